"""Run figures for the metrics: read-only aggregates over runs, their events, the bridge's
audit rows and the ledger.

Every run is counted here whichever process executed it (a worker of ``corral serve``, a
``corral worker`` elsewhere, ``corral run``): the figures are what the store holds, not what
one process saw. ``figures`` is one read transaction of grouped queries; durations are
bucketed by the database (``_histogram``), so a scrape moves a few hundred numbers, however
many runs there are. Nothing here writes.

What counts: a run is *admitted* once its ``run.admitted`` event is recorded (a run parked
for its idempotency key and discarded for a twin never is), *ended* once its status is
terminal. Rows are never deleted, so every count only grows, as a Prometheus counter must.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import JSON, Float, case, cast, exists, func, or_, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql import ColumnElement, Select

from corral.states import TERMINAL
from corral.store.engine import transaction
from corral.store.schema import bridge_calls, ledger, run_events, runs


@dataclass(frozen=True)
class Histogram:
    """Observations bucketed by upper bound: ``buckets[i]`` counts those ``<= bounds[i]``
    (cumulative, as Prometheus has them); ``count`` and ``total`` cover all of them."""

    bounds: tuple[float, ...]
    buckets: tuple[int, ...]
    count: int = 0
    total: float = 0.0


@dataclass(frozen=True)
class Figures:
    ended: dict[tuple[str | None, str, str], int] = field(
        default_factory=dict
    )  # app, trigger, status
    admitted: dict[tuple[str | None, str], int] = field(default_factory=dict)  # app, trigger
    durations: dict[str, Histogram] = field(default_factory=dict)  # by trigger
    boots: Histogram | None = None
    swaps: Histogram | None = None
    bridge_calls: dict[tuple[str | None, int], int] = field(
        default_factory=dict
    )  # connection, status
    charged: dict[str | None, int] = field(default_factory=dict)  # micro-credits by app
    queued: int = 0


class RunStats:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def figures(self, bounds: Sequence[float]) -> Figures:
        """Every figure the metrics show, durations bucketed by ``bounds`` (seconds)."""
        bounds = tuple(sorted(bounds))
        ended = runs.c.status.in_(TERMINAL)
        with transaction(self._engine) as conn:
            counted = conn.execute(
                select(runs.c.app, runs.c.trigger, runs.c.status, func.count())
                .where(ended)
                .group_by(runs.c.app, runs.c.trigger, runs.c.status)
            ).all()
            admitted_event = exists().where(
                run_events.c.run_id == runs.c.id, run_events.c.kind == "run.admitted"
            )
            admitted = conn.execute(
                select(runs.c.app, runs.c.trigger, func.count())
                .where(admitted_event)
                .group_by(runs.c.app, runs.c.trigger)
            ).all()

            wall = (
                select(
                    runs.c.trigger.label("key"),
                    _seconds(conn, runs.c.started_at, runs.c.finished_at).label("seconds"),
                )
                .where(ended, runs.c.started_at.is_not(None), runs.c.finished_at.is_not(None))
                .subquery()
            )
            durations = _histogram(conn, wall, bounds, grouped=True)

            # A run's boot: its last sandbox booted to its last runner started (the attempt
            # that ran), for ended runs, as the run's trace draws it.
            marks = (
                select(
                    run_events.c.run_id,
                    func.max(case((run_events.c.kind == "sandbox.booted", run_events.c.at))).label(
                        "booted"
                    ),
                    func.max(case((run_events.c.kind == "runner.started", run_events.c.at))).label(
                        "started"
                    ),
                )
                .join(runs, runs.c.id == run_events.c.run_id)
                .where(ended, run_events.c.kind.in_(("sandbox.booted", "runner.started")))
                .group_by(run_events.c.run_id)
                .subquery()
            )
            boot = _seconds(conn, marks.c.booted, marks.c.started)
            boots = (
                select(case((boot < 0, 0.0), else_=boot).label("seconds"))
                .where(marks.c.booted.is_not(None), marks.c.started.is_not(None))
                .subquery()
            )
            swaps = (
                select(
                    func.coalesce(_json_number(conn, run_events.c.data, "seconds"), 0.0).label(
                        "seconds"
                    )
                )
                .join(runs, runs.c.id == run_events.c.run_id)
                .where(ended, run_events.c.kind == "swap.locked")
                .subquery()
            )

            calls = conn.execute(
                select(bridge_calls.c.connection, bridge_calls.c.status, func.count())
                .where(
                    bridge_calls.c.run.is_not(None),
                    or_(
                        bridge_calls.c.connection.is_(None), bridge_calls.c.connection != "_corral"
                    ),
                )
                .group_by(bridge_calls.c.connection, bridge_calls.c.status)
            ).all()
            charged = conn.execute(
                select(ledger.c.app, -func.sum(ledger.c.micros))
                .where(ledger.c.kind == "deduction")
                .group_by(ledger.c.app)
            ).all()
            queued = conn.scalar(
                select(func.count()).select_from(runs).where(runs.c.status == "queued")
            )
            return Figures(
                ended={(r[0], r[1], r[2]): int(r[3]) for r in counted},
                admitted={(r[0], r[1]): int(r[2]) for r in admitted},
                durations=durations,
                boots=_histogram(conn, boots, bounds)[""],
                swaps=_histogram(conn, swaps, bounds)[""],
                bridge_calls={(r[0], int(r[1])): int(r[2]) for r in calls},
                charged={r[0]: int(r[1] or 0) for r in charged},
                queued=int(queued or 0),
            )


def _histogram(
    conn: Connection, source: Any, bounds: tuple[float, ...], *, grouped: bool = False
) -> dict[str, Histogram]:
    """Bucket ``source.c.seconds`` (grouped by ``source.c.key`` if ``grouped``) in the
    database: one row per group, whatever the number of observations."""
    seconds = source.c.seconds
    columns: list[ColumnElement[Any]] = [
        func.count(seconds),
        func.coalesce(func.sum(seconds), 0.0),
        *(func.sum(case((seconds <= bound, 1), else_=0)) for bound in bounds),
    ]
    query: Select[Any]
    if grouped:
        query = select(source.c.key, *columns).where(seconds.is_not(None)).group_by(source.c.key)
    else:
        query = select(*columns).where(seconds.is_not(None))
    found: dict[str, Histogram] = {}
    for row in conn.execute(query).all():
        key, values = (str(row[0]), row[1:]) if grouped else ("", row)
        found[key] = Histogram(
            bounds,
            tuple(int(v or 0) for v in values[2:]),
            int(values[0] or 0),
            float(values[1] or 0.0),
        )
    if not grouped:  # an aggregate without GROUP BY always answers one row
        found.setdefault("", Histogram(bounds, tuple(0 for _ in bounds)))
    return found


def _seconds(conn: Connection, start: Any, end: Any) -> ColumnElement[Any]:
    """``end - start`` in seconds, as the engine spells it."""
    if conn.dialect.name == "postgresql":
        return func.extract("epoch", end - start)
    # SQLite keeps timestamps as ISO text (UTC): julianday reads them, in days.
    return (func.julianday(end) - func.julianday(start)) * 86400.0


def _json_number(conn: Connection, column: Any, key: str) -> ColumnElement[Any]:
    """The number at ``key`` of the JSON object in the text ``column``."""
    if conn.dialect.name == "postgresql":
        return cast(func.json_extract_path_text(cast(column, JSON), key), Float)
    return cast(func.json_extract(column, f"$.{key}"), Float)
