"""Trace spans: the ``spans`` table, where the default exporter of ``corral.observability``
writes each run's finished spans and the API and the tests read them back."""

from __future__ import annotations

import dataclasses
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.engine import Engine, Row

from corral.store.engine import transaction
from corral.store.rows import Span
from corral.store.schema import spans


class Spans:
    """The ``spans`` table. Safe to share between threads."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def add(self, batch: list[Span]) -> None:
        """Append finished spans, all or none."""
        if batch:
            with transaction(self._engine, write=True) as conn:
                conn.execute(insert(spans), [dataclasses.asdict(s) for s in batch])

    def for_run(self, run_id: str) -> list[Span]:
        """The spans of ``run_id``'s trace, by start time."""
        with transaction(self._engine) as conn:
            rows = conn.execute(
                select(spans).where(spans.c.run_id == run_id).order_by(spans.c.start)
            )
            return [_span(r) for r in rows]


def _span(row: Row[Any]) -> Span:
    return Span(**row._asdict())
