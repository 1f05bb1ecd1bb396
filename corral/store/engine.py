"""Engines, migrations and error translation: how the store reaches its database.

This module owns everything engine-specific, so the aggregate modules can stay portable:

* ``make_engine`` turns a ``sqlite:///...`` or ``postgresql://...`` URL into an Engine.
  SQLite gets WAL, ``synchronous=NORMAL``, ``foreign_keys=ON`` and ``busy_timeout=5000``
  on every connection, and SQLAlchemy (not the sqlite3 module) emits BEGIN, so DDL is
  transactional and a write transaction can take the file lock up front
  (``WRITE``: ``BEGIN IMMEDIATE``). PostgreSQL URLs are pointed at psycopg 3.
* ``migrate`` brings the schema to Alembic ``head`` in one transaction, serialised between
  processes by ``pg_advisory_xact_lock`` on PostgreSQL and the database file lock on SQLite.
* ``translating`` is the one place SQLAlchemy and Alembic exceptions become
  ``corral.errors``; ``is_unique_violation`` lets callers say which conflict it was. A
  transient failure (the server unreachable, starting up or shutting down, a session dropped,
  SQLite's lock still busy) becomes ``StoreUnavailable``, which ``patiently`` retries.

The store itself never retries: a one-shot command should say at once that the database is
down. The long-running parts that hold runs (workers, the executor, the bridge) call it
``patiently``, so a database restart costs them latency and never a run.
"""

from __future__ import annotations

import fcntl
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, TypeVar

from alembic import command
from alembic.config import Config
from alembic.util import CommandError
from sqlalchemy import create_engine, event, exc, text
from sqlalchemy.engine import URL, Connection, Engine, make_url

from corral.errors import InvalidInput, StoreError, StoreUnavailable

T = TypeVar("T")
log = logging.getLogger("corral.store")

# How long the long-running parts wait out an unreachable database before giving up: far
# longer than a restart or a failover takes, far shorter than a run's lease backoff allows.
OUTAGE_BUDGET_S = 60.0

# PostgreSQL SQLSTATEs after which the same transaction, run again, may well succeed: the
# server shutting down or starting up, too many connections, a serialization failure or a
# deadlock (both rolled back). Class 08 (connection exceptions) is transient as a whole.
_TRANSIENT_SQLSTATES: Final = frozenset({"40001", "40P01", "53300", "57P01", "57P02", "57P03"})

MIGRATIONS_DIR: Final = Path(__file__).resolve().parent / "migrations"

# Execution options for a connection whose transaction will write: on SQLite it begins
# with BEGIN IMMEDIATE, so a compare-and-swap never meets a stale read snapshot.
WRITE: Final[dict[str, Any]] = {"corral_sqlite_begin": "IMMEDIATE"}
_BEGIN_MODES: Final = frozenset({"DEFERRED", "IMMEDIATE", "EXCLUSIVE"})

_SQLITE_PRAGMAS: Final = (
    "busy_timeout=5000",  # first: the pragmas below may themselves wait for the lock
    "journal_mode=WAL",
    "synchronous=NORMAL",
    "foreign_keys=ON",
)

# Key of the PostgreSQL advisory lock held while migrating ("corral" in ASCII).
MIGRATION_LOCK_KEY: Final = 0x636F7272616C

# Alembic installs its ``context`` proxy module-globally: one migration per process at once.
_MIGRATE_LOCK = threading.Lock()


def parse_url(url: str) -> URL:
    """Parse a store URL; ``postgresql://`` becomes ``postgresql+psycopg://``."""
    try:
        parsed = make_url(url)
    except exc.ArgumentError as e:
        raise InvalidInput(f"not a database URL: {url.split(':', 1)[0]!r}...") from e
    if parsed.drivername == "postgresql":
        return parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername in ("postgresql+psycopg", "sqlite", "sqlite+pysqlite"):
        return parsed
    raise InvalidInput(
        f"unsupported database URL scheme {parsed.drivername!r}: "
        "use sqlite:///path or postgresql://user@host/db"
    )


def shown(url: URL) -> str:
    """The URL as it may appear in messages and logs: password masked."""
    return url.render_as_string(hide_password=True)


def make_engine(url: str | URL) -> Engine:
    """Create the Engine for ``url`` with Corral's per-connection setup installed."""
    parsed = parse_url(url) if isinstance(url, str) else url
    if parsed.get_backend_name() != "sqlite":
        return create_engine(parsed, pool_pre_ping=True)
    database = parsed.database or ""
    if database and database != ":memory:" and not database.startswith("file:"):
        try:
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the directory for {shown(parsed)}: {e}") from e
    engine = create_engine(parsed)
    event.listen(engine, "connect", _sqlite_connect)
    event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_connect(dbapi_connection: Any, connection_record: Any) -> None:
    # Stop the sqlite3 module from issuing BEGIN itself; _sqlite_begin does it instead.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        for pragma in _SQLITE_PRAGMAS:
            cursor.execute(f"PRAGMA {pragma}")
    finally:
        cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    mode = str(conn.get_execution_options().get("corral_sqlite_begin", "DEFERRED"))
    if mode not in _BEGIN_MODES:
        raise ValueError(f"unknown SQLite BEGIN mode {mode!r}")
    conn.exec_driver_sql(f"BEGIN {mode}")


def alembic_config() -> Config:
    """An Alembic Config for the store's migrations, built without any alembic.ini."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def migrate(engine: Engine) -> None:
    """Upgrade the database behind ``engine`` to the newest revision; safe to race."""
    config = alembic_config()
    with (
        _MIGRATE_LOCK,
        _sqlite_file_lock(engine),
        translating(engine.url),
        engine.connect() as conn,
    ):
        conn.execution_options(**WRITE)
        with conn.begin():
            if conn.dialect.name == "postgresql":
                # Released by the commit; a second process waits here, then finds head.
                conn.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
                )
            config.attributes["connection"] = conn
            try:
                command.upgrade(config, "head")
            except CommandError as e:
                raise StoreError(
                    f"cannot migrate {shown(engine.url)}: {e}. "
                    "Is the database newer than this version of Corral?"
                ) from e


@contextmanager
def _sqlite_file_lock(engine: Engine) -> Iterator[None]:
    """Across processes, one at a time migrates a SQLite file (PostgreSQL has its advisory
    lock). Taken before the first connection, because that connection also switches a new
    file to WAL, which SQLite refuses outright (no busy wait) while another process is in it."""
    path = engine.url.database if engine.dialect.name == "sqlite" else None
    if not path or path == ":memory:":
        yield
        return
    with open(f"{path}.migrate-lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def is_unique_violation(error: exc.IntegrityError) -> bool:
    """Whether ``error`` is a duplicate key (as opposed to, say, a failed CHECK)."""
    orig = error.orig
    if getattr(orig, "sqlstate", None) == "23505":  # PostgreSQL unique_violation
        return True
    return getattr(orig, "sqlite_errorname", None) in (
        "SQLITE_CONSTRAINT_PRIMARYKEY",
        "SQLITE_CONSTRAINT_UNIQUE",
    )


@contextmanager
def transaction(engine: Engine, *, write: bool = False) -> Iterator[Connection]:
    """One transaction, committed on success; database errors become ``StoreError``.

    ``write`` takes SQLite's write lock at BEGIN (IMMEDIATE), so read-then-write transactions
    serialise instead of failing at commit; PostgreSQL ignores it.
    """
    with translating(engine.url), engine.connect() as conn:
        if write:
            conn.execution_options(**WRITE)
        with conn.begin():
            yield conn


@contextmanager
def translating(url: URL) -> Iterator[None]:
    """Turn any SQLAlchemy error raised inside into ``StoreError`` naming the masked URL."""
    try:
        yield
    except exc.SQLAlchemyError as e:
        if is_transient(e):
            raise StoreUnavailable(
                f"database {shown(url)} is unavailable: {_reason(e, url)}"
            ) from e
        if isinstance(e, exc.OperationalError):
            raise StoreError(
                f"database {shown(url)} is unreachable or refused the operation: {_reason(e, url)}"
            ) from e
        raise StoreError(f"database {shown(url)} refused the operation: {_reason(e, url)}") from e


def is_transient(error: exc.SQLAlchemyError) -> bool:
    """Whether running the same transaction again a moment later may succeed."""
    if isinstance(error, exc.TimeoutError):  # no pooled connection came free in time
        return True
    if not isinstance(error, exc.DBAPIError):
        return False
    if error.connection_invalidated:  # SQLAlchemy saw the session drop
        return True
    orig = error.orig
    errorname = str(getattr(orig, "sqlite_errorname", ""))
    if errorname:
        return errorname.startswith(("SQLITE_BUSY", "SQLITE_LOCKED"))
    if not isinstance(error, exc.OperationalError | exc.InterfaceError):
        return False
    sqlstate = getattr(orig, "sqlstate", None)
    # No SQLSTATE: the server never answered (refused, reset, timed out).
    return sqlstate is None or sqlstate.startswith("08") or sqlstate in _TRANSIENT_SQLSTATES


def patiently(
    call: Callable[[], T],
    what: str,
    budget: float | None = None,
    check: Callable[[], object] | None = None,
) -> T:
    """``call()``, retried with backoff while the database is unavailable, for up to ``budget``
    seconds (``OUTAGE_BUDGET_S``); then the last ``StoreUnavailable`` propagates. Any other
    error propagates at once. ``check`` is called before every pause: whatever it raises
    (a worker whose lease ran out meanwhile) ends the wait.

    Only for operations that are safe to repeat: reads, and writes that are idempotent or
    fenced (a lease heartbeat, a run's final record). A transaction whose session dropped
    during COMMIT may have committed; repeating an append then adds it twice.
    """
    deadline = time.monotonic() + (OUTAGE_BUDGET_S if budget is None else budget)
    pause = 0.05
    while True:
        try:
            return call()
        except StoreUnavailable as e:
            if time.monotonic() + pause > deadline:
                raise
            if check is not None:
                check()
            level = logging.WARNING if pause == 0.05 else logging.DEBUG  # once per outage
            log.log(level, "%s: %s; retrying until it is back", what, e.detail)
            time.sleep(pause)
            pause = min(pause * 2, 1.0)


def _reason(error: exc.SQLAlchemyError, url: URL) -> str:
    # The driver's own message, without SQLAlchemy's appended statement and parameters.
    orig = error.orig if isinstance(error, exc.DBAPIError) else None
    message = " ".join(str(orig if orig is not None else error).split())
    if url.password:
        message = message.replace(str(url.password), "***")
    return message
