"""``Store``: Corral's database, one attribute per aggregate.

``Store.open`` connects and migrates; each attribute is the one module that reads and writes
its tables (see ``corral/store/__init__.py`` for the map). ``Store`` itself speaks no SQL.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

from sqlalchemy.engine import Engine

from corral.store.apps import Apps
from corral.store.connections import Connections
from corral.store.credentials import Credentials
from corral.store.engine import make_engine, migrate, parse_url, shown
from corral.store.environments import Environments
from corral.store.ledger import Ledger
from corral.store.releases import Releases
from corral.store.runs import Runs
from corral.store.schedules import Schedules
from corral.store.signing_keys import SigningKeys
from corral.store.spans import Spans
from corral.store.stats import RunStats
from corral.store.usage import Usage
from corral.store.webhooks import Deliveries
from corral.store.workers import Workers


class Store:
    """Every table of Corral's database, in SQLite or PostgreSQL. Safe to share between
    threads."""

    def __init__(self, engine: Engine) -> None:
        """Wrap an engine from ``engine.make_engine``; use ``Store.open`` instead."""
        self._engine = engine
        self.environments = Environments(engine)
        self.releases = Releases(engine)
        self.runs = Runs(engine)
        self.workers = Workers(engine)
        self.apps = Apps(engine)
        self.ledger = Ledger(engine)
        self.usage = Usage(engine)
        self.connections = Connections(engine)
        self.signing_keys = SigningKeys(engine)
        self.spans = Spans(engine)
        self.schedules = Schedules(engine)
        self.webhooks = Deliveries(engine)
        self.credentials = Credentials(engine)
        self.stats = RunStats(engine)  # read-only: the metrics' figures

    @classmethod
    def open(cls, url: str) -> Store:
        """Connect to ``url`` (``sqlite:///path`` or ``postgresql://...``) and migrate it."""
        engine = make_engine(parse_url(url))
        try:
            migrate(engine)
        except BaseException:
            engine.dispose()
            raise
        return cls(engine)

    def close(self) -> None:
        """Close every pooled connection. The store must not be used afterwards."""
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({shown(self._engine.url)!r})"
