"""Each store function that moves a run moves it only as ``corral.states`` allows, on SQLite
and on PostgreSQL: an ended run is never brought back, whoever still names it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from corral.errors import LeaseLost
from corral.states import RunStatus
from corral.store import Run, Store

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def new_run(store: Store, id: str, status: str = "queued") -> Run:
    return store.runs.create(
        Run(
            id=id,
            environment="env",
            snapshot="sha256:" + "0" * 64,
            entrypoint="a.py:main",
            input="{}",
            trigger="http",
            status=status,
            created_at=NOW,
            user="ann",
            app="app",
            app_version=1,
        )
    )


def test_a_run_ended_under_a_lease_stays_ended_whatever_its_worker_does(store: Store) -> None:
    new_run(store, "run-1")
    leased = store.runs.claim("w1", 30, NOW)
    assert leased is not None and leased.status == "running"
    done = store.runs.finish("run-1", status="failed", finished_at=NOW, error_code="worker_lost")
    assert done is not None
    ended = done[0]
    assert (ended.status, ended.lease_owner) == ("failed", "w1")  # the lease is still on it

    # The worker that held it, stalled until now, tries every way back to the queue or on.
    assert not store.runs.release("run-1", "w1", delay=0)
    assert not store.runs.hand_back("run-1", "w1")
    assert not store.runs.requeue(ended, backoff=0)
    assert not store.runs.heartbeat("run-1", "w1", 30)
    with pytest.raises(LeaseLost):
        store.runs.record_start(
            "run-1",
            lease_owner="w1",
            started_at=NOW,
            runner_version="1.0.0",
            runner_digest="sha256:" + "1" * 64,
        )
    assert store.runs.claim("w2", 30, NOW + timedelta(hours=1)) is None
    assert store.runs.finish("run-1", status="succeeded", finished_at=NOW) is None
    assert store.runs.get("run-1") == ended
    assert [e.kind for e in store.runs.events("run-1")] == ["run.finished"]


def test_a_queued_run_only_starts_or_is_cancelled(store: Store) -> None:
    queued = new_run(store, "run-q")
    # Not running: nothing of a running run's way back to the queue applies to it.
    assert not store.runs.release("run-q", "w1")
    assert not store.runs.hand_back("run-q", "w1")
    assert not store.runs.requeue(queued, backoff=0)
    for status in ("succeeded", "failed", "timed_out"):
        with pytest.raises(ValueError, match=f"no run may become {status} from queued"):
            store.runs.finish("run-q", from_status=("queued",), status=status, finished_at=NOW)
        # From "queued or running", the states still decide: only a running run may succeed.
        assert store.runs.finish("run-q", status=status, finished_at=NOW) is None
    assert store.runs.get("run-q") == queued and store.runs.events("run-q") == []

    done = store.runs.finish(
        "run-q", from_status=(RunStatus.QUEUED,), status="cancelled", finished_at=NOW
    )
    assert done is not None and done[0].status == "cancelled"


def test_a_run_starts_queued_or_running_and_nothing_else(store: Store) -> None:
    for status in ("succeeded", "failed", "timed_out", "cancelled"):
        with pytest.raises(ValueError, match="a run starts queued or running"):
            new_run(store, f"run-{status}", status)
    assert store.runs.recent() == []
    assert new_run(store, "run-r", "running").status == "running"
