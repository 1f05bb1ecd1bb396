"""The shipped test double of the sandbox runtime keeps the protocol's promises (bootstrap
first, channels, kill, wait, close, reap), so that what runs on it behaves as on runc."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from corral.errors import CommandNotFound, InvalidInput, RequirementMissing, SessionEnded
from corral.processes import Owner
from corral.sandbox.runtime import SandboxRequest
from corral.sandbox.testing import UnsandboxedRuntime

ENV = (("PATH", "/usr/bin:/bin"), ("HOME", "/home/user"))


@pytest.fixture
def runtime(tmp_path: Path) -> UnsandboxedRuntime:
    runtime = UnsandboxedRuntime(tmp_path / "sandboxes")
    assert runtime.prepare() == 0
    return runtime


@pytest.fixture
def layers(tmp_path: Path) -> tuple[Path, ...]:
    """Two layers, topmost first: the top one replaces a file and adds one."""
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    for layer in (lower, upper):
        (layer / "home/user").mkdir(parents=True)
    (lower / "tmp").mkdir()
    (lower / "home/user/notes.txt").write_text("old")
    (lower / "home/user/kept.txt").write_text("kept")
    (upper / "home/user/notes.txt").write_text("new")
    (upper / "home/user/link").symlink_to("notes.txt")
    return (upper, lower)


def soon() -> float:
    return time.monotonic() + 30


def test_started_sandbox_runs_the_bootstrap_on_the_merged_layers(
    runtime: UnsandboxedRuntime, layers: tuple[Path, ...]
) -> None:
    with runtime.start(SandboxRequest(layers, env=ENV, label="t")) as sandbox:
        ready, _ = sandbox.expect(("boot.ready",), soon())
        assert ready["python"] == list(sys.version_info[:3])
        home = sandbox.rootfs / "home/user"
        assert (home / "notes.txt").read_text() == "new"  # the topmost layer wins
        assert (home / "kept.txt").read_text() == "kept"
        assert os.readlink(home / "link") == "notes.txt"
        assert sandbox.inside("/home/user") == str(home)
        assert sandbox.address == "127.0.0.1" and not sandbox.exited()
        where = sandbox.rootfs.parent
    assert not where.exists()  # closed: nothing left


def test_the_bootstrap_answers_commands_until_killed(
    runtime: UnsandboxedRuntime, layers: tuple[Path, ...]
) -> None:
    with runtime.start(SandboxRequest(layers, env=ENV)) as sandbox:
        sandbox.expect(("boot.ready",), soon())
        where = sandbox.inside("/tmp")
        sandbox.send({"op": "validate", "path": where, "package": "p", "requires": [99, 0]})
        sandbox.send({"op": "validate", "path": where, "package": "p", "requires": [3, 0]})
        first, _ = sandbox.expect(("boot.invalid",), soon())
        second, _ = sandbox.expect(("boot.invalid",), soon())
        assert first["error"].startswith("the release needs Python >= 99.0")
        assert second["error"] == f"no package p in {where}"
        sandbox.kill()
        ended = sandbox.wait(timeout=30)
        assert (ended.code, ended.timed_out) == (128 + 9, False)
        assert sandbox.exited()
        with pytest.raises(SessionEnded):
            while True:
                sandbox.next(soon())


def test_wait_past_its_timeout_kills_it(
    runtime: UnsandboxedRuntime, layers: tuple[Path, ...]
) -> None:
    with runtime.start(SandboxRequest(layers, env=ENV)) as sandbox:
        ended = sandbox.wait(timeout=0.2)  # the bootstrap waits for commands forever
        assert ended.timed_out and ended.code == 128 + 9


def test_the_rest_of_its_process_group_dies_with_the_first_process(
    runtime: UnsandboxedRuntime, layers: tuple[Path, ...], tmp_path: Path
) -> None:
    """As a pid namespace dies with its init: nothing a sandbox started outlives it."""
    pidfile = tmp_path / "child.pid"
    script = f"sleep 60 & echo $! > {pidfile}; exit 3"
    result = runtime.run(SandboxRequest(layers, argv=("sh", "-c", script), env=ENV))
    assert result.exit_code == 3 and not result.timed_out
    child = int(pidfile.read_text())
    for _ in range(500):  # SIGKILLed before run() returned; dead once the kernel has done it
        if not running(child):
            break
        time.sleep(0.01)
    assert not running(child)


def running(pid: int) -> bool:
    """Alive and not a zombie (a killed orphan stays one until init reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_run_gives_the_command_the_callers_stdio_in_the_root(
    runtime: UnsandboxedRuntime, layers: tuple[Path, ...], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    with open(out, "wb") as stdout:
        result = runtime.run(
            SandboxRequest(layers, argv=("sh", "-c", "cat notes.txt; echo; echo $HOME"), env=ENV),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
        )
    text = out.read_text().splitlines()
    assert result.exit_code == 0 and text[0] == "new"
    assert text[1].endswith(f"/{result.sandbox_id}/root/home/user")
    assert list(runtime.directory.iterdir()) == []  # torn down


def test_run_times_out_and_a_missing_command_is_named(
    runtime: UnsandboxedRuntime, layers: tuple[Path, ...]
) -> None:
    slow = runtime.run(SandboxRequest(layers, argv=("sleep", "60"), env=ENV, timeout=0.2))
    assert slow.timed_out and slow.exit_code == 128 + 9
    with pytest.raises(CommandNotFound, match="'no-such-command' is not found in environment 'e'"):
        runtime.run(SandboxRequest(layers, argv=("no-such-command",), env=ENV, label="e"))
    assert list(runtime.directory.iterdir()) == []


def test_requests_it_cannot_honour_are_refused_by_name(
    runtime: UnsandboxedRuntime, layers: tuple[Path, ...], tmp_path: Path
) -> None:
    with pytest.raises(InvalidInput, match="give no argv"):
        runtime.start(SandboxRequest(layers, argv=("sh",)))
    with pytest.raises(InvalidInput, match="give no timeout"):
        runtime.start(SandboxRequest(layers, timeout=5))
    draft = SandboxRequest(
        layers, argv=("true",), upper=tmp_path / "u", work=tmp_path / "w", env=ENV
    )
    with pytest.raises(RequirementMissing, match="edit sessions"):
        runtime.run(draft)


def test_reap_clears_what_a_dead_owner_left_and_nothing_else(
    runtime: UnsandboxedRuntime, layers: tuple[Path, ...]
) -> None:
    gone = subprocess.Popen(["sleep", "60"])
    dead_owner = Owner.of(gone.pid)
    gone.kill()
    gone.wait()
    orphan = runtime.start(SandboxRequest(layers, env=ENV))
    kept = runtime.start(SandboxRequest(layers, env=ENV))
    try:
        record = orphan.rootfs.parent / "record.json"
        data = json.loads(record.read_text())
        record.write_text(json.dumps({**data, "owner": asdict(dead_owner)}))
        assert runtime.reap() == 1
        assert not orphan.rootfs.exists()
        assert orphan.wait(timeout=30).code == 128 + 9  # its bootstrap was killed
        assert kept.rootfs.exists() and not kept.exited()
    finally:
        orphan.close()
        kept.close()
    assert runtime.reap() == 0
