"""Cron schedules and their ticks: what is scheduled, and which fire times have been handled.

A schedule names an app, an input, a user and a cron expression in a time zone; ``next_fire``
is the next instant it is due. A tick is one fire time of one schedule, and the table's
primary key ``(schedule_id, fire_time)`` makes every fire time a tick at most once, however
many schedulers race for it.

Firing is claim, admit, settle:

1. ``claim`` (one transaction): advance ``next_fire`` past the fire time with a
   compare-and-swap on its old value (and on the schedule not being paused), and insert the
   tick row ``claimed`` (plus a ``skipped_misfire`` row for each missed fire time it is
   catching up on). Whoever loses the swap or the insert does nothing more.
2. ``enqueue()`` (the caller's, outside any transaction here): admits the run through
   ``Pipeline.execute_agent``, which commits the run in its own transactions. The claim is
   committed first because on SQLite an open write transaction would lock those out.
3. ``settle``: record the run id (``enqueued``) or that admission was refused (``refused``).

A scheduler that dies between 1 and 3 leaves a ``claimed`` tick; after a timeout another one
``retake``s it and calls ``enqueue`` again. The run's idempotency key is the tick itself
(``idempotency_key(schedule_id, fire_time)``), so if the dead scheduler's run was admitted,
the retry gets that run back instead of a second one.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import pairwise
from typing import Any, Final

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from corral.errors import InvalidInput, NotFound
from corral.limits import MAX_INPUT, json_size
from corral.store.engine import is_unique_violation, transaction
from corral.store.pipeline import AppNotFound
from corral.store.rows import check_aware
from corral.store.schema import apps, schedule_ticks, schedules
from corral.triggers import cron

MISFIRE_POLICIES: Final = ("skip", "run_once")
# Outcomes of a tick. ``claimed`` is transient: a scheduler owns the fire time and is
# admitting its run; every other outcome is final.
CLAIMED, ENQUEUED, REFUSED, SKIPPED = "claimed", "enqueued", "refused", "skipped_misfire"


class ScheduleNotFound(NotFound):
    code = "schedule_not_found"

    def __init__(self, schedule_id: str) -> None:
        self.schedule_id = schedule_id
        super().__init__(f"no schedule {schedule_id!r}; `corral schedule list` shows them")


@dataclass(frozen=True)
class Schedule:
    """One row of ``schedules``."""

    id: str
    app: str
    cron: str
    timezone: str
    input: Any  # decoded JSON
    user: str
    misfire: str  # skip | run_once
    paused: bool
    next_fire: datetime  # aware UTC
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "app": self.app,
            "cron": self.cron,
            "timezone": self.timezone,
            "input": self.input,
            "user": self.user,
            "misfire": self.misfire,
            "paused": self.paused,
            "next_fire": self.next_fire.isoformat(),
            "created_at": self.created_at.isoformat(),
        }


@dataclass(frozen=True)
class Tick:
    """One row of ``schedule_ticks``: a fire time and what became of it."""

    schedule_id: str
    fire_time: datetime
    run_id: str | None
    outcome: str  # claimed | enqueued | refused | skipped_misfire
    scheduler: str
    at: datetime  # when it was claimed (or retaken), or recorded as skipped


def idempotency_key(schedule_id: str, fire_time: datetime) -> str:
    """The idempotency key of the run a tick admits: the same for every retry of the tick."""
    return f"schedule:{schedule_id}:{fire_time.astimezone(UTC).isoformat()}"


class _Lost(Exception):
    """Raised inside a claim to roll it back: another scheduler has this tick."""


class Schedules:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    # -- managing schedules ------------------------------------------------------------------

    def add(
        self,
        app: str,
        cron_expr: str,
        timezone: str,
        input: Any = None,
        user: str = "local",
        misfire: str = "skip",
        *,
        now: datetime,
    ) -> Schedule:
        """Schedule ``app``; it first fires at the first fire time after ``now``."""
        spec = cron.check_cron(cron_expr)
        cron.time_zone(timezone)
        if misfire not in MISFIRE_POLICIES:
            raise InvalidInput(
                f"misfire policy must be one of {', '.join(MISFIRE_POLICIES)}, got {misfire!r}"
            )
        if not isinstance(user, str) or not user:
            raise InvalidInput(f"a schedule's user must be a non-empty string, got {user!r}")
        try:
            encoded = json.dumps(input, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"the schedule's input is not JSON: {exc}") from None
        if json_size(input) > MAX_INPUT:  # every tick's run would be refused at admission
            raise InvalidInput(
                f"the schedule's input is {json_size(input)} bytes of JSON; "
                f"a run's input may be at most {MAX_INPUT}"
            )
        now = check_aware(now, "now")
        schedule = Schedule(
            id=f"sch-{secrets.token_hex(6)}",
            app=app,
            cron=spec,
            timezone=timezone,
            input=json.loads(encoded),
            user=user,
            misfire=misfire,
            paused=False,
            next_fire=cron.next_fire(spec, timezone, now),
            created_at=now,
        )
        with transaction(self._engine, write=True) as conn:
            if conn.scalar(select(apps.c.name).where(apps.c.name == app)) is None:
                raise AppNotFound(app)
            conn.execute(
                insert(schedules).values(
                    id=schedule.id,
                    app=app,
                    cron=spec,
                    timezone=timezone,
                    input=encoded,
                    user=user,
                    misfire=misfire,
                    paused=False,
                    next_fire=schedule.next_fire,
                    created_at=now,
                )
            )
        return schedule

    def get(self, schedule_id: str) -> Schedule:
        with transaction(self._engine) as conn:
            row = conn.execute(select(schedules).where(schedules.c.id == schedule_id)).first()
        if row is None:
            raise ScheduleNotFound(schedule_id)
        return _schedule(row)

    def all(self, app: str | None = None) -> list[Schedule]:
        query = select(schedules).order_by(schedules.c.created_at, schedules.c.id)
        if app is not None:
            query = query.where(schedules.c.app == app)
        with transaction(self._engine) as conn:
            return [_schedule(r) for r in conn.execute(query).all()]

    def pause(self, schedule_id: str) -> Schedule:
        """Stop firing ``schedule_id`` until it is resumed; pausing twice changes nothing."""
        with transaction(self._engine, write=True) as conn:
            conn.execute(update(schedules).where(schedules.c.id == schedule_id).values(paused=True))
            row = conn.execute(select(schedules).where(schedules.c.id == schedule_id)).first()
        if row is None:
            raise ScheduleNotFound(schedule_id)
        return _schedule(row)

    def resume(self, schedule_id: str, *, now: datetime) -> Schedule:
        """Fire ``schedule_id`` again, from ``now`` on. The paused period is not caught up,
        except that under ``run_once`` a fire time missed while paused runs once (the latest).
        Resuming a schedule that is not paused changes nothing."""
        now = check_aware(now, "now")
        with transaction(self._engine, write=True) as conn:
            row = conn.execute(select(schedules).where(schedules.c.id == schedule_id)).first()
            if row is None:
                raise ScheduleNotFound(schedule_id)
            if not row.paused:
                return _schedule(row)
            next_fire = cron.next_fire(row.cron, row.timezone, now)
            if row.misfire == "run_once" and row.next_fire <= now:
                next_fire = cron.previous_fire(row.cron, row.timezone, now)
            conn.execute(
                update(schedules)
                .where(schedules.c.id == schedule_id)
                .values(paused=False, next_fire=next_fire)
            )
            row = conn.execute(select(schedules).where(schedules.c.id == schedule_id)).one()
        return _schedule(row)

    def remove(self, schedule_id: str) -> None:
        """Delete ``schedule_id`` and (by cascade) its ticks; runs it started are kept."""
        with transaction(self._engine, write=True) as conn:
            gone = conn.execute(delete(schedules).where(schedules.c.id == schedule_id))
            if gone.rowcount != 1:
                raise ScheduleNotFound(schedule_id)

    def due(self, now: datetime) -> list[Schedule]:
        """Schedules not paused whose next fire time is at or before ``now``."""
        now = check_aware(now, "now")
        with transaction(self._engine) as conn:
            rows = conn.execute(
                select(schedules)
                .where(schedules.c.paused.is_(False), schedules.c.next_fire <= now)
                .order_by(schedules.c.next_fire, schedules.c.id)
            ).all()
        return [_schedule(r) for r in rows]

    def next_due(self) -> datetime | None:
        """The earliest next fire time of any schedule not paused; None if there is none."""
        with transaction(self._engine) as conn:
            return conn.scalar(
                select(schedules.c.next_fire)
                .where(schedules.c.paused.is_(False))
                .order_by(schedules.c.next_fire)
                .limit(1)
            )

    def ticks(self, schedule_id: str | None = None) -> list[Tick]:
        query = select(schedule_ticks).order_by(schedule_ticks.c.fire_time)
        if schedule_id is not None:
            query = query.where(schedule_ticks.c.schedule_id == schedule_id)
        with transaction(self._engine) as conn:
            return [Tick(**r._asdict()) for r in conn.execute(query).all()]

    # -- firing ------------------------------------------------------------------------------

    def fire(
        self,
        schedule_id: str,
        fire_time: datetime,
        scheduler_name: str,
        enqueue: Callable[[], str | None],
        *,
        skipped: Sequence[datetime] = (),
        now: datetime | None = None,
    ) -> bool:
        """Fire ``schedule_id`` at ``fire_time`` if no other scheduler has: claim, admit, settle.

        ``enqueue`` admits the run and returns its id, or None if admission was refused; it
        is called only by the scheduler whose claim won. ``skipped`` are earlier, missed fire
        times recorded ``skipped_misfire`` in the same claim; the swap then expects
        ``next_fire`` to be the first of them. Returns whether this call won the tick.

        If ``enqueue`` raises, the exception propagates and the tick stays ``claimed``, for
        ``retake`` to finish once the claim is stale.
        """
        fire_time = check_aware(fire_time, "fire time")
        missed = [check_aware(t, "skipped fire time") for t in skipped]
        if any(b <= a for a, b in pairwise([*missed, fire_time])):
            raise InvalidInput("skipped fire times must be increasing and before the fire time")
        now = check_aware(now or datetime.now(UTC), "now")
        rows = [_tick(schedule_id, t, SKIPPED, scheduler_name, now) for t in missed]
        rows.append(_tick(schedule_id, fire_time, CLAIMED, scheduler_name, now))
        expected = missed[0] if missed else fire_time
        if not self._claim(schedule_id, expected, fire_time, rows):
            return False
        run_id = enqueue()
        self._settle(schedule_id, fire_time, scheduler_name, run_id)
        return True

    def skip(
        self,
        schedule_id: str,
        fire_times: Sequence[datetime],
        scheduler_name: str,
        *,
        now: datetime | None = None,
    ) -> bool:
        """Record missed ``fire_times`` as ``skipped_misfire`` and move ``next_fire`` past the
        last of them, if no other scheduler has. Returns whether this call won them."""
        times = [check_aware(t, "fire time") for t in fire_times]
        if not times:
            return False
        if any(b <= a for a, b in pairwise(times)):
            raise InvalidInput("fire times to skip must be increasing")
        now = check_aware(now or datetime.now(UTC), "now")
        rows = [_tick(schedule_id, t, SKIPPED, scheduler_name, now) for t in times]
        return self._claim(schedule_id, times[0], times[-1], rows)

    def stalled(self, before: datetime) -> list[Tick]:
        """Ticks still ``claimed`` since before ``before``: their scheduler died, or hangs."""
        before = check_aware(before, "before")
        with transaction(self._engine) as conn:
            rows = conn.execute(
                select(schedule_ticks)
                .where(schedule_ticks.c.outcome == CLAIMED, schedule_ticks.c.at < before)
                .order_by(schedule_ticks.c.fire_time)
            ).all()
        return [Tick(**r._asdict()) for r in rows]

    def retake(
        self,
        tick: Tick,
        scheduler_name: str,
        enqueue: Callable[[], str | None],
        *,
        now: datetime | None = None,
    ) -> bool:
        """Take over a stalled claim, if it is still the one ``tick`` shows, and finish it.

        ``enqueue`` must use the tick's idempotency key: the stalled scheduler may have
        admitted the run already, and then admission returns that run.
        """
        now = check_aware(now or datetime.now(UTC), "now")
        with transaction(self._engine, write=True) as conn:
            taken = conn.execute(
                update(schedule_ticks)
                .where(
                    schedule_ticks.c.schedule_id == tick.schedule_id,
                    schedule_ticks.c.fire_time == tick.fire_time,
                    schedule_ticks.c.outcome == CLAIMED,
                    schedule_ticks.c.scheduler == tick.scheduler,
                    schedule_ticks.c.at == tick.at,
                )
                .values(scheduler=scheduler_name, at=now)
            )
            if taken.rowcount != 1:
                return False
        self._settle(tick.schedule_id, tick.fire_time, scheduler_name, enqueue())
        return True

    def _claim(
        self, schedule_id: str, expected: datetime, last: datetime, rows: list[dict[str, Any]]
    ) -> bool:
        """Advance ``next_fire`` from ``expected`` to the fire time after ``last`` and insert
        ``rows``, all or nothing; False if another scheduler (or a pause) got there first."""
        try:
            with transaction(self._engine, write=True) as conn:
                row = conn.execute(
                    select(schedules.c.cron, schedules.c.timezone).where(
                        schedules.c.id == schedule_id
                    )
                ).first()
                if row is None:
                    return False  # removed meanwhile
                following = cron.next_fire(row.cron, row.timezone, last)
                # First statement that writes: on PostgreSQL it locks the row, so a racing
                # claim waits here and then finds next_fire moved; SQLite has serialised us.
                swapped = conn.execute(
                    update(schedules)
                    .where(
                        schedules.c.id == schedule_id,
                        schedules.c.next_fire == expected,
                        schedules.c.paused.is_(False),
                    )
                    .values(next_fire=following)
                )
                if swapped.rowcount != 1:
                    return False
                _insert_ticks(conn, rows)
        except _Lost:
            return False
        return True

    def _settle(
        self, schedule_id: str, fire_time: datetime, scheduler_name: str, run_id: str | None
    ) -> None:
        with transaction(self._engine, write=True) as conn:
            conn.execute(
                update(schedule_ticks)
                .where(
                    schedule_ticks.c.schedule_id == schedule_id,
                    schedule_ticks.c.fire_time == fire_time,
                    schedule_ticks.c.outcome == CLAIMED,
                    schedule_ticks.c.scheduler == scheduler_name,
                )
                .values(outcome=ENQUEUED if run_id else REFUSED, run_id=run_id)
            )


def _insert_ticks(conn: Connection, rows: list[dict[str, Any]]) -> None:
    try:
        conn.execute(insert(schedule_ticks), rows)
    except IntegrityError as exc:
        # next_fire was moved back onto a fire time already handled (a resume); the tick
        # primary key still allows one run per fire time. Roll the claim back.
        if is_unique_violation(exc):
            raise _Lost from exc
        raise


def _tick(
    schedule_id: str, fire_time: datetime, outcome: str, scheduler: str, at: datetime
) -> dict[str, Any]:
    return {
        "schedule_id": schedule_id,
        "fire_time": fire_time,
        "run_id": None,
        "outcome": outcome,
        "scheduler": scheduler,
        "at": at,
    }


def _schedule(row: Any) -> Schedule:
    values = row._asdict()
    values["input"] = json.loads(values["input"])
    values["paused"] = bool(values["paused"])
    return Schedule(**values)
