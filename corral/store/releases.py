"""Runner releases: the ``runner_releases`` table.

A release is identified by the digest of its tarball; the one activated last is current.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine, Row

from corral.errors import ReleaseNotFound
from corral.store.engine import transaction
from corral.store.rows import Release
from corral.store.schema import runner_releases


class Releases:
    """The ``runner_releases`` table. Safe to share between threads."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def publish(self, release: Release) -> Release:
        """Record ``release`` and make it current; publishing the same bytes again re-activates.

        One statement (INSERT ... ON CONFLICT DO UPDATE), so any number of processes may
        publish the same release at once: each either inserts it or re-activates it, and none
        meets a unique violation (which on PostgreSQL would abort its whole transaction).
        """
        with transaction(self._engine, write=True) as conn:
            dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
            statement = dialect.insert(runner_releases).values(dataclasses.asdict(release))
            conn.execute(
                statement.on_conflict_do_update(
                    index_elements=["digest"],
                    set_={"activated_at": statement.excluded.activated_at},
                )
            )
        return self.get(release.digest)

    def activate(self, ref: str, at: datetime) -> Release:
        release = self.get(ref)
        with transaction(self._engine, write=True) as conn:
            conn.execute(
                update(runner_releases)
                .where(runner_releases.c.digest == release.digest)
                .values(activated_at=at)
            )
        return self.get(release.digest)

    def get(self, ref: str) -> Release:
        """A release by digest, or by version (the newest published with that version)."""
        with transaction(self._engine) as conn:
            row = conn.execute(
                select(runner_releases)
                .where((runner_releases.c.digest == ref) | (runner_releases.c.version == ref))
                .order_by(runner_releases.c.published_at.desc())
            ).first()
        if row is None:
            raise ReleaseNotFound(ref)
        return _release(row)

    def current(self) -> Release | None:
        with transaction(self._engine) as conn:
            row = conn.execute(
                select(runner_releases).order_by(runner_releases.c.activated_at.desc()).limit(1)
            ).first()
        return None if row is None else _release(row)

    def all(self) -> list[Release]:
        with transaction(self._engine) as conn:
            rows = conn.execute(
                select(runner_releases).order_by(runner_releases.c.published_at.desc())
            ).all()
        return [_release(r) for r in rows]


def _release(row: Row[Any]) -> Release:
    return Release(**row._asdict())
