"""What the fault tests share: ``corral`` processes to kill, and the exactly-once check.

``CorralProcess`` starts a real ``corral`` command (``python -m corral.cli ...``) on the same
data directory, database and run directory as a test's ``Corral``; with ``point`` it runs it
under ``tests/integration/killpoint.py``, which SIGKILLs it at that point. Its output goes to
a log file that a failing assertion shows.

``assert_ended_once`` is what "every run ends exactly once" means, checked on the store: one
terminal status, finished at a recorded time, exactly one ``run.finished`` event and it
agrees with that status, no ledger source twice and every usage event billed (an ad-hoc
``corral run`` too: it goes through the same pipeline).
"""

from __future__ import annotations

import errno
import json
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from corral.config import Settings
from corral.states import RunStatus
from corral.store import Run, Store
from tests.integration.leftovers import environ_for

T = TypeVar("T")


class CorralProcess:
    def __init__(
        self,
        settings: Settings,
        *args: str,
        log: Path,
        point: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.log = log
        self.mark = log.with_suffix(".killed")
        head = [sys.executable, "-m", "corral.cli"]
        if point is not None:
            killpoint = "tests.integration.killpoint"
            head = [sys.executable, "-m", killpoint, point, str(self.mark), "--"]
        self._out = open(log, "ab")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [*head, *args],
            env=environ_for(settings, **(env or {})),
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def killed_at_point(self) -> bool:
        """The process reached its kill point and died of it."""
        return self.proc.poll() == -signal.SIGKILL and self.mark.exists()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.wait()

    def stop(self) -> int:
        """Ask it to stop as an operator would (Ctrl-C), then wait; kill it if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.wait(60)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"corral did not stop on SIGINT:\n{self.output()}") from None

    def wait(self, timeout: float | None = None) -> int:
        code = self.proc.wait(timeout)
        self._out.close()
        return code


def wait_for(check: Callable[[], T | None], within: float, what: str) -> T:
    """Poll ``check`` until it returns something other than None (or False)."""
    deadline = time.monotonic() + within
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, f"{what}: not within {within} s"
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_bridge_port(settings: Settings) -> int:
    """A bridge port no process serves on this host. Bridges share a port (SO_REUSEPORT) and
    the kernel spreads connections over them: a bridge of another test's Corral, on another
    store, would refuse our sandboxes' tokens."""
    gateway = str(settings.network.gateway)
    for port in random.sample(range(8800, 8880), 80):
        with socket.socket() as s:
            try:
                s.bind((gateway, port))  # without SO_REUSEPORT: fails if any bridge listens
            except OSError as exc:
                if exc.errno == errno.EADDRNOTAVAIL:  # no sandbox network yet: no bridge either
                    return port
                continue
            return port
    raise AssertionError("every bridge port 8800-8879 is taken")


def kinds(store: Store, run_id: str) -> list[str]:
    return [e.kind for e in store.runs.events(run_id)]


def assert_ended_once(store: Store, run_id: str) -> Run:
    """The run ended, once: see the module docstring."""
    run = store.runs.get(run_id)
    assert RunStatus(run.status).terminal, f"{run_id} is still {run.status}"
    assert run.finished_at is not None, f"{run_id} is {run.status} without a finish time"
    finished = [e for e in store.runs.events(run_id) if e.kind == "run.finished"]
    assert len(finished) == 1, (
        f"{run_id} has {len(finished)} run.finished events: {kinds(store, run_id)}"
    )
    assert json.loads(finished[0].data)["status"] == run.status, (finished[0].data, run.status)
    sources = [e.source for e in store.ledger.entries(run=run_id)]
    assert len(sources) == len(set(sources)), f"{run_id} was billed twice for one usage"
    unbilled = {f"usage:{u.id}" for u in store.usage.events(run_id)} - set(sources)
    assert not unbilled, f"{run_id} has usage never billed: {sorted(unbilled)}"
    return run


def until_ended(store: Store, run_id: str, within: float) -> Run:
    def ended() -> Run | None:
        run = store.runs.get(run_id)
        return run if RunStatus(run.status).terminal else None

    return wait_for(ended, within, f"run {run_id} to end")
