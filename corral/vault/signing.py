"""The bridge's Ed25519 signing keys at rest: sealed like credentials, rewrapped with them.

A process that mints run tokens and the bridge that checks them may be different processes
on different hosts, so the signing keys live in the store (the ``signing_keys`` table). Each
private key is sealed by ``sealed.py`` under the primary master key, bound to its key id, and
stored as one packed value. ``Vault.rotate`` rewraps the signing keys with the credentials and
``Vault.retire`` refuses a master key that still seals one, so retiring an old master key
never orphans a signing key.

A signing key is useful for ``kept_for`` after it was made (the bridge's rotation period plus
the longest lifetime of a token; the caller says how long): the keys younger than that are the
ones loaded, rewrapped and counted. An older key verifies no token any more, is never read
again by anyone, and is left as it is.

Before issue 9 the bridge sealed its keys itself, directly under a master key
(``<master key id>:<nonce><ciphertext>``, associated data ``corral-signing-key:<kid>``). Such
keys still load, and the next rotation rewraps them into the envelope format; none is lost.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from datetime import UTC, datetime, timedelta
from typing import Protocol

from corral.errors import CredentialTampered, UnknownMasterKey, VaultError
from corral.store.rows import SealedSigningKey
from corral.vault.keys import MasterKeyRing, MasterKeys
from corral.vault.sealed import (
    SigningKeyIdentity,
    direct_key_id,
    pack,
    packed,
    rewrap,
    seal,
    unpack,
    unseal,
    unseal_direct,
)

log = logging.getLogger("corral.vault")


class SigningKeyRecords(Protocol):
    """What the store keeps of signing keys (``store.signing_keys``): sealed values by key id."""

    def add(self, kid: str, sealed: bytes, created_at: datetime) -> None: ...

    def since(self, since: datetime) -> list[SealedSigningKey]: ...

    def replace(self, kid: str, old: bytes, new: bytes) -> bool: ...


class SealedSigningKeys:
    """The bridge's signing keys in the store, sealed under the master keys. Thread-safe."""

    def __init__(self, records: SigningKeyRecords, keys: MasterKeys, kept_for: timedelta) -> None:
        self._records = records
        self._keys = keys
        self.kept_for = kept_for

    def save(self, kid: str, private: bytes, created: datetime) -> None:
        """Seal and store a new signing key (the raw 32 bytes of an Ed25519 private key)."""
        sealed = seal(private, SigningKeyIdentity(kid), self._keys.ring())
        self._records.add(kid, pack(sealed), created)

    def load(self, known: Collection[str] = ()) -> list[tuple[str, bytes, datetime]]:
        """Every useful signing key but those in ``known``: (key id, private key, created).

        A key that does not open (sealed under a master key no longer held, or altered) is
        skipped with a warning: tokens it signed cannot be checked here, and the ring signs
        with a fresh key of its own.
        """
        opened = []
        for kid, blob, created in self._useful():
            if kid in known:
                continue
            try:
                opened.append((kid, self._open(kid, blob), created))
            except VaultError as exc:
                log.warning("skipping signing key %s: %s", kid, exc.detail)
        return opened

    def rewrap(self) -> tuple[int, list[str]]:
        """Move every useful key to the primary master key, in the envelope format.

        Returns how many were moved, and ``"signing key <kid>: <code>"`` for each that could
        not be (left as it is). A key another process replaced meanwhile is left to it.
        """
        moved, failed = 0, []
        for kid, blob, _ in self._useful():
            identity = SigningKeyIdentity(kid)
            ring = self._keys.ring(needing=_key_id(blob))
            if packed(blob) and _key_id(blob) == ring.primary:
                continue
            try:
                if packed(blob):
                    new = pack(rewrap(unpack(blob, identity), identity, ring))
                else:  # the bridge's own format of old: opened, then sealed afresh
                    new = pack(seal(self._open(kid, blob), identity, ring))
            except (CredentialTampered, UnknownMasterKey) as exc:
                failed.append(f"{identity.described}: {exc.code}")
                continue
            moved += self._records.replace(kid, blob, new)
        return moved, failed

    def usage(self) -> dict[str, int]:
        """Useful signing keys per master key id (``?`` for a value in no known format)."""
        counts: dict[str, int] = {}
        for _, blob, _ in self._useful():
            key_id = _key_id(blob) or "?"
            counts[key_id] = counts.get(key_id, 0) + 1
        return counts

    def _useful(self) -> list[tuple[str, bytes, datetime]]:
        stored = self._records.since(datetime.now(UTC) - self.kept_for)
        return [(k.kid, k.sealed, k.created_at) for k in stored]

    def _open(self, kid: str, blob: bytes) -> bytes:
        identity = SigningKeyIdentity(kid)
        ring: MasterKeyRing = self._keys.ring(needing=_key_id(blob))
        if packed(blob):
            return unseal(unpack(blob, identity), identity, ring)
        return unseal_direct(blob, identity, b"corral-signing-key:" + kid.encode(), ring)


def _key_id(blob: bytes) -> str | None:
    """The master key id ``blob`` is sealed under, in either format."""
    if packed(blob):
        try:
            return unpack(blob, SigningKeyIdentity("")).key_id
        except CredentialTampered:
            return None
    return direct_key_id(blob)
