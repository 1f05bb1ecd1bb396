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
