"""Cron schedules against real databases, through the real admission path.

Every test runs on SQLite and on PostgreSQL. The pipeline is the real ``Pipeline``: a fired
tick is an ``execute_agent`` that admits a queued run (no worker runs it, so no sandbox is
needed). Time is simulated: the tests call ``Scheduler.tick(now)`` with the ``now`` they choose.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from corral.billing.ledger import Ledger
from corral.config import Settings
from corral.envs.service import Environments
from corral.errors import AppNotFound, InvalidCron, InvalidInput, InvalidTimeZone, ScheduleNotFound
from corral.pipeline.apps import Apps, AppSpec
from corral.pipeline.executor import Executor
from corral.pipeline.service import Pipeline, Trigger
from corral.releases.service import ReleaseService
from corral.store import Run, Schedule, Snapshot, Store, Tick
from corral.store.engine import transaction
from corral.store.schema import schedules as schedules_table
from corral.triggers import schedules
from corral.triggers.scheduler import BACKLOG, Fired, Scheduler
from corral.triggers.schedules import idempotency_key

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)  # a fire time of every every-minute schedule
MINUTE = timedelta(minutes=1)
APP, USER, ENV = "nightly", "alice", "sched-env"


def minute(k: int) -> datetime:
    return T0 + k * MINUTE


@dataclass
class Node:
    """One scheduler's world: its own Store (own connections) and its own Pipeline."""

    store: Store
    pipeline: Pipeline

    def scheduler(self, name: str, **options: Any) -> Scheduler:
        return Scheduler(self.store, self.pipeline, name, **options)


@pytest.fixture
def open_node(store_url: str, tmp_path: Path) -> Iterator[Callable[[], Node]]:
    """Opens Nodes on one database with an app, its environment and a user with credits."""
    settings = Settings.from_env({"CORRAL_DATA_DIR": str(tmp_path / "data")})
    opened: list[Store] = []

    def open_() -> Node:
        store = Store.open(store_url)
        opened.append(store)
        envs = Environments(settings, store, lambda: None)  # type: ignore[arg-type,return-value]
        releases = ReleaseService(store, envs.layout)
        executor = Executor(settings, store, envs, releases, lambda: None)  # type: ignore[arg-type,return-value]
        return Node(store, Pipeline(store, executor, Ledger(store)))

    first = open_()
    digest = "sha256:" + hashlib.sha256(b"scheduler test image").hexdigest()
    first.store.environments.create(
        ENV, "base:test", Snapshot(digest, "", 0, None, None, 1, T0 - timedelta(days=1))
    )
    Apps(first.store).create(APP, AppSpec(ENV, "agent.py:main"))
    Ledger(first.store).grant(USER, 100)
    yield open_
    for store in opened:
        store.close()


@pytest.fixture
def node(open_node: Callable[[], Node]) -> Node:
    return open_node()


def every_minute(node: Node, misfire: str = "skip", **options: Any) -> Schedule:
    schedule = schedules.add(
        node.store,
        APP,
        "* * * * *",
        "UTC",
        {"n": 1},
        USER,
        misfire,
        now=T0 - timedelta(seconds=30),
        **options,
    )
    assert schedule.next_fire == T0
    return schedule


def runs_of(node: Node) -> list[Run]:
    return [r for r in node.store.runs.recent(APP, limit=10_000) if r.trigger == "schedule"]


def ticks(node: Node, schedule: Schedule) -> dict[datetime, Tick]:
    return {t.fire_time: t for t in node.store.schedules.ticks(schedule.id)}


# -- racing schedulers ------------------------------------------------------------------------


def test_three_racing_schedulers_fire_every_tick_exactly_once(
    open_node: Callable[[], Node],
) -> None:
    nodes = [open_node() for _ in range(3)]
    schedule = every_minute(nodes[0])
    steps = 200
    barrier = threading.Barrier(3)
    fired: list[list[Fired]] = [[] for _ in nodes]
    errors: list[BaseException] = []

    def drive(i: int) -> None:
        rng = random.Random(i)
        scheduler = nodes[i].scheduler(f"scheduler-{i}")
        try:
            for k in range(steps):
                barrier.wait(timeout=30)  # all three race for the same fire time
                time.sleep(rng.random() * 0.002)  # in a random order
                jitter = timedelta(seconds=rng.uniform(0, 4))  # within the grace window
                fired[i].extend(scheduler.tick(minute(k) + jitter))
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=drive, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    store = nodes[0].store

    recorded = ticks(nodes[0], schedule)
    assert sorted(recorded) == [minute(k) for k in range(steps)]  # none missed, none extra
    assert {t.outcome for t in recorded.values()} == {"enqueued"}
    run_ids = [t.run_id for t in recorded.values() if t.run_id is not None]
    assert len(run_ids) == len(recorded), recorded  # every tick names its run
    assert len(set(run_ids)) == steps
    runs = runs_of(nodes[0])
    assert sorted(r.id for r in runs) == sorted(run_ids)  # one admitted run per fire time
    assert all(r.status == "queued" and r.user == USER and r.app == APP for r in runs)
    # each scheduler reports what it fired and nothing else: together, every tick once
    reported = [f for per in fired for f in per]
    assert sorted(f.fire_time for f in reported) == [minute(k) for k in range(steps)]
    for i, per in enumerate(fired):
        assert all(recorded[f.fire_time].scheduler == f"scheduler-{i}" for f in per)
    assert store.schedules.get(schedule.id).next_fire == minute(steps)
    assert len({t.scheduler for t in recorded.values()}) >= 2  # the race was real
    assert store.schedules.stalled(minute(steps + 10)) == []


# -- misfires ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("misfire", "back_at", "runs_for_the_outage"),
    [
        ("skip", minute(14) + timedelta(seconds=30), []),
        ("run_once", minute(14) + timedelta(seconds=30), [minute(14)]),
        # back exactly at a fire time: that tick is on time, and it is the catch-up run
        ("skip", minute(15) + timedelta(seconds=2), [minute(15)]),
        ("run_once", minute(15) + timedelta(seconds=2), [minute(15)]),
    ],
    ids=["skip", "run_once", "skip-back-on-time", "run_once-back-on-time"],
)
def test_missed_fire_times_after_downtime_follow_the_misfire_policy(
    open_node: Callable[[], Node],
    misfire: str,
    back_at: datetime,
    runs_for_the_outage: list[datetime],
) -> None:
    nodes = [open_node() for _ in range(3)]
    schedule = every_minute(nodes[0], misfire)
    first = nodes[0].scheduler("first")
    for k in range(5):
        first.tick(minute(k) + timedelta(seconds=1))
    # down from minute 5 to minute 14 included: ten fire times pass with no scheduler up.
    # Three schedulers come back at once and race for the backlog.
    schedulers = [n.scheduler(f"back-{i}") for i, n in enumerate(nodes)]
    results: list[list[Fired]] = [[] for _ in schedulers]
    threads = [
        threading.Thread(target=lambda i=i: results[i].extend(schedulers[i].tick(back_at)))
        for i in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)

    recorded = ticks(nodes[0], schedule)
    outage = [minute(k) for k in range(5, 15)]
    assert all(t in recorded for t in outage)
    enqueued = sorted(t for t, tick in recorded.items() if tick.outcome == "enqueued")
    assert enqueued == [minute(k) for k in range(5)] + runs_for_the_outage
    skipped = sorted(t for t, tick in recorded.items() if tick.outcome == "skipped_misfire")
    assert skipped == [t for t in outage if t not in runs_for_the_outage]
    assert all(recorded[t].run_id is None for t in skipped)
    assert len(runs_of(nodes[0])) == 5 + len(runs_for_the_outage)
    assert sum(1 for per in results for f in per if f.outcome == "enqueued") == len(
        runs_for_the_outage
    )
    # and the schedule is back on its feet: the next fire time is on time again
    next_fire = nodes[0].store.schedules.get(schedule.id).next_fire
    assert next_fire == (minute(15) if back_at < minute(15) else minute(16))
    again = first.tick(next_fire + timedelta(seconds=1))
    assert [(f.fire_time, f.outcome) for f in again] == [(next_fire, "enqueued")]


@pytest.mark.parametrize("misfire", ["skip", "run_once"])
def test_a_backlog_longer_than_one_transaction_is_handled_in_stretches(
    node: Node, misfire: str
) -> None:
    schedule = every_minute(node, misfire)
    missed = 2 * BACKLOG + 500
    back_at = minute(missed - 1) + timedelta(seconds=30)
    fired = node.scheduler("back").tick(back_at)
    assert len(fired) == missed
    recorded = ticks(node, schedule)
    assert sorted(recorded) == [minute(k) for k in range(missed)]
    enqueued = [t for t, tick in recorded.items() if tick.outcome == "enqueued"]
    assert enqueued == ([minute(missed - 1)] if misfire == "run_once" else [])
    assert len(runs_of(node)) == len(enqueued)
    assert node.store.schedules.get(schedule.id).next_fire == minute(missed)


def test_a_fire_time_already_handled_is_never_claimed_again(node: Node) -> None:
    schedule = every_minute(node)
    scheduler = node.scheduler("only")
    assert len(scheduler.tick(T0 + timedelta(seconds=1))) == 1
    # next_fire moved back onto a fire time already handled: the tick's primary key still
    # allows one run per fire time, and the losing claim leaves everything as it was.
    with transaction(node.store._engine, write=True) as conn:
        conn.execute(
            update(schedules_table).where(schedules_table.c.id == schedule.id).values(next_fire=T0)
        )
    assert scheduler.tick(T0 + timedelta(seconds=2)) == []
    assert len(runs_of(node)) == 1 and list(ticks(node, schedule)) == [T0]
    assert node.store.schedules.get(schedule.id).next_fire == T0


# -- pause and resume -------------------------------------------------------------------------


@pytest.mark.parametrize("misfire", ["skip", "run_once"])
def test_pause_stops_firing_and_resume_does_not_fire_the_paused_period(
    node: Node, misfire: str
) -> None:
    schedule = every_minute(node, misfire)
    scheduler = node.scheduler("only")
    for k in range(3):
        assert len(scheduler.tick(minute(k) + timedelta(seconds=1))) == 1
    paused = node.store.schedules.pause(schedule.id)
    assert paused.paused and node.store.schedules.pause(schedule.id).paused  # twice: no change
    for k in range(3, 8):
        assert scheduler.tick(minute(k) + timedelta(seconds=1)) == []
    assert node.store.schedules.next_due() is None

    resumed = schedules.resume(node.store, schedule.id, now=minute(7) + timedelta(seconds=20))
    assert not resumed.paused
    assert schedules.resume(node.store, schedule.id, now=minute(7) + timedelta(seconds=25)) == (
        resumed
    )  # resuming a running schedule changes nothing
    if misfire == "skip":
        assert resumed.next_fire == minute(8)
        assert scheduler.tick(minute(7) + timedelta(seconds=21)) == []
    else:  # the latest fire time missed while paused runs, once
        assert resumed.next_fire == minute(7)
        caught_up = scheduler.tick(minute(7) + timedelta(seconds=21))
        assert [(f.fire_time, f.outcome) for f in caught_up] == [(minute(7), "enqueued")]
    for k in range(8, 10):
        assert len(scheduler.tick(minute(k) + timedelta(seconds=1))) == 1

    recorded = ticks(node, schedule)
    expected = [minute(k) for k in (0, 1, 2, 8, 9)] + ([minute(7)] if misfire == "run_once" else [])
    assert sorted(recorded) == sorted(expected)  # nothing at all recorded for paused minutes
    assert {t.outcome for t in recorded.values()} == {"enqueued"}
    assert len(runs_of(node)) == len(expected)


def test_pause_resume_and_remove_refuse_an_unknown_schedule(node: Node) -> None:
    for call in (
        lambda: node.store.schedules.pause("sch-nope"),
        lambda: schedules.resume(node.store, "sch-nope", now=T0),
        lambda: node.store.schedules.remove("sch-nope"),
        lambda: node.store.schedules.get("sch-nope"),
    ):
        with pytest.raises(ScheduleNotFound, match="sch-nope"):
            call()


def test_a_removed_schedule_stops_firing_and_loses_its_ticks(node: Node) -> None:
    schedule = every_minute(node)
    scheduler = node.scheduler("only")
    scheduler.tick(minute(0))
    node.store.schedules.remove(schedule.id)
    assert scheduler.tick(minute(1)) == []
    assert node.store.schedules.ticks(schedule.id) == []
    assert len(runs_of(node)) == 1  # the run it started is kept


# -- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "error", "says"),
    [
        ({"cron_expr": "61 * * * *"}, InvalidCron, "minute 61 is out of range"),
        ({"cron_expr": "0 9 * *"}, InvalidCron, "'0 9 * *'"),
        ({"cron_expr": "0 0 30 2 *"}, InvalidCron, "never fires"),
        ({"timezone": "Europe/Atlantis"}, InvalidTimeZone, "'Europe/Atlantis'"),
        ({"timezone": ""}, InvalidTimeZone, "empty"),
        ({"misfire": "catch_up"}, InvalidInput, "skip, run_once"),
        ({"app": "no-such-app"}, AppNotFound, "no-such-app"),
        ({"user": ""}, InvalidInput, "user"),
        ({"input": {1, 2}}, InvalidInput, "not JSON"),
    ],
)
def test_an_invalid_schedule_is_refused_and_stores_nothing(
    node: Node, args: dict[str, Any], error: type[Exception], says: str
) -> None:
    values: dict[str, Any] = {
        "app": APP,
        "cron_expr": "0 9 * * MON",
        "timezone": "Europe/Paris",
        "input": None,
        "user": USER,
        "misfire": "skip",
        **args,
    }
    with pytest.raises(error, match=says.replace("*", r"\*")):
        schedules.add(node.store, now=T0, **values)
    assert node.store.schedules.all() == []
    assert node.store.schedules.next_due() is None


def test_a_valid_schedule_is_stored_normalised_with_its_first_fire_time(node: Node) -> None:
    added = schedules.add(
        node.store,
        APP,
        "0  9 * * mon",
        "Europe/Paris",
        {"report": "weekly"},
        USER,
        "run_once",
        now=T0,
    )
    assert added.cron == "0 9 * * MON"
    assert added.next_fire == datetime(2024, 5, 6, 7, tzinfo=UTC)  # Monday 09:00 CEST
    assert node.store.schedules.get(added.id) == added
    assert node.store.schedules.all(APP) == [added] and node.store.schedules.all("other") == []
    assert node.store.schedules.next_due() == added.next_fire


def test_admission_refused_is_recorded_and_the_schedule_moves_on(node: Node) -> None:
    schedule = schedules.add(node.store, APP, "* * * * *", "UTC", None, "broke", now=T0)
    fired = node.scheduler("only").tick(minute(1))
    assert [(f.outcome, f.run_id) for f in fired] == [("refused", None)]
    assert "budget_exhausted" in (fired[0].error or "")
    assert ticks(node, schedule)[minute(1)].outcome == "refused"
    assert node.store.schedules.get(schedule.id).next_fire == minute(2)
    assert runs_of(node) == []


# -- a scheduler that dies mid-tick -----------------------------------------------------------


class Crash(Exception):
    """Stands for the process dying: nothing after it in the same call happens."""


@pytest.mark.parametrize("admitted", [True, False], ids=["after-admission", "before-admission"])
def test_a_tick_abandoned_mid_admission_is_retaken_without_a_second_run(
    node: Node, admitted: bool
) -> None:
    schedule = every_minute(node)

    def dies() -> str | None:
        if admitted:
            node.pipeline.execute_agent(
                APP,
                schedule.input,
                Trigger("schedule"),
                user=USER,
                idempotency_key=idempotency_key(schedule.id, T0),
            )
        raise Crash

    with pytest.raises(Crash):
        node.scheduler("doomed").fire(schedule, T0, dies, now=T0)
    stalled = node.store.schedules.stalled(T0 + timedelta(minutes=5))
    assert [(t.fire_time, t.outcome, t.scheduler) for t in stalled] == [(T0, "claimed", "doomed")]
    assert len(runs_of(node)) == (1 if admitted else 0)

    rescuer = node.scheduler("rescuer")
    assert rescuer.tick(T0 + timedelta(seconds=30)) == []  # too soon: the claim may be alive
    fired = rescuer.tick(T0 + timedelta(seconds=61))
    assert [(f.fire_time, f.outcome) for f in fired] == [(T0, "enqueued"), (minute(1), "enqueued")]
    runs = runs_of(node)
    assert len(runs) == 2  # one for each fire time: the retaken one was not admitted twice
    assert ticks(node, schedule)[T0].run_id in {r.id for r in runs}
    assert ticks(node, schedule)[T0].scheduler == "rescuer"
    assert node.store.schedules.stalled(T0 + timedelta(hours=1)) == []
    # the dead scheduler's late settle, were it to come back, changes nothing
    assert node.scheduler("zombie").retake(stalled[0], lambda: "run-x", now=T0) is False


# -- the loop ---------------------------------------------------------------------------------


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting")
        time.sleep(0.02)


def test_the_loop_fires_on_its_clock_and_survives_a_failing_pass(node: Node) -> None:
    schedule = every_minute(node)
    now = [T0 - timedelta(seconds=1)]
    failing = [True]
    real = node.pipeline.execute_agent

    def flaky(*args: Any, **kwargs: Any) -> Run:
        if failing[0]:
            failing[0] = False
            raise RuntimeError("a bug in admission")
        return real(*args, **kwargs)

    node.pipeline.execute_agent = flaky  # type: ignore[method-assign]
    scheduler = node.scheduler("looping", clock=lambda: now[0]).start()
    try:
        assert scheduler.running
        time.sleep(0.3)
        assert node.store.schedules.ticks(schedule.id) == []  # nothing due yet
        now[0] = T0 + timedelta(seconds=1)
        wait_for(lambda: scheduler.failures == 1)  # the pass failed; the loop goes on
        assert isinstance(scheduler.last_error, RuntimeError)
        assert [t.outcome for t in node.store.schedules.ticks(schedule.id)] == ["claimed"]
        now[0] = T0 + timedelta(seconds=65)  # the claim is stale: the loop retakes it
        # Admitted first, then settled: wait for both before looking.
        wait_for(
            lambda: (
                len(runs_of(node)) == 2
                and {t.outcome for t in node.store.schedules.ticks(schedule.id)} == {"enqueued"}
            )
        )
        assert len(runs_of(node)) == 2
    finally:
        scheduler.stop()
    assert not scheduler.running
