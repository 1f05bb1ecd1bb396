"""A freeze killed at every step, and a data disk that fills up under a freeze or a run.

The freeze's order (ARCHITECTURE.md): write blobs, move the head in the database, tag, clear
the draft. A real ``corral env freeze`` is SIGKILLed at each step (once by the clock, on a
draft large enough to be caught writing its layer; at the others through
``tests/integration/killpoint.py``). Whatever the step, the head is the old snapshot or the new
one, every snapshot verifies and boots, and the next freeze works and leaves every tag right.

The full disk is a small tmpfs holding the data directory, so filling it touches nothing else.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.config import Settings
from corral.context import Corral
from corral.errors import DiskFull
from corral.snapshots.fsattr import unlock_everything
from corral.snapshots.layout import Layout
from tests.integration.conftest import run
from tests.integration.faults import (
    CorralProcess,
    assert_ended_once,
    free_bridge_port,
    kinds,
    wait_for,
)
from tests.integration.leftovers import Leftovers, environ_for
from tests.integration.test_http_trigger import agent_environment
from tests.integration.test_resilience import small_disk

pytestmark = [pytest.mark.root, pytest.mark.runc]
__all__ = ["small_disk"]  # a fixture: a 600 MiB tmpfs


def corral_cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "corral.cli", *args],
        env=environ_for(settings),
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_whole(corral: Corral, env: str) -> None:
    """Every snapshot verifies, and the OCI layout's tags say what the database says: the
    environment's tag is its head, ``<env>+<seq>`` each snapshot."""
    history = corral.envs.history(env)
    assert corral.envs.verify(env).snapshots == len(history)
    layout = Layout(corral.settings.oci_dir)
    assert layout.resolve(env).digest == corral.envs.get(env).head
    for snap in history:
        assert layout.resolve(f"{env}+{snap.seq}").digest == snap.digest, snap.seq


def edit(corral: Corral, env: str, script: str) -> None:
    code, _, err = run(corral, env, "sh", "-c", script, edit=True)
    assert code == 0, err


def seen(corral: Corral, env: str) -> str:
    code, out, err = run(corral, env, "sh", "-c", "cat /home/user/marker*; true")
    assert code == 0, err
    return out


# -- a freeze killed ---------------------------------------------------------------------

# Where `corral env freeze` dies, in the order the freeze goes; None: by the clock, while the
# layer's temporary blob grows.
FREEZE_DEATHS = {
    "writing the layer": None,
    "layer written": "corral.snapshots.layout:Layout._write_blob",
    "blobs written": "corral.envs.service:Environments._try_unpack@before",
    "unpacking": "corral.snapshots.images:unpack_layer",
    "head moved": "corral.store.environments:Environments.add_snapshot",
    "tagged": "corral.envs.service:Environments._tag",
}
HEAD_MOVED = ("head moved", "tagged")


BIG = "head -c 200M /dev/zero > /home/user/big; "  # a layer that takes a while to write


def kill_while_writing(freeze: CorralProcess, blobs: Path, before: set[Path]) -> None:
    """SIGKILL the freeze once its layer's temporary blob (not in ``before``) holds a few MiB."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert freeze.proc.poll() is None, f"the freeze ended first:\n{freeze.output()}"
        for p in set(blobs.glob(".tmp-*")) - before:
            with contextlib.suppress(FileNotFoundError):
                if p.stat().st_size > 4 << 20:
                    freeze.kill()
                    return
        time.sleep(0.002)
    raise AssertionError("the layer's temporary blob did not grow within 60 s")


@pytest.mark.parametrize("death", FREEZE_DEATHS)
def test_a_killed_freeze_leaves_a_whole_environment(
    corral: Corral, env: str, tmp_path: Path, death: str
) -> None:
    edit(corral, env, "echo old > /home/user/marker")
    old = corral.envs.freeze(env)
    big = BIG if death == "writing the layer" else ""
    edit(corral, env, f"{big}echo new > /home/user/marker")
    leaks = Leftovers(corral.settings)

    point = FREEZE_DEATHS[death]
    blobs = corral.settings.oci_dir / "blobs" / "sha256"
    temporaries = set(blobs.glob(".tmp-*"))
    freeze = CorralProcess(
        corral.settings, "env", "freeze", env, log=tmp_path / "freeze.log", point=point
    )
    if point is None:
        kill_while_writing(freeze, blobs, temporaries)
    else:
        freeze.wait(120)
        assert freeze.killed_at_point(), freeze.output()

    head = corral.envs.get(env).head
    history = corral.envs.history(env)
    if death in HEAD_MOVED:
        assert head != old.digest and history[0].digest == head and history[1] == old
        assert seen(corral, env) == "new\n"
    else:
        assert head == old.digest and history[0] == old
        assert seen(corral, env) == "old\n"
    verified = corral_cli(corral.settings, "env", "verify", env, "--json")
    assert verified.returncode == 0 and json.loads(verified.stdout)["ok"], verified.stderr

    edit(corral, env, "rm -f /home/user/big; echo next > /home/user/marker2")
    nxt = corral_cli(corral.settings, "env", "freeze", env)
    assert nxt.returncode == 0, nxt.stderr
    assert corral.envs.get(env).head == nxt.stdout.strip()
    assert seen(corral, env) == "new\nnext\n"
    assert_whole(corral, env)
    leaks.assert_none()


def test_a_freeze_killed_writing_its_layer_leaves_no_temporary_blob(
    corral: Corral, env: str, tmp_path: Path
) -> None:
    edit(corral, env, f"{BIG}echo new > /home/user/marker")
    leaks = Leftovers(corral.settings)
    blobs = corral.settings.oci_dir / "blobs" / "sha256"
    temporaries = set(blobs.glob(".tmp-*"))
    freeze = CorralProcess(corral.settings, "env", "freeze", env, log=tmp_path / "freeze.log")
    kill_while_writing(freeze, blobs, temporaries)
    nxt = corral_cli(corral.settings, "env", "freeze", env)  # the next command that writes
    assert nxt.returncode == 0, nxt.stderr
    leaks.assert_none()


# -- the disk fills up -------------------------------------------------------------------


def fill(disk: Path, leave: int = 0) -> Path:
    """A file taking all of ``disk``'s free space but ``leave`` bytes; remove it to free them."""
    filler = disk / f"filler-{secrets.token_hex(4)}"
    with open(filler, "wb") as f:
        chunk = b"\0" * (1 << 20)
        try:
            while True:
                st = os.statvfs(disk)
                room = st.f_bavail * st.f_frsize - leave
                if room <= 0:
                    break
                f.write(chunk[: min(len(chunk), room)])
                f.flush()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return filler


@pytest.fixture
def small(small_disk: Path, tmp_path: Path) -> Iterator[Corral]:
    """A Corral whose data directory is the small disk; its database lives elsewhere, so that
    a full data disk still lets it record what happened."""
    (tmp_path / "db").mkdir()
    environ = {
        **os.environ,
        "CORRAL_DATA_DIR": str(small_disk),
        "CORRAL_DATABASE_URL": f"sqlite:///{tmp_path / 'db' / 'corral.db'}",
    }
    port = free_bridge_port(Settings.from_env(environ))
    corral = Corral(Settings.from_env({**environ, "CORRAL_BRIDGE_PORT": str(port)}))
    try:
        yield corral
    finally:
        corral.close()


def test_a_freeze_on_a_full_disk_fails_clearly_and_works_once_space_is_freed(
    small: Corral,
) -> None:
    envs = small.envs
    envs.create("full")
    edit(small, "full", "echo old > /home/user/marker")
    good = envs.freeze("full")
    edit(small, "full", "head -c 20M /dev/urandom > /home/user/big; echo new > /home/user/marker")
    leaks = Leftovers(small.settings)
    filler = fill(small.settings.data_dir, leave=4 << 20)

    failed = corral_cli(small.settings, "env", "freeze", "full", "--json")
    assert failed.returncode != 0
    assert json.loads(failed.stderr)["error"] == DiskFull.code, failed.stderr
    assert envs.get("full").head == good.digest and envs.history("full")[0] == good
    assert seen(small, "full") == "old\n" and envs.has_draft("full")
    leaks.assert_none()

    filler.unlink()
    frozen = corral_cli(small.settings, "env", "freeze", "full")
    assert frozen.returncode == 0, frozen.stderr
    assert seen(small, "full") == "new\n"
    assert_whole(small, "full")
    leaks.assert_none()


@pytest.mark.parametrize("cache", ["layers unpacked", "top layer not unpacked yet"])
def test_a_run_on_a_full_disk_fails_clearly_and_works_once_space_is_freed(
    small: Corral, cache: str
) -> None:
    env = agent_environment(small)
    args = ("run", env, "agent.py:greet", "--input", '{"who": "ada"}', "--json")
    warm = corral_cli(small.settings, *args)  # publishes the runner and folds it in
    assert warm.returncode == 0, warm.stderr
    if cache == "top layer not unpacked yet":  # as after a freeze that deferred its unpack
        top = small.envs.images.load(small.envs.get(env).head).layers[-1]
        unpacked = small.settings.data_dir / "layers" / top.digest.removeprefix("sha256:")
        unlock_everything(unpacked)
        shutil.rmtree(unpacked)
    leaks = Leftovers(small.settings)
    filler = fill(small.settings.data_dir)

    failed = corral_cli(small.settings, *args)
    assert failed.returncode != 0
    latest = small.store.runs.for_environment(env)[0]
    assert (latest.status, latest.error_code) == ("failed", DiskFull.code), latest.error
    assert str(small.settings.data_dir) in (latest.error or "")
    assert_ended_once(small.store, latest.id)
    leaks.assert_none()

    filler.unlink()
    again = corral_cli(small.settings, *args)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["result"]["greeting"] == "hello ada"
    leaks.assert_none()


def test_a_disk_that_fills_during_a_run_costs_only_the_fold_in(
    small: Corral, tmp_path: Path
) -> None:
    env = agent_environment(small)  # never run: its first run swaps the runner in
    head = small.envs.get(env).head
    leaks = Leftovers(small.settings)
    args = ("run", env, "agent.py:sleepy", "--input", '{"seconds": 2}', "--json")
    running = CorralProcess(small.settings, *args, log=tmp_path / "run.log")
    wait_for(
        lambda: (
            (r := small.store.runs.for_environment(env))
            and "runner.started" in kinds(small.store, r[0].id)
        ),
        60,
        "the agent to start",
    )
    filler = fill(small.settings.data_dir)
    assert running.wait(120) == 0, running.output()

    ran = small.store.runs.for_environment(env)[0]
    assert (ran.status, ran.swapped, ran.folded_snapshot) == ("succeeded", True, None)
    skipped = [
        json.loads(e.data) for e in small.store.runs.events(ran.id) if e.kind == "fold_in.skipped"
    ]
    assert len(skipped) == 1 and "space" in skipped[0]["reason"], kinds(small.store, ran.id)
    assert small.envs.get(env).head == head
    assert_ended_once(small.store, ran.id)
    leaks.assert_none()

    filler.unlink()
    again = corral_cli(
        small.settings, "run", env, "agent.py:greet", "--input", '{"who": "bo"}', "--json"
    )
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["folded_snapshot"] == small.envs.get(env).head != head
    assert_whole(small, env)
    leaks.assert_none()
