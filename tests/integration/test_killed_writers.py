"""A process killed mid-write leaves no temporary behind past the next command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from corral.context import Corral
from corral.snapshots import temporaries
from corral.snapshots.layout import Layout
from tests.integration.conftest import run

pytestmark = [pytest.mark.root, pytest.mark.runc]


def temporaries_in(corral: Corral) -> list[str]:
    places = (
        corral.settings.oci_dir,
        corral.settings.oci_dir / "blobs" / "sha256",
        corral.settings.data_dir / "layers",
        corral.settings.data_dir,
    )
    return [
        f"{d.name}/{p}"
        for d in places
        if d.is_dir()
        for p in os.listdir(d)
        if p.startswith((".tmp", ".unpack", ".platform", ".import"))
    ]


def test_a_freeze_killed_mid_write_leaves_nothing_after_the_next_command(
    corral: Corral, env: str
) -> None:
    # Enough to freeze that the blob is still being written when the freeze is killed.
    code, _, err = run(
        corral, env, "sh", "-c", "head -c 300000000 /dev/urandom > /home/user/big", edit=True
    )
    assert code == 0, err
    environ = {**os.environ, "CORRAL_DATA_DIR": str(corral.settings.data_dir)}
    freeze = subprocess.Popen(
        [sys.executable, "-m", "corral.cli", "env", "freeze", env],
        env=environ,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not temporaries_in(corral):
            assert freeze.poll() is None, "the freeze ended before it wrote anything"
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        freeze.send_signal(signal.SIGKILL)
        freeze.wait()
    assert temporaries_in(corral)  # what the killed freeze left

    listed = subprocess.run(
        [sys.executable, "-m", "corral.cli", "env", "list"],
        env=environ,
        capture_output=True,
        text=True,
    )
    assert listed.returncode == 0, listed.stderr
    assert temporaries_in(corral) == []
    snap = corral.envs.freeze(env)  # the draft is intact: the freeze can be done again
    assert corral.envs.get(env).head == snap.digest


def test_the_sweep_keeps_what_a_live_writer_is_writing(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "oci").init()
    fd, mine = tempfile.mkstemp(prefix=temporaries.prefix("tmp"), dir=layout.blobs)
    os.close(fd)
    dead = subprocess.run(
        [
            sys.executable,
            "-c",
            "from corral.snapshots import temporaries;print(temporaries.prefix('tmp'))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (layout.blobs / f"{dead}abc").write_bytes(b"half a blob")
    Layout(tmp_path / "oci").init()
    assert os.listdir(layout.blobs) == [Path(mine).name]
