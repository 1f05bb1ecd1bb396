"""Run-token signing keys: the ``signing_keys`` table, shared by every Corral process.

The private keys are stored sealed; sealing, opening and rewrapping are the vault's
(``corral.vault.signing``), and which key signs is the bridge's (``corral.bridge.tokens``).
Here they are bytes under a key id.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine, Row

from corral.store.engine import transaction
from corral.store.rows import SealedSigningKey
from corral.store.schema import signing_keys


class SigningKeys:
    """The ``signing_keys`` table. Safe to share between threads."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def add(self, kid: str, sealed: bytes, created_at: datetime) -> None:
        """Store a signing key; storing the same key id again is a no-op (one statement, so
        it holds between processes too)."""
        with transaction(self._engine, write=True) as conn:
            dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
            conn.execute(
                dialect.insert(signing_keys)
                .values(kid=kid, sealed_private_key=sealed, created_at=created_at)
                .on_conflict_do_nothing(index_elements=["kid"])
            )

    def since(self, since: datetime) -> list[SealedSigningKey]:
        """The keys created at or after ``since``, oldest first."""
        with transaction(self._engine) as conn:
            rows = conn.execute(
                select(signing_keys)
                .where(signing_keys.c.created_at >= since)
                .order_by(signing_keys.c.created_at)
            )
            return [_key(r) for r in rows]

    def replace(self, kid: str, old: bytes, new: bytes) -> bool:
        """Store ``new`` as key ``kid``'s sealed value if it still is ``old`` (a rewrap that
        another process did first, or a key that is gone, is left alone): True if replaced."""
        with transaction(self._engine, write=True) as conn:
            done = conn.execute(
                update(signing_keys)
                .where(signing_keys.c.kid == kid, signing_keys.c.sealed_private_key == old)
                .values(sealed_private_key=new)
            )
            return done.rowcount == 1


def _key(row: Row[Any]) -> SealedSigningKey:
    # psycopg returns bytea as memoryview; SQLite as bytes.
    return SealedSigningKey(
        kid=row.kid, sealed=bytes(row.sealed_private_key), created_at=row.created_at
    )
