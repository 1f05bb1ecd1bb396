"""Alembic environment for the store, loaded by Alembic from ``corral.store.engine.migrate``.

The caller hands over an open ``Connection`` already inside a transaction (and, on
PostgreSQL, holding the migration advisory lock) as ``config.attributes["connection"]``;
Alembic then runs every pending revision inside that transaction and the caller commits.
There is no ``alembic.ini``: ``corral.store.engine.alembic_config`` builds the config.

For development (``alembic revision --autogenerate``) a config carrying only a
``sqlalchemy.url`` works too: a connection is made here with the store's own engine setup.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from corral.store.engine import make_engine
from corral.store.schema import metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _main() -> None:
    config = context.config
    if context.is_offline_mode():
        context.configure(
            url=config.get_main_option("sqlalchemy.url"),
            target_metadata=metadata,
            literal_binds=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        return
    connection = config.attributes.get("connection")
    if isinstance(connection, Connection):
        _run(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no connection given and no sqlalchemy.url set")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


_main()
