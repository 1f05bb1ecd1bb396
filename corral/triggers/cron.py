"""Cron schedule maths: which instants a five-field cron expression names in a time zone.

Pure functions of their arguments: nothing here reads the clock or the database. Instants go
in and come out as aware UTC datetimes; a naive one is refused.

An expression is the standard five fields ``minute hour day-of-month month day-of-week``,
each ``*``, a number or a three-letter name (``JAN``, ``MON``), a range ``a-b``, a step
``/n`` on either, or a comma-separated list of those. Day-of-week 0 and 7 are Sunday. When
both day fields are restricted, a day matching either one fires (as in Vixie cron).
Extensions (``@daily``, ``L``, ``W``, ``#``, ``H``, a seconds or year field) are refused.

Matching is done on the local wall clock of the time zone, so ``0 9 * * MON`` fires at 09:00
in Europe/Paris in winter and in summer alike. Daylight saving time changes the wall clock
twice a year, and two rules settle it:

* a wall time that happens twice (the clocks go back) fires once, at its first occurrence;
* a wall time that never happens (the clocks go forward) fires at the instant the clock jumps
  past it, so ``30 2 * * *`` still runs once that day, at 03:00 in Paris.

Wall times are one minute apart, instants are strictly increasing, and no instant fires twice.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter

from corral.errors import InvalidCron, InvalidInput, InvalidTimeZone

FIELDS: Final = ("minute", "hour", "day-of-month", "month", "day-of-week")
_BOUNDS: Final = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
_NAMES: Final[tuple[tuple[str, ...], ...]] = (
    (),
    (),
    (),
    ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"),
    ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"),
)
_VALUE = r"(?:\d+|[A-Za-z]{3})"
_ITEM: Final = re.compile(rf"(?:\*|({_VALUE})(?:-({_VALUE}))?)(?:/(\d+))?")
# A wall time occurs at most twice, so walking past a repeated stretch takes a bounded number
# of candidates; this guard only turns a bug into an error instead of a hang.
_MAX_STALE_STEPS: Final = 100_000


def check_cron(expr: str) -> str:
    """Return ``expr`` normalised (single spaces, names upper-case); ``InvalidCron`` if bad."""
    if not isinstance(expr, str):
        raise InvalidCron(expr, "it is not a string")
    return _parse(expr)


def time_zone(name: str) -> ZoneInfo:
    """The IANA time zone called ``name``; ``InvalidTimeZone`` if there is none."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidTimeZone(name, "it is empty")
    return _zone(name)


def next_fire(expr: str, tz: str, after: datetime) -> datetime:
    """The first instant strictly after ``after`` at which ``expr`` fires in ``tz``."""
    return next(_instants(check_cron(expr), time_zone(tz), _utc(after, "after")))


def fires_between(
    expr: str, tz: str, start: datetime, end: datetime, limit: int | None = None
) -> list[datetime]:
    """Every instant in ``(start, end]`` at which ``expr`` fires in ``tz``, oldest first.

    With ``limit``, at most that many (the oldest ones).
    """
    spec, zone = check_cron(expr), time_zone(tz)
    start, end = _utc(start, "start"), _utc(end, "end")
    out: list[datetime] = []
    if limit is not None and limit <= 0:
        return out
    for instant in _instants(spec, zone, start):
        if instant > end:
            break
        out.append(instant)
        if limit is not None and len(out) >= limit:
            break
    return out


def previous_fire(expr: str, tz: str, at: datetime) -> datetime:
    """The last instant at or before ``at`` at which ``expr`` fires in ``tz``."""
    spec, zone, at = check_cron(expr), time_zone(tz), _utc(at, "at")
    # Local readings map to instants monotonically (see _instant), so once a wall time S maps
    # past ``at``, every fire time at or before ``at`` is a wall time below S.
    ahead = timedelta(minutes=1)
    while _instant(_reading(at + ahead, zone), zone) <= at:  # ``at`` is in a repeated hour
        ahead *= 2
    walls = croniter(spec, _reading(at + ahead, zone))
    for _ in range(_MAX_STALE_STEPS):
        instant = _instant(walls.get_prev(datetime), zone)
        if instant <= at:
            return instant
    raise InvalidCron(expr, "it does not move backwards in time")  # pragma: no cover


# -- internals -----------------------------------------------------------------------------


@lru_cache(maxsize=1024)
def _parse(expr: str) -> str:
    fields = expr.split()
    if len(fields) != 5:
        what = "it is empty" if not fields else f"it has {len(fields)} field(s)"
        raise InvalidCron(expr, what)
    normalised = [_check_field(i, field, expr) for i, field in enumerate(fields)]
    spec = " ".join(normalised)
    try:
        # A reference start date: a valid expression that never fires (31 February) fails here.
        croniter(spec, datetime(2000, 1, 1)).get_next(datetime)
    except CroniterError as exc:
        reason = "it never fires" if "find next date" in str(exc) else str(exc)
        raise InvalidCron(expr, reason) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidCron(expr, str(exc) or type(exc).__name__) from None
    return spec


def _check_field(index: int, field: str, expr: str) -> str:
    name = FIELDS[index]
    low, high = _BOUNDS[index]
    for item in field.split(","):
        match = _ITEM.fullmatch(item.upper())
        if match is None:
            raise InvalidCron(
                expr,
                f"{name} field {field!r}: {item!r} is not *, a number, a name, a range, "
                "a step or a list of those",
            )
        first, last, step = match.groups()
        values = [_value(index, v, expr) for v in (first, last) if v is not None]
        for value in values:
            if not low <= value <= high:
                raise InvalidCron(expr, f"{name} {value} is out of range {low}-{high}")
        if len(values) == 2 and values[0] > values[1]:
            raise InvalidCron(expr, f"{name} range {item!r} runs backwards")
        if step is not None and int(step) == 0:
            raise InvalidCron(expr, f"{name} step {item!r} is zero")
    return field.upper()


def _value(index: int, token: str, expr: str) -> int:
    if token.isdigit():
        return int(token)
    names = _NAMES[index]
    if token not in names:
        allowed = f"one of {', '.join(names)}" if names else "numbers only"
        raise InvalidCron(expr, f"{FIELDS[index]} {token!r} is not a known name ({allowed})")
    return names.index(token) + (1 if index == 3 else 0)  # months count from 1


@lru_cache(maxsize=256)
def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except ZoneInfoNotFoundError:
        raise InvalidTimeZone(name) from None
    except ValueError as exc:  # a path-like key
        raise InvalidTimeZone(name, f"it is not a zone name ({exc})") from None
    except OSError:  # a directory of zones (``Europe``), an unreadable file
        raise InvalidTimeZone(name) from None


def _utc(value: datetime, what: str) -> datetime:
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise InvalidInput(f"{what} must be a timezone-aware datetime, got {value!r}")
    return value.astimezone(UTC)


def _reading(instant: datetime, zone: ZoneInfo) -> datetime:
    """What a wall clock in ``zone`` shows at ``instant`` (naive)."""
    return instant.astimezone(zone).replace(tzinfo=None, fold=0)


def _instant(wall: datetime, zone: ZoneInfo) -> datetime:
    """When wall time ``wall`` fires: its first occurrence, or the jump over it if skipped.

    This mapping never decreases as ``wall`` grows, which is what lets callers walk wall
    times in order and stop at the first instant past a bound.
    """
    first = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if _reading(first, zone) == wall:
        return first  # it exists; fold=0 is its earlier occurrence when it repeats
    # A gap: before the jump the clock reads less than ``wall``, after it more. Per PEP 495
    # the two folds map ``wall`` with the offsets either side of the jump, so they bracket it.
    other = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
    low, high = int(min(first, other).timestamp()), int(max(first, other).timestamp())
    while high - low > 1:
        middle = (low + high) // 2
        if _reading(datetime.fromtimestamp(middle, UTC), zone) > wall:
            high = middle
        else:
            low = middle
    return datetime.fromtimestamp(high, UTC)


def _instants(spec: str, zone: ZoneInfo, after: datetime) -> Iterator[datetime]:
    """Every fire instant strictly after ``after``, in order, without end."""
    walls = croniter(spec, _reading(after, zone))
    last, stale = after, 0
    while True:
        instant = _instant(walls.get_next(datetime), zone)
        if instant > last:
            yield instant
            last, stale = instant, 0
            continue
        stale += 1  # a wall time already passed: its first occurrence, or a jump, was earlier
        if stale > _MAX_STALE_STEPS:  # pragma: no cover - a repeated stretch is finite
            raise InvalidCron(spec, "it does not move forwards in time")
