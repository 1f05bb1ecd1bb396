"""Usage and audit: the ``bridge_calls`` table (one audit row per call through the bridge)
and the ``usage_events`` table (model tokens, forwarded calls, sandbox seconds per run).

Both are append-only. Writes come in batches (the bridge's sink flushes every few tens of
milliseconds), so each ``add_*`` takes a list of the bridge's records and is one
transaction. What usage costs is ``corral.billing``'s to say.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.engine import Engine, Row

from corral.store.engine import transaction
from corral.store.rows import BridgeCall, UsageEvent
from corral.store.schema import bridge_calls, usage_events


class Usage:
    """The ``bridge_calls`` and ``usage_events`` tables. Safe to share between threads."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def add_calls(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Append audit rows: the columns of ``bridge_calls`` but its ``id``."""
        if rows:
            with transaction(self._engine, write=True) as conn:
                conn.execute(insert(bridge_calls), [dict(r) for r in rows])

    def calls(self, run: str | None = None, limit: int = 1000) -> list[BridgeCall]:
        """Audit rows (of ``run``, if given), oldest first."""
        query = select(bridge_calls).order_by(bridge_calls.c.id).limit(limit)
        if run is not None:
            query = query.where(bridge_calls.c.run == run)
        with transaction(self._engine) as conn:
            return [_call(r) for r in conn.execute(query)]

    def add_events(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Append usage events: ``at``, ``run``, ``user``, ``kind``, and what applies of
        ``connection``, ``input_tokens``, ``output_tokens`` and ``quantity``."""
        if not rows:
            return
        normalised = [
            {
                "at": r["at"],
                "run": r["run"],
                "user": r["user"],
                "connection": r.get("connection"),
                "kind": r["kind"],
                "input_tokens": int(r.get("input_tokens", 0)),
                "output_tokens": int(r.get("output_tokens", 0)),
                "quantity": float(r.get("quantity", 0.0)),
            }
            for r in rows
        ]
        with transaction(self._engine, write=True) as conn:
            conn.execute(insert(usage_events), normalised)

    def events(self, run: str) -> list[UsageEvent]:
        """The usage events of ``run``, oldest first."""
        with transaction(self._engine) as conn:
            rows = conn.execute(
                select(usage_events).where(usage_events.c.run == run).order_by(usage_events.c.id)
            )
            return [_usage(r) for r in rows]


def _call(row: Row[Any]) -> BridgeCall:
    return BridgeCall(**row._asdict())


def _usage(row: Row[Any]) -> UsageEvent:
    return UsageEvent(**row._asdict())
