"""Admission (``Pipeline.execute_agent``): what is let into the queue and what is refused, by
name, before anything is stored. No worker runs here: admitted runs stay queued."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from corral.context import Corral
from corral.errors import (
    BudgetExhausted,
    CallRefused,
    ConcurrencyLimit,
    IdempotencyMismatch,
    InputTooLarge,
    InvalidInput,
)
from corral.limits import MAX_INPUT
from corral.pipeline.service import MAX_DEPTH, Trigger
from corral.store import Run

HTTP = Trigger("http")
SCHEMA = {
    "type": "object",
    "properties": {"ticker": {"type": "string", "pattern": "^[A-Z]{1,5}$"}},
    "required": ["ticker"],
    "additionalProperties": False,
}


def admit(corral: Corral, app: str, user: str, input: Any = None, **kw: Any) -> Run:
    trigger = kw.pop("trigger", HTTP)
    value = {"n": 1} if input is None else input
    return corral.pipeline.execute_agent(app, value, trigger, user=user, **kw)


def runs_of(corral: Corral, app: str) -> list[Run]:
    return corral.store.runs.recent(app)


def test_an_admitted_run_is_queued_with_its_app_version_and_trigger(
    corral: Corral, app: Callable[..., str], user: str
) -> None:
    name = app(timeout=30.0)
    run = admit(corral, name, user, {"n": 4}, trigger=Trigger("schedule"))
    assert (run.status, run.app, run.app_version, run.trigger, run.user) == (
        "queued",
        name,
        1,
        "schedule",
        user,
    )
    assert run.environment == "analyst" and run.depth == 0 and run.root == run.id
    assert [e.kind for e in corral.store.runs.events(run.id)] == ["run.admitted"]


def test_input_is_checked_against_the_apps_schema(
    corral: Corral, app: Callable[..., str], user: str
) -> None:
    name = app(input_schema=SCHEMA)
    with pytest.raises(InvalidInput, match="at ticker: 'acme' does not match"):
        admit(corral, name, user, {"ticker": "acme"})
    with pytest.raises(InvalidInput, match=r"\(the input\).*'ticker' is a required property"):
        admit(corral, name, user, {})
    assert runs_of(corral, name) == []  # nothing stored for a refusal
    assert admit(corral, name, user, {"ticker": "ACME"}).status == "queued"


def test_an_input_over_its_limit_is_refused_before_anything_else(
    corral: Corral, app: Callable[..., str], user: str
) -> None:
    with pytest.raises(InputTooLarge, match=f"at most {MAX_INPUT}"):
        admit(corral, app(), user, {"blob": "x" * MAX_INPUT})


def test_a_user_without_credits_is_refused_until_granted(
    corral: Corral, app: Callable[..., str]
) -> None:
    name = app()
    with pytest.raises(BudgetExhausted, match="'nobody-yet' has no credits left"):
        admit(corral, name, "nobody-yet")
    corral.ledger.grant("nobody-yet", "0.000001")
    assert admit(corral, name, "nobody-yet").status == "queued"


def test_an_app_with_no_budget_left_is_refused(
    corral: Corral, app: Callable[..., str], user: str
) -> None:
    with pytest.raises(BudgetExhausted, match="budget of zero credits per run"):
        admit(corral, app(budget_per_run=0), user)
    capped = app(budget_total=0.5)
    first = admit(corral, capped, user)
    corral.store.usage.add_events([usage(first, seconds=50.0)])  # 50 s at 0.01: 0.5 credits
    corral.ledger.bill(first.id, user, capped)
    with pytest.raises(BudgetExhausted, match=r"has spent its budget of 0\.5 credits"):
        admit(corral, capped, user)


def usage(run: Run, seconds: float) -> dict[str, Any]:
    return {
        "at": run.created_at,
        "run": run.id,
        "user": run.user,
        "connection": None,
        "kind": "sandbox_seconds",
        "quantity": seconds,
    }


# -- concurrency policies, per user and app ------------------------------------------------


def test_reject_refuses_a_second_active_run_of_the_same_user(
    corral: Corral, app: Callable[..., str], user: str
) -> None:
    name = app(concurrency="reject")
    admit(corral, name, user)
    with pytest.raises(ConcurrencyLimit, match=f"already running for '{user}'"):
        admit(corral, name, user)
    corral.ledger.grant("someone-else", 1)
    assert admit(corral, name, "someone-else").status == "queued"  # per user


@pytest.mark.parametrize("policy", ["reject", "allow"])
def test_a_limit_caps_active_runs_and_frees_up_as_runs_end(
    corral: Corral, app: Callable[..., str], user: str, policy: str
) -> None:
    name = app(concurrency=policy, max_concurrent=2)
    first = admit(corral, name, user)
    admit(corral, name, user)
    with pytest.raises(ConcurrencyLimit, match="allows 2 run"):
        admit(corral, name, user)
    corral.pipeline.cancel(first.id)
    assert admit(corral, name, user).status == "queued"


def test_allow_without_a_limit_and_enqueue_admit_every_run(
    corral: Corral, app: Callable[..., str], user: str
) -> None:
    for spec in ({"concurrency": "allow"}, {"concurrency": "enqueue", "max_concurrent": 1}):
        name = app(**spec)
        assert [admit(corral, name, user).status for _ in range(3)] == ["queued"] * 3


def test_cancel_previous_cancels_the_users_active_runs(
    corral: Corral, app: Callable[..., str], user: str
) -> None:
    name = app(concurrency="cancel_previous")
    old = admit(corral, name, user)
    new = admit(corral, name, user)
    gone = corral.store.runs.get(old.id)
    assert (gone.status, gone.error_code) == ("cancelled", "cancelled")
    assert corral.store.runs.get(new.id).status == "queued"


# -- idempotency keys -------------------------------------------------------------------------


def test_a_replayed_key_returns_the_first_run_and_a_changed_request_is_refused(
    corral: Corral, app: Callable[..., str], user: str
) -> None:
    name = app()
    first = admit(corral, name, user, {"n": 1}, idempotency_key="order-7")
    again = admit(corral, name, user, {"n": 1}, idempotency_key="order-7")
    assert again.id == first.id and len(runs_of(corral, name)) == 1
    with pytest.raises(IdempotencyMismatch, match="'order-7' was used with a different request"):
        admit(corral, name, user, {"n": 2}, idempotency_key="order-7")
    corral.ledger.grant("another-user", 1)
    theirs = admit(corral, name, "another-user", {"n": 1}, idempotency_key="order-7")
    assert theirs.id != first.id  # keys are per user


def test_concurrent_twins_of_one_key_make_one_run(
    corral: Corral, app: Callable[..., str], user: str
) -> None:
    name = app()
    start = threading.Barrier(6)
    got: list[str] = []

    def twin() -> None:
        start.wait()
        got.append(admit(corral, name, user, {"n": 3}, idempotency_key="twin").id)

    threads = [threading.Thread(target=twin) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 6 and len(set(got)) == 1
    assert [r.id for r in runs_of(corral, name)] == got[:1]  # the losers' runs are gone
    available = corral.store.runs.get(got[0]).available_at
    assert available is not None and available <= datetime.now(UTC)  # runnable, not parked


# -- agent-to-agent calls ---------------------------------------------------------------------


def test_calls_nest_at_most_max_depth_deep(
    corral: Corral, app: Callable[..., str], user: str
) -> None:
    chain = [app() for _ in range(MAX_DEPTH + 2)]
    parent = admit(corral, chain[0], user)
    for depth, name in enumerate(chain[1 : MAX_DEPTH + 1], start=1):
        parent = admit(corral, name, user, trigger=Trigger("agent", parent_run=parent.id))
        assert (parent.depth, parent.root) == (depth, corral.store.runs.get(parent.id).root)
    with pytest.raises(CallRefused, match=f"at most {MAX_DEPTH} deep"):
        admit(corral, chain[-1], user, trigger=Trigger("agent", parent_run=parent.id))


def test_a_call_back_into_an_app_of_the_chain_is_a_cycle(
    corral: Corral, app: Callable[..., str], user: str
) -> None:
    a, b = app(), app()
    root = admit(corral, a, user)
    child = admit(corral, b, user, trigger=Trigger("agent", parent_run=root.id))
    with pytest.raises(CallRefused, match=f"cycle refused: {a} -> {b} -> {a}"):
        admit(corral, a, user, trigger=Trigger("agent", parent_run=child.id))


def test_a_caller_over_its_budget_may_start_no_callee(
    corral: Corral, app: Callable[..., str], user: str
) -> None:
    caller = admit(corral, app(budget_per_run=0.1), user)
    corral.store.usage.add_events([usage(caller, seconds=10.0)])  # 0.1 credits: all of it
    with pytest.raises(BudgetExhausted, match="may start no more runs"):
        admit(corral, app(), user, trigger=Trigger("agent", parent_run=caller.id))
