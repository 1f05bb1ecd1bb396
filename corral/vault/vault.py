"""``Vault``: users' credentials for their connections, sealed at rest, opened host-side only.

A credential belongs to a user and a connection (``github``, ``slack``, ``openai``,
``anthropic`` or any custom name) and is one of the kinds in ``kinds.py``. The vault
validates it, seals it (``sealed.py``) under a master key (``keys.py``) and stores the sealed
bytes (``corral.store.credentials``); the database never sees a secret, and the master keys
never enter the database.

Only ``resolve`` returns secrets, wrapped in ``Secret``, and only the host-side bridge may
call it: agents run in hostile sandboxes and must never hold a long-lived credential, so
nothing that runs in or answers to a sandbox may build a ``Vault``. Everything else returns
``CredentialInfo``, which has no secret field. No method puts a secret into an exception,
a log line or a ``repr``.

Rotation never stops service: ``rotate`` makes a new master key primary first, while the
old one stays in the ring, then rewraps one record per transaction: every credential, and
every signing key of the bridge (``signing.py``) that still verifies tokens. Every record
opens under either key throughout, so readers never wait for it. ``retire`` then removes
the old key, and only once no credential and no signing key still uses it.
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from corral.config import Secret
from corral.errors import (
    CredentialNotFound,
    CredentialRevoked,
    CredentialTampered,
    InvalidInput,
    MasterKeyError,
    MasterKeyInUse,
    UnknownMasterKey,
)
from corral.store.credentials import Credentials
from corral.store.rows import CredentialRow, check_connection, check_user
from corral.vault.keys import MasterKeys
from corral.vault.kinds import (
    Credential,
    CredentialInfo,
    FieldValue,
    check_fields,
    check_kind,
    stored_fields,
)
from corral.vault.sealed import Identity, Sealed, rewrap, seal, unseal
from corral.vault.signing import SealedSigningKeys


@dataclass(frozen=True)
class Rotation:
    """What ``rotate`` did."""

    primary: str  # the key id every record should now be under
    rewrapped: int  # credentials moved to it by this rotation
    failed: tuple[str, ...]  # "user/connection: code" (or "signing key <kid>: code") not moved
    usage: Mapping[str, int]  # live credentials per key id, afterwards
    signing_keys: int = 0  # the bridge's signing keys moved to it by this rotation

    def to_dict(self) -> dict[str, object]:
        return {
            "primary": self.primary,
            "rewrapped": self.rewrapped,
            "signing_keys": self.signing_keys,
            "failed": list(self.failed),
            "usage": dict(self.usage),
        }


@dataclass(frozen=True)
class KeyStatus:
    """One master key id: whether it is primary and how many live records it seals."""

    key_id: str
    primary: bool
    records: int  # credentials
    present: bool  # False: records name this key id but the ring lacks it
    signing_keys: int = 0  # the bridge's signing keys that still verify tokens

    def to_dict(self) -> dict[str, object]:
        return {
            "key_id": self.key_id,
            "primary": self.primary,
            "records": self.records,
            "signing_keys": self.signing_keys,
            "present": self.present,
        }


class Vault:
    """Sealed credentials in the store, master keys from ``MasterKeys``. Thread-safe.

    ``signing_keys``: the bridge's signing keys, sealed under the same master keys (the
    same ``MasterKeys``), rewrapped and counted with the credentials.
    """

    def __init__(
        self, credentials: Credentials, keys: MasterKeys, signing_keys: SealedSigningKeys
    ) -> None:
        self._credentials = credentials
        self._keys = keys
        self.signing_keys = signing_keys

    @property
    def key_source(self) -> str:
        """``CORRAL_MASTER_KEY`` or the key file's path."""
        return self._keys.source

    def put(
        self, user: str, connection: str, kind: str, fields: Mapping[str, object]
    ) -> CredentialInfo:
        """Store (or replace) ``user``'s credential for ``connection``. Write-only.

        ``fields`` per kind: bearer {token}; api_key {key}; basic {username, password};
        oauth2 {access_token, refresh_token, token_url, client_id, client_secret,
        expires_at (epoch seconds, optional)}. A bad field raises ``InvalidInput`` naming it.
        """
        check_user(user)
        check_connection(connection)
        checked = check_fields(check_kind(kind), fields)
        now = _now()
        identity = Identity(user, connection, kind)
        sealed = seal(_plaintext(checked), identity, self._keys.ring())
        row = _with_sealed(
            CredentialRow(user, connection, kind, None, None, None, None, None, now, now),
            sealed,
        )
        return _info(self._credentials.put(row))

    def list(self, user: str | None = None) -> builtins.list[CredentialInfo]:
        """Metadata of every credential (of ``user``), revoked ones included. No secrets."""
        return [_info(row) for row in self._credentials.all(user)]

    def revoke(self, user: str, connection: str) -> CredentialInfo:
        """Revoke the credential: its ciphertext and wrapped key are destroyed. Idempotent."""
        return _info(self._credentials.revoke(user, connection, _now()))

    def resolve(self, user: str, connection: str) -> Credential:
        """The credential, secrets included (as ``Secret``). For the host-side bridge only.

        ``CredentialNotFound``, ``CredentialRevoked``, or, if the stored bytes fail to
        authenticate, ``CredentialTampered``/``UnknownMasterKey`` - never a wrong secret.
        """
        row = self._credentials.get(user, connection)
        fields = self._open(row)
        return Credential.build(row.user, row.connection, row.kind, fields, row.updated_at)

    def update_oauth(
        self,
        user: str,
        connection: str,
        access_token: str | Secret,
        expires_at: int | None,
        refresh_token: str | Secret | None = None,
    ) -> CredentialInfo:
        """Store the result of an OAuth refresh: a new access token, its expiry, and the new
        refresh token if the provider rotated it (None keeps the old one).

        Resealed under a fresh data key and the primary master key, inside one transaction
        that holds the row, so two refreshes racing cannot interleave.
        """

        def refreshed(row: CredentialRow) -> CredentialRow:
            if row.kind != "oauth2":
                raise InvalidInput(
                    f"credential {row.connection!r} of {row.user!r} is {row.kind}, not oauth2"
                )
            fields: dict[str, object] = dict(self._open(row))
            fields["access_token"] = access_token
            fields["expires_at"] = expires_at
            if refresh_token is not None:
                fields["refresh_token"] = refresh_token
            checked = check_fields("oauth2", fields)
            identity = Identity(row.user, row.connection, row.kind)
            sealed = seal(_plaintext(checked), identity, self._keys.ring())
            return _with_sealed(replace(row, updated_at=_now()), sealed)

        return _info(self._credentials.modify(user, connection, refreshed))

    def rotate(self, new_key: bytes | None = None) -> Rotation:
        """Make a new master key primary and rewrap every data key under it: the
        credentials', and the bridge's signing keys'.

        With the key file as the source, ``new_key`` (a fresh random key if None) is added
        to the file as primary, the old keys kept. With ``CORRAL_MASTER_KEY``, the new key
        must already be first in the variable; this only rewraps. One record per
        transaction: a record that fails to unwrap is reported in ``failed`` and left as it
        is, and the rest go on.
        """
        self._keys.promote(new_key)
        rewrapped, failed = 0, []
        for user, connection in self._credentials.sealed_elsewhere(self._keys.ring().primary):
            try:
                rewrapped += self._rewrap_one(user, connection)
            except (CredentialTampered, UnknownMasterKey) as exc:
                failed.append(f"{user}/{connection}: {exc.code}")
            except CredentialNotFound:
                pass  # gone since the list was taken: nothing left to rewrap
        signing, signing_failed = self.signing_keys.rewrap()
        return Rotation(
            self._keys.ring().primary,
            rewrapped,
            (*failed, *signing_failed),
            self._credentials.key_usage(),
            signing,
        )

    def retire(self, key_id: str) -> tuple[str, ...]:
        """Remove old master key ``key_id`` from the key file; the remaining key ids.

        ``MasterKeyInUse`` while any live credential, or any signing key that still
        verifies tokens, is sealed under it.
        """
        ring = self._keys.ring()
        if key_id == ring.primary:
            raise MasterKeyError(f"key {key_id} is the primary key; rotate to a new one first")
        records = self._credentials.key_usage().get(key_id, 0)
        signing = self.signing_keys.usage().get(key_id, 0)
        if records or signing:
            raise MasterKeyInUse(key_id, records, signing)
        return self._keys.remove(key_id).key_ids

    def keys(self) -> builtins.list[KeyStatus]:
        """Every key id in the ring or named by a record, the primary first."""
        ring = self._keys.ring()
        usage = self._credentials.key_usage()
        signing = self.signing_keys.usage()
        ids = list(ring.key_ids) + sorted((set(usage) | set(signing)) - set(ring.keys))
        return [
            KeyStatus(
                kid, kid == ring.primary, usage.get(kid, 0), kid in ring.keys, signing.get(kid, 0)
            )
            for kid in ids
        ]

    # -- plumbing -------------------------------------------------------------------

    def _open(self, row: CredentialRow) -> dict[str, FieldValue]:
        if row.revoked_at is not None:
            raise CredentialRevoked(row.user, row.connection)
        identity = Identity(row.user, row.connection, row.kind)
        ring = self._keys.ring(needing=row.key_id)
        plaintext = unseal(_sealed(row), identity, ring)
        try:
            return stored_fields(row.kind, json.loads(plaintext))
        except ValueError:
            # Authentic bytes that are not a credential: sealed by something other than put().
            raise CredentialTampered(
                identity.described, "it decrypts, but not to a valid credential"
            ) from None

    def _rewrap_one(self, user: str, connection: str) -> int:
        moved = 0

        def rewrapped(row: CredentialRow) -> CredentialRow | None:
            nonlocal moved
            ring = self._keys.ring(needing=row.key_id)
            if row.revoked_at is not None or row.key_id == ring.primary:
                return None  # revoked, or already moved (by a put or another rotation)
            identity = Identity(row.user, row.connection, row.kind)
            moved = 1
            # updated_at stays: the credential itself has not changed, only its wrapping.
            return _with_sealed(row, rewrap(_sealed(row), identity, ring))

        self._credentials.modify(user, connection, rewrapped)
        return moved


def _now() -> datetime:
    return datetime.now(UTC)


def _plaintext(fields: Mapping[str, FieldValue]) -> bytes:
    return json.dumps(dict(fields), sort_keys=True, separators=(",", ":")).encode()


def _sealed(row: CredentialRow) -> Sealed:
    if row.key_id is None or row.dek_nonce is None or row.wrapped_dek is None:
        raise CredentialTampered(
            f"credential {row.user}/{row.connection}", "its sealed columns are empty"
        )
    if row.nonce is None or row.ciphertext is None:
        raise CredentialTampered(
            f"credential {row.user}/{row.connection}", "its sealed columns are empty"
        )
    return Sealed(row.key_id, row.dek_nonce, row.wrapped_dek, row.nonce, row.ciphertext)


def _with_sealed(row: CredentialRow, sealed: Sealed) -> CredentialRow:
    return replace(
        row,
        key_id=sealed.key_id,
        dek_nonce=sealed.dek_nonce,
        wrapped_dek=sealed.wrapped_dek,
        nonce=sealed.nonce,
        ciphertext=sealed.ciphertext,
    )


def _info(row: CredentialRow) -> CredentialInfo:
    return CredentialInfo(
        user=row.user,
        connection=row.connection,
        kind=row.kind,
        key_id=row.key_id,
        created_at=row.created_at,
        updated_at=row.updated_at,
        revoked=row.revoked_at is not None,
    )
