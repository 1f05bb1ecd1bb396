"""The pipeline on real sandboxes: leases, a killed worker, budgets, concurrency policies."""

from __future__ import annotations

import itertools
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from corral.context import Corral
from corral.errors import BudgetExhausted, ConcurrencyLimit
from corral.pipeline.apps import AppSpec
from corral.pipeline.service import Trigger
from corral.pipeline.worker import Worker
from corral.store import Run
from tests.fakes import FakeMarketData
from tests.integration.conftest import run

pytestmark = [pytest.mark.root, pytest.mark.runc]

AGENT = """
import time
from corral_runner import sdk

def quick(input):
    return {"echo": input}

def slow(input):
    sdk.log("started")
    time.sleep(float(input.get("seconds", 5)))
    sdk.log("finished")
    return {"slept": input.get("seconds", 5)}

def spender(input):
    # every call through the bridge costs credits; keep calling until stopped
    for i in range(100000):
        sdk.request("prices", "GET", "/v1/prices/ACME")
        time.sleep(0.01)
    return "never"
"""


@pytest.fixture(scope="module")
def agents_env(corral: Corral) -> Iterator[str]:
    name = f"t-{secrets.token_hex(4)}"
    corral.envs.create(name)
    code, _, err = run(
        corral, name, "sh", "-c", f"cat > /home/user/agent.py <<'EOF'\n{AGENT}\nEOF", edit=True
    )
    assert code == 0, err
    corral.envs.freeze(name)
    yield name
    corral.envs.delete(name)


def new_app(corral: Corral, env: str, entry: str, **settings: Any) -> str:
    """An app of ``entry`` in ``env``; ``settings`` are AppSpec fields."""
    name = f"a-{secrets.token_hex(4)}"
    corral.pipeline.apps.create(name, AppSpec(env, entry, **settings))
    return name


def span(run: Run) -> tuple[datetime, datetime]:
    """When ``run`` started and finished: a run that succeeded has both."""
    assert run.started_at is not None and run.finished_at is not None, run
    return run.started_at, run.finished_at


def user_with_credits(corral: Corral, credits: float = 100) -> str:
    user = f"u-{secrets.token_hex(4)}"
    corral.ledger.grant(user, credits)
    return user


@pytest.fixture
def workers(corral: Corral) -> Iterator[list[Worker]]:
    started = corral.start_workers(2, lease=3.0)
    yield started
    for w in started:
        w.stop()
        corral._workers.remove(w)


def test_a_run_is_admitted_executed_and_billed_once(
    corral: Corral, agents_env: str, workers: list[Worker]
) -> None:
    app, user = new_app(corral, agents_env, "agent.py:quick"), user_with_credits(corral)
    done = corral.pipeline.execute_agent(
        app, {"x": 1}, Trigger("http"), user=user, wait=True, wait_timeout=60
    )
    assert (done.status, json.loads(done.result or "")) == ("succeeded", {"echo": {"x": 1}})
    assert done.deliveries == 1 and done.app_version == 1
    charged = corral.store.ledger.entries(run=done.id)
    assert charged and all(e.kind == "deduction" and e.user == user for e in charged)
    before = corral.ledger.balance(user)
    # Exact, in micro-credits: no approximation needed.
    assert corral.ledger.bill(done.id, user, app) * 1_000_000 == -sum(e.micros for e in charged)
    assert corral.ledger.balance(user) == before  # billing again deducts nothing more


def test_a_worker_killed_mid_run_hands_the_run_to_another(corral: Corral, agents_env: str) -> None:
    app, user = new_app(corral, agents_env, "agent.py:slow"), user_with_credits(corral)
    queued = corral.pipeline.execute_agent(app, {"seconds": 4}, Trigger("http"), user=user)
    environ = {
        **os.environ,
        "CORRAL_DATA_DIR": str(corral.settings.data_dir),
        "CORRAL_BRIDGE_PORT": str(corral.settings.network.bridge_port),
    }
    worker_a = subprocess.Popen(
        [sys.executable, "-m", "corral.cli", "worker", "--workers", "1", "--lease", "3"],
        env=environ,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            kinds = [e.kind for e in corral.store.runs.events(queued.id)]
            if "runner.started" in kinds:
                break
            time.sleep(0.05)
        else:
            pytest.fail("worker A never started the run")
        assert corral.store.runs.get(queued.id).lease_owner is not None
    finally:
        worker_a.send_signal(signal.SIGKILL)
        worker_a.wait()
    worker_b = Worker(corral.pipeline, corral.sandboxes, lease=3.0).start()
    try:
        done = corral.pipeline.wait(queued.id, timeout=90)
    finally:
        worker_b.stop()
    assert done.status == "succeeded", (done.error_code, done.error)
    assert done.deliveries == 2 and done.lease_owner == worker_b.name
    events = corral.store.runs.events(queued.id)
    results = [e for e in events if e.kind == "result"]
    assert len(results) == 1, "the agent completed more than once"
    kinds = [e.kind for e in events]
    # Either A's orphaned sandbox was reaped and B ran the agent afresh, or A's sandbox had
    # already reported, and B finished the run from the log without running it again.
    assert kinds.count("sandbox.booted") == 2 or "run.resumed" in kinds
    assert corral.verifier.revoked(queued.id)


def test_a_run_that_spends_its_budget_is_stopped(
    corral: Corral, agents_env: str, workers: list[Worker]
) -> None:
    app = new_app(
        corral, agents_env, "agent.py:spender", budget_per_run=0.05, connections=("prices",)
    )
    user = user_with_credits(corral)
    market = FakeMarketData(api_key="mk-budget").start()
    corral.store.connections.put("prices", market.url, "header:x-api-key", None)
    corral.vault.put(user, "prices", "api_key", {"key": "mk-budget"})
    done = corral.pipeline.execute_agent(
        app, {}, Trigger("http"), user=user, wait=True, wait_timeout=90
    )
    assert (done.status, done.error_code) == ("failed", "budget_exhausted")
    assert "token was revoked and its sandbox torn down" in (done.error or "")
    assert corral.verifier.revoked(done.id)
    assert corral.store.ledger.spent(run=done.id) >= 0.05
    calls = len(market.requests)
    time.sleep(0.5)
    assert len(market.requests) == calls  # the sandbox is gone: nothing more arrives
    market.stop()


def test_budgets_and_credits_are_checked_at_admission(corral: Corral, agents_env: str) -> None:
    user = user_with_credits(corral)
    zero = new_app(corral, agents_env, "agent.py:quick", budget_per_run=0)
    with pytest.raises(BudgetExhausted, match="budget of zero"):
        corral.pipeline.execute_agent(zero, {}, Trigger("http"), user=user)
    broke = f"u-{secrets.token_hex(4)}"
    with pytest.raises(BudgetExhausted, match="no credits left"):
        corral.pipeline.execute_agent(
            new_app(corral, agents_env, "agent.py:quick"), {}, Trigger("http"), user=broke
        )


def test_concurrency_policies(corral: Corral, agents_env: str, workers: list[Worker]) -> None:
    user = user_with_credits(corral)
    reject = new_app(corral, agents_env, "agent.py:slow", concurrency="reject")
    first = corral.pipeline.execute_agent(reject, {"seconds": 3}, Trigger("http"), user=user)
    with pytest.raises(ConcurrencyLimit, match="already running"):
        corral.pipeline.execute_agent(reject, {"seconds": 3}, Trigger("http"), user=user)
    other = user_with_credits(corral)  # the policy is per user and app
    corral.pipeline.execute_agent(reject, {"seconds": 0}, Trigger("http"), user=other)

    cancel = new_app(corral, agents_env, "agent.py:slow", concurrency="cancel_previous")
    old = corral.pipeline.execute_agent(cancel, {"seconds": 20}, Trigger("http"), user=user)
    new = corral.pipeline.execute_agent(cancel, {"seconds": 0}, Trigger("http"), user=user)
    assert corral.pipeline.wait(old.id, 30).status == "cancelled"
    assert corral.pipeline.wait(new.id, 60).status == "succeeded"

    queue = new_app(corral, agents_env, "agent.py:slow", concurrency="enqueue", max_concurrent=1)
    runs = [
        corral.pipeline.execute_agent(queue, {"seconds": 1}, Trigger("http"), user=user)
        for _ in range(3)
    ]
    finished = [corral.pipeline.wait(r.id, 90) for r in runs]
    assert all(f.status == "succeeded" for f in finished), [
        (f.status, f.error_code, f.error, f.deliveries) for f in finished
    ]
    spans = sorted(span(f) for f in finished)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))  # never overlapped
    assert corral.pipeline.wait(first.id, 30).status == "succeeded"
