"""Cron schedule maths: wall-time matching across daylight saving time, and clear refusals."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from itertools import pairwise
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter

from corral.errors import InvalidCron, InvalidInput, InvalidTimeZone
from corral.triggers.cron import check_cron, fires_between, next_fire, previous_fire, time_zone

PARIS, NEW_YORK = "Europe/Paris", "America/New_York"


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def local(
    tz: str, year: int, month: int, day: int, hour: int = 0, minute: int = 0, *, fold: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=ZoneInfo(tz), fold=fold)


def chain(expr: str, tz: str, after: datetime, n: int) -> list[datetime]:
    out = []
    for _ in range(n):
        after = next_fire(expr, tz, after)
        out.append(after)
    return out


# -- the same wall time, whatever the offset -------------------------------------------------


@pytest.mark.parametrize(
    ("tz", "start", "utc_hours"),
    [
        # Paris: CET (+1) until 2024-03-31, CEST (+2) until 2024-10-27, then CET again.
        (PARIS, utc(2024, 3, 20), [8, 7, 7]),
        (PARIS, utc(2024, 10, 16), [7, 8, 8]),
        # New York: EST (-5) until 2024-03-10, EDT (-4) until 2024-11-03, then EST again.
        (NEW_YORK, utc(2024, 3, 1), [14, 13, 13]),
        (NEW_YORK, utc(2024, 10, 25), [13, 14, 14]),
    ],
    ids=["paris-spring", "paris-autumn", "new-york-spring", "new-york-autumn"],
)
def test_monday_nine_is_nine_local_across_both_transitions(
    tz: str, start: datetime, utc_hours: list[int]
) -> None:
    fires = chain("0 9 * * MON", tz, start, 3)
    assert [f.hour for f in fires] == utc_hours
    for f in fires:
        assert f.tzinfo is UTC
        seen = f.astimezone(ZoneInfo(tz))
        assert (seen.weekday(), seen.hour, seen.minute) == (0, 9, 0)
    assert [b - a for a, b in pairwise(fires)] != [timedelta(weeks=1)] * 2  # UTC moved


def test_exact_instants_either_side_of_the_paris_transitions() -> None:
    assert next_fire("0 9 * * MON", PARIS, utc(2024, 3, 26)) == utc(2024, 4, 1, 7)
    assert next_fire("0 9 * * MON", PARIS, utc(2024, 3, 19)) == utc(2024, 3, 25, 8)
    assert next_fire("0 9 * * MON", PARIS, utc(2024, 10, 22)) == utc(2024, 10, 28, 8)
    assert next_fire("0 9 * * MON", PARIS, utc(2024, 10, 15)) == utc(2024, 10, 21, 7)


# -- wall times that do not exist, or exist twice --------------------------------------------


@pytest.mark.parametrize(
    ("tz", "day", "jump"),
    [
        (PARIS, (2024, 3, 31), utc(2024, 3, 31, 1)),  # 02:00 CET -> 03:00 CEST
        (NEW_YORK, (2024, 3, 10), utc(2024, 3, 10, 7)),  # 02:00 EST -> 03:00 EDT
    ],
    ids=["paris", "new-york"],
)
def test_a_skipped_wall_time_fires_once_when_the_clock_jumps_past_it(
    tz: str, day: tuple[int, int, int], jump: datetime
) -> None:
    before = local(tz, *day) - timedelta(days=1)
    fires = fires_between("30 2 * * *", tz, before, before + timedelta(days=3))
    assert len(fires) == 3  # once a day, the day of the jump included
    assert fires[1] == jump
    assert jump.astimezone(ZoneInfo(tz)).hour == 3
    # the days either side run at 02:30 local
    assert [f.astimezone(ZoneInfo(tz)).strftime("%H:%M") for f in fires] == [
        "02:30",
        "03:00",
        "02:30",
    ]


@pytest.mark.parametrize(
    ("tz", "expr", "wall"),
    [
        (PARIS, "30 2 * * *", (2024, 10, 27, 2, 30)),  # 02:00-03:00 happens twice
        (NEW_YORK, "30 1 * * *", (2024, 11, 3, 1, 30)),  # 01:00-02:00 happens twice
    ],
    ids=["paris", "new-york"],
)
def test_a_repeated_wall_time_fires_once_at_its_first_occurrence(
    tz: str, expr: str, wall: tuple[int, int, int, int, int]
) -> None:
    first = local(tz, *wall, fold=0).astimezone(UTC)
    second = local(tz, *wall, fold=1).astimezone(UTC)
    assert second - first == timedelta(hours=1)
    assert next_fire(expr, tz, first - timedelta(minutes=1)) == first
    # after the first occurrence, and from inside the repeated hour, the next one is tomorrow
    for after in (first, first + timedelta(minutes=40), second - timedelta(minutes=1)):
        nxt = next_fire(expr, tz, after)
        assert nxt > second
        assert nxt - first == timedelta(days=1, hours=1)


# The start of a day of real time with a transition of 2024 in the middle.
AROUND = {
    (PARIS, "spring"): utc(2024, 3, 30, 13),
    (PARIS, "autumn"): utc(2024, 10, 26, 13),
    (NEW_YORK, "spring"): utc(2024, 3, 9, 19),
    (NEW_YORK, "autumn"): utc(2024, 11, 2, 18),
}


@pytest.mark.parametrize(("tz", "season"), list(AROUND), ids=[f"{z}-{s}" for z, s in AROUND])
@pytest.mark.parametrize("expr", ["* * * * *", "*/7 * * * *", "0 * * * *", "30 2 * * *"])
def test_every_fire_time_matches_an_independent_minute_by_minute_reading(
    tz: str, season: str, expr: str
) -> None:
    """Walk real time a minute at a time through a transition and say, for each minute,
    whether it fires under the two rules; ``fires_between`` must agree exactly."""
    zone, start, span = ZoneInfo(tz), AROUND[tz, season], timedelta(days=1)
    walls, matching = croniter(expr, start.replace(tzinfo=None) - timedelta(days=1)), set()
    while (wall := walls.get_next(datetime)) < start.replace(tzinfo=None) + 2 * span:
        matching.add(wall)  # every matching wall time, ignoring time zones altogether
    expected, seen = [], set()
    previous = start.astimezone(zone).replace(tzinfo=None)
    u = start + timedelta(minutes=1)
    while u <= start + span:
        reading = u.astimezone(zone).replace(tzinfo=None, fold=0)
        gap = int((reading - previous).total_seconds() // 60)  # 1, or more across a jump
        skipped_match = any(previous + timedelta(minutes=m) in matching for m in range(1, gap))
        if (reading in matching and reading not in seen) or skipped_match:
            expected.append(u)
        seen.add(reading)
        previous = reading
        u += timedelta(minutes=1)
    got = fires_between(expr, tz, start, start + span)
    assert got == expected
    assert got == sorted(set(got))  # strictly increasing: nothing fires twice


def test_every_minute_keeps_firing_every_real_minute_through_the_spring_jump() -> None:
    fires = fires_between("* * * * *", PARIS, utc(2024, 3, 31, 0, 30), utc(2024, 3, 31, 1, 30))
    assert fires == [utc(2024, 3, 31, 0, 31) + timedelta(minutes=i) for i in range(60)]


# -- instants in and out ----------------------------------------------------------------------


def test_next_fire_is_strictly_after_and_accepts_any_aware_offset() -> None:
    nine = utc(2024, 5, 6, 7)  # Monday 09:00 in Paris (CEST)
    assert next_fire("0 9 * * MON", PARIS, nine) == nine + timedelta(weeks=1)
    assert next_fire("0 9 * * MON", PARIS, nine - timedelta(microseconds=1)) == nine
    tokyo = timezone(timedelta(hours=9))
    assert next_fire("0 9 * * MON", PARIS, datetime(2024, 5, 6, 15, 59, tzinfo=tokyo)) == nine


def test_naive_instants_are_refused() -> None:
    with pytest.raises(InvalidInput, match="timezone-aware"):
        next_fire("* * * * *", "UTC", datetime(2024, 1, 1))
    with pytest.raises(InvalidInput, match="end must be"):
        fires_between("* * * * *", "UTC", utc(2024, 1, 1), datetime(2024, 1, 2))


def test_fires_between_is_half_open_ordered_and_limited() -> None:
    start, end = utc(2024, 1, 1, 9), utc(2024, 1, 1, 10)
    every15 = fires_between("*/15 * * * *", "UTC", start, end)
    assert every15 == [utc(2024, 1, 1, 9, m) for m in (15, 30, 45)] + [end]  # (start, end]
    assert fires_between("*/15 * * * *", "UTC", start, end, limit=2) == every15[:2]
    assert fires_between("*/15 * * * *", "UTC", end, start) == []
    weekdays = fires_between("0 9 * * MON-FRI", PARIS, utc(2024, 3, 1), utc(2024, 4, 1))
    assert len(weekdays) == 21  # March 2024 has 21 weekdays
    assert {f.astimezone(ZoneInfo(PARIS)).hour for f in weekdays} == {9}


def test_day_of_month_and_day_of_week_restricted_together_fire_on_either() -> None:
    fires = fires_between("0 0 13 * FRI", "UTC", utc(2024, 9, 1), utc(2024, 10, 1))
    assert [f.day for f in fires] == [6, 13, 20, 27]  # Fridays, and the 13th (a Friday too)
    fires = fires_between("0 0 1 * SUN,7", "UTC", utc(2024, 8, 31), utc(2024, 9, 10))
    assert [f.day for f in fires] == [1, 8]  # 1 September 2024 is a Sunday; 7 is Sunday too


def test_previous_fire_is_the_last_at_or_before() -> None:
    nine = utc(2024, 5, 6, 7)
    assert previous_fire("0 9 * * MON", PARIS, nine) == nine
    assert previous_fire("0 9 * * MON", PARIS, nine + timedelta(days=3)) == nine
    assert previous_fire("0 9 * * MON", PARIS, nine - timedelta(seconds=1)) == nine - timedelta(
        weeks=1
    )
    # inside the repeated hour in Paris: 02:40 CET (second pass) -> 02:40 CEST was earlier
    second_pass = local(PARIS, 2024, 10, 27, 2, 45, fold=1)
    earlier = local(PARIS, 2024, 10, 27, 2, 40).astimezone(UTC)
    assert previous_fire("*/20 * * * *", PARIS, second_pass) == earlier
    assert previous_fire("30 2 * * *", PARIS, utc(2024, 3, 31, 1, 30)) == utc(2024, 3, 31, 1)
    assert previous_fire("0 0 29 2 *", "UTC", utc(2025, 1, 1)) == utc(2024, 2, 29)


# -- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "says"),
    [
        ("", "it is empty"),
        ("* * * *", "it has 4 field(s)"),
        ("0 0 * * * 2024", "it has 6 field(s)"),
        ("@daily", "it has 1 field(s)"),
        ("60 * * * *", "minute 60 is out of range 0-59"),
        ("0 24 * * *", "hour 24 is out of range 0-23"),
        ("0 0 0 * *", "day-of-month 0 is out of range 1-31"),
        ("0 0 * 13 *", "month 13 is out of range 1-12"),
        ("0 0 * * 8", "day-of-week 8 is out of range 0-7"),
        ("1-70 * * * *", "minute 70 is out of range"),
        ("*/0 * * * *", "minute step '*/0' is zero"),
        ("0 0 * * FRI-MON", "day-of-week range 'FRI-MON' runs backwards"),
        ("0 0 * FOO *", "month 'FOO' is not a known name"),
        ("0 0 * * JAN", "day-of-week 'JAN' is not a known name"),
        ("MON * * * *", "minute 'MON' is not a known name (numbers only)"),
        ("0 0 L * *", "day-of-month field 'L'"),
        ("0 0 * * 5#2", "day-of-week field '5#2'"),
        ("H * * * *", "minute field 'H'"),
        ("0 0 1,,2 * *", "'' is not *, a number"),
        ("0 0 31 2 *", "it never fires"),
        ("0 0 30 2 *", "it never fires"),
    ],
)
def test_invalid_expressions_are_refused_naming_the_expression(expr: str, says: str) -> None:
    with pytest.raises(InvalidCron) as caught:
        next_fire(expr, "UTC", utc(2024, 1, 1))
    assert says in caught.value.detail
    assert repr(expr) in caught.value.detail
    assert "minute hour day-of-month month day-of-week" in caught.value.detail
    assert caught.value.code == "invalid_cron" and isinstance(caught.value, InvalidInput)


def test_non_string_expression_is_refused() -> None:
    with pytest.raises(InvalidCron, match="not a string"):
        check_cron(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "tz", ["Mars/Olympus", "europe/paris", "", "  ", "Europe", "../etc/passwd", "/etc/localtime"]
)
def test_invalid_time_zones_are_refused_naming_the_zone(tz: str) -> None:
    with pytest.raises(InvalidTimeZone) as caught:
        next_fire("* * * * *", tz, utc(2024, 1, 1))
    assert repr(tz) in caught.value.detail
    assert "IANA" in caught.value.detail
    assert caught.value.code == "invalid_time_zone" and isinstance(caught.value, InvalidInput)


def test_valid_inputs_are_normalised() -> None:
    assert check_cron("  0   9 * *   mon-fri ") == "0 9 * * MON-FRI"
    assert check_cron("*/15 0-6,22,23 1-31/2 jan,Jul *") == "*/15 0-6,22,23 1-31/2 JAN,JUL *"
    assert str(time_zone("America/New_York")) == "America/New_York"
    assert str(time_zone("UTC")) == "UTC"
