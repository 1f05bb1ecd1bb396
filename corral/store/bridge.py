"""The bridge's records: audit rows, usage events, connection profiles, sealed signing keys.

Writes come in batches (the bridge's sink flushes every few tens of milliseconds), so each
``add_*`` takes a list and is one transaction.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from corral.store.engine import transaction
from corral.store.schema import bridge_calls, connections, runs, signing_keys, usage_events


class BridgeRecords:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    # -- audit and usage ---------------------------------------------------------------------

    def add_calls(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            with transaction(self._engine, write=True) as conn:
                conn.execute(insert(bridge_calls), rows)

    def calls(self, run: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        query = select(bridge_calls).order_by(bridge_calls.c.id).limit(limit)
        if run is not None:
            query = query.where(bridge_calls.c.run == run)
        with transaction(self._engine) as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def add_usage(self, rows: list[dict[str, Any]]) -> None:
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

    def usage(self, run: str) -> list[dict[str, Any]]:
        with transaction(self._engine) as conn:
            rows = conn.execute(
                select(usage_events).where(usage_events.c.run == run).order_by(usage_events.c.id)
            )
            return [dict(r._mapping) for r in rows]

    # -- runs, as the bridge sees them -------------------------------------------------------

    def run_is_live(self, run: str) -> bool:
        with transaction(self._engine) as conn:
            row = conn.execute(select(runs.c.finished_at).where(runs.c.id == run)).first()
        return row is not None and row.finished_at is None

    def ended_since(self, since: datetime) -> tuple[list[str], datetime]:
        """Runs that finished after ``since``, and the cursor for the next call."""
        now = datetime.now(UTC)
        with transaction(self._engine) as conn:
            rows = conn.execute(
                select(runs.c.id).where(runs.c.finished_at > since, runs.c.finished_at <= now)
            )
            return [r.id for r in rows], now

    # -- connection profiles -----------------------------------------------------------------

    def put_connection(self, name: str, base_url: str, auth: str, meter: str | None) -> None:
        row = {
            "name": name,
            "base_url": base_url,
            "auth": auth,
            "meter": meter,
            "updated_at": datetime.now(UTC),
        }
        with transaction(self._engine, write=True) as conn:
            # One statement: two processes putting the same new profile cannot collide.
            dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
            statement = dialect.insert(connections).values(row)
            conn.execute(
                statement.on_conflict_do_update(
                    index_elements=["name"],
                    set_={k: statement.excluded[k] for k in row if k != "name"},
                )
            )

    def connection(self, name: str) -> dict[str, Any] | None:
        with transaction(self._engine) as conn:
            row = conn.execute(select(connections).where(connections.c.name == name)).first()
        return None if row is None else dict(row._mapping)

    def all_connections(self) -> list[dict[str, Any]]:
        with transaction(self._engine) as conn:
            rows = conn.execute(select(connections).order_by(connections.c.name))
            return [dict(r._mapping) for r in rows]

    def remove_connection(self, name: str) -> bool:
        with transaction(self._engine, write=True) as conn:
            return conn.execute(delete(connections).where(connections.c.name == name)).rowcount > 0

    # -- signing keys ------------------------------------------------------------------------

    def add_signing_key(self, kid: str, sealed: bytes, created_at: datetime) -> None:
        """Store a signing key; storing the same key id again is a no-op (one statement, so
        it holds between processes too)."""
        with transaction(self._engine, write=True) as conn:
            dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
            conn.execute(
                dialect.insert(signing_keys)
                .values(kid=kid, sealed_private_key=sealed, created_at=created_at)
                .on_conflict_do_nothing(index_elements=["kid"])
            )

    def signing_keys(self, since: datetime) -> list[tuple[str, bytes, datetime]]:
        with transaction(self._engine) as conn:
            rows = conn.execute(
                select(signing_keys)
                .where(signing_keys.c.created_at >= since)
                .order_by(signing_keys.c.created_at)
            )
            return [(r.kid, r.sealed_private_key, r.created_at) for r in rows]

    def replace_signing_key(self, kid: str, old: bytes, new: bytes) -> bool:
        """Store ``new`` as key ``kid``'s sealed value if it still is ``old`` (a rewrap that
        another process did first, or a key that is gone, is left alone): True if replaced."""
        with transaction(self._engine, write=True) as conn:
            done = conn.execute(
                update(signing_keys)
                .where(signing_keys.c.kid == kid, signing_keys.c.sealed_private_key == old)
                .values(sealed_private_key=new)
            )
            return done.rowcount == 1
