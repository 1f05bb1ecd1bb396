"""The store: Corral's database of environments and their snapshot histories.

``Store`` (``store.py``) is the only code that speaks SQL; ``schema.py`` describes the
tables, ``migrations/`` creates them (Alembic, driven from code: no alembic.ini), and
``engine.py`` holds the SQLite/PostgreSQL specifics and the one translation of database
errors into ``corral.errors``. ``Environment`` and ``Snapshot`` are frozen copies of rows.
"""

from corral.store.records import ReleaseNotFound, RunNotFound
from corral.store.rows import Environment, Release, Run, RunEvent, Snapshot
from corral.store.store import Store

__all__ = [
    "Environment",
    "Release",
    "ReleaseNotFound",
    "Run",
    "RunEvent",
    "RunNotFound",
    "Snapshot",
    "Store",
]
