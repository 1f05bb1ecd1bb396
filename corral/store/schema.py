"""The database schema as SQLAlchemy Core tables: the one description of what is stored.

``store.py`` builds every query from these objects, and ``migrations/`` must produce
exactly these tables (a test compares the two). Changing a table here means adding an
Alembic revision under ``migrations/versions/`` as well.

Timestamps use ``UTCDateTime``: written as UTC, read back as aware UTC on every engine
(SQLite keeps no offset, so a naive value read from it is UTC by construction).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Integer,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.types import TypeDecorator

# Deterministic constraint names, so migrations can refer to them on every engine.
NAMING_CONVENTION = {
    "pk": "pk_%(table_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp, stored as UTC and always returned as aware UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.utcoffset() is None:
            raise ValueError(f"refusing to store naive datetime {value!r}; pass an aware one")
        return value.astimezone(UTC)

    def process_result_value(self, value: Any | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime from the database, got {value!r}")
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


environments = Table(
    "environments",
    metadata,
    Column("name", Text, primary_key=True),
    Column("base", Text, nullable=False),
    Column("head", Text, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    CheckConstraint("length(name) BETWEEN 1 AND 63", name="name_length"),
)

snapshots = Table(
    "snapshots",
    metadata,
    Column("digest", Text, primary_key=True),
    Column(
        "environment",
        Text,
        ForeignKey("environments.name", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("seq", Integer, nullable=False),
    Column("parent", Text, nullable=True),
    Column("layer", Text, nullable=True),
    Column("size", BigInteger, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("message", Text, nullable=True),
    UniqueConstraint("environment", "seq"),
    CheckConstraint("seq >= 1", name="seq_positive"),
    CheckConstraint("size >= 0", name="size_not_negative"),
)

runner_releases = Table(
    "runner_releases",
    metadata,
    Column("digest", Text, primary_key=True),  # sha256 of the release tarball
    Column("version", Text, nullable=False),
    Column("requires_python", Text, nullable=False),  # "3.8": the oldest Python it supports
    Column("source", Text, nullable=False),  # where it was published from
    Column("published_at", UTCDateTime, nullable=False),
    Column("activated_at", UTCDateTime, nullable=False),  # the newest activation is current
)

runs = Table(
    "runs",
    metadata,
    Column("id", Text, primary_key=True),
    # Not foreign keys: a run's record outlives the environment it ran in.
    Column("environment", Text, nullable=False),
    Column("snapshot", Text, nullable=False),  # the digest the run booted
    Column("entrypoint", Text, nullable=False),
    Column("input", Text, nullable=False),  # JSON
    Column("trigger", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("result", Text, nullable=True),  # JSON
    Column("error_code", Text, nullable=True),
    Column("error", Text, nullable=True),
    Column("runner_version", Text, nullable=True),
    Column("runner_digest", Text, nullable=True),
    Column("swapped", Boolean, nullable=False),
    Column("folded_snapshot", Text, nullable=True),  # the snapshot the fold-in wrote
    Column("attempts", Integer, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("started_at", UTCDateTime, nullable=True),
    Column("finished_at", UTCDateTime, nullable=True),
)

run_events = Table(
    "run_events",
    metadata,
    Column("run_id", Text, ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("at", UTCDateTime, nullable=False),
    Column("kind", Text, nullable=False),
    Column("data", Text, nullable=False),  # JSON object
)
