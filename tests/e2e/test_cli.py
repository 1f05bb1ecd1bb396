"""The issue's user session, driven through the ``corral`` command as a user would."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from corral.releases.service import BUNDLED
from corral.runner import __version__ as BUNDLED_VERSION
from tests.integration.conftest import need_sandboxes
from tests.integration.test_environments import _wheel

pytestmark = [pytest.mark.root, pytest.mark.runc]


@pytest.fixture
def corral_cli(tmp_path: Path) -> Any:
    need_sandboxes()
    environ = {
        **os.environ,
        "CORRAL_DATA_DIR": str(tmp_path / "data"),
        # Its own bridge: another Corral (this test session's) may hold the default port.
        "CORRAL_BRIDGE_PORT": str(8800 + secrets.randbelow(80)),
    }

    def cli(
        *args: str, stdin: Any = subprocess.DEVNULL, ok: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "corral.cli", *args],
            env=environ,
            stdin=stdin,
            capture_output=True,
            text=True,
            timeout=120,
        )
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


def test_run_an_agent_and_publish_a_runner(corral_cli: Any, tmp_path: Path) -> None:
    corral_cli("env", "create", "analyst")
    agent = (
        "def main(input):\n    print('charting', input['ticker'])\n"
        "    return {'ticker': input['ticker'], 'close': 109.0}\n"
    )
    corral_cli(
        "env", "exec", "analyst", "--", "sh", "-c", f"cat > /home/user/agent.py <<'EOF'\n{agent}EOF"
    )
    corral_cli("env", "freeze", "analyst")

    streamed = corral_cli("run", "analyst", "agent.py:main", "--input", '{"ticker": "ACME"}')
    assert json.loads(streamed.stdout) == {"ticker": "ACME", "close": 109.0}
    assert "swap.locked" in streamed.stderr and "| charting ACME" in streamed.stderr

    listed = json.loads(corral_cli("runner", "list", "--json").stdout)
    assert [r["version"] for r in listed] == [BUNDLED_VERSION] and listed[0]["current"]

    source = tmp_path / "runner"
    shutil.copytree(BUNDLED, source, ignore=shutil.ignore_patterns("__pycache__"))
    published = json.loads(
        corral_cli("runner", "publish", str(source), "--version", "1.2.0", "--json").stdout
    )
    assert published["version"] == "1.2.0"

    done = json.loads(
        corral_cli(
            "run", "analyst", "agent.py:main", "--input", '{"ticker": "ACME"}', "--json"
        ).stdout
    )
    assert (done["status"], done["runner_version"], done["swapped"]) == ("succeeded", "1.2.0", True)
    assert done["result"] == {"ticker": "ACME", "close": 109.0}
    assert any(e["kind"] == "fold_in.done" for e in done["events"])

    corral_cli("runner", "use", BUNDLED_VERSION)
    rolled = json.loads(
        corral_cli("run", "analyst", "agent.py:main", "--input", '{"ticker": "X"}', "--json").stdout
    )
    assert (rolled["runner_version"], rolled["swapped"]) == (BUNDLED_VERSION, True)

    bad = corral_cli("run", "analyst", "agent.py:main", "--input", "{not json", ok=False)
    assert bad.returncode == 2 and "--input is not JSON" in bad.stderr
    missing = corral_cli("run", "analyst", "nope.py:main", "--input", "{}", ok=False)
    assert missing.returncode == 1 and "entrypoint_not_found" in missing.stderr
