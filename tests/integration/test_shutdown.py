"""SIGTERM is how service managers stop a process: nothing it held may outlive it.

``corral sandbox run`` tears its sandbox down as on Ctrl-C; ``corral worker`` and ``corral
serve`` drain: no new runs, the run in hand finishes within the grace period or goes back to
the queue for another worker, and every sandbox is torn down before the process exits.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from corral.context import Corral
from corral.pipeline.service import Trigger
from corral.pipeline.worker import Worker
from corral.sandbox.slots import Record
from tests.integration.test_pipeline import agents_env, new_app, user_with_credits
from tests.integration.test_resilience import leftovers, wait_for_record

pytestmark = [pytest.mark.root, pytest.mark.runc]
__all__ = ["agents_env"]  # a fixture, imported for the tests below


def corral_process(corral: Corral, *args: str, log: Path) -> subprocess.Popen[bytes]:
    environ = {
        **os.environ,
        "CORRAL_DATA_DIR": str(corral.settings.data_dir),
        "CORRAL_BRIDGE_PORT": str(corral.settings.network.bridge_port),
    }
    with open(log, "wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "corral.cli", *args],
            env=environ,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def terminate(proc: subprocess.Popen[bytes], log: Path) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"the process ignored SIGTERM; its log:\n{log.read_text()}")


def running_sandbox(corral: Corral, proc: subprocess.Popen[bytes], run_id: str) -> Record:
    """The sandbox ``proc`` runs ``run_id``'s agent in, once the agent is under way."""
    deadline = time.monotonic() + 90
    while "runner.started" not in [e.kind for e in corral.store.runs.events(run_id)]:
        assert proc.poll() is None and time.monotonic() < deadline, "the run never started"
        time.sleep(0.05)
    return wait_for_record(corral, proc.pid, set())


def test_sigterm_tears_down_the_sandbox_of_corral_sandbox_run(
    corral: Corral, env: str, tmp_path: Path
) -> None:
    log = tmp_path / "stderr"
    proc = corral_process(corral, "sandbox", "run", env, "--", "sleep", "60", log=log)
    try:
        record = wait_for_record(corral, proc.pid, set())
    finally:
        terminate(proc, log)
    assert leftovers(corral, record) == []  # torn down by the process itself: nobody reaped


def test_sigterm_lets_corral_worker_finish_the_run_in_hand(
    corral: Corral, agents_env: str, tmp_path: Path
) -> None:
    app, user = new_app(corral, agents_env, "agent.py:slow"), user_with_credits(corral)
    queued = corral.pipeline.execute_agent(app, {"seconds": 3}, Trigger("http"), user=user)
    log = tmp_path / "stderr"
    proc = corral_process(corral, "worker", "--workers", "1", "--grace", "60", log=log)
    try:
        record = running_sandbox(corral, proc, queued.id)
    finally:
        code = terminate(proc, log)
    done = corral.store.runs.get(queued.id)
    assert (done.status, done.deliveries) == ("succeeded", 1), log.read_text()
    assert json.loads(done.result or "null") == {"slept": 3}
    assert code != -signal.SIGTERM  # it handled the signal rather than dying of it
    assert leftovers(corral, record) == []


def test_sigterm_on_corral_serve_hands_the_run_back_after_the_grace(
    corral: Corral, agents_env: str, tmp_path: Path
) -> None:
    app, user = new_app(corral, agents_env, "agent.py:slow"), user_with_credits(corral)
    queued = corral.pipeline.execute_agent(app, {"seconds": 6}, Trigger("http"), user=user)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "stderr"
    proc = corral_process(
        corral,
        "serve",
        "--port",
        str(port),
        "--workers",
        "1",
        "--no-schedules",
        "--grace",
        "0.5",
        log=log,
    )
    try:
        record = running_sandbox(corral, proc, queued.id)
    finally:
        terminate(proc, log)
    back = corral.store.runs.get(queued.id)
    assert (back.status, back.lease_owner) == ("queued", None), log.read_text()
    assert "run.handed_back" in [e.kind for e in corral.store.runs.events(queued.id)]
    assert leftovers(corral, record) == []

    # Handed back, not lost: another worker takes it at once and runs it to its end.
    worker = Worker(corral.pipeline, corral.sandboxes, lease=5.0).start()
    try:
        deadline = time.monotonic() + 90
        while corral.store.runs.get(queued.id).status in ("queued", "running"):
            assert time.monotonic() < deadline, "nobody took the handed-back run"
            time.sleep(0.1)
    finally:
        worker.stop()
    done = corral.store.runs.get(queued.id)
    assert (done.status, done.deliveries) == ("succeeded", 2)
