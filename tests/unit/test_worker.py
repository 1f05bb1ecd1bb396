"""Workers on the unsandboxed runtime: admitted runs are leased, executed, billed and ended
once; a cancel or a spent budget stops a running one; ``enqueue`` keeps to its limit."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import pytest

from corral.context import Corral
from corral.pipeline.service import Trigger
from corral.sandbox.testing import UnsandboxedRuntime
from corral.store import Run

HTTP = Trigger("http")


@pytest.fixture(scope="module", autouse=True)
def workers(corral: Corral) -> Iterator[None]:
    corral.start_workers(2, lease=5.0)
    yield
    corral.stop_workers(grace=5.0)


def kinds(corral: Corral, run: Run) -> list[str]:
    return [e.kind for e in corral.store.runs.events(run.id)]


def ended(corral: Corral, run: Run) -> Run:
    done = corral.pipeline.wait(run.id, timeout=60)
    assert done.status not in ("queued", "running"), f"{run.id} did not end: {done}"
    return done


def started(corral: Corral, run: Run) -> None:
    """Wait until the agent itself runs (the runner has reported in)."""
    deadline = time.monotonic() + 60
    while "runner.started" not in kinds(corral, run):
        assert time.monotonic() < deadline, f"{run.id} never started: {kinds(corral, run)}"
        time.sleep(0.02)


def test_a_run_is_executed_billed_and_ended_once(
    corral: Corral, app: Callable[..., str], user: str
) -> None:
    run = corral.pipeline.execute_agent(app(), {"n": 5}, HTTP, user=user)
    done = ended(corral, run)
    assert (done.status, json.loads(done.result or "null")) == ("succeeded", {"double": 10})
    assert (done.attempts, done.deliveries) == (1, 1)
    seen = kinds(corral, done)
    assert seen[0] == "run.admitted" and seen[-1] == "run.finished"
    assert seen.count("run.finished") == 1 and "result" in seen
    [deduction] = corral.store.ledger.entries(run=done.id)  # billed as it ended
    assert deduction.kind == "deduction" and deduction.micros < 0  # its sandbox seconds


def test_an_agent_error_ends_the_run_at_its_first_attempt(
    corral: Corral, app: Callable[..., str], user: str
) -> None:
    done = ended(corral, corral.pipeline.execute_agent(app("agent.py:boom"), {}, HTTP, user=user))
    assert (done.status, done.error_code, done.attempts, done.deliveries) == (
        "failed",
        "agent_raised",
        1,
        1,
    )


def test_a_cancelled_run_is_stopped_and_its_sandbox_torn_down(
    corral: Corral, app: Callable[..., str], user: str
) -> None:
    run = corral.pipeline.execute_agent(app("agent.py:slow"), {"ticks": 600}, HTTP, user=user)
    started(corral, run)
    corral.pipeline.cancel(run.id)
    done = ended(corral, run)
    assert (done.status, done.error_code) == ("cancelled", "cancelled")
    assert "run.stopped" in kinds(corral, done)
    runtime = corral.runtime
    assert isinstance(runtime, UnsandboxedRuntime)
    [booted] = [e for e in corral.store.runs.events(run.id) if e.kind == "sandbox.booted"]
    assert not (runtime.directory / json.loads(booted.data)["sandbox"]).exists()


def test_a_run_that_spends_its_budget_is_stopped(
    corral: Corral, app: Callable[..., str], user: str
) -> None:
    thrifty = app("agent.py:slow", budget_per_run=0.005)  # half a second of sandbox time
    done = ended(corral, corral.pipeline.execute_agent(thrifty, {"ticks": 600}, HTTP, user=user))
    assert (done.status, done.error_code) == ("failed", "budget_exhausted")
    assert "of its 0.005 credits" in (done.error or "")


def test_enqueue_runs_one_at_a_time_per_user_whatever_the_workers(
    corral: Corral, app: Callable[..., str], user: str
) -> None:
    one = app("agent.py:slow", concurrency="enqueue", max_concurrent=1)
    first = corral.pipeline.execute_agent(one, {"ticks": 4}, HTTP, user=user)
    second = corral.pipeline.execute_agent(one, {"ticks": 4}, HTTP, user=user)
    a, b = ended(corral, first), ended(corral, second)
    assert a.status == b.status == "succeeded"
    spans = sorted((r.started_at, r.finished_at) for r in (a, b) if r.started_at and r.finished_at)
    # Whichever ran first (two workers may each take one, and give it back), the other
    # began only once it had ended.
    assert len(spans) == 2 and spans[1][0] >= spans[0][1]
