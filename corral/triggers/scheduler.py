"""The scheduler: fires due cron schedules as runs, through ``Pipeline.execute_agent``.

Any number of schedulers, in any number of processes, may run against one database; the
store's claim on each tick (``corral.store.schedules``) makes every fire time fire once. A
scheduler is a route into the pipeline and nothing more: a fired tick is one
``execute_agent(app, input, Trigger("schedule"), user=..., idempotency_key=<the tick>)``,
and whatever admission refuses (no credits, a concurrency limit, a deleted app) is recorded
on the tick as ``refused``.

``tick(now)`` handles everything due at ``now``; it reads no clock, so tests drive it with
simulated time. Fire times less than ``grace`` old count as on time. Older ones were missed
(the scheduler was down, or the schedule was late) and follow the schedule's misfire policy:

* ``skip``: each missed fire time is recorded ``skipped_misfire`` and no run starts for it;
* ``run_once``: one run starts for the most recent missed fire time, the others are skipped.

A fire time that is on time always runs, and it is the catch-up run as well: under
``run_once`` the missed ones before it are skipped rather than run a second time.

``start()`` runs ``tick`` in a thread, sleeping until the next due time but never more than
``max_sleep``, so schedules added or resumed elsewhere are seen within that.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from corral.errors import CorralError, ScheduleNotFound, StoreError
from corral.pipeline.service import Pipeline, Trigger
from corral.store import Schedule, Store, Tick
from corral.store.schedules import ENQUEUED, REFUSED, SKIPPED
from corral.triggers import cron
from corral.triggers.schedules import following, idempotency_key

GRACE: Final = timedelta(seconds=5)
CLAIM_TIMEOUT: Final = timedelta(seconds=60)  # a claim older than this was abandoned
MAX_SLEEP: Final = 0.5  # seconds
MIN_SLEEP: Final = 0.01  # seconds: even when something is overdue, never spin
BACKLOG: Final = 1000  # missed fire times handled per transaction after a long downtime

log = logging.getLogger("corral.scheduler")


@dataclass(frozen=True)
class Fired:
    """One fire time this scheduler handled, and what became of it."""

    schedule_id: str
    fire_time: datetime
    outcome: str  # enqueued | refused | skipped_misfire
    run_id: str | None = None
    error: str | None = None  # why admission refused it


def default_name() -> str:
    """A name that tells schedulers apart in tick records: host, process and a nonce."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Scheduler:
    def __init__(
        self,
        store: Store,
        pipeline: Pipeline,
        name: str | None = None,
        *,
        clock: Callable[[], datetime] = _utcnow,
        grace: timedelta = GRACE,
        claim_timeout: timedelta = CLAIM_TIMEOUT,
        max_sleep: float = MAX_SLEEP,
    ) -> None:
        self.store = store
        self.pipeline = pipeline
        self.name = name or default_name()
        self.clock = clock
        self.grace = grace
        self.claim_timeout = claim_timeout
        self.max_sleep = max_sleep
        self.failures = 0  # ticks the loop caught failing
        self.last_error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- one pass ----------------------------------------------------------------------------

    def tick(self, now: datetime) -> list[Fired]:
        """Fire everything due at ``now`` that no other scheduler has; returns what it fired.

        Also finishes ticks another scheduler claimed and abandoned (``claim_timeout`` ago).
        """
        fired: list[Fired] = []
        for stalled in self.store.schedules.stalled(now - self.claim_timeout):
            fired.extend(self._retake(stalled, now))
        for schedule in self.store.schedules.due(now):
            fired.extend(self._fire_due(schedule, now))
        return fired

    def _fire_due(self, schedule: Schedule, now: datetime) -> list[Fired]:
        fired: list[Fired] = []
        first = schedule.next_fire
        while True:
            later = cron.fires_between(schedule.cron, schedule.timezone, first, now, BACKLOG)
            due = [first, *later]
            if len(later) < BACKLOG or now - due[-1] <= self.grace:
                break
            # A backlog too long for one transaction: all of this stretch was missed, and the
            # latest missed fire time is further on, so skip it under either policy and go on.
            if not self.skip(schedule, due[:-1], now=now):
                return fired
            fired.extend(Fired(schedule.id, t, SKIPPED) for t in due[:-1])
            first = due[-1]
        late = [t for t in due if now - t > self.grace]
        on_time = due[len(late) :]
        if on_time:  # fire each on time; the missed ones before them are skipped
            plan = [(on_time[0], late)] + [(t, []) for t in on_time[1:]]
        elif schedule.misfire == "run_once":
            plan = [(late[-1], late[:-1])]
        else:
            if self.skip(schedule, late, now=now):
                fired.extend(Fired(schedule.id, t, SKIPPED) for t in late)
            return fired
        for fire_time, skipped in plan:
            admit = _Admission(self.pipeline, schedule, fire_time)
            if not self.fire(schedule, fire_time, admit, skipped=skipped, now=now):
                break  # another scheduler (or a pause, or a removal) got there first
            fired.extend(Fired(schedule.id, t, SKIPPED) for t in skipped)
            fired.append(admit.fired())
        return fired

    def _retake(self, tick: Tick, now: datetime) -> list[Fired]:
        try:
            schedule = self.store.schedules.get(tick.schedule_id)
        except ScheduleNotFound:
            return []  # removed since: its ticks are gone with it
        admit = _Admission(self.pipeline, schedule, tick.fire_time)
        if not self.retake(tick, admit, now=now):
            return []
        log.warning(
            "retook tick %s of schedule %s abandoned by %s",
            tick.fire_time.isoformat(),
            tick.schedule_id,
            tick.scheduler,
        )
        return [admit.fired()]

    # -- one tick: claim, admit, settle -------------------------------------------------------

    def fire(
        self,
        schedule: Schedule,
        fire_time: datetime,
        enqueue: Callable[[], str | None],
        *,
        skipped: Sequence[datetime] = (),
        now: datetime,
    ) -> bool:
        """Fire ``schedule`` at ``fire_time`` if no other scheduler has: claim, admit, settle.

        ``enqueue`` admits the run and returns its id, or None if admission was refused; it
        is called only if this scheduler's claim won. ``skipped`` are earlier, missed fire
        times recorded ``skipped_misfire`` in the same claim. Returns whether this call won
        the tick.

        If ``enqueue`` raises, the exception propagates and the tick stays ``claimed``, for
        ``retake`` to finish once the claim is stale.
        """
        if not self.store.schedules.claim(
            schedule.id,
            fire_time,
            self.name,
            following=following(schedule, fire_time),
            skipped=skipped,
            now=now,
        ):
            return False
        self.store.schedules.settle(schedule.id, fire_time, self.name, enqueue())
        return True

    def skip(self, schedule: Schedule, fire_times: Sequence[datetime], *, now: datetime) -> bool:
        """Record missed ``fire_times`` as skipped, if no other scheduler has."""
        if not fire_times:
            return False
        after = following(schedule, fire_times[-1])
        return self.store.schedules.skip(
            schedule.id, fire_times, self.name, following=after, now=now
        )

    def retake(self, tick: Tick, enqueue: Callable[[], str | None], *, now: datetime) -> bool:
        """Take over a stalled claim, if it is still the one ``tick`` shows, and finish it.

        ``enqueue`` must use the tick's idempotency key: the stalled scheduler may have
        admitted the run already, and then admission returns that run.
        """
        if not self.store.schedules.retake(tick, self.name, now=now):
            return False
        self.store.schedules.settle(tick.schedule_id, tick.fire_time, self.name, enqueue())
        return True

    # -- the loop ----------------------------------------------------------------------------

    def start(self) -> Scheduler:
        if self._thread is not None and self._thread.is_alive():
            return self
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._loop, name=f"scheduler {self.name}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                for f in self.tick(self.clock()):
                    log.info(
                        "schedule %s fired %s: %s %s",
                        f.schedule_id,
                        f.fire_time.isoformat(),
                        f.outcome,
                        f.run_id or "",
                    )
                wait = self._until_due(self.clock())
            except Exception as exc:  # the loop must outlive any one failed pass: record, go on
                self.failures += 1
                self.last_error = exc
                log.exception("scheduler %s: a pass failed; retrying", self.name)
                wait = self.max_sleep
            self._stop.wait(wait)

    def _until_due(self, now: datetime) -> float:
        due = self.store.schedules.next_due()
        if due is None:
            return self.max_sleep
        return min(max((due - now).total_seconds(), MIN_SLEEP), self.max_sleep)


class _Admission:
    """The ``enqueue`` a tick's claim calls: one ``execute_agent``, keyed by the tick."""

    def __init__(self, pipeline: Pipeline, schedule: Schedule, fire_time: datetime) -> None:
        self.pipeline, self.schedule, self.fire_time = pipeline, schedule, fire_time
        self.run_id: str | None = None
        self.error: str | None = None

    def __call__(self) -> str | None:
        s = self.schedule
        try:
            run = self.pipeline.execute_agent(
                s.app,
                s.input,
                Trigger("schedule"),
                user=s.user,
                idempotency_key=idempotency_key(s.id, self.fire_time),
            )
        except StoreError:
            raise  # the database failed, not admission: the claim stays, to be retaken
        except CorralError as exc:  # admission said no: no credits, a limit, no such app ...
            self.error = f"{exc.code}: {exc.detail}"
            log.warning(
                "schedule %s at %s refused: %s", s.id, self.fire_time.isoformat(), self.error
            )
            return None
        self.run_id = run.id
        return run.id

    def fired(self) -> Fired:
        outcome = ENQUEUED if self.run_id else REFUSED
        return Fired(self.schedule.id, self.fire_time, outcome, self.run_id, self.error)
