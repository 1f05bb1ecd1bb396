"""Sealed credentials: the SQL for the vault's ``credentials`` table.

This module stores and fetches rows of bytes it cannot read: sealing and opening belong to
``corral.vault``, and no master key or plaintext ever reaches this module. Like every store
module, every public method is one transaction, every value is validated before any SQL is
built, and every database error leaves as a ``corral.errors`` exception
(``engine.transaction``).

``modify`` is the read-modify-write the vault needs for rewrapping and OAuth refreshes: the
row is locked (``FOR UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite) from the read
to the write, so two writers of one record serialise instead of losing an update.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine, Row

from corral.errors import CredentialNotFound, InvalidInput
from corral.store.engine import transaction
from corral.store.rows import CredentialRow, check_aware, check_connection, check_user
from corral.store.schema import CREDENTIAL_KINDS, SEALED_COLUMNS, credentials

_KEY_ID_LENGTH = 16  # hex digits: see corral/vault/keys.py


class Credentials:
    """The ``credentials`` table. Safe to share between threads."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def put(self, row: CredentialRow) -> CredentialRow:
        """Insert ``row``, or replace the sealed record of its user and connection.

        Replacing keeps ``created_at`` and clears ``revoked_at``: storing a credential again
        after a revoke is how it comes back. Returns the stored row.
        """
        row = _check_row(row)
        values = _values(row)
        keep = ("user", "connection", "created_at")
        replace = {k: v for k, v in values.items() if k not in keep}
        with transaction(self._engine, write=True) as conn:
            # One atomic statement: two processes putting the same new record cannot both
            # insert, and neither sees a unique violation.
            dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
            stmt = dialect.insert(credentials).values(values)
            conn.execute(
                stmt.on_conflict_do_update(index_elements=["user", "connection"], set_=replace)
            )
            return _fetch(conn, row.user, row.connection)

    def get(self, user: str, connection: str) -> CredentialRow:
        """The row of ``user``'s ``connection``, revoked or not; ``CredentialNotFound`` if none."""
        check_user(user)
        check_connection(connection)
        with transaction(self._engine) as conn:
            return _fetch(conn, user, connection)

    def all(self, user: str | None = None) -> list[CredentialRow]:
        """Every row (of ``user``, if given), ordered by user then connection."""
        query = select(credentials).order_by(credentials.c.user, credentials.c.connection)
        if user is not None:
            query = query.where(credentials.c.user == check_user(user))
        with transaction(self._engine) as conn:
            return [_row(r) for r in conn.execute(query).all()]

    def revoke(self, user: str, connection: str, at: datetime) -> CredentialRow:
        """Mark the record revoked and null every sealed column. Revoking twice is a no-op."""
        check_user(user)
        check_connection(connection)
        at = check_aware(at, "revoked_at")
        with transaction(self._engine, write=True) as conn:
            conn.execute(
                update(credentials)
                .where(
                    credentials.c.user == user,
                    credentials.c.connection == connection,
                    credentials.c.revoked_at.is_(None),
                )
                .values(revoked_at=at, updated_at=at, **dict.fromkeys(SEALED_COLUMNS))
            )
            return _fetch(conn, user, connection)

    def modify(
        self,
        user: str,
        connection: str,
        change: Callable[[CredentialRow], CredentialRow | None],
    ) -> CredentialRow:
        """Replace the record with ``change(current)``, holding the row lock in between.

        ``change`` returns None to leave the record as it is; anything it raises rolls the
        transaction back. It may not move the record to another user or connection.
        """
        check_user(user)
        check_connection(connection)
        with transaction(self._engine, write=True) as conn:
            current = _fetch(conn, user, connection, lock=True)
            changed = change(current)
            if changed is None:
                return current
            changed = _check_row(changed)
            if (changed.user, changed.connection) != (user, connection):
                raise InvalidInput(
                    f"a change to {user}/{connection} may not move it to "
                    f"{changed.user}/{changed.connection}"
                )
            values = _values(changed)
            del values["user"], values["connection"]
            conn.execute(
                update(credentials)
                .where(credentials.c.user == user, credentials.c.connection == connection)
                .values(values)
            )
            return changed

    def sealed_elsewhere(self, key_id: str) -> list[tuple[str, str]]:
        """(user, connection) of every live record sealed under a key other than ``key_id``."""
        _check_key_id(key_id)
        query = (
            select(credentials.c.user, credentials.c.connection)
            .where(credentials.c.revoked_at.is_(None), credentials.c.key_id != key_id)
            .order_by(credentials.c.user, credentials.c.connection)
        )
        with transaction(self._engine) as conn:
            return [(r.user, r.connection) for r in conn.execute(query).all()]

    def key_usage(self) -> dict[str, int]:
        """How many live records each master key id seals."""
        query = (
            select(credentials.c.key_id, func.count())
            .where(credentials.c.revoked_at.is_(None))
            .group_by(credentials.c.key_id)
        )
        with transaction(self._engine) as conn:
            return {str(kid): int(n) for kid, n in conn.execute(query).all()}


def _fetch(conn: Connection, user: str, connection: str, *, lock: bool = False) -> CredentialRow:
    query = select(credentials).where(
        credentials.c.user == user, credentials.c.connection == connection
    )
    if lock:
        query = query.with_for_update()  # SQLite renders nothing: BEGIN IMMEDIATE locks instead
    found = conn.execute(query).first()
    if found is None:
        raise CredentialNotFound(user, connection)
    return _row(found)


def _check_row(row: CredentialRow) -> CredentialRow:
    """A row about to be written must be sealed: only ``revoke`` writes the other kind."""
    check_user(row.user)
    check_connection(row.connection)
    if row.kind not in CREDENTIAL_KINDS:
        raise InvalidInput(f"unknown credential kind {row.kind!r}: one of {CREDENTIAL_KINDS}")
    if row.revoked_at is not None:
        raise InvalidInput("a sealed credential cannot carry revoked_at")
    _check_key_id(row.key_id)
    for name in SEALED_COLUMNS[1:]:
        value = getattr(row, name)
        if not isinstance(value, bytes) or not value:
            raise InvalidInput(f"sealed credential column {name} must be non-empty bytes")
    check_aware(row.created_at, "created_at")
    check_aware(row.updated_at, "updated_at")
    return row


def _check_key_id(key_id: object) -> str:
    if (
        not isinstance(key_id, str)
        or len(key_id) != _KEY_ID_LENGTH
        or any(c not in "0123456789abcdef" for c in key_id)
    ):
        raise InvalidInput(f"invalid master key id {key_id!r}: {_KEY_ID_LENGTH} lowercase hex")
    return key_id


def _values(row: CredentialRow) -> dict[str, Any]:
    return {
        "user": row.user,
        "connection": row.connection,
        "kind": row.kind,
        "key_id": row.key_id,
        "dek_nonce": row.dek_nonce,
        "wrapped_dek": row.wrapped_dek,
        "nonce": row.nonce,
        "ciphertext": row.ciphertext,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
        "revoked_at": row.revoked_at,
    }


def _row(row: Row[Any]) -> CredentialRow:
    def raw(value: Any) -> bytes | None:
        # psycopg returns bytea as memoryview; SQLite as bytes.
        return None if value is None else bytes(value)

    return CredentialRow(
        user=row.user,
        connection=row.connection,
        kind=row.kind,
        key_id=row.key_id,
        dek_nonce=raw(row.dek_nonce),
        wrapped_dek=raw(row.wrapped_dek),
        nonce=raw(row.nonce),
        ciphertext=raw(row.ciphertext),
        created_at=row.created_at,
        updated_at=row.updated_at,
        revoked_at=row.revoked_at,
    )
