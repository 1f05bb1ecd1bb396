"""``corral app run --wait`` with no worker anywhere says so at once, instead of waiting in
silence for ever; ``--here`` executes the run in the calling process instead."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from corral.context import Corral
from corral.pipeline.worker import Worker, live_workers
from tests.integration.test_pipeline import agents_env, new_app, user_with_credits

pytestmark = [pytest.mark.root, pytest.mark.runc]
__all__ = ["agents_env"]  # a fixture, imported for the tests below


def corral_cli(corral: Corral, *args: str) -> subprocess.CompletedProcess[str]:
    environ = {
        **os.environ,
        "CORRAL_DATA_DIR": str(corral.settings.data_dir),
        "CORRAL_BRIDGE_PORT": str(corral.settings.network.bridge_port),
    }
    return subprocess.run(
        [sys.executable, "-m", "corral.cli", *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def no_worker(corral: Corral) -> None:
    """No worker alive (one SIGKILLed by an earlier test ages out of the registry first)."""
    corral.stop_workers()
    deadline = time.monotonic() + 30
    while live_workers(corral.store):
        assert time.monotonic() < deadline, f"workers still alive: {live_workers(corral.store)}"
        time.sleep(0.5)


def test_wait_with_no_worker_says_how_to_start_one(
    corral: Corral, agents_env: str, no_worker: None
) -> None:
    app, user = new_app(corral, agents_env, "agent.py:quick"), user_with_credits(corral)
    out = corral_cli(corral, "app", "run", app, "--input", '{"x": 1}', "--user", user, "--wait")
    assert out.returncode == 1
    assert "no worker is running" in out.stderr and "corral worker" in out.stderr, out.stderr
    assert "--here" in out.stderr
    assert corral.store.runs.active(user, app) == []  # nothing was queued to wait for

    queued = corral_cli(corral, "app", "run", app, "--user", user, "--json")  # no --wait
    assert queued.returncode == 0 and "no worker is running" in queued.stderr
    assert json.loads(queued.stdout)["status"] == "queued"


def test_here_executes_the_run_in_the_calling_process(
    corral: Corral, agents_env: str, no_worker: None
) -> None:
    app, user = new_app(corral, agents_env, "agent.py:quick"), user_with_credits(corral)
    out = corral_cli(
        corral, "app", "run", app, "--input", '{"x": 2}', "--user", user, "--here", "--json"
    )
    assert out.returncode == 0, out.stderr
    done = json.loads(out.stdout)
    assert (done["status"], done["result"]) == ("succeeded", {"echo": {"x": 2}})
    assert corral.store.runs.get(done["id"]).deliveries == 1


def test_a_worker_in_another_process_is_seen_and_does_the_run(
    corral: Corral, agents_env: str, no_worker: None
) -> None:
    app, user = new_app(corral, agents_env, "agent.py:quick"), user_with_credits(corral)
    worker = Worker(corral.pipeline, corral.sandboxes, lease=5.0).start()
    try:
        assert worker.name in live_workers(corral.store)
        out = corral_cli(
            corral, "app", "run", app, "--input", '{"x": 3}', "--user", user, "--wait", "--json"
        )
    finally:
        worker.stop()
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["status"] == "succeeded"
    assert worker.name not in live_workers(corral.store)  # a stopped worker signs off
