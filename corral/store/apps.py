"""Apps and their versions: the ``apps`` and ``app_versions`` tables.

An app's spec is stored as JSON, whole, for every version: a run records the version it
ran, so what ran is known however the app moved on. The spec's meaning (its schema, its
policies) is the pipeline's (``corral.pipeline.apps``); here it is a JSON object.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Engine, Row
from sqlalchemy.exc import IntegrityError

from corral.errors import AppExists, AppNotFound
from corral.store.engine import is_unique_violation, transaction
from corral.store.rows import App, AppVersion
from corral.store.schema import app_versions, apps


class Apps:
    """The ``apps`` and ``app_versions`` tables. Safe to share between threads."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def create(self, name: str, spec: dict[str, Any]) -> int:
        """Store app ``name`` at version 1; ``AppExists`` if the name is taken."""
        now = datetime.now(UTC)
        body = json.dumps(spec, sort_keys=True)
        with transaction(self._engine, write=True) as conn:
            try:  # inside the transaction: it turns database errors into StoreError on the way out
                conn.execute(
                    insert(apps).values(
                        name=name, version=1, spec=body, created_at=now, updated_at=now
                    )
                )
            except IntegrityError as exc:
                if is_unique_violation(exc):
                    raise AppExists(name) from exc
                raise
            conn.execute(
                insert(app_versions).values(app=name, version=1, spec=body, created_at=now)
            )
        return 1

    def update(self, name: str, spec: dict[str, Any]) -> int:
        """Store ``spec`` as the app's next version; returns the version number."""
        now = datetime.now(UTC)
        body = json.dumps(spec, sort_keys=True)
        with transaction(self._engine, write=True) as conn:
            current = conn.scalar(select(apps.c.version).where(apps.c.name == name))
            if current is None:
                raise AppNotFound(name)
            version = current + 1
            conn.execute(
                update(apps)
                .where(apps.c.name == name)
                .values(version=version, spec=body, updated_at=now)
            )
            conn.execute(
                insert(app_versions).values(app=name, version=version, spec=body, created_at=now)
            )
        return int(version)

    def get(self, name: str, version: int | None = None) -> AppVersion:
        """Version ``version`` of app ``name``, or its current version."""
        query = select(app_versions).where(app_versions.c.app == name)
        if version is None:
            current = select(apps.c.version).where(apps.c.name == name).scalar_subquery()
            query = query.where(app_versions.c.version == current)
        else:
            query = query.where(app_versions.c.version == version)
        with transaction(self._engine) as conn:
            row = conn.execute(query).first()
        if row is None:
            raise AppNotFound(name, version)
        return _version(row)

    def all(self) -> list[App]:
        """Every app at its current version, ordered by name."""
        with transaction(self._engine) as conn:
            rows = conn.execute(select(apps).order_by(apps.c.name)).all()
        return [_app(r) for r in rows]

    def versions(self, name: str) -> list[AppVersion]:
        """Every version of app ``name``, newest first."""
        with transaction(self._engine) as conn:
            rows = conn.execute(
                select(app_versions)
                .where(app_versions.c.app == name)
                .order_by(app_versions.c.version.desc())
            ).all()
        if not rows:
            raise AppNotFound(name)
        return [_version(r) for r in rows]


def _app(row: Row[Any]) -> App:
    return App(
        name=row.name,
        version=int(row.version),
        spec=json.loads(row.spec),
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _version(row: Row[Any]) -> AppVersion:
    return AppVersion(
        app=row.app,
        version=int(row.version),
        spec=json.loads(row.spec),
        created_at=row.created_at,
    )
