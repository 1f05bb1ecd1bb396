"""The issue's user session, driven through the ``corral`` command as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import need_sandboxes
from tests.integration.test_environments import _wheel

pytestmark = [pytest.mark.root, pytest.mark.runc]


@pytest.fixture
def corral_cli(tmp_path: Path) -> Any:
    need_sandboxes()
    environ = {**os.environ, "CORRAL_DATA_DIR": str(tmp_path / "data")}

    def cli(
        *args: str, stdin: Any = subprocess.DEVNULL, ok: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "corral.cli", *args], env=environ,
                              stdin=stdin, capture_output=True, text=True, timeout=120)  # fmt: skip
        if ok:
            assert proc.returncode == 0, proc.stderr
        return proc

    return cli


def test_the_analyst_session(corral_cli: Any, tmp_path: Path) -> None:
    created = json.loads(corral_cli("env", "create", "analyst", "--json").stdout)
    assert created["name"] == "analyst" and created["head"].startswith("sha256:")

    wheel = _wheel(tmp_path)  # stands in for `pip install matplotlib`: same pip, no internet
    with open(wheel, "rb") as f:
        install = f"cat > /tmp/{wheel.name} && pip install -q --no-index /tmp/{wheel.name}"
        corral_cli("env", "exec", "analyst", "--", "sh", "-c", install, stdin=f)
    corral_cli("env", "exec", "analyst", "--", "sh", "-c", "echo 'print(42)' > /home/user/plot.py")

    digest = corral_cli("env", "freeze", "analyst").stdout.strip()
    assert digest.startswith("sha256:") and len(digest) == 71

    history = json.loads(corral_cli("env", "history", "analyst", "--json").stdout)
    assert history[0]["digest"] == digest and len(history) == 2
    assert all({"digest", "size", "created_at"} <= set(h) for h in history)
    human = corral_cli("env", "history", "analyst").stdout.splitlines()
    assert human[1].split()[1] == digest  # newest first

    run = corral_cli("sandbox", "run", "analyst", "--", "python3", "/home/user/plot.py")
    assert run.stdout == "42\n"
    probe = "import corralprobe; print(corralprobe.VALUE)"
    ran = corral_cli("sandbox", "run", "analyst", "--json", "--", "python3", "-c", probe)
    as_json = json.loads(ran.stdout)
    assert (as_json["exit_code"], as_json["stdout"]) == (0, "7\n")

    verified = json.loads(corral_cli("env", "verify", "analyst", "--json").stdout)
    assert verified["ok"] and verified["snapshots"] == 2


def test_errors_are_clear_and_exit_non_zero(corral_cli: Any) -> None:
    missing = corral_cli("env", "history", "nope", "--json", ok=False)
    assert missing.returncode == 1
    assert json.loads(missing.stderr)["error"] == "environment_not_found"
    corral_cli("env", "create", "e1")
    again = corral_cli("env", "freeze", "e1", ok=False)
    assert again.returncode == 1 and "no changes since" in again.stderr
    notfound = corral_cli("sandbox", "run", "e1", "--", "no-such-command", ok=False)
    assert notfound.returncode != 0 and "'no-such-command' is not found" in notfound.stderr
    code = corral_cli("sandbox", "run", "e1", "--", "sh", "-c", "exit 7", ok=False)
    assert code.returncode == 7  # the command's own exit status comes through
    bad = corral_cli("env", "create", "Not/Valid", ok=False)
    assert bad.returncode == 2 and "invalid environment name" in bad.stderr
