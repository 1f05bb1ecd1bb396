"""Drafts have a limit: an edit session cannot fill the data disk every environment needs.

A Corral with a 32 MB draft limit shares the session's data directory; its edit sessions
run in real sandboxes, with their drafts on real loop-mounted ext4 images.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from corral.api.app import create_app
from corral.context import Corral
from corral.errors import DraftFull, NothingToFreeze
from corral.snapshots import overlay
from tests.hosts import serving
from tests.integration.conftest import run

pytestmark = [pytest.mark.root, pytest.mark.runc]

LIMIT_MB = 32
FILL = "head -c 100000000 /dev/zero > /home/user/big"  # 100 MB: three times the limit


@pytest.fixture(scope="module")
def capped(corral: Corral) -> Iterator[Corral]:
    made = Corral(dataclasses.replace(corral.settings, draft_limit_bytes=LIMIT_MB << 20))
    yield made
    made.close()


@pytest.fixture
def new_env(capped: Corral) -> Iterator[str]:
    name = f"t-{secrets.token_hex(4)}"
    capped.envs.create(name)
    yield name
    capped.envs.delete(name)


def allocated(path: Path) -> int:
    """Bytes the file takes on the data disk (a sparse file takes what it holds)."""
    return os.stat(path).st_blocks * 512


def test_an_edit_session_cannot_write_past_the_draft_limit(
    capped: Corral, new_env: str, env: str
) -> None:
    envs = capped.envs
    image = capped.settings.data_dir / "envs" / new_env / "draft.img"

    _, out, err = run(
        capped, new_env, "sh", "-c", f"{FILL}; echo $?; du -m /home/user/big", edit=True
    )

    assert "No space left on device" in err  # the write failed in the sandbox, as it was made
    assert out.split()[0] == "1" and int(out.split()[1]) <= LIMIT_MB
    assert allocated(image) <= (LIMIT_MB + 1) << 20  # all the data disk gave it
    usage = envs.draft_usage(new_env)
    assert usage is not None and usage.full and usage.limit_bytes == LIMIT_MB << 20
    assert f"{LIMIT_MB}.0 MB limit (CORRAL_DRAFT_LIMIT_MB)" in (usage.notice or "")
    assert f"draft of environment {new_env!r} is full" in (usage.notice or "")

    # Another environment's draft is its own: room to write, nothing of the full one in it.
    other = capped.envs.exec(
        env, ("sh", "-c", "head -c 10000000 /dev/zero > /home/user/ten"), stdin=subprocess.DEVNULL
    )
    assert other.exit_code == 0 and other.draft is not None and not other.draft.full
    assert run(capped, env, "test", "-e", "/home/user/big", edit=True)[0] == 1

    # A full draft still freezes; then a fresh draft begins with the whole limit free.
    frozen = envs.freeze(new_env, "what fitted")
    assert envs.history(new_env)[0].digest == frozen.digest
    assert envs.draft_usage(new_env) is None and not image.exists()
    assert run(capped, new_env, "sh", "-c", "du -m /home/user/big")[0] == 0  # in the snapshot
    again = envs.exec(
        new_env,
        ("sh", "-c", "head -c 10000000 /dev/zero > /home/user/more"),
        stdin=subprocess.DEVNULL,
    )
    assert again.exit_code == 0 and again.draft is not None and not again.draft.full


def test_a_full_draft_can_be_discarded_and_removed(capped: Corral) -> None:
    envs = capped.envs
    name = f"t-{secrets.token_hex(4)}"
    envs.create(name)
    draft = capped.settings.data_dir / "envs" / name / "draft"
    assert run(capped, name, "sh", "-c", FILL, edit=True)[0] != 0
    envs.discard(name)
    assert not envs.has_draft(name) and not overlay.mounted_under(draft)
    with pytest.raises(NothingToFreeze):
        envs.freeze(name)

    assert run(capped, name, "sh", "-c", FILL, edit=True)[0] != 0
    assert overlay.mounted_under(draft) == [draft]
    envs.delete(name)
    assert not overlay.mounted_under(draft) and not draft.parent.exists()


def test_the_cli_and_the_api_say_the_draft_is_full_and_what_its_limit_is(
    capped: Corral, new_env: str
) -> None:
    environ = {
        **os.environ,
        "CORRAL_DATA_DIR": str(capped.settings.data_dir),
        "CORRAL_DRAFT_LIMIT_MB": str(LIMIT_MB),
    }
    cli = [sys.executable, "-m", "corral.cli", "env", "exec"]
    command = [new_env, "--", "sh", "-c", FILL]
    shown = subprocess.run(cli + command, env=environ, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 1  # the command's own exit status
    assert "No space left on device" in shown.stderr
    assert f"corral: the draft of environment '{new_env}' is full" in shown.stderr
    assert f"of its {LIMIT_MB}.0 MB limit (CORRAL_DRAFT_LIMIT_MB)" in shown.stderr

    as_json = subprocess.run(
        [*cli, "--json", *command], env=environ, capture_output=True, text=True, timeout=120
    )
    draft = json.loads(as_json.stdout)["draft"]
    assert draft["full"] and draft["limit_bytes"] == LIMIT_MB << 20

    with serving(create_app(capped)) as url, httpx.Client(base_url=url, timeout=120) as client:
        answer = client.post(f"/v1/envs/{new_env}/exec", json={"argv": ["sh", "-c", FILL]})
        shown_env = client.get(f"/v1/envs/{new_env}")
    assert answer.status_code == 200 and answer.json()["exit_code"] == 1
    draft = answer.json()["draft"]
    assert draft["full"] and draft["limit_bytes"] == LIMIT_MB << 20
    assert f"{LIMIT_MB}.0 MB limit (CORRAL_DRAFT_LIMIT_MB)" in draft["notice"]
    assert shown_env.json()["draft"]["full"] and shown_env.json()["draft_changed"]


def test_a_draft_from_before_the_limit_is_kept(capped: Corral, new_env: str) -> None:
    """An older Corral kept drafts as plain directories: the next session carries it over,
    whiteouts and opaque directories included."""
    envs = capped.envs
    upper = capped.settings.data_dir / "envs" / new_env / "draft" / "upper"
    (upper / "home" / "user").mkdir(parents=True)
    (upper / "home" / "user" / "kept.txt").write_text("from before\n")
    os.chown(upper / "home" / "user" / "kept.txt", 1000, 1000)
    (upper / "etc").mkdir()
    os.mknod(upper / "etc" / "debian_version", 0o600 | stat.S_IFCHR, os.makedev(0, 0))  # deleted
    (upper / "opt").mkdir()
    (upper / "opt" / "only").write_text("")
    os.setxattr(upper / "opt", "trusted.overlay.opaque", b"y")  # /opt replaced by this one
    assert envs.has_draft(new_env)

    code, out, err = run(
        capped,
        new_env,
        "sh",
        "-c",
        "cat /home/user/kept.txt; stat -c %u /home/user/kept.txt; ls /opt;"
        " test -e /etc/debian_version",
        edit=True,
    )
    assert out.splitlines() == ["from before", "1000", "only"] and code == 1, err
    usage = envs.draft_usage(new_env)
    assert usage is not None and usage.limit_bytes == LIMIT_MB << 20

    # One too large for the limit is refused, named, and left as it was.
    envs.discard(new_env)
    (upper / "home").mkdir(parents=True)
    with open(upper / "home" / "huge", "wb") as f:
        f.write(os.urandom(1 << 20) * (LIMIT_MB + 8))
    with pytest.raises(DraftFull, match=f"at most {LIMIT_MB} MB"):
        run(capped, new_env, "true", edit=True)
    assert (upper / "home" / "huge").stat().st_size == (LIMIT_MB + 8) << 20
    assert not (upper.parent.parent / "draft.img").exists()
