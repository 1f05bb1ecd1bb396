"""The store: Corral's database, and the only code that speaks SQL.

One module per aggregate, each the only reader and writer of its tables and reached through
an attribute of ``Store`` (``store.py``):

=====================  ==================  ==============================================
``store.``             module              tables
=====================  ==================  ==============================================
``environments``       ``environments``    environments, snapshots
``releases``           ``releases``        runner_releases
``runs``               ``runs``            runs (the record, the queue, leases),
                                           run_events, idempotency_keys
``workers``            ``workers``         workers (who is there)
``apps``               ``apps``            apps, app_versions
``ledger``             ``ledger``          ledger
``usage``              ``usage``           bridge_calls (audit), usage_events
``connections``        ``connections``     connections
``signing_keys``       ``signing_keys``    signing_keys
``spans``              ``spans``           spans
``schedules``          ``schedules``       schedules, schedule_ticks
``webhooks``           ``webhooks``        webhook_deliveries
``credentials``        ``credentials``     credentials
=====================  ==================  ==============================================

The store holds no policy: it persists and it claims. Run states and their allowed
transitions are ``corral.states`` (each transition is one function of ``runs.py`` whose SQL
refuses any other); cron maths and misfire policy are ``corral.triggers``'; prices are
``corral.billing``'s. Every public method is one transaction; every row it hands out is a
frozen dataclass of ``rows.py``, built from its table in one place, the module that owns the
table; every value a caller passes in is validated (``rows.check_*``) before any SQL is built.

``schema.py`` describes the tables, ``migrations/`` creates them (Alembic, driven from code:
no alembic.ini), and ``engine.py`` holds the SQLite/PostgreSQL specifics and the one
translation of database errors into ``corral.errors``.
"""

from corral.store.rows import (
    App,
    AppVersion,
    BridgeCall,
    ConnectionProfile,
    CredentialRow,
    Delivery,
    Environment,
    KeyBinding,
    LedgerEntry,
    Release,
    Run,
    RunEvent,
    Schedule,
    SealedSigningKey,
    Snapshot,
    Span,
    Tick,
    TreeMember,
    UsageEvent,
)
from corral.store.store import Store

__all__ = [
    "App",
    "AppVersion",
    "BridgeCall",
    "ConnectionProfile",
    "CredentialRow",
    "Delivery",
    "Environment",
    "KeyBinding",
    "LedgerEntry",
    "Release",
    "Run",
    "RunEvent",
    "Schedule",
    "SealedSigningKey",
    "Snapshot",
    "Span",
    "Store",
    "Tick",
    "TreeMember",
    "UsageEvent",
]
