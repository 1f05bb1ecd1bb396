"""Workers' presence: the ``workers`` table, one row per live worker.

A worker writes its row when it starts, renews ``seen_at`` as it polls and deletes the row
when it stops; a row not renewed for a while is a worker that died. Leases on runs name
workers too (``runs.lease_owner``), but they are fenced on their own: this table only says
who is there, for ``corral app run`` to know whether anything would execute a run.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine

from corral.store.engine import transaction
from corral.store.schema import workers


class Workers:
    """The ``workers`` table. Safe to share between threads."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def seen(self, name: str, host: str, pid: int, started_at: datetime) -> None:
        """``name`` is alive now (inserted on its first call, renewed on every later one)."""
        now = datetime.now(UTC)
        values = {"name": name, "host": host, "pid": pid, "started_at": started_at, "seen_at": now}
        with transaction(self._engine, write=True) as conn:
            upsert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
            statement = upsert(workers).values(values)
            conn.execute(
                statement.on_conflict_do_update(index_elements=["name"], set_={"seen_at": now})
            )

    def gone(self, name: str) -> None:
        with transaction(self._engine, write=True) as conn:
            conn.execute(delete(workers).where(workers.c.name == name))

    def live(self, within: float) -> list[str]:
        """Names of the workers seen in the last ``within`` seconds; older rows are the dead's,
        and are cleared."""
        cutoff = datetime.now(UTC) - timedelta(seconds=within)
        with transaction(self._engine, write=True) as conn:
            conn.execute(delete(workers).where(workers.c.seen_at < cutoff))
            rows = conn.execute(select(workers.c.name).order_by(workers.c.name)).all()
        return [r.name for r in rows]
