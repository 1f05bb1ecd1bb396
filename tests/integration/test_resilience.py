"""Nothing leaks and nothing stored is lost: full disks, killed sandboxes, killed Corrals."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.config import Settings
from corral.context import Corral
from corral.errors import DiskFull, NothingToFreeze
from corral.sandbox.network import NETNS_DIR
from corral.sandbox.slots import Record
from corral.snapshots import overlay
from tests.integration.conftest import run, runc_runtime

pytestmark = [pytest.mark.root, pytest.mark.runc]


def leftovers(corral: Corral, record: Record) -> list[str]:
    """Every resource of ``record`` that still exists on the host."""
    found = []
    if overlay.mounted_under(Path(record.bundle)):
        found.append("mount")
    if Path(record.bundle).exists():
        found.append("bundle")
    if (NETNS_DIR / record.netns).exists():
        found.append("netns")
    if (Path(record.runc_root) / record.container).exists():
        found.append("runc state")
    if Path(f"/sys/class/net/{'cr'}{record.slot:x}").exists():
        found.append("veth")
    for ctl in ("memory", "pids", "cpu"):
        if Path(f"/sys/fs/cgroup/{ctl}/corral/{record.container}").exists():
            found.append(f"{ctl} cgroup")
    if (corral.settings.run_dir / "slots" / str(record.slot)).exists():
        found.append("slot")
    return found


def wait_for_record(corral: Corral, owner_pid: int, known: set[str], timeout: float = 20) -> Record:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in runc_runtime(corral).slots.records():
            fresh = record.owner.pid == owner_pid and record.sandbox_id not in known
            if fresh and _running(record):
                return record
        time.sleep(0.05)
    raise AssertionError(f"no running sandbox owned by pid {owner_pid} appeared")


def _running(record: Record) -> bool:
    """The container's command has started (not merely created)."""
    state = subprocess.run(
        ["runc", "--root", record.runc_root, "state", record.container],
        capture_output=True,
        text=True,
        check=False,
    )
    return state.returncode == 0 and json.loads(state.stdout)["status"] == "running"


def test_corral_killed_mid_run_is_reaped_by_the_next_start(corral: Corral, env: str) -> None:
    environ = {**os.environ, "CORRAL_DATA_DIR": str(corral.settings.data_dir)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral.cli", "sandbox", "run", env, "--", "sleep", "60"],
        env=environ,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        record = wait_for_record(corral, proc.pid, set())
    finally:
        proc.kill()
        proc.wait()
    # The owner is gone; its sandbox is not (runc keeps the container alive without it).
    assert "runc state" in leftovers(corral, record) and "netns" in leftovers(corral, record)
    out = subprocess.run(
        [sys.executable, "-m", "corral.cli", "sandbox", "reap", "--json"],
        env=environ,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout)["reaped"] >= 1
    assert leftovers(corral, record) == []


def test_sandbox_killed_mid_run_is_torn_down(corral: Corral, env: str) -> None:
    known = {r.sandbox_id for r in runc_runtime(corral).slots.records()}
    results: list[tuple[int, str, str]] = []
    t = threading.Thread(target=lambda: results.append(run(corral, env, "sleep", "60")))
    t.start()
    record = wait_for_record(corral, os.getpid(), known)
    subprocess.run(
        ["runc", "--root", record.runc_root, "kill", record.container, "KILL"], check=True
    )
    t.join(timeout=30)
    assert results and results[0][0] == 128 + 9
    assert leftovers(corral, record) == []


def test_timeout_kills_and_tears_down(corral: Corral, env: str) -> None:
    start = time.monotonic()
    result = corral.envs.run(env, ("sleep", "60"), timeout=1.0, stdin=subprocess.DEVNULL)
    assert result.timed_out and time.monotonic() - start < 15
    assert not any(r.sandbox_id == result.sandbox_id for r in runc_runtime(corral).slots.records())


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 600 MiB tmpfs: room for the base image and its unpacked layer, and little else."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_during_freeze_keeps_the_previous_snapshot(small_disk: Path) -> None:
    settings = Settings.from_env({**os.environ, "CORRAL_DATA_DIR": str(small_disk)})
    corral = Corral(settings)
    try:
        envs = corral.envs
        envs.create("full")
        assert run(corral, "full", "sh", "-c", "echo kept > /home/user/kept", edit=True)[0] == 0
        good = envs.freeze("full")
        st = os.statvfs(small_disk)
        big = int(st.f_bavail * st.f_frsize * 0.6)
        code, _, err = run(
            corral, "full", "sh", "-c", f"head -c {big} /dev/urandom > /home/user/big", edit=True
        )
        assert code == 0, err

        with pytest.raises(DiskFull, match="no space left"):
            envs.freeze("full")

        assert envs.history("full")[0].digest == good.digest
        assert envs.get("full").head == good.digest
        assert envs.verify("full").snapshots == 2
        assert not [
            p for p in os.listdir(settings.oci_dir / "blobs/sha256") if p.startswith(".tmp")
        ]
        assert run(corral, "full", "cat", "/home/user/kept")[:2] == (0, "kept\n")
        assert envs.has_draft("full")  # the user's unfrozen work is still there
        envs.discard("full")
        with pytest.raises(NothingToFreeze):
            envs.freeze("full")
    finally:
        corral.close()


def test_a_run_cannot_fill_the_host_disk(corral: Corral, env: str) -> None:
    small = dataclasses.replace(
        corral.settings, limits=dataclasses.replace(corral.settings.limits, scratch_bytes=64 << 20)
    )
    capped = Corral(small)
    try:
        _, out, err = run(
            capped,
            env,
            "sh",
            "-c",
            "head -c 100000000 /dev/zero > /tmp/fill; echo $?; du -m /tmp/fill",
        )
    finally:
        capped.close()
    assert "No space left on device" in err
    assert int(out.split()[-2]) <= 64  # MB written before the cap stopped it
