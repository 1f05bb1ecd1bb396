"""The credit ledger: exact amounts, grants and corrections, and one deduction per usage event
however often a run is billed. Usage arrives as the bridge writes it (its ``Backend``)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from corral.billing.ledger import Ledger
from corral.bridge.backend import StoreBackend
from corral.context import Corral
from corral.errors import InvalidInput
from corral.pipeline.service import Trigger
from corral.store import Run


@pytest.fixture
def ledger(corral: Corral) -> Ledger:
    return corral.ledger


@pytest.fixture
def bridge(corral: Corral) -> StoreBackend:
    """What the bridge writes usage and calls through."""
    return StoreBackend(corral.store, corral.vault)


def test_grants_add_up_exactly(ledger: Ledger) -> None:
    for amount in (0.1, 0.1, 0.1, "0.000001", Decimal("2")):
        ledger.grant("exact", amount)
    assert ledger.balance("exact") == Decimal("2.300001")


@pytest.mark.parametrize(
    ("amount", "why"),
    [
        (float("nan"), "finite"),
        (float("inf"), "finite"),
        ("0.0000001", "more than 6 decimal places"),
        ("1e-7", "more than 6 decimal places"),
        (0, "more than zero"),
        (-5, "more than zero"),
        (2e9, "at most 1000000000"),
        ("ten", "must be a number"),
        (True, "must be a number of credits"),
    ],
)
def test_a_grant_that_is_not_an_exact_positive_amount_is_refused(
    ledger: Ledger, user: str, amount: Any, why: str
) -> None:
    with pytest.raises(InvalidInput, match=why):
        ledger.grant(user, amount)
    assert ledger.balance(user) == 100  # nothing posted


def test_a_correction_needs_a_sign_and_a_reason_and_stays_in_the_history(
    corral: Corral, ledger: Ledger
) -> None:
    ledger.grant("corrected", 10)
    with pytest.raises(InvalidInput, match="must not be zero"):
        ledger.adjust("corrected", 0, "nothing")
    with pytest.raises(InvalidInput, match="needs a note"):
        ledger.adjust("corrected", -3, "  ")
    ledger.adjust("corrected", "-2.5", "granted twice by mistake")
    assert ledger.balance("corrected") == Decimal("7.5")
    entries = corral.store.ledger.entries(user="corrected")
    assert [(e.kind, e.micros, e.detail) for e in entries] == [
        ("grant", 10_000_000, None),
        ("adjustment", -2_500_000, "granted twice by mistake"),
    ]


def a_run(corral: Corral, app: Callable[..., str], user: str) -> Run:
    return corral.pipeline.execute_agent(app(), {}, Trigger("http"), user=user)


def used(run: Run, **row: Any) -> dict[str, Any]:
    return {"at": datetime.now(UTC), "run": run.id, "user": run.user, **row}


def call(run: Run, connection: str, status: int = 200, error: str | None = None) -> dict[str, Any]:
    return {
        "at": datetime.now(UTC),
        "run": run.id,
        "connection": connection,
        "method": "POST",
        "path": f"/{connection}/v1/x",
        "status": status,
        "bytes_in": 10,
        "bytes_out": 10,
        "latency_ms": 1.0,
        "error": error,
        "peer": "10.213.0.2",
    }


def test_each_usage_event_is_deducted_once_however_often_the_run_is_billed(
    corral: Corral, ledger: Ledger, bridge: StoreBackend, app: Callable[..., str], user: str
) -> None:
    run = a_run(corral, app, user)
    bridge.write_usage(
        [
            used(
                run, connection="openai", kind="model_tokens", input_tokens=1000, output_tokens=500
            ),
            used(run, connection=None, kind="sandbox_seconds", quantity=2.5),
        ]
    )
    bridge.write_calls(
        [
            call(run, "openai"),
            call(run, "_corral"),  # the bridge's own endpoints are free
            call(run, "openai", 502, error="upstream_unreachable"),  # so are failed calls
        ]
    )
    expected = Decimal("1") + Decimal("1.5") + Decimal("0.025") + Decimal("0.0005")
    assert ledger.cost(run.id) == expected  # what budgets read before billing
    assert ledger.bill(run.id, user, run.app) == expected
    assert ledger.bill(run.id, user, run.app) == expected  # again: nothing new
    assert ledger.balance(user) == 100 - expected
    assert len(corral.store.ledger.entries(run=run.id)) == 3

    bridge.write_usage([used(run, connection=None, kind="sandbox_seconds", quantity=0.1)])
    assert ledger.bill(run.id, user, run.app) == expected + Decimal("0.001")
    assert len(corral.store.ledger.entries(run=run.id)) == 4


def test_two_billers_at_once_deduct_once(
    corral: Corral, ledger: Ledger, bridge: StoreBackend, app: Callable[..., str], user: str
) -> None:
    run = a_run(corral, app, user)
    bridge.write_usage(
        [used(run, connection=None, kind="sandbox_seconds", quantity=1.0) for _ in range(20)]
    )
    start = threading.Barrier(4)

    def bill() -> None:
        start.wait()
        ledger.bill(run.id, user, run.app)

    threads = [threading.Thread(target=bill) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ledger.balance(user) == Decimal("99.8")
    assert len(corral.store.ledger.entries(run=run.id)) == 20
