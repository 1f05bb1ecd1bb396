"""Environments and their snapshot histories: the ``environments`` and ``snapshots`` tables.

Blobs and layers are not here (they are files under the OCI layout, owned by
``corral.snapshots``): a snapshot row names its manifest digest and where it sits in its
environment's history.

Moving an environment's head is a compare-and-swap: ``add_snapshot`` updates the head only
``WHERE head = expected_head``, as its first statement, so on PostgreSQL the row lock and on
SQLite the ``BEGIN IMMEDIATE`` file lock serialise racing writers, and each loser sees the
winner's head and gets ``Conflict``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.engine import Connection, Engine, Row
from sqlalchemy.exc import IntegrityError

from corral.errors import (
    Conflict,
    EnvironmentExists,
    EnvironmentNotFound,
    InvalidInput,
    SnapshotNotFound,
)
from corral.store.engine import is_unique_violation, transaction
from corral.store.rows import Environment, Snapshot, check_digest, check_name, check_snapshot
from corral.store.schema import environments, snapshots


class Environments:
    """The ``environments`` and ``snapshots`` tables. Safe to share between threads."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def create(self, name: str, base: str, first: Snapshot) -> Environment:
        """Insert environment ``name`` and its first snapshot (seq 1) together.

        Raises ``EnvironmentExists`` if the name is taken.
        """
        check_name(name)
        if not isinstance(base, str) or not base:
            raise InvalidInput(f"environment base must be a non-empty string, got {base!r}")
        first = check_snapshot(first, name)
        now = datetime.now(UTC)
        with transaction(self._engine, write=True) as conn:
            try:
                conn.execute(
                    insert(environments).values(
                        name=name, base=base, head=first.digest, created_at=now, updated_at=now
                    )
                )
            except IntegrityError as e:
                if is_unique_violation(e):
                    raise EnvironmentExists(name) from e
                raise
            conn.execute(insert(snapshots).values(_snapshot_values(first, seq=1)))
        return Environment(name=name, base=base, head=first.digest, created_at=now, updated_at=now)

    def get(self, name: str) -> Environment:
        """The environment called ``name``; ``EnvironmentNotFound`` if there is none."""
        check_name(name)
        with transaction(self._engine) as conn:
            row = conn.execute(select(environments).where(environments.c.name == name)).first()
        if row is None:
            raise EnvironmentNotFound(name)
        return _environment(row)

    def all(self) -> list[Environment]:
        """Every environment, ordered by name."""
        with transaction(self._engine) as conn:
            rows = conn.execute(select(environments).order_by(environments.c.name)).all()
        return [_environment(row) for row in rows]

    def delete(self, name: str) -> None:
        """Delete environment ``name`` and (by cascade) its snapshot rows."""
        check_name(name)
        with transaction(self._engine, write=True) as conn:
            result = conn.execute(delete(environments).where(environments.c.name == name))
            if result.rowcount != 1:
                raise EnvironmentNotFound(name)

    def add_snapshot(self, name: str, snap: Snapshot, expected_head: str) -> Snapshot:
        """Append ``snap`` to ``name``'s history and make it the head, if the head is unchanged.

        Compare-and-swap: if the head is no longer ``expected_head`` nothing is written and
        ``Conflict`` names both digests. Returns the stored row, with its ``seq``.
        """
        check_name(name)
        check_digest(expected_head, "expected head")
        snap = check_snapshot(snap, name)
        now = datetime.now(UTC)
        with transaction(self._engine, write=True) as conn:
            moved = conn.execute(
                update(environments)
                .where(environments.c.name == name, environments.c.head == expected_head)
                .values(head=snap.digest, updated_at=now)
            )
            if moved.rowcount != 1:
                head = conn.scalar(select(environments.c.head).where(environments.c.name == name))
                if head is None:
                    raise EnvironmentNotFound(name)
                raise Conflict(
                    f"environment {name!r} has moved on: its head is {head}, "
                    f"not the expected {expected_head}; reload it and try again"
                )
            last = conn.scalar(
                select(func.max(snapshots.c.seq)).where(snapshots.c.environment == name)
            )
            seq = (last or 0) + 1
            try:
                conn.execute(insert(snapshots).values(_snapshot_values(snap, seq=seq)))
            except IntegrityError as e:
                if is_unique_violation(e):
                    raise Conflict(
                        f"snapshot {snap.digest} is already in the history of {name!r}"
                    ) from e
                raise
        return Snapshot(
            digest=snap.digest,
            environment=name,
            seq=seq,
            parent=snap.parent,
            layer=snap.layer,
            size=snap.size,
            created_at=snap.created_at,
            message=snap.message,
        )

    def history(self, name: str) -> list[Snapshot]:
        """Every snapshot of ``name``, newest (highest ``seq``) first."""
        check_name(name)
        with transaction(self._engine) as conn:
            rows = conn.execute(
                select(snapshots)
                .where(snapshots.c.environment == name)
                .order_by(snapshots.c.seq.desc())
            ).all()
            if not rows and not _exists(conn, name):
                raise EnvironmentNotFound(name)
        return [_snapshot(row) for row in rows]

    def snapshot(self, name: str, digest: str) -> Snapshot:
        """Snapshot ``digest`` of environment ``name``.

        ``SnapshotNotFound`` if the environment has no such snapshot, ``EnvironmentNotFound``
        if there is no such environment.
        """
        check_name(name)
        check_digest(digest, "snapshot digest")
        with transaction(self._engine) as conn:
            row = conn.execute(
                select(snapshots).where(
                    snapshots.c.environment == name, snapshots.c.digest == digest
                )
            ).first()
            if row is None:
                if not _exists(conn, name):
                    raise EnvironmentNotFound(name)
                raise SnapshotNotFound(digest, f"environment {name!r}")
        return _snapshot(row)


def _exists(conn: Connection, name: str) -> bool:
    found = conn.scalar(select(environments.c.name).where(environments.c.name == name))
    return found is not None


def _snapshot_values(snap: Snapshot, *, seq: int) -> dict[str, Any]:
    return {
        "digest": snap.digest,
        "environment": snap.environment,
        "seq": seq,
        "parent": snap.parent,
        "layer": snap.layer,
        "size": snap.size,
        "created_at": snap.created_at,
        "message": snap.message,
    }


def _environment(row: Row[Any]) -> Environment:
    return Environment(
        name=row.name,
        base=row.base,
        head=row.head,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _snapshot(row: Row[Any]) -> Snapshot:
    return Snapshot(
        digest=row.digest,
        environment=row.environment,
        seq=row.seq,
        parent=row.parent,
        layer=row.layer,
        size=row.size,
        created_at=row.created_at,
        message=row.message,
    )
