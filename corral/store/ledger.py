"""The credit ledger: the ``ledger`` table, append-only, in integer micro-credits.

Prices and what to charge are ``corral.billing``'s; here an entry is stored at most once per
``source`` (however often billing runs over the same usage), and only if its amount fits its
kind and keeps every balance exact (``check_entry`` here, the table's CHECK constraints
below it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine, Row

from corral.errors import BalanceLimit, InvalidInput
from corral.store.engine import transaction
from corral.store.rows import LedgerEntry
from corral.store.schema import LEDGER_MAX_MICROS, ledger


class Ledger:
    """The ``ledger`` table. Safe to share between threads."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def post(self, entries: list[LedgerEntry]) -> int:
        """Append entries; one whose ``source`` is already in the ledger is skipped (exactly
        once per usage event, however often billing runs). Returns how many were new.

        Each entry's ``micros`` must be an integer whose sign fits its ``kind`` (see
        ``check_entry``), whoever posts it; and a credit may not lift the user's balance
        past ``LEDGER_MAX_MICROS``, which keeps every balance exact.
        """
        if not entries:
            return 0
        for entry in entries:
            check_entry(entry)
        new = 0
        with transaction(self._engine, write=True) as conn:
            upsert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
            for entry in entries:  # RETURNING, not rowcount: psycopg reports -1 for batches
                if entry.micros > 0:
                    after = _balance(conn, entry.user) + entry.micros
                    if after > LEDGER_MAX_MICROS:
                        raise BalanceLimit(
                            f"that would make {entry.user!r}'s balance {after} micro-credits; "
                            f"a balance may be at most {LEDGER_MAX_MICROS}"
                        )
                values = dataclasses.asdict(entry)
                del values["id"]  # the table numbers its entries
                statement = (
                    upsert(ledger)
                    .values(**values)
                    .on_conflict_do_nothing(index_elements=["source"])
                    .returning(ledger.c.id)
                )
                new += len(conn.execute(statement).all())
        return new

    def balance(self, user: str) -> int:
        """The user's balance in micro-credits: the exact sum of their entries."""
        with transaction(self._engine) as conn:
            return _balance(conn, user)

    def spent(
        self, *, run: str | None = None, app: str | None = None, user: str | None = None
    ) -> int:
        """Micro-credits deducted (a positive number), for a run, an app or a user."""
        query = select(func.coalesce(func.sum(ledger.c.micros), 0)).where(
            ledger.c.kind == "deduction"
        )
        if run is not None:
            query = query.where(ledger.c.run == run)
        if app is not None:
            query = query.where(ledger.c.app == app)
        if user is not None:
            query = query.where(ledger.c.user == user)
        with transaction(self._engine) as conn:
            return -int(conn.scalar(query) or 0)

    def entries(self, *, run: str | None = None, user: str | None = None) -> list[LedgerEntry]:
        """Entries (of a run, of a user), in the order they were posted."""
        query = select(ledger).order_by(ledger.c.id)
        if run is not None:
            query = query.where(ledger.c.run == run)
        if user is not None:
            query = query.where(ledger.c.user == user)
        with transaction(self._engine) as conn:
            return [_entry(r) for r in conn.execute(query)]


def check_entry(entry: LedgerEntry) -> None:
    """Refuse a ledger entry whose amount is not an integer of micro-credits fitting its kind:
    a grant is positive, a deduction not positive, an adjustment not zero."""
    kind, micros = entry.kind, entry.micros
    if isinstance(micros, bool) or not isinstance(micros, int):
        raise InvalidInput(f"a ledger amount is an integer of micro-credits, not {micros!r}")
    if abs(micros) > LEDGER_MAX_MICROS:
        raise InvalidInput(
            f"a ledger entry is at most {LEDGER_MAX_MICROS} micro-credits in size, not {micros}"
        )
    fits = {
        "grant": micros > 0,
        "deduction": micros <= 0,
        "adjustment": micros != 0,
    }
    if kind not in fits:
        raise InvalidInput(f"unknown ledger entry kind {kind!r}; one of {', '.join(fits)}")
    if not fits[kind]:
        raise InvalidInput(f"a {kind} of {micros} micro-credits does not fit its kind")


def _balance(conn: Connection, user: str) -> int:
    total = conn.scalar(
        select(func.coalesce(func.sum(ledger.c.micros), 0)).where(ledger.c.user == user)
    )
    return int(total or 0)


def _entry(row: Row[Any]) -> LedgerEntry:
    return LedgerEntry(**row._asdict())
