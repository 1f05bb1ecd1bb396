"""The pipeline's records: apps and their versions, the run queue, idempotency keys, the ledger.

The queue is the ``runs`` table itself. ``claim`` takes the oldest runnable queued run and
leases it to a worker in one transaction: on PostgreSQL the candidate row is locked with
``FOR UPDATE SKIP LOCKED`` (two workers never wait on, or take, the same row); on SQLite the
transaction holds the database's write lock from its first statement (``BEGIN IMMEDIATE``), so
claims are serialised. A lease is fenced by its owner: heartbeats and completions name the
worker, and a worker whose lease was taken over learns so from its next heartbeat.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, func, insert, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from corral.errors import Conflict, NotFound
from corral.store.engine import is_unique_violation, transaction
from corral.store.records import ACTIVE, finished_event
from corral.store.rows import Run
from corral.store.schema import app_versions, apps, idempotency_keys, ledger, runs


class AppNotFound(NotFound):
    code = "app_not_found"

    def __init__(self, name: str, version: int | None = None) -> None:
        shown = f"{name!r} version {version}" if version else repr(name)
        super().__init__(f"no app {shown}; `corral app list` shows them")


class AppExists(Conflict):
    code = "app_exists"

    def __init__(self, name: str) -> None:
        super().__init__(f"an app named {name!r} already exists")


def _run(row: Any) -> Run:
    return Run(**row._asdict())


class PipelineRecords:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    # -- apps --------------------------------------------------------------------------------

    def create_app(self, name: str, spec: dict[str, Any]) -> int:
        now = datetime.now(UTC)
        body = json.dumps(spec, sort_keys=True)
        with transaction(self._engine, write=True) as conn:
            try:  # inside the transaction: it turns database errors into StoreError on the way out
                conn.execute(insert(apps).values(name=name, version=1, spec=body,
                                                 created_at=now, updated_at=now))  # fmt: skip
            except IntegrityError as exc:
                if is_unique_violation(exc):
                    raise AppExists(name) from exc
                raise
            conn.execute(insert(app_versions).values(app=name, version=1, spec=body,
                                                     created_at=now))  # fmt: skip
        return 1

    def update_app(self, name: str, spec: dict[str, Any]) -> int:
        """Store ``spec`` as the app's next version; returns the version number."""
        now = datetime.now(UTC)
        body = json.dumps(spec, sort_keys=True)
        with transaction(self._engine, write=True) as conn:
            current = conn.scalar(select(apps.c.version).where(apps.c.name == name))
            if current is None:
                raise AppNotFound(name)
            version = current + 1
            conn.execute(update(apps).where(apps.c.name == name)
                         .values(version=version, spec=body, updated_at=now))  # fmt: skip
            conn.execute(insert(app_versions).values(app=name, version=version, spec=body,
                                                     created_at=now))  # fmt: skip
        return int(version)

    def app(self, name: str, version: int | None = None) -> tuple[int, dict[str, Any]]:
        with transaction(self._engine) as conn:
            if version is None:
                row = conn.execute(
                    select(apps.c.version, apps.c.spec).where(apps.c.name == name)
                ).first()
            else:
                row = conn.execute(
                    select(app_versions.c.version, app_versions.c.spec).where(
                        app_versions.c.app == name, app_versions.c.version == version
                    )
                ).first()
        if row is None:
            raise AppNotFound(name, version)
        return int(row.version), json.loads(row.spec)

    def apps(self) -> list[tuple[str, int, dict[str, Any]]]:
        with transaction(self._engine) as conn:
            rows = conn.execute(select(apps).order_by(apps.c.name)).all()
        return [(r.name, int(r.version), json.loads(r.spec)) for r in rows]

    def versions(self, name: str) -> list[tuple[int, dict[str, Any], datetime]]:
        with transaction(self._engine) as conn:
            rows = conn.execute(
                select(app_versions).where(app_versions.c.app == name)
                .order_by(app_versions.c.version.desc())
            ).all()  # fmt: skip
        if not rows:
            raise AppNotFound(name)
        return [(int(r.version), json.loads(r.spec), r.created_at) for r in rows]

    # -- the queue ---------------------------------------------------------------------------

    def claim(self, worker: str, lease: float, now: datetime | None = None) -> Run | None:
        """Lease the oldest runnable queued run to ``worker``, or None if there is none."""
        now = now or datetime.now(UTC)
        with transaction(self._engine, write=True) as conn:
            candidate = conn.execute(
                select(runs.c.id)
                .where(runs.c.status == "queued",
                       or_(runs.c.available_at.is_(None), runs.c.available_at <= now))
                .order_by(runs.c.created_at)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()  # fmt: skip
            if candidate is None:
                return None
            row = conn.execute(
                update(runs)
                .where(runs.c.id == candidate.id, runs.c.status == "queued")
                .values(status="running", lease_owner=worker,
                        lease_expires=now + timedelta(seconds=lease),
                        deliveries=runs.c.deliveries + 1,
                        started_at=func.coalesce(runs.c.started_at, now))
                .returning(*runs.c)
            ).first()  # fmt: skip
        return None if row is None else _run(row)

    def heartbeat(self, run_id: str, worker: str, lease: float) -> bool:
        """Extend ``worker``'s lease; False if the lease is no longer its own."""
        until = datetime.now(UTC) + timedelta(seconds=lease)
        with transaction(self._engine, write=True) as conn:
            done = conn.execute(
                update(runs)
                .where(runs.c.id == run_id, runs.c.lease_owner == worker,
                       runs.c.status == "running")
                .values(lease_expires=until)
            )  # fmt: skip
            return done.rowcount == 1

    def release(self, run_id: str, worker: str, delay: float = 0.0) -> None:
        """Give a leased run back to the queue (a concurrency limit said: not yet)."""
        with transaction(self._engine, write=True) as conn:
            conn.execute(
                update(runs)
                .where(runs.c.id == run_id, runs.c.lease_owner == worker)
                .values(status="queued", lease_owner=None, lease_expires=None, started_at=None,
                        deliveries=runs.c.deliveries - 1,
                        available_at=datetime.now(UTC) + timedelta(seconds=delay))
            )  # fmt: skip

    def expired(self, now: datetime | None = None) -> list[Run]:
        """Running runs whose worker stopped renewing its lease (it died, or hangs)."""
        now = now or datetime.now(UTC)
        with transaction(self._engine) as conn:
            rows = conn.execute(
                select(runs).where(runs.c.status == "running", runs.c.lease_expires < now)
            ).all()
        return [_run(r) for r in rows]

    def requeue(self, run: Run, backoff: float) -> bool:
        """Put an expired run back in the queue, once: only if its lease is still the old one."""
        with transaction(self._engine, write=True) as conn:
            done = conn.execute(
                update(runs)
                .where(runs.c.id == run.id, runs.c.status == "running",
                       runs.c.lease_owner == run.lease_owner,
                       runs.c.lease_expires == run.lease_expires)
                .values(status="queued", lease_owner=None, lease_expires=None,
                        available_at=datetime.now(UTC) + timedelta(seconds=backoff))
            )  # fmt: skip
            return done.rowcount == 1

    def active(self, user: str, app: str) -> list[Run]:
        with transaction(self._engine) as conn:
            rows = conn.execute(
                select(runs).where(runs.c.user == user, runs.c.app == app,
                                   runs.c.status.in_(ACTIVE)).order_by(runs.c.created_at)
            ).all()  # fmt: skip
        return [_run(r) for r in rows]

    def running_count(self, user: str, app: str) -> int:
        with transaction(self._engine) as conn:
            return int(
                conn.scalar(
                    select(func.count()).select_from(runs).where(
                        runs.c.user == user, runs.c.app == app, runs.c.status == "running"
                    )
                ) or 0
            )  # fmt: skip

    def cancel(self, run_id: str) -> Run | None:
        """Cancel a queued run outright (it ends: ``run.finished`` in the same transaction),
        or flag a running one for its worker; None if neither."""
        now = datetime.now(UTC)
        with transaction(self._engine, write=True) as conn:
            queued = conn.execute(
                update(runs).where(runs.c.id == run_id, runs.c.status == "queued")
                .values(status="cancelled", finished_at=now, error_code="cancelled",
                        error="cancelled before it started")
            )  # fmt: skip
            if queued.rowcount == 1:
                finished_event(conn, run_id, "cancelled", now, {"attempts": 0})
            else:
                conn.execute(
                    update(runs).where(runs.c.id == run_id, runs.c.status == "running")
                    .values(cancel_requested=True)
                )  # fmt: skip
            row = conn.execute(select(runs).where(runs.c.id == run_id)).first()
        return None if row is None else _run(row)

    def runs(self, app: str | None = None, limit: int = 100) -> list[Run]:
        query = select(runs).order_by(runs.c.created_at.desc()).limit(limit)
        if app is not None:
            query = query.where(runs.c.app == app)
        with transaction(self._engine) as conn:
            return [_run(r) for r in conn.execute(query).all()]

    # -- idempotency -------------------------------------------------------------------------

    def bound_run(self, user: str, app: str, key: str, ttl: timedelta) -> tuple[str, str] | None:
        """(request hash, run id) bound to ``key`` within ``ttl``, or None."""
        with transaction(self._engine) as conn:
            row = conn.execute(select(idempotency_keys).where(
                idempotency_keys.c.user == user, idempotency_keys.c.app == app,
                idempotency_keys.c.key == key)).first()  # fmt: skip
        if row is None or row.created_at <= datetime.now(UTC) - ttl:
            return None
        return row.request_hash, row.run_id

    def bind_key(self, user: str, app: str, key: str, request_hash: str, run_id: str,
                 ttl: timedelta) -> tuple[str, str]:  # fmt: skip
        """Bind ``key`` to ``run_id`` unless a fresh binding exists; returns the binding that
        holds (ours, or the one a concurrent request made first)."""
        now = datetime.now(UTC)
        where = and_(idempotency_keys.c.user == user, idempotency_keys.c.app == app,
                     idempotency_keys.c.key == key)  # fmt: skip
        with transaction(self._engine, write=True) as conn:
            conn.execute(
                delete(idempotency_keys).where(where, idempotency_keys.c.created_at <= now - ttl)
            )
            dialect = self._engine.dialect.name
            upsert = pg_insert if dialect == "postgresql" else sqlite_insert
            conn.execute(
                upsert(idempotency_keys)
                .values(user=user, app=app, key=key, request_hash=request_hash, run_id=run_id,
                        created_at=now)
                .on_conflict_do_nothing(index_elements=["user", "app", "key"])
            )  # fmt: skip
            row = conn.execute(select(idempotency_keys).where(where)).one()
        return row.request_hash, row.run_id

    def release_parked(self, run_id: str) -> None:
        """A run admitted parked (not yet claimable) becomes claimable now."""
        with transaction(self._engine, write=True) as conn:
            conn.execute(update(runs).where(runs.c.id == run_id, runs.c.status == "queued")
                         .values(available_at=datetime.now(UTC)))  # fmt: skip

    def discard_parked(self, run_id: str) -> None:
        """Remove a parked run that lost its idempotency key to a concurrent twin."""
        with transaction(self._engine, write=True) as conn:
            conn.execute(delete(runs).where(runs.c.id == run_id, runs.c.status == "queued"))

    # -- the ledger --------------------------------------------------------------------------

    def post(self, entries: list[dict[str, Any]]) -> int:
        """Append entries; one whose ``source`` is already in the ledger is skipped (exactly
        once per usage event, however often billing runs). Returns how many were new."""
        if not entries:
            return 0
        dialect = self._engine.dialect.name
        upsert = pg_insert if dialect == "postgresql" else sqlite_insert
        new = 0
        with transaction(self._engine, write=True) as conn:
            for entry in entries:  # RETURNING, not rowcount: psycopg reports -1 for batches
                statement = (upsert(ledger).values(**entry)
                             .on_conflict_do_nothing(index_elements=["source"])
                             .returning(ledger.c.id))  # fmt: skip
                new += len(conn.execute(statement).all())
        return new

    def balance(self, user: str) -> float:
        with transaction(self._engine) as conn:
            return float(conn.scalar(select(func.coalesce(func.sum(ledger.c.credits), 0.0))
                                     .where(ledger.c.user == user)) or 0.0)  # fmt: skip

    def spent(
        self, *, run: str | None = None, app: str | None = None, user: str | None = None
    ) -> float:
        query = select(func.coalesce(func.sum(ledger.c.credits), 0.0)).where(
            ledger.c.kind == "deduction"
        )
        if run is not None:
            query = query.where(ledger.c.run == run)
        if app is not None:
            query = query.where(ledger.c.app == app)
        if user is not None:
            query = query.where(ledger.c.user == user)
        with transaction(self._engine) as conn:
            return -float(conn.scalar(query) or 0.0)

    def entries(self, *, run: str | None = None, user: str | None = None) -> list[dict[str, Any]]:
        query = select(ledger).order_by(ledger.c.id)
        if run is not None:
            query = query.where(ledger.c.run == run)
        if user is not None:
            query = query.where(ledger.c.user == user)
        with transaction(self._engine) as conn:
            return [dict(r._mapping) for r in conn.execute(query)]
