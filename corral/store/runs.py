"""Runs: the ``runs`` table (the record, the queue and its leases), ``run_events`` (each run's
log) and ``idempotency_keys`` (a second handle on the run a request admitted).

Every change of a run's status is one function here, and its SQL moves the run only from a
state ``corral.states`` allows into the new one (``WHERE status IN sources(target)``), so a
transition the states module does not allow matches no row:

* ``create``: a new run, ``queued`` (admission) or ``running`` (``corral run``);
* ``claim``: queued -> running, leased to a worker;
* ``release``, ``hand_back``, ``requeue``: running -> queued (a limit said not yet; its worker
  shuts down; its worker died), each fenced by the lease;
* ``finish``: into a terminal state, with the run's ``run.finished`` event in the same
  transaction, only while the run is still where the caller saw it.

The queue is the ``runs`` table itself. ``claim`` takes the oldest runnable queued run and
leases it to a worker in one transaction: on PostgreSQL the candidate row is locked with
``FOR UPDATE SKIP LOCKED`` (two workers never wait on, or take, the same row); on SQLite the
transaction holds the database's write lock from its first statement (``BEGIN IMMEDIATE``), so
claims are serialised. A lease is fenced by its owner: heartbeats and completions name the
worker, and a worker whose lease was taken over learns so from its next heartbeat.

A run's event log is append-only: ``append_event`` assigns the next sequence number inside
its transaction, so concurrent writers of one run's log serialise and readers can follow the
log with ``events(run_id, after=seq)``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, delete, func, insert, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine, Row
from sqlalchemy.sql.elements import ColumnElement

from corral.errors import LeaseLost, RunNotFound
from corral.states import ACTIVE, INITIAL, TERMINAL, RunStatus, sources
from corral.store.engine import transaction
from corral.store.rows import KeyBinding, Run, RunEvent, TreeMember
from corral.store.schema import bridge_calls, idempotency_keys, run_events, runs, usage_events


class Runs:
    """The ``runs``, ``run_events`` and ``idempotency_keys`` tables. Safe to share between
    threads."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    # -- the record --------------------------------------------------------------------------

    def create(self, run: Run) -> Run:
        """Record a new run, in one of the states a run starts in (``states.INITIAL``)."""
        if run.status not in INITIAL:
            raise ValueError(f"a run starts {' or '.join(INITIAL)}, not {run.status!r}")
        with transaction(self._engine, write=True) as conn:
            conn.execute(insert(runs).values(dataclasses.asdict(run)))
        return run

    def get(self, run_id: str) -> Run:
        with transaction(self._engine) as conn:
            row = conn.execute(select(runs).where(runs.c.id == run_id)).first()
        if row is None:
            raise RunNotFound(run_id)
        return run_row(row)

    def recent(self, app: str | None = None, limit: int = 100) -> list[Run]:
        """The newest runs (of ``app``, if given), newest first."""
        query = select(runs).order_by(runs.c.created_at.desc()).limit(limit)
        if app is not None:
            query = query.where(runs.c.app == app)
        with transaction(self._engine) as conn:
            return [run_row(r) for r in conn.execute(query).all()]

    def for_environment(self, environment: str, limit: int = 50) -> list[Run]:
        with transaction(self._engine) as conn:
            rows = conn.execute(
                select(runs)
                .where(runs.c.environment == environment)
                .order_by(runs.c.created_at.desc())
                .limit(limit)
            ).all()
        return [run_row(r) for r in rows]

    def active(self, user: str, app: str) -> list[Run]:
        """``user``'s runs of ``app`` that have not ended, oldest first."""
        with transaction(self._engine) as conn:
            rows = conn.execute(
                select(runs)
                .where(runs.c.user == user, runs.c.app == app, _status_in(ACTIVE))
                .order_by(runs.c.created_at)
            ).all()
        return [run_row(r) for r in rows]

    def running_count(self, user: str, app: str) -> int:
        with transaction(self._engine) as conn:
            return int(
                conn.scalar(
                    select(func.count())
                    .select_from(runs)
                    .where(
                        runs.c.user == user,
                        runs.c.app == app,
                        runs.c.status == str(RunStatus.RUNNING),
                    )
                )
                or 0
            )

    def is_live(self, run_id: str) -> bool:
        """Whether ``run_id`` exists and has not finished (the bridge serves only those)."""
        with transaction(self._engine) as conn:
            row = conn.execute(select(runs.c.finished_at).where(runs.c.id == run_id)).first()
        return row is not None and row.finished_at is None

    def ended_since(self, since: datetime) -> tuple[list[str], datetime]:
        """Runs that finished after ``since``, and the cursor for the next call."""
        now = datetime.now(UTC)
        with transaction(self._engine) as conn:
            rows = conn.execute(
                select(runs.c.id).where(runs.c.finished_at > since, runs.c.finished_at <= now)
            )
            return [r.id for r in rows], now

    def record_start(
        self,
        run_id: str,
        *,
        lease_owner: str | None,
        started_at: datetime,
        runner_version: str,
        runner_digest: str,
    ) -> Run:
        """Record that an execution of a running run has begun, and with which runner.

        With ``lease_owner``, only while that worker holds the run's lease (a worker that
        lost its lease must not overwrite its successor's record): ``LeaseLost`` otherwise.
        Not a transition: the run stays ``running``, and a run that is not (it has ended
        meanwhile) is left as it is.
        """
        where = [runs.c.id == run_id, runs.c.status == str(RunStatus.RUNNING)]
        if lease_owner is not None:
            where.append(runs.c.lease_owner == lease_owner)
        with transaction(self._engine, write=True) as conn:
            row = conn.execute(
                update(runs)
                .where(*where)
                .values(
                    started_at=started_at,
                    runner_version=runner_version,
                    runner_digest=runner_digest,
                )
                .returning(*runs.c)
            ).first()
            if row is None:
                if lease_owner is not None and conn.scalar(
                    select(runs.c.id).where(runs.c.id == run_id)
                ):
                    raise LeaseLost(run_id, lease_owner)
                raise RunNotFound(run_id)
        return run_row(row)

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

    # -- the queue: queued -> running -> queued ----------------------------------------------

    def claim(
        self,
        worker: str,
        lease: float,
        now: datetime | None = None,
        *,
        awaited_by: str | None = None,
        only: str | None = None,
    ) -> Run | None:
        """queued -> running: lease the oldest runnable queued run to ``worker``, or None.

        With ``awaited_by``, only a run that the run ``awaited_by`` called and is waiting on:
        the caller's worker lends it the capacity the waiting caller holds. With ``only``,
        only that run, if it is queued, even parked: its caller executes it now (``corral app
        run --here``; ``corral run``, whose run is parked so that no worker takes it).
        """
        now = now or datetime.now(UTC)
        where = [_may_become(RunStatus.RUNNING)]
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
                .where(runs.c.id == candidate.id, _may_become(RunStatus.RUNNING))
                .values(
                    status=str(RunStatus.RUNNING),
                    lease_owner=worker,
                    lease_expires=now + timedelta(seconds=lease),
                    deliveries=runs.c.deliveries + 1,
                    started_at=func.coalesce(runs.c.started_at, now),
                )
                .returning(*runs.c)
            ).first()
        return None if row is None else run_row(row)

    def heartbeat(self, run_id: str, worker: str, lease: float) -> bool:
        """Extend ``worker``'s lease; False if the lease is no longer its own."""
        until = datetime.now(UTC) + timedelta(seconds=lease)
        with transaction(self._engine, write=True) as conn:
            done = conn.execute(
                update(runs)
                .where(
                    runs.c.id == run_id,
                    runs.c.lease_owner == worker,
                    runs.c.status == str(RunStatus.RUNNING),
                )
                .values(lease_expires=until)
            )
            return done.rowcount == 1

    def release(self, run_id: str, worker: str, delay: float = 0.0) -> bool:
        """running -> queued: ``worker`` gives its leased run back, claimable after ``delay``
        (a concurrency limit said: not yet). The delivery is not counted: it never started.
        False if the run is no longer ``worker``'s running run."""
        with transaction(self._engine, write=True) as conn:
            done = conn.execute(
                update(runs)
                .where(
                    runs.c.id == run_id,
                    runs.c.lease_owner == worker,
                    _may_become(RunStatus.QUEUED),
                )
                .values(
                    status=str(RunStatus.QUEUED),
                    lease_owner=None,
                    lease_expires=None,
                    started_at=None,
                    deliveries=runs.c.deliveries - 1,
                    available_at=datetime.now(UTC) + timedelta(seconds=delay),
                )
            )
            return done.rowcount == 1

    def hand_back(self, run_id: str, worker: str) -> bool:
        """running -> queued: a worker shutting down gives its run back, claimable at once.
        The delivery still counts: the next one checks the log for an outcome the agent
        reported meanwhile. False if the run is no longer ``worker``'s running run."""
        with transaction(self._engine, write=True) as conn:
            done = conn.execute(
                update(runs)
                .where(
                    runs.c.id == run_id,
                    runs.c.lease_owner == worker,
                    _may_become(RunStatus.QUEUED),
                )
                .values(
                    status=str(RunStatus.QUEUED),
                    lease_owner=None,
                    lease_expires=None,
                    available_at=datetime.now(UTC),
                )
            )
            return done.rowcount == 1

    def expired(self, now: datetime | None = None) -> list[Run]:
        """Running runs whose worker stopped renewing its lease (it died, or hangs)."""
        now = now or datetime.now(UTC)
        with transaction(self._engine) as conn:
            rows = conn.execute(
                select(runs).where(
                    runs.c.status == str(RunStatus.RUNNING), runs.c.lease_expires < now
                )
            ).all()
        return [run_row(r) for r in rows]

    def requeue(self, run: Run, backoff: float) -> bool:
        """running -> queued: put an expired run back in the queue, once: only if its lease
        is still the one ``run`` shows."""
        with transaction(self._engine, write=True) as conn:
            done = conn.execute(
                update(runs)
                .where(
                    runs.c.id == run.id,
                    _may_become(RunStatus.QUEUED),
                    runs.c.lease_owner == run.lease_owner,
                    runs.c.lease_expires == run.lease_expires,
                )
                .values(
                    status=str(RunStatus.QUEUED),
                    lease_owner=None,
                    lease_expires=None,
                    available_at=datetime.now(UTC) + timedelta(seconds=backoff),
                )
            )
            return done.rowcount == 1

    def request_cancel(self, run_id: str) -> bool:
        """Flag a running run for its worker, which stops it (and ends it ``cancelled``);
        False if it is not running. Not a transition: the worker's ``finish`` is."""
        with transaction(self._engine, write=True) as conn:
            done = conn.execute(
                update(runs)
                .where(runs.c.id == run_id, runs.c.status == str(RunStatus.RUNNING))
                .values(cancel_requested=True)
            )
            return done.rowcount == 1

    # -- admission with an idempotency key ---------------------------------------------------

    def key_binding(self, user: str, app: str, key: str, ttl: timedelta) -> KeyBinding | None:
        """The run ``key`` was bound to within ``ttl``, or None."""
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
        return _binding(row)

    def bind_key(
        self, user: str, app: str, key: str, request_hash: str, run_id: str, ttl: timedelta
    ) -> KeyBinding:
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
            upsert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
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
        return _binding(row)

    def release_parked(self, run_id: str) -> None:
        """A run admitted parked (not yet claimable) becomes claimable now."""
        with transaction(self._engine, write=True) as conn:
            conn.execute(
                update(runs)
                .where(runs.c.id == run_id, runs.c.status == str(RunStatus.QUEUED))
                .values(available_at=datetime.now(UTC))
            )

    def discard_parked(self, run_id: str) -> None:
        """Remove a parked run that lost its idempotency key to a concurrent twin."""
        with transaction(self._engine, write=True) as conn:
            conn.execute(
                delete(runs).where(runs.c.id == run_id, runs.c.status == str(RunStatus.QUEUED))
            )

    # -- the end: -> terminal ----------------------------------------------------------------

    def finish(
        self,
        run_id: str,
        *,
        lease_owner: str | None = None,
        lease_expires: datetime | None = None,
        from_status: Iterable[str] = ACTIVE,
        detail: dict[str, Any] | None = None,
        **fields: Any,
    ) -> tuple[Run, RunEvent] | None:
        """End a run: the one write that moves a run into a terminal state.

        The terminal ``status`` and the other ``fields`` (``finished_at`` among them), and
        the run's ``run.finished`` event (its status and ``detail``), in one transaction. It
        happens only while the run is still in one of ``from_status`` from which
        ``corral.states`` allows ``status`` (and, when given, while ``lease_owner`` holds its
        lease, the one that expires at ``lease_expires``), so of two paths racing to end one
        run exactly one wins, and no run ends without its event. Returns the ended run and
        that event, or None if this call did not end it (it had ended already, or its lease
        belongs to another worker): nothing is written then.
        """
        unknown = set(fields) - {c.name for c in runs.columns}
        if unknown:
            raise ValueError(f"runs has no columns {sorted(unknown)}")
        status = fields.get("status")
        if status not in TERMINAL:
            raise ValueError(f"finish needs a terminal status, not {status!r}")
        at = fields.get("finished_at")
        if not isinstance(at, datetime):
            raise ValueError("finish needs the time the run finished (finished_at)")
        starts = tuple(from_status)
        origins = sources(status, starts)
        if not origins:
            raise ValueError(f"no run may become {status} from {', '.join(starts)}")
        where = [runs.c.id == run_id, _status_in(origins)]
        if lease_owner is not None:
            where.append(runs.c.lease_owner == lease_owner)
        if lease_expires is not None:
            where.append(runs.c.lease_expires == lease_expires)
        with transaction(self._engine, write=True) as conn:
            row = conn.execute(
                update(runs).where(*where).values(**fields).returning(*runs.c)
            ).first()
            if row is None:
                if not conn.scalar(select(runs.c.id).where(runs.c.id == run_id)):
                    raise RunNotFound(run_id)
                return None
            event = _finished_event(conn, run_id, str(status), at, detail)
        return run_row(row), event

    def claim_announcement(self, run_id: str, now: datetime) -> bool:
        """Mark an ended run's completion hooks as fired; True for the one caller that did."""
        with transaction(self._engine, write=True) as conn:
            done = conn.execute(
                update(runs)
                .where(runs.c.id == run_id, _status_in(TERMINAL), runs.c.announced_at.is_(None))
                .values(announced_at=now)
            )
            return done.rowcount == 1

    def unannounced(self, ended_before: datetime, limit: int = 100) -> list[Run]:
        """Ended runs whose completion hooks have not fired (ended by a process without them)."""
        with transaction(self._engine) as conn:
            rows = conn.execute(
                select(runs)
                .where(
                    runs.c.announced_at.is_(None),
                    _status_in(TERMINAL),
                    runs.c.finished_at < ended_before,
                )
                .order_by(runs.c.finished_at)
                .limit(limit)
            ).all()
        return [run_row(r) for r in rows]

    # -- the log -----------------------------------------------------------------------------

    def append_events(self, events: list[tuple[str, datetime, str, str]]) -> None:
        """Append (run_id, at, kind, data) events, in order, numbering each run's own."""
        with transaction(self._engine, write=True) as conn:
            next_seq: dict[str, int] = {}
            rows = []
            for run_id, at, kind, data in events:
                if run_id not in next_seq:
                    last = conn.scalar(
                        select(func.max(run_events.c.seq)).where(run_events.c.run_id == run_id)
                    )
                    next_seq[run_id] = (last or 0) + 1
                rows.append(
                    {
                        "run_id": run_id,
                        "seq": next_seq[run_id],
                        "at": at,
                        "kind": kind,
                        "data": data,
                    }
                )
                next_seq[run_id] += 1
            if rows:
                conn.execute(insert(run_events), rows)

    def append_event(self, run_id: str, at: datetime, kind: str, data: str) -> RunEvent:
        with transaction(self._engine, write=True) as conn:
            return _append(conn, run_id, at, kind, data)

    def events(self, run_id: str, after: int = 0) -> list[RunEvent]:
        with transaction(self._engine) as conn:
            rows = conn.execute(
                select(run_events)
                .where(run_events.c.run_id == run_id, run_events.c.seq > after)
                .order_by(run_events.c.seq)
            ).all()
        return [_event(r) for r in rows]


def run_row(row: Row[Any]) -> Run:
    """The one builder of ``Run``: from a row of ``runs`` (every column)."""
    return Run(**row._asdict())


def _event(row: Row[Any]) -> RunEvent:
    return RunEvent(**row._asdict())


def _binding(row: Row[Any]) -> KeyBinding:
    return KeyBinding(**row._asdict())


def _status_in(statuses: Iterable[str]) -> ColumnElement[bool]:
    return runs.c.status.in_([str(s) for s in statuses])


def _may_become(target: RunStatus) -> ColumnElement[bool]:
    """The run is in a state ``corral.states`` allows ``target`` from."""
    return _status_in(sources(target))


def _finished_event(
    conn: Connection, run_id: str, status: str, at: datetime, detail: dict[str, Any] | None
) -> RunEvent:
    """Append the run's ``run.finished`` event, inside the transaction that ends it."""
    data = json.dumps({"status": status, **(detail or {})}, default=repr)
    return _append(conn, run_id, at, "run.finished", data)


def _append(conn: Connection, run_id: str, at: datetime, kind: str, data: str) -> RunEvent:
    last = conn.scalar(select(func.max(run_events.c.seq)).where(run_events.c.run_id == run_id))
    seq = (last or 0) + 1
    conn.execute(insert(run_events).values(run_id=run_id, seq=seq, at=at, kind=kind, data=data))
    return RunEvent(run_id, seq, at, kind, data)
