"""The database schema as SQLAlchemy Core tables: the one description of what is stored.

The store's modules build every query from these objects, and ``migrations/`` must produce
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
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.sql import false
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
    Column("user", Text, nullable=False, server_default="local"),
    Column("app", Text, nullable=True),
    Column("app_version", Integer, nullable=True),
    Column("parent_run", Text, nullable=True),
    Column("depth", Integer, nullable=False, server_default="0"),
    Column("options", Text, nullable=True),
    Column("lease_owner", Text, nullable=True),
    Column("lease_expires", UTCDateTime, nullable=True),
    Column("available_at", UTCDateTime, nullable=True),
    Column("deliveries", Integer, nullable=False, server_default="0"),
    Column("cancel_requested", Boolean, nullable=False, server_default=false()),
    # The run that started this run's call tree (its own id for a root): budgets bound trees.
    Column("root_run", Text, nullable=True),
    Column("awaited", Boolean, nullable=False, server_default=false()),  # its caller waits
    Column("announced_at", UTCDateTime, nullable=True),  # completion hooks fired (once)
    Index("ix_runs_queue", "status", "available_at"),
    Index("ix_runs_root_run", "root_run"),
    Index("ix_runs_parent_run", "parent_run", "status"),
    Index("ix_runs_announced_at", "announced_at", "status"),
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

# Sealed credentials (see corral/vault/sealed.py): the secret fields exist here only as
# AES-256-GCM ciphertext under a per-record data key, itself wrapped under a master key that
# is never stored in the database. Revoking nulls every sealed column, so a revoked row
# keeps its metadata and nothing that could be decrypted.
CREDENTIAL_KINDS = ("bearer", "api_key", "basic", "oauth2")
SEALED_COLUMNS = ("key_id", "dek_nonce", "wrapped_dek", "nonce", "ciphertext")
SEALED_UNLESS_REVOKED = (
    "(revoked_at IS NULL AND "
    + " AND ".join(f"{c} IS NOT NULL" for c in SEALED_COLUMNS)
    + ") OR (revoked_at IS NOT NULL AND "
    + " AND ".join(f"{c} IS NULL" for c in SEALED_COLUMNS)
    + ")"
)
KIND_KNOWN = "kind IN (" + ", ".join(f"'{k}'" for k in CREDENTIAL_KINDS) + ")"

credentials = Table(
    "credentials",
    metadata,
    Column("user", Text, primary_key=True),  # "user" is reserved in SQL: SQLAlchemy quotes it
    Column("connection", Text, primary_key=True),
    Column("kind", Text, nullable=False),
    Column("key_id", Text, nullable=True),  # the master key that wraps the data key
    Column("dek_nonce", LargeBinary, nullable=True),
    Column("wrapped_dek", LargeBinary, nullable=True),
    Column("nonce", LargeBinary, nullable=True),
    Column("ciphertext", LargeBinary, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("revoked_at", UTCDateTime, nullable=True),
    CheckConstraint(KIND_KNOWN, name="kind_known"),
    CheckConstraint(SEALED_UNLESS_REVOKED, name="sealed_unless_revoked"),
    # Rotation looks for records under an old key, and retiring a key counts them.
    Index("ix_credentials_key_id", "key_id"),
)

bridge_calls = Table(
    "bridge_calls",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", UTCDateTime, nullable=False),
    Column("run", Text, nullable=True),
    Column("connection", Text, nullable=True),
    Column("method", Text, nullable=False),
    Column("path", Text, nullable=False),  # as the sandbox sent it, without the query
    Column("status", Integer, nullable=False),
    Column("bytes_in", BigInteger, nullable=False),
    Column("bytes_out", BigInteger, nullable=False),
    Column("latency_ms", Float, nullable=False),
    Column("error", Text, nullable=True),
    Column("peer", Text, nullable=False),
)

usage_events = Table(
    "usage_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", UTCDateTime, nullable=False),
    Column("run", Text, nullable=False),
    Column("user", Text, nullable=False),
    Column("connection", Text, nullable=True),
    Column("kind", Text, nullable=False),  # model_tokens | bridge_call | sandbox_seconds
    Column("input_tokens", BigInteger, nullable=False),
    Column("output_tokens", BigInteger, nullable=False),
    Column("quantity", Float, nullable=False),
)

connections = Table(
    "connections",
    metadata,
    Column("name", Text, primary_key=True),
    Column("base_url", Text, nullable=False),
    Column("auth", Text, nullable=False),
    Column("meter", Text, nullable=True),
    Column("updated_at", UTCDateTime, nullable=False),
)

signing_keys = Table(
    "signing_keys",
    metadata,
    Column("kid", Text, primary_key=True),
    Column("sealed_private_key", LargeBinary, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

apps = Table(
    "apps",
    metadata,
    Column("name", Text, primary_key=True),
    Column("version", Integer, nullable=False),  # the current version
    Column("spec", Text, nullable=False),  # JSON AppSpec of the current version
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

app_versions = Table(
    "app_versions",
    metadata,
    Column("app", Text, ForeignKey("apps.name", ondelete="CASCADE"), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("spec", Text, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("user", Text, primary_key=True),
    Column("app", Text, primary_key=True),
    Column("key", Text, primary_key=True),
    Column("request_hash", Text, nullable=False),
    Column("run_id", Text, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

# The ledger counts in integer micro-credits (docs/design/ledger.md): sums are exact on every
# engine and no amount can be NaN or infinite. The checks are the last line behind the
# ledger's own validation: whatever code posts an entry, its sign fits its kind and its size
# fits the bound that keeps every balance exact.
LEDGER_MAX_MICROS = 10**15  # one entry: a billion credits
LEDGER_KINDS = ("grant", "deduction", "adjustment", "voided")
LEDGER_SIGNS = (
    "(kind = 'grant' AND micros > 0) OR (kind = 'deduction' AND micros <= 0)"
    " OR (kind = 'adjustment' AND micros <> 0) OR (kind = 'voided' AND micros = 0)"
)
LEDGER_BOUNDED = f"micros BETWEEN -{LEDGER_MAX_MICROS} AND {LEDGER_MAX_MICROS}"

ledger = Table(
    "ledger",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("user", Text, nullable=False),
    Column("run", Text, nullable=True),
    Column("app", Text, nullable=True),
    Column("source", Text, nullable=False, unique=True),  # what it is for: at most once each
    # grant | deduction | adjustment (an operator's correction, either sign) | voided (a
    # legacy entry whose amount was not a finite number: kept, worth nothing)
    Column("kind", Text, nullable=False),
    Column("micros", BigInteger, nullable=False),  # micro-credits: + grant, - deduction
    Column("detail", Text, nullable=True),
    Column("at", UTCDateTime, nullable=False),
    CheckConstraint(LEDGER_SIGNS, name="micros_by_kind"),
    CheckConstraint(LEDGER_BOUNDED, name="micros_bounded"),
)

schedules = Table(
    "schedules",
    metadata,
    Column("id", Text, primary_key=True),
    Column("app", Text, nullable=False),
    Column("cron", Text, nullable=False),  # standard five-field cron expression
    Column("timezone", Text, nullable=False),  # IANA name, e.g. Europe/Paris
    Column("input", Text, nullable=False),  # JSON
    Column("user", Text, nullable=False),
    Column("misfire", Text, nullable=False),  # skip | run_once
    Column("paused", Boolean, nullable=False, server_default=false()),
    Column("next_fire", UTCDateTime, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

schedule_ticks = Table(
    "schedule_ticks",
    metadata,
    Column("schedule_id", Text, ForeignKey("schedules.id", ondelete="CASCADE"), primary_key=True),
    Column("fire_time", UTCDateTime, primary_key=True),  # unique per schedule: one run a tick
    Column("run_id", Text, nullable=True),  # None for a tick skipped after downtime
    Column("outcome", Text, nullable=False),  # enqueued | skipped_misfire | refused
    Column("scheduler", Text, nullable=False),
    Column("at", UTCDateTime, nullable=False),
)

webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", Text, nullable=False, unique=True),  # one delivery per finished run
    Column("url", Text, nullable=False),
    Column("body", Text, nullable=False),  # JSON, exactly the bytes signed and sent
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt", UTCDateTime, nullable=False),
    Column("status", Text, nullable=False),  # pending | delivered | failed
    Column("last_error", Text, nullable=True),
    Column("lease_owner", Text, nullable=True),
    Column("lease_expires", UTCDateTime, nullable=True),
    Column("delivered_at", UTCDateTime, nullable=True),
)

spans = Table(
    "spans",
    metadata,
    Column("span_id", Text, primary_key=True),
    Column("trace_id", Text, nullable=False, index=True),
    Column("parent_id", Text, nullable=True),
    Column("run_id", Text, nullable=True, index=True),
    Column("name", Text, nullable=False),
    Column("start", UTCDateTime, nullable=False),
    Column("end", UTCDateTime, nullable=False),
    Column("attributes", Text, nullable=False),  # JSON
    Column("status", Text, nullable=False),
)

# Workers announce themselves: one row per live worker, its ``seen_at`` renewed as it polls and
# deleted when it stops. A row not renewed for a while is a worker that died.
workers = Table(
    "workers",
    metadata,
    Column("name", Text, primary_key=True),
    Column("host", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("seen_at", UTCDateTime, nullable=False),
)
