"""The run queue and its leases: claim order, fenced renewals, expiry and requeue with
backoff, hand back, and one winner among racing claimers (SQLite; no sandbox runs here)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from corral.context import Corral
from corral.pipeline.service import Trigger
from corral.pipeline.worker import MAX_DELIVERIES, recover_expired
from corral.store import Run


@pytest.fixture
def queued(corral: Corral, app: Callable[..., str], user: str) -> Callable[[], Run]:
    """``queued()``: admit one more run of this test's own app."""
    name = app()
    return lambda: corral.pipeline.execute_agent(name, {}, Trigger("http"), user=user)


def later(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


def claim_all(corral: Corral, worker: str, now: datetime | None = None) -> list[str]:
    """Every run claimable now, in the order the queue hands them out."""
    out = []
    while (run := corral.store.runs.claim(worker, 10.0, now)) is not None:
        out.append(run.id)
    return out


@pytest.fixture(autouse=True)
def empty_queue(corral: Corral) -> None:
    """Runs left queued by earlier tests of the module are out of the way."""
    claim_all(corral, "sweeper", later(10**6))


def test_runs_are_claimed_oldest_first_with_a_lease_and_a_delivery(
    corral: Corral, queued: Callable[[], Run]
) -> None:
    first, second, third = queued(), queued(), queued()
    claimed = corral.store.runs.claim("w1", 10.0)
    assert claimed is not None and claimed.id == first.id
    assert (claimed.status, claimed.lease_owner, claimed.deliveries) == ("running", "w1", 1)
    assert claimed.lease_expires is not None and claimed.lease_expires > later(9)
    assert claim_all(corral, "w2") == [second.id, third.id]


def test_a_claim_can_be_narrowed_to_one_run(corral: Corral, queued: Callable[[], Run]) -> None:
    first, second = queued(), queued()
    claimed = corral.store.runs.claim("w1", 10.0, only=second.id)
    assert claimed is not None and claimed.id == second.id
    assert corral.store.runs.claim("w1", 10.0, only=second.id) is None  # taken
    assert claim_all(corral, "w1") == [first.id]


def test_a_renewal_is_fenced_to_the_lease_holder(corral: Corral, queued: Callable[[], Run]) -> None:
    run = queued()
    claimed = corral.store.runs.claim("w1", 1.0)
    assert claimed is not None and claimed.lease_expires is not None
    assert corral.store.runs.heartbeat(run.id, "w1", 60.0)
    renewed = corral.store.runs.get(run.id).lease_expires
    assert renewed is not None and renewed > claimed.lease_expires + timedelta(seconds=50)
    assert not corral.store.runs.heartbeat(run.id, "w2", 60.0)  # not its lease
    corral.pipeline.cancel(run.id)  # flags it; still running, still w1's
    assert corral.store.runs.heartbeat(run.id, "w1", 60.0)


def test_an_expired_lease_is_requeued_once_after_its_backoff(
    corral: Corral, queued: Callable[[], Run]
) -> None:
    run = queued()
    corral.store.runs.claim("dead", 10.0, now=later(-60))  # its lease ran out long ago
    [expired] = [r for r in corral.store.runs.expired() if r.id == run.id]
    assert corral.store.runs.requeue(expired, backoff=30.0)
    assert not corral.store.runs.requeue(expired, backoff=30.0)  # fenced: once
    assert not corral.store.runs.heartbeat(run.id, "dead", 10.0)  # its owner lost it
    assert corral.store.runs.claim("w2", 10.0) is None  # backing off
    again = corral.store.runs.claim("w2", 10.0, now=later(31))
    assert again is not None and (again.lease_owner, again.deliveries) == ("w2", 2)


def test_a_handed_back_run_is_claimable_at_once_and_keeps_its_delivery_count(
    corral: Corral, queued: Callable[[], Run]
) -> None:
    run = queued()
    corral.store.runs.claim("w1", 10.0)
    assert not corral.store.runs.hand_back(run.id, "w2")  # only its holder may
    assert corral.store.runs.hand_back(run.id, "w1")
    back = corral.store.runs.get(run.id)
    assert (back.status, back.lease_owner, back.deliveries) == ("queued", None, 1)
    again = corral.store.runs.claim("w2", 10.0)
    assert again is not None and (again.id, again.deliveries) == (run.id, 2)


def test_a_run_released_by_a_concurrency_limit_costs_no_delivery(
    corral: Corral, queued: Callable[[], Run]
) -> None:
    run = queued()
    corral.store.runs.claim("w1", 10.0)
    corral.store.runs.release(run.id, "w1", delay=5.0)
    back = corral.store.runs.get(run.id)
    assert (back.status, back.deliveries, back.started_at) == ("queued", 0, None)
    assert corral.store.runs.claim("w1", 10.0) is None  # not before its delay


def test_racing_claimers_each_get_a_different_run_or_none(
    corral: Corral, queued: Callable[[], Run]
) -> None:
    runs = {queued().id for _ in range(5)}
    start = threading.Barrier(8)
    got: list[str | None] = []

    def claimer(n: int) -> None:
        start.wait()
        claimed = corral.store.runs.claim(f"w{n}", 10.0)
        got.append(None if claimed is None else claimed.id)

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [g for g in got if g is not None]
    assert sorted(won) == sorted(runs) and got.count(None) == 3  # each run exactly once


# -- recovering from dead owners (worker.recover_expired) -------------------------------------


def test_a_dead_workers_run_is_requeued_with_a_backoff_that_grows(
    corral: Corral, queued: Callable[[], Run]
) -> None:
    run = queued()
    backoffs: list[tuple[datetime, datetime, datetime]] = []
    for _ in range(2):
        claimed = corral.store.runs.claim("dead", 10.0, now=later(10**6), only=run.id)
        assert claimed is not None
        corral.store.runs.heartbeat(run.id, "dead", -60.0)  # its last renewal, long ago
        asked = datetime.now(UTC)
        recover_expired(corral.pipeline, corral.sandboxes, lease=3.0)
        done = datetime.now(UTC)
        back = corral.store.runs.get(run.id)
        assert (back.status, back.lease_owner) == ("queued", None)
        assert back.available_at is not None
        backoffs.append((asked, back.available_at, done))
    # lease/3 + 1 + 2**deliveries: long enough for a stalled owner to notice and stop, and
    # longer with every delivery lost
    for (asked, available, done), seconds in zip(backoffs, (4, 6), strict=True):
        pause = timedelta(seconds=seconds)
        assert asked + pause <= available <= done + pause


def test_a_run_lost_too_often_fails_as_worker_lost(
    corral: Corral, queued: Callable[[], Run]
) -> None:
    run = queued()
    for n in range(MAX_DELIVERIES):
        claimed = corral.store.runs.claim(f"w{n}", 10.0, now=later(10**6), only=run.id)
        assert claimed is not None and claimed.deliveries == n + 1
        if n < MAX_DELIVERIES - 1:
            corral.store.runs.hand_back(run.id, f"w{n}")
    corral.store.runs.heartbeat(run.id, f"w{MAX_DELIVERIES - 1}", -60.0)  # then it died
    recover_expired(corral.pipeline, corral.sandboxes, lease=3.0)
    lost = corral.store.runs.get(run.id)
    assert (lost.status, lost.error_code) == ("failed", "worker_lost")
    assert lost.error == f"{MAX_DELIVERIES} workers lost this run"
    assert [e.kind for e in corral.store.runs.events(run.id)][-1] == "run.finished"
