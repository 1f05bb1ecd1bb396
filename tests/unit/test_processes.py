"""Process identity: a pid names a process only together with its start time."""

from __future__ import annotations

import subprocess
import sys

from corral.processes import Owner, start_time


def test_this_process_is_alive_and_a_recycled_pid_is_not() -> None:
    me = Owner.me()
    assert me.alive()
    assert not Owner(me.pid, me.start + 1).alive()  # the same pid, another process


def test_a_process_that_exited_is_not_alive() -> None:
    child = subprocess.Popen([sys.executable, "-c", "input()"], stdin=subprocess.PIPE)
    owner = Owner(child.pid, start_time(child.pid))
    assert owner.alive()
    assert child.stdin is not None
    child.stdin.close()
    child.wait()
    assert not owner.alive()
