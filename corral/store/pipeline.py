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
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, delete, func, insert, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from corral.errors import Conflict, InvalidInput, NotFound
from corral.store.engine import is_unique_violation, transaction
from corral.store.records import ACTIVE
from corral.store.rows import Run
from corral.store.schema import (
    LEDGER_MAX_MICROS,
    app_versions,
    apps,
    bridge_calls,
    idempotency_keys,
    ledger,
    runs,
    usage_events,
    workers,
)


class AppNotFound(NotFound):
    code = "app_not_found"

    def __init__(self, name: str, version: int | None = None) -> None:
        shown = f"{name!r} version {version}" if version else repr(name)
        super().__init__(f"no app {shown}; `corral app list` shows them")


class BalanceLimit(Conflict):
    """A credit would lift a balance past ``LEDGER_MAX_MICROS``: what is stored says no."""

    code = "balance_limit"


class AppExists(Conflict):
    code = "app_exists"

    def __init__(self, name: str) -> None:
        super().__init__(f"an app named {name!r} already exists")


def _run(row: Any) -> Run:
    return Run(**row._asdict())


@dataclass(frozen=True)
class TreeMember:
    """One run of a call tree and what it has used so far, billed or not."""

    id: str
    parent_run: str | None
    status: str
    started_at: datetime | None
    budget: float | None  # its budget_per_run as admitted; None: unbounded
    input_tokens: int = 0
    output_tokens: int = 0
    sandbox_seconds: float = 0.0  # recorded when an execution of it ends
    bridge_calls: int = 0  # calls the bridge forwarded (its own endpoints are free)


class PipelineRecords:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    # -- apps --------------------------------------------------------------------------------

    def create_app(self, name: str, spec: dict[str, Any]) -> int:
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

    def update_app(self, name: str, spec: dict[str, Any]) -> int:
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
                select(app_versions)
                .where(app_versions.c.app == name)
                .order_by(app_versions.c.version.desc())
            ).all()
        if not rows:
            raise AppNotFound(name)
        return [(int(r.version), json.loads(r.spec), r.created_at) for r in rows]

    # -- the queue ---------------------------------------------------------------------------

    def claim(
        self,
        worker: str,
        lease: float,
        now: datetime | None = None,
        *,
        awaited_by: str | None = None,
        only: str | None = None,
    ) -> Run | None:
        """Lease the oldest runnable queued run to ``worker``, or None if there is none.

        With ``awaited_by``, only a run that the run ``awaited_by`` called and is waiting on:
        the caller's worker lends it the capacity the waiting caller holds. With ``only``,
        only that run, if it is queued, even parked: its caller executes it now (``corral app
        run --here``; ``corral run``, whose run is parked so that no worker takes it).
        """
        now = now or datetime.now(UTC)
        where = [runs.c.status == "queued"]
        if only is None:
            where.append(or_(runs.c.available_at.is_(None), runs.c.available_at <= now))
        else:
            where.append(runs.c.id == only)
        if awaited_by is not None:
            where += [runs.c.parent_run == awaited_by, runs.c.awaited.is_(True)]
        with transaction(self._engine, write=True) as conn:
            candidate = conn.execute(
                select(runs.c.id)
                .where(*where)
                .order_by(runs.c.created_at)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if candidate is None:
                return None
            row = conn.execute(
                update(runs)
                .where(runs.c.id == candidate.id, runs.c.status == "queued")
                .values(
                    status="running",
                    lease_owner=worker,
                    lease_expires=now + timedelta(seconds=lease),
                    deliveries=runs.c.deliveries + 1,
                    started_at=func.coalesce(runs.c.started_at, now),
                )
                .returning(*runs.c)
            ).first()
        return None if row is None else _run(row)

    def heartbeat(self, run_id: str, worker: str, lease: float) -> bool:
        """Extend ``worker``'s lease; False if the lease is no longer its own."""
        until = datetime.now(UTC) + timedelta(seconds=lease)
        with transaction(self._engine, write=True) as conn:
            done = conn.execute(
                update(runs)
                .where(
                    runs.c.id == run_id, runs.c.lease_owner == worker, runs.c.status == "running"
                )
                .values(lease_expires=until)
            )
            return done.rowcount == 1

    def release(self, run_id: str, worker: str, delay: float = 0.0) -> None:
        """Give a leased run back to the queue (a concurrency limit said: not yet)."""
        with transaction(self._engine, write=True) as conn:
            conn.execute(
                update(runs)
                .where(runs.c.id == run_id, runs.c.lease_owner == worker)
                .values(
                    status="queued",
                    lease_owner=None,
                    lease_expires=None,
                    started_at=None,
                    deliveries=runs.c.deliveries - 1,
                    available_at=datetime.now(UTC) + timedelta(seconds=delay),
                )
            )

    def hand_back(self, run_id: str, worker: str) -> bool:
        """A worker shutting down gives its run back, claimable at once. The delivery still
        counts: the next one checks the log for an outcome the agent reported meanwhile."""
        with transaction(self._engine, write=True) as conn:
            done = conn.execute(
                update(runs)
                .where(
                    runs.c.id == run_id, runs.c.lease_owner == worker, runs.c.status == "running"
                )
                .values(
                    status="queued",
                    lease_owner=None,
                    lease_expires=None,
                    available_at=datetime.now(UTC),
                )
            )
            return done.rowcount == 1

    # -- who is working ---------------------------------------------------------------------

    def worker_seen(self, name: str, host: str, pid: int, started_at: datetime) -> None:
        """``name`` is alive now (inserted on its first call, renewed on every later one)."""
        now = datetime.now(UTC)
        values = {"name": name, "host": host, "pid": pid, "started_at": started_at, "seen_at": now}
        upsert = pg_insert if self._engine.dialect.name == "postgresql" else sqlite_insert
        with transaction(self._engine, write=True) as conn:
            statement = upsert(workers).values(values)
            conn.execute(
                statement.on_conflict_do_update(index_elements=["name"], set_={"seen_at": now})
            )

    def worker_gone(self, name: str) -> None:
        with transaction(self._engine, write=True) as conn:
            conn.execute(delete(workers).where(workers.c.name == name))

    def live_workers(self, within: float) -> list[str]:
        """Names of the workers seen in the last ``within`` seconds; older rows are the dead's,
        and are cleared."""
        cutoff = datetime.now(UTC) - timedelta(seconds=within)
        with transaction(self._engine, write=True) as conn:
            conn.execute(delete(workers).where(workers.c.seen_at < cutoff))
            rows = conn.execute(select(workers.c.name).order_by(workers.c.name)).all()
        return [r.name for r in rows]

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
                .where(
                    runs.c.id == run.id,
                    runs.c.status == "running",
                    runs.c.lease_owner == run.lease_owner,
                    runs.c.lease_expires == run.lease_expires,
                )
                .values(
                    status="queued",
                    lease_owner=None,
                    lease_expires=None,
                    available_at=datetime.now(UTC) + timedelta(seconds=backoff),
                )
            )
            return done.rowcount == 1

    def active(self, user: str, app: str) -> list[Run]:
        with transaction(self._engine) as conn:
            rows = conn.execute(
                select(runs)
                .where(runs.c.user == user, runs.c.app == app, runs.c.status.in_(ACTIVE))
                .order_by(runs.c.created_at)
            ).all()
        return [_run(r) for r in rows]

    def running_count(self, user: str, app: str) -> int:
        with transaction(self._engine) as conn:
            return int(
                conn.scalar(
                    select(func.count())
                    .select_from(runs)
                    .where(runs.c.user == user, runs.c.app == app, runs.c.status == "running")
                )
                or 0
            )

    def request_cancel(self, run_id: str) -> bool:
        """Flag a running run for its worker, which stops it; False if it is not running."""
        with transaction(self._engine, write=True) as conn:
            done = conn.execute(
                update(runs)
                .where(runs.c.id == run_id, runs.c.status == "running")
                .values(cancel_requested=True)
            )
            return done.rowcount == 1

    def tree(self, root: str) -> list[TreeMember]:
        """Every run of the call tree rooted at ``root``, each with its usage totals: three
        grouped queries in one transaction, however large the tree."""
        member = or_(runs.c.root_run == root, runs.c.id == root)
        ids = select(runs.c.id).where(member)
        usage = (
            select(
                usage_events.c.run,
                func.sum(
                    case(
                        (usage_events.c.kind == "model_tokens", usage_events.c.input_tokens),
                        else_=0,
                    )
                ).label("input_tokens"),
                func.sum(
                    case(
                        (usage_events.c.kind == "model_tokens", usage_events.c.output_tokens),
                        else_=0,
                    )
                ).label("output_tokens"),
                func.sum(
                    case(
                        (usage_events.c.kind == "sandbox_seconds", usage_events.c.quantity),
                        else_=0.0,
                    )
                ).label("sandbox_seconds"),
            )
            .where(usage_events.c.run.in_(ids))
            .group_by(usage_events.c.run)
        )
        calls = (
            select(bridge_calls.c.run, func.count().label("calls"))
            .where(
                bridge_calls.c.run.in_(ids),
                bridge_calls.c.connection.is_not(None),
                bridge_calls.c.connection != "_corral",
                or_(bridge_calls.c.error.is_(None), bridge_calls.c.error == ""),
            )
            .group_by(bridge_calls.c.run)
        )
        with transaction(self._engine) as conn:
            members = conn.execute(
                select(
                    runs.c.id, runs.c.parent_run, runs.c.status, runs.c.started_at, runs.c.options
                ).where(member)
            ).all()
            used = {r.run: r for r in conn.execute(usage).all()}
            called = {r.run: int(r.calls) for r in conn.execute(calls).all()}
        tree = []
        for m in members:
            u = used.get(m.id)
            budget = json.loads(m.options or "{}").get("budget_per_run")
            tree.append(
                TreeMember(
                    id=m.id,
                    parent_run=m.parent_run,
                    status=m.status,
                    started_at=m.started_at,
                    budget=None if budget is None else float(budget),
                    input_tokens=int(u.input_tokens or 0) if u else 0,
                    output_tokens=int(u.output_tokens or 0) if u else 0,
                    sandbox_seconds=float(u.sandbox_seconds or 0.0) if u else 0.0,
                    bridge_calls=called.get(m.id, 0),
                )
            )
        return tree

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
            row = conn.execute(
                select(idempotency_keys).where(
                    idempotency_keys.c.user == user,
                    idempotency_keys.c.app == app,
                    idempotency_keys.c.key == key,
                )
            ).first()
        if row is None or row.created_at <= datetime.now(UTC) - ttl:
            return None
        return row.request_hash, row.run_id

    def bind_key(
        self, user: str, app: str, key: str, request_hash: str, run_id: str, ttl: timedelta
    ) -> tuple[str, str]:
        """Bind ``key`` to ``run_id`` unless a fresh binding exists; returns the binding that
        holds (ours, or the one a concurrent request made first)."""
        now = datetime.now(UTC)
        where = and_(
            idempotency_keys.c.user == user,
            idempotency_keys.c.app == app,
            idempotency_keys.c.key == key,
        )
        with transaction(self._engine, write=True) as conn:
            conn.execute(
                delete(idempotency_keys).where(where, idempotency_keys.c.created_at <= now - ttl)
            )
            dialect = self._engine.dialect.name
            upsert = pg_insert if dialect == "postgresql" else sqlite_insert
            conn.execute(
                upsert(idempotency_keys)
                .values(
                    user=user,
                    app=app,
                    key=key,
                    request_hash=request_hash,
                    run_id=run_id,
                    created_at=now,
                )
                .on_conflict_do_nothing(index_elements=["user", "app", "key"])
            )
            row = conn.execute(select(idempotency_keys).where(where)).one()
        return row.request_hash, row.run_id

    def release_parked(self, run_id: str) -> None:
        """A run admitted parked (not yet claimable) becomes claimable now."""
        with transaction(self._engine, write=True) as conn:
            conn.execute(
                update(runs)
                .where(runs.c.id == run_id, runs.c.status == "queued")
                .values(available_at=datetime.now(UTC))
            )

    def discard_parked(self, run_id: str) -> None:
        """Remove a parked run that lost its idempotency key to a concurrent twin."""
        with transaction(self._engine, write=True) as conn:
            conn.execute(delete(runs).where(runs.c.id == run_id, runs.c.status == "queued"))

    # -- the ledger --------------------------------------------------------------------------

    def post(self, entries: list[dict[str, Any]]) -> int:
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
        dialect = self._engine.dialect.name
        upsert = pg_insert if dialect == "postgresql" else sqlite_insert
        new = 0
        with transaction(self._engine, write=True) as conn:
            for entry in entries:  # RETURNING, not rowcount: psycopg reports -1 for batches
                if entry["micros"] > 0:
                    after = _balance(conn, entry["user"]) + entry["micros"]
                    if after > LEDGER_MAX_MICROS:
                        raise BalanceLimit(
                            f"that would make {entry['user']!r}'s balance {after} micro-credits; "
                            f"a balance may be at most {LEDGER_MAX_MICROS}"
                        )
                statement = (
                    upsert(ledger)
                    .values(**entry)
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

    def entries(self, *, run: str | None = None, user: str | None = None) -> list[dict[str, Any]]:
        query = select(ledger).order_by(ledger.c.id)
        if run is not None:
            query = query.where(ledger.c.run == run)
        if user is not None:
            query = query.where(ledger.c.user == user)
        with transaction(self._engine) as conn:
            return [dict(r._mapping) for r in conn.execute(query)]


def check_entry(entry: dict[str, Any]) -> None:
    """Refuse a ledger entry whose amount is not an integer of micro-credits fitting its kind:
    a grant is positive, a deduction not positive, an adjustment not zero."""
    kind, micros = entry.get("kind"), entry.get("micros")
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
