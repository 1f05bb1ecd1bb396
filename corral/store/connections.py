"""Connection profiles: the ``connections`` table (where a connection's calls go, how they
authenticate, how their usage is metered). The profiles built in are the bridge's
(``corral.bridge.connections``); this table holds the ones an operator added or changed."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine, Row

from corral.store.engine import transaction
from corral.store.rows import ConnectionProfile
from corral.store.schema import connections


class Connections:
    """The ``connections`` table. Safe to share between threads."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def put(self, name: str, base_url: str, auth: str, meter: str | None) -> None:
        """Add profile ``name``, or replace it."""
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

    def get(self, name: str) -> ConnectionProfile | None:
        with transaction(self._engine) as conn:
            row = conn.execute(select(connections).where(connections.c.name == name)).first()
        return None if row is None else _profile(row)

    def all(self) -> list[ConnectionProfile]:
        with transaction(self._engine) as conn:
            rows = conn.execute(select(connections).order_by(connections.c.name))
            return [_profile(r) for r in rows]

    def remove(self, name: str) -> bool:
        """Delete profile ``name``; False if there was none."""
        with transaction(self._engine, write=True) as conn:
            return conn.execute(delete(connections).where(connections.c.name == name)).rowcount > 0


def _profile(row: Row[Any]) -> ConnectionProfile:
    return ConnectionProfile(**row._asdict())
