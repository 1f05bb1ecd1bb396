"""Schedules: what a cron schedule may be, and when it fires next.

The store keeps schedules and claims their ticks (``corral.store.schedules``); the policy is
here: an expression and a time zone are checked (``cron``), the misfire policy is one of
``MISFIRE_POLICIES``, the input would be admitted, and every fire time is computed here and
handed to the store. What a missed fire time becomes when a scheduler comes back is the
scheduler's (``scheduler.py``); what becomes of the fire times missed while a schedule was
paused is ``resume``'s.
"""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime
from typing import Any, Final

from corral.errors import InvalidInput
from corral.limits import MAX_INPUT, json_size
from corral.store import Schedule, Store
from corral.store.rows import check_aware
from corral.triggers import cron

MISFIRE_POLICIES: Final = ("skip", "run_once")


def idempotency_key(schedule_id: str, fire_time: datetime) -> str:
    """The idempotency key of the run a tick admits: the same for every retry of the tick."""
    return f"schedule:{schedule_id}:{fire_time.astimezone(UTC).isoformat()}"


def following(schedule: Schedule, after: datetime) -> datetime:
    """The schedule's first fire time after ``after``."""
    return cron.next_fire(schedule.cron, schedule.timezone, after)


def add(
    store: Store,
    app: str,
    cron_expr: str,
    timezone: str,
    input: Any = None,
    user: str = "local",
    misfire: str = "skip",
    *,
    now: datetime,
) -> Schedule:
    """Schedule ``app``; it first fires at the first fire time after ``now``. Anything that
    does not fit is refused before anything is stored."""
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
    return store.schedules.add(
        Schedule(
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
    )


def resume(store: Store, schedule_id: str, *, now: datetime) -> Schedule:
    """Fire ``schedule_id`` again, from ``now`` on. The paused period is not caught up,
    except that under ``run_once`` a fire time missed while paused runs once (the latest).
    Resuming a schedule that is not paused changes nothing."""
    now = check_aware(now, "now")

    def next_fire(paused: Schedule) -> datetime:
        if paused.misfire == "run_once" and paused.next_fire <= now:
            return cron.previous_fire(paused.cron, paused.timezone, now)
        return cron.next_fire(paused.cron, paused.timezone, now)

    return store.schedules.resume(schedule_id, next_fire)
