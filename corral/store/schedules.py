"""Cron schedules and their ticks: the ``schedules`` and ``schedule_ticks`` tables.

A schedule names an app, an input, a user and a cron expression in a time zone; ``next_fire``
is the next instant it is due. A tick is one fire time of one schedule, and the table's
primary key ``(schedule_id, fire_time)`` makes every fire time a tick at most once, however
many schedulers race for it.

This module stores and claims; it does no time maths and holds no policy. Which instants an
expression names, what a missed fire time becomes and when a schedule fires next are the
triggers' (``corral.triggers.schedules`` and ``scheduler``): they pass the computed instants
in. Firing is claim, admit, settle, and the store holds the first and the last:

1. ``claim`` (one transaction): advance ``next_fire`` past the fire time with a
   compare-and-swap on its old value (and on the schedule not being paused), and insert the
   tick row ``claimed`` (plus a ``skipped_misfire`` row for each missed fire time it is
   catching up on). Whoever loses the swap or the insert does nothing more.
2. The scheduler admits the run through ``Pipeline.execute_agent``, which commits the run in
   its own transactions. The claim is committed first because on SQLite an open write
   transaction would lock those out.
3. ``settle``: record the run id (``enqueued``) or that admission was refused (``refused``).

A scheduler that dies between 1 and 3 leaves a ``claimed`` tick; after a timeout another one
``retake``s it and admits again (with the tick as the run's idempotency key, so a run the dead
scheduler admitted is found rather than admitted twice).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from itertools import pairwise
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Connection, Engine, Row

from corral.errors import AppNotFound, InvalidInput, ScheduleNotFound
from corral.store.engine import transaction
from corral.store.rows import Schedule, Tick, check_aware
from corral.store.schema import apps, schedule_ticks, schedules

# Outcomes of a tick. ``claimed`` is transient: a scheduler owns the fire time and is
# admitting its run; every other outcome is final.
CLAIMED, ENQUEUED, REFUSED, SKIPPED = "claimed", "enqueued", "refused", "skipped_misfire"


class Schedules:
    """The ``schedules`` and ``schedule_ticks`` tables. Safe to share between threads."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    # -- the schedules -----------------------------------------------------------------------

    def add(self, schedule: Schedule) -> Schedule:
        """Store a new schedule; ``AppNotFound`` if its app does not exist."""
        check_aware(schedule.next_fire, "next fire time")
        check_aware(schedule.created_at, "created_at")
        try:
            encoded = json.dumps(schedule.input, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"the schedule's input is not JSON: {exc}") from None
        with transaction(self._engine, write=True) as conn:
            if conn.scalar(select(apps.c.name).where(apps.c.name == schedule.app)) is None:
                raise AppNotFound(schedule.app)
            conn.execute(
                insert(schedules).values(
                    id=schedule.id,
                    app=schedule.app,
                    cron=schedule.cron,
                    timezone=schedule.timezone,
                    input=encoded,
                    user=schedule.user,
                    misfire=schedule.misfire,
                    paused=schedule.paused,
                    next_fire=schedule.next_fire,
                    created_at=schedule.created_at,
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

    def resume(self, schedule_id: str, next_fire: Callable[[Schedule], datetime]) -> Schedule:
        """Fire a paused schedule again, from ``next_fire(paused row)`` on, computed while the
        row is locked (``FOR UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite) so that
        nothing moves it in between. Resuming a schedule that is not paused changes nothing."""
        with transaction(self._engine, write=True) as conn:
            row = conn.execute(
                select(schedules).where(schedules.c.id == schedule_id).with_for_update()
            ).first()
            if row is None:
                raise ScheduleNotFound(schedule_id)
            paused = _schedule(row)
            if not paused.paused:
                return paused
            following = check_aware(next_fire(paused), "next fire time")
            conn.execute(
                update(schedules)
                .where(schedules.c.id == schedule_id)
                .values(paused=False, next_fire=following)
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

    # -- the ticks ---------------------------------------------------------------------------

    def ticks(self, schedule_id: str | None = None) -> list[Tick]:
        query = select(schedule_ticks).order_by(schedule_ticks.c.fire_time)
        if schedule_id is not None:
            query = query.where(schedule_ticks.c.schedule_id == schedule_id)
        with transaction(self._engine) as conn:
            return [_tick(r) for r in conn.execute(query).all()]

    def claim(
        self,
        schedule_id: str,
        fire_time: datetime,
        scheduler_name: str,
        *,
        following: datetime,
        skipped: Sequence[datetime] = (),
        now: datetime | None = None,
    ) -> bool:
        """Claim the tick at ``fire_time`` for ``scheduler_name``, if no other scheduler has:
        ``next_fire`` moves to ``following`` and the tick is recorded ``claimed``.

        ``skipped`` are earlier, missed fire times recorded ``skipped_misfire`` in the same
        claim; the swap then expects ``next_fire`` to be the first of them. Returns whether
        this call won the tick; the winner admits its run, then ``settle``s the tick.
        """
        fire_time = check_aware(fire_time, "fire time")
        missed = [check_aware(t, "skipped fire time") for t in skipped]
        if any(b <= a for a, b in pairwise([*missed, fire_time])):
            raise InvalidInput("skipped fire times must be increasing and before the fire time")
        following = _check_following(following, fire_time)
        now = check_aware(now or datetime.now(UTC), "now")
        rows = [_tick_values(schedule_id, t, SKIPPED, scheduler_name, now) for t in missed]
        rows.append(_tick_values(schedule_id, fire_time, CLAIMED, scheduler_name, now))
        expected = missed[0] if missed else fire_time
        return self._claim(schedule_id, expected, following, rows)

    def skip(
        self,
        schedule_id: str,
        fire_times: Sequence[datetime],
        scheduler_name: str,
        *,
        following: datetime,
        now: datetime | None = None,
    ) -> bool:
        """Record missed ``fire_times`` as ``skipped_misfire`` and move ``next_fire`` to
        ``following``, past the last of them, if no other scheduler has. Returns whether this
        call won them."""
        times = [check_aware(t, "fire time") for t in fire_times]
        if not times:
            return False
        if any(b <= a for a, b in pairwise(times)):
            raise InvalidInput("fire times to skip must be increasing")
        following = _check_following(following, times[-1])
        now = check_aware(now or datetime.now(UTC), "now")
        rows = [_tick_values(schedule_id, t, SKIPPED, scheduler_name, now) for t in times]
        return self._claim(schedule_id, times[0], following, rows)

    def settle(
        self, schedule_id: str, fire_time: datetime, scheduler_name: str, run_id: str | None
    ) -> None:
        """Record what became of a tick ``scheduler_name`` claimed: the run it admitted
        (``enqueued``), or None if admission refused it (``refused``). Fenced by the claim: a
        scheduler whose claim was retaken changes nothing."""
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

    def stalled(self, before: datetime) -> list[Tick]:
        """Ticks still ``claimed`` since before ``before``: their scheduler died, or hangs."""
        before = check_aware(before, "before")
        with transaction(self._engine) as conn:
            rows = conn.execute(
                select(schedule_ticks)
                .where(schedule_ticks.c.outcome == CLAIMED, schedule_ticks.c.at < before)
                .order_by(schedule_ticks.c.fire_time)
            ).all()
        return [_tick(r) for r in rows]

    def retake(self, tick: Tick, scheduler_name: str, *, now: datetime | None = None) -> bool:
        """Take over a stalled claim for ``scheduler_name``, if it is still the one ``tick``
        shows. The winner admits the tick's run again, then ``settle``s it."""
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
            return taken.rowcount == 1

    def _claim(
        self, schedule_id: str, expected: datetime, following: datetime, rows: list[dict[str, Any]]
    ) -> bool:
        """Advance ``next_fire`` from ``expected`` to ``following`` and insert ``rows``, all or
        nothing; False if another scheduler (or a pause, or a removal) got there first."""
        with transaction(self._engine, write=True) as conn:
            # First statement: on PostgreSQL it locks the row, so a racing claim waits here
            # and then finds next_fire moved; SQLite has serialised us with BEGIN IMMEDIATE.
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
            if _handled(conn, schedule_id, [r["fire_time"] for r in rows]):
                # next_fire was moved back onto a fire time already handled (a resume); the
                # tick's primary key allows one run per fire time. Nothing changes: the
                # swap is undone under the row lock the claim still holds.
                conn.execute(
                    update(schedules)
                    .where(schedules.c.id == schedule_id)
                    .values(next_fire=expected)
                )
                return False
            conn.execute(insert(schedule_ticks), rows)
        return True


def _handled(conn: Connection, schedule_id: str, fire_times: list[datetime]) -> bool:
    """Whether any of ``fire_times`` of the schedule is already a tick. Only claims insert
    ticks, each under the schedule's row lock, which the caller holds: no race."""
    found = conn.scalar(
        select(schedule_ticks.c.fire_time)
        .where(
            schedule_ticks.c.schedule_id == schedule_id,
            schedule_ticks.c.fire_time.in_(fire_times),
        )
        .limit(1)
    )
    return found is not None


def _check_following(following: datetime, last: datetime) -> datetime:
    following = check_aware(following, "next fire time")
    if following <= last:
        raise InvalidInput(f"the next fire time {following} is not after {last}")
    return following


def _tick_values(
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


def _schedule(row: Row[Any]) -> Schedule:
    values = row._asdict()
    values["input"] = json.loads(values["input"])
    values["paused"] = bool(values["paused"])
    return Schedule(**values)


def _tick(row: Row[Any]) -> Tick:
    return Tick(**row._asdict())
