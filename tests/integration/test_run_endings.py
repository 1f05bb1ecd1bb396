"""Every way a run can end leaves the same records: counted in the metrics, traced, announced
to the completion hooks exactly once, whichever path (and whichever process) ended it.

No worker threads run in this module unless a test starts one, so admitted runs stay queued
until the test ends them; the completion hooks are wired as in any process that runs workers.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from corral.context import Corral
from corral.pipeline.apps import AppSpec
from corral.pipeline.service import Trigger
from corral.pipeline.worker import MAX_DELIVERIES, Worker
from corral.store import Run
from corral.store.engine import transaction
from corral.store.schema import runs

pytestmark = [pytest.mark.root, pytest.mark.runc]


class Recorder:
    """A completion hook that remembers every run it was called with."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, run: Run) -> None:
        self.seen.append(run.id)


@pytest.fixture(scope="module")
def hooked(corral: Corral) -> Iterator[Recorder]:
    assert corral.start_workers(0) == []  # the hooks and the deliverer, no worker threads
    recorder = Recorder()
    corral.pipeline.on_finished.append(recorder)
    yield recorder
    corral.pipeline.on_finished.remove(recorder)
    corral.stop_workers()


@pytest.fixture(scope="module")
def app_env(corral: Corral) -> Iterator[str]:
    name = f"t-{secrets.token_hex(4)}"
    corral.envs.create(name)  # nothing of it runs here: every run ends before it starts
    yield name
    corral.envs.delete(name)


def new_app(corral: Corral, env: str, **settings: object) -> str:
    name = f"a-{secrets.token_hex(4)}"
    corral.pipeline.apps.create(name, AppSpec(env, "agent.py:main", **settings))  # type: ignore[arg-type]
    return name


def admit(corral: Corral, app: str) -> Run:
    user = f"u-{secrets.token_hex(4)}"
    corral.ledger.grant(user, 10)
    run = corral.pipeline.execute_agent(app, {}, Trigger("http"), user=user)
    assert run.status == "queued"
    return run


def counted(corral: Corral, app: str, status: str) -> float:
    """``corral_runs_total`` for the app's HTTP-triggered runs that ended ``status``."""
    labels = {"app": app, "trigger": "http", "status": status}
    return corral.metrics.registry.get_sample_value("corral_runs_total", labels) or 0.0


def span_names(corral: Corral, run_id: str) -> list[str]:
    return sorted(s.name for s in corral.tracing.spans(run_id))


def test_a_run_cancelled_while_queued_is_counted_traced_and_announced_once(
    corral: Corral, hooked: Recorder, app_env: str
) -> None:
    app = new_app(corral, app_env)
    queued = admit(corral, app)

    cancelled = corral.pipeline.cancel(queued.id)

    assert (cancelled.status, cancelled.error_code) == ("cancelled", "cancelled")
    assert hooked.seen.count(queued.id) == 1
    assert counted(corral, app, "cancelled") == 1
    assert span_names(corral, queued.id) == ["admission", "queue", "run"]
    # Nothing fires twice: a second cancel, a direct announcement, a sweep.
    assert corral.pipeline.cancel(queued.id).status == "cancelled"
    assert not corral.pipeline.announce(cancelled)
    corral.pipeline.announce_pending(grace=timedelta(0))
    assert hooked.seen.count(queued.id) == 1
    assert counted(corral, app, "cancelled") == 1
    assert span_names(corral, queued.id) == ["admission", "queue", "run"]


def test_a_run_cancelled_by_the_cancel_previous_policy_is_announced(
    corral: Corral, hooked: Recorder, app_env: str
) -> None:
    app = new_app(corral, app_env, concurrency="cancel_previous")
    user = f"u-{secrets.token_hex(4)}"
    corral.ledger.grant(user, 10)
    first = corral.pipeline.execute_agent(app, {}, Trigger("http"), user=user)
    second = corral.pipeline.execute_agent(app, {}, Trigger("http"), user=user)

    assert corral.store.runs.get(first.id).status == "cancelled"
    assert hooked.seen.count(first.id) == 1 and second.id not in hooked.seen
    assert counted(corral, app, "cancelled") == 1
    assert "queue" in span_names(corral, first.id)
    corral.pipeline.cancel(second.id)


def test_a_run_lost_by_too_many_workers_is_counted_and_traced(
    corral: Corral, hooked: Recorder, app_env: str
) -> None:
    app = new_app(corral, app_env)
    run = admit(corral, app)
    # As if MAX_DELIVERIES workers had leased it and died: running, its lease long expired.
    with transaction(corral.store._engine, write=True) as conn:
        conn.execute(
            update(runs)
            .where(runs.c.id == run.id)
            .values(
                status="running",
                lease_owner="dead-worker",
                lease_expires=datetime.now(UTC) - timedelta(minutes=1),
                deliveries=MAX_DELIVERIES,
                started_at=datetime.now(UTC) - timedelta(minutes=2),
            )
        )
    sweeper = Worker(corral.pipeline, corral.sandboxes, name="sweeper")

    sweeper.requeue_expired()
    sweeper.requeue_expired()

    lost = corral.store.runs.get(run.id)
    assert (lost.status, lost.error_code) == ("failed", "worker_lost")
    assert hooked.seen.count(run.id) == 1
    assert counted(corral, app, "failed") == 1
    assert span_names(corral, run.id) == ["admission", "queue", "run"]


def test_a_run_ended_by_a_process_without_hooks_is_announced_by_a_worker(
    corral: Corral, hooked: Recorder, app_env: str
) -> None:
    app = new_app(corral, app_env)
    run = admit(corral, app)
    cli = Corral(corral.settings)  # another process, as `corral` on the command line is
    try:
        assert cli.pipeline.on_finished == []
        assert cli.pipeline.cancel(run.id).status == "cancelled"
    finally:
        cli.close()
    assert run.id not in hooked.seen  # nobody in that process to announce it

    worker = Worker(corral.pipeline, corral.sandboxes).start()
    try:
        deadline = time.monotonic() + 30
        while run.id not in hooked.seen and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        worker.stop()
    assert hooked.seen.count(run.id) == 1
    assert counted(corral, app, "cancelled") == 1
    assert span_names(corral, run.id) == ["admission", "queue", "run"]
