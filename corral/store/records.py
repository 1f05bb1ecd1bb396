"""Runner releases, runs and run events: the SQL for issue 3's records.

Like ``store.py``, every public method is one transaction and every database error leaves
as a ``corral.errors`` exception. A run's event log is append-only: ``append_event`` assigns
the next sequence number inside its transaction, so concurrent writers of one run's log
serialise and readers can follow the log with ``events(run_id, after=seq)``.

A run ends exactly once, through ``finish`` (or, for a run cancelled while queued, through
``PipelineRecords.cancel``): the terminal status and the ``run.finished`` event are written
in one transaction, and only while the run has not ended, so no path can end a run twice or
end it without its event, whoever (a worker, its successor, a sweeper) gets there.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine, Row

from corral.errors import Conflict, NotFound
from corral.store.engine import transaction
from corral.store.rows import Release, Run, RunEvent
from corral.store.schema import run_events, runner_releases, runs

# Statuses of a run that has not ended, and of one that has (see corral/pipeline/states.py).
ACTIVE = ("queued", "running")
TERMINAL = ("succeeded", "failed", "timed_out", "cancelled")


class RunNotFound(NotFound):
    code = "run_not_found"

    def __init__(self, run_id: str) -> None:
        super().__init__(f"no run with id {run_id!r}")


class LeaseLost(Conflict):
    code = "lease_lost"

    def __init__(self, run_id: str, worker: str) -> None:
        super().__init__(f"worker {worker} no longer holds the lease on {run_id}")


class ReleaseNotFound(NotFound):
    code = "release_not_found"

    def __init__(self, ref: str) -> None:
        super().__init__(f"no runner release {ref!r}; `corral runner list` shows them")


class Releases:
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


class Runs:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def create(self, run: Run) -> Run:
        with transaction(self._engine, write=True) as conn:
            conn.execute(insert(runs).values(dataclasses.asdict(run)))
        return run

    def update(self, run_id: str, *, lease_owner: str | None = None, **fields: Any) -> Run:
        """Change a run's record. With ``lease_owner``, only while that worker holds the run's
        lease (a worker that lost its lease must not overwrite its successor's record):
        ``LeaseLost`` otherwise."""
        unknown = set(fields) - {c.name for c in runs.columns}
        if unknown:
            raise ValueError(f"runs has no columns {sorted(unknown)}")
        where = [runs.c.id == run_id]
        if lease_owner is not None:
            where.append(runs.c.lease_owner == lease_owner)
        with transaction(self._engine, write=True) as conn:
            done = conn.execute(update(runs).where(*where).values(**fields))
            if done.rowcount == 0:
                if lease_owner is not None and conn.scalar(
                    select(runs.c.id).where(runs.c.id == run_id)
                ):
                    raise LeaseLost(run_id, lease_owner)
                raise RunNotFound(run_id)
        return self.get(run_id)

    def finish(
        self,
        run_id: str,
        *,
        lease_owner: str | None = None,
        lease_expires: datetime | None = None,
        from_status: tuple[str, ...] = ACTIVE,
        detail: dict[str, Any] | None = None,
        **fields: Any,
    ) -> tuple[Run, RunEvent] | None:
        """End a run: the one write that moves a run into a terminal state.

        The terminal ``status`` and the other ``fields`` (``finished_at`` among them), and
        the run's ``run.finished`` event (its status and ``detail``), in one transaction. It
        happens only while the run is still in ``from_status`` (and, when given, while
        ``lease_owner`` holds its lease, the one that expires at ``lease_expires``), so of two
        paths racing to end one run exactly one wins, and no run ends without its event.
        Returns the ended run and that event, or None if this call did not end it (it had
        ended already, or its lease belongs to another worker): nothing is written then.
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
        where = [runs.c.id == run_id, runs.c.status.in_(from_status)]
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
            event = finished_event(conn, run_id, str(status), at, detail)
        return Run(**row._asdict()), event

    def claim_announcement(self, run_id: str, now: datetime) -> bool:
        """Mark an ended run's completion hooks as fired; True for the one caller that did."""
        with transaction(self._engine, write=True) as conn:
            done = conn.execute(
                update(runs)
                .where(
                    runs.c.id == run_id, runs.c.status.in_(TERMINAL), runs.c.announced_at.is_(None)
                )
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
                    runs.c.status.in_(TERMINAL),
                    runs.c.finished_at < ended_before,
                )
                .order_by(runs.c.finished_at)
                .limit(limit)
            ).all()
        return [Run(**r._asdict()) for r in rows]

    def get(self, run_id: str) -> Run:
        with transaction(self._engine) as conn:
            row = conn.execute(select(runs).where(runs.c.id == run_id)).first()
        if row is None:
            raise RunNotFound(run_id)
        return Run(**row._asdict())

    def for_environment(self, environment: str, limit: int = 50) -> list[Run]:
        with transaction(self._engine) as conn:
            rows = conn.execute(
                select(runs)
                .where(runs.c.environment == environment)
                .order_by(runs.c.created_at.desc())
                .limit(limit)
            ).all()
        return [Run(**r._asdict()) for r in rows]

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
        return [RunEvent(**r._asdict()) for r in rows]


def finished_event(
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


def _release(row: Row[Any]) -> Release:
    return Release(**row._asdict())
