"""Webhook deliveries: the ``webhook_deliveries`` table, one row per finished run whose app
has a webhook, leased like runs.

A delivery is ``pending`` until a deliverer gets a 2xx for it (``delivered``) or gives up
(``failed``). Any number of deliverers, in any number of processes, take pending deliveries
from this table. ``claim`` leases the oldest due one in one transaction (``FOR UPDATE SKIP
LOCKED`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite) and counts the attempt there, so an
attempt cut short by a dead deliverer is still counted. Every later write is fenced by the
lease's owner: a deliverer whose lease was taken over changes nothing. When to retry and
when to give up is the deliverer's (``corral.pipeline.webhooks``).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine, Row
from sqlalchemy.sql.elements import ColumnElement

from corral.errors import DeliveryNotFound
from corral.states import TERMINAL
from corral.store.engine import transaction
from corral.store.rows import Delivery, Run
from corral.store.runs import run_row
from corral.store.schema import runs, webhook_deliveries

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
_ERROR_LIMIT = 1000  # characters of the last error kept on the row


class Deliveries:
    """The ``webhook_deliveries`` table. Safe to share between threads."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def enqueue(self, run_id: str, url: str, body: str, now: datetime | None = None) -> bool:
        """Record the delivery for ``run_id``, due at once; False if the run already has one."""
        at = now or datetime.now(UTC)
        with transaction(self._engine, write=True) as conn:
            insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
            statement = (
                insert(webhook_deliveries)
                .values(
                    run_id=run_id, url=url, body=body, attempts=0, next_attempt=at, status=PENDING
                )
                .on_conflict_do_nothing(index_elements=["run_id"])
                .returning(webhook_deliveries.c.id)  # no row when the run already has one
            )
            return conn.execute(statement).first() is not None

    def claim(self, owner: str, lease: float, now: datetime | None = None) -> Delivery | None:
        """Lease the longest-due pending delivery to ``owner`` and count an attempt; or None.

        A delivery whose lease ran out (its deliverer died or hung) is due again at once.
        """
        now = now or datetime.now(UTC)
        with transaction(self._engine) as conn:  # most polls find nothing: no write lock
            due = conn.scalar(select(webhook_deliveries.c.id).where(_claimable(now)).limit(1))
        if due is None:
            return None
        with transaction(self._engine, write=True) as conn:
            candidate = conn.execute(
                select(webhook_deliveries.c.id)
                .where(_claimable(now))
                .order_by(webhook_deliveries.c.next_attempt, webhook_deliveries.c.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if candidate is None:
                return None
            row = conn.execute(
                update(webhook_deliveries)
                .where(webhook_deliveries.c.id == candidate.id, _claimable(now))
                .values(
                    lease_owner=owner,
                    lease_expires=now + timedelta(seconds=lease),
                    attempts=webhook_deliveries.c.attempts + 1,
                )
                .returning(*webhook_deliveries.c)
            ).first()
        return None if row is None else _delivery(row)

    def delivered(self, delivery_id: int, owner: str, now: datetime | None = None) -> bool:
        """Mark a leased delivery delivered; False if ``owner`` no longer holds it."""
        return self._settle(
            delivery_id,
            owner,
            status=DELIVERED,
            lease_owner=None,
            lease_expires=None,
            delivered_at=now or datetime.now(UTC),
        )

    def retry(self, delivery_id: int, owner: str, error: str, at: datetime) -> bool:
        """Give a leased delivery back, due again at ``at``; False if ``owner`` lost it."""
        return self._settle(
            delivery_id,
            owner,
            next_attempt=at,
            last_error=error[:_ERROR_LIMIT],
            lease_owner=None,
            lease_expires=None,
        )

    def fail(self, delivery_id: int, owner: str, error: str) -> bool:
        """Give up on a leased delivery; False if ``owner`` lost it."""
        return self._settle(
            delivery_id,
            owner,
            status=FAILED,
            last_error=error[:_ERROR_LIMIT],
            lease_owner=None,
            lease_expires=None,
        )

    def get(self, delivery_id: int) -> Delivery:
        with transaction(self._engine) as conn:
            row = conn.execute(
                select(webhook_deliveries).where(webhook_deliveries.c.id == delivery_id)
            ).first()
        if row is None:
            raise DeliveryNotFound(str(delivery_id))
        return _delivery(row)

    def for_run(self, run_id: str) -> Delivery | None:
        with transaction(self._engine) as conn:
            row = conn.execute(
                select(webhook_deliveries).where(webhook_deliveries.c.run_id == run_id)
            ).first()
        return None if row is None else _delivery(row)

    def finished_without_delivery(self, since: datetime, limit: int = 500) -> list[Run]:
        """App runs that ended after ``since`` and have no delivery row (oldest first)."""
        query = (
            select(runs)
            .outerjoin(webhook_deliveries, webhook_deliveries.c.run_id == runs.c.id)
            .where(
                runs.c.status.in_([str(s) for s in TERMINAL]),
                runs.c.app.is_not(None),
                runs.c.finished_at >= since,
                webhook_deliveries.c.id.is_(None),
            )
            .order_by(runs.c.finished_at)
            .limit(limit)
        )
        with transaction(self._engine) as conn:
            return [run_row(r) for r in conn.execute(query).all()]

    def _settle(self, delivery_id: int, owner: str, **values: Any) -> bool:
        with transaction(self._engine, write=True) as conn:
            done = conn.execute(
                update(webhook_deliveries)
                .where(
                    webhook_deliveries.c.id == delivery_id,
                    webhook_deliveries.c.lease_owner == owner,
                    webhook_deliveries.c.status == PENDING,
                )
                .values(**values)
            )
            return done.rowcount == 1


def _delivery(row: Row[Any]) -> Delivery:
    return Delivery(**row._asdict())


def _claimable(now: datetime) -> ColumnElement[bool]:
    return and_(
        webhook_deliveries.c.status == PENDING,
        webhook_deliveries.c.next_attempt <= now,
        or_(webhook_deliveries.c.lease_expires.is_(None), webhook_deliveries.c.lease_expires < now),
    )
