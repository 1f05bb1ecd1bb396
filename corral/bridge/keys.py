"""Signing keys for run tokens, shared by every Corral process through the store.

A process that mints a token and the bridge that checks it may be different processes, even
different hosts, so keys live in the database: each Ed25519 private key sealed with AES-256-GCM
under the vault's primary master key (the signing key id as associated data). The newest key
signs; a key older than ``rotate_after`` is replaced by a fresh one; keys stay verifiable for
``rotate_after`` plus the longest token lifetime.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from corral.bridge.tokens import KeyRing, SigningKey
from corral.errors import CorralError
from corral.store.signing_keys import SigningKeys
from corral.vault.keys import MasterKeys

MAX_TOKEN_LIFETIME = 24 * 3600.0
log = logging.getLogger("corral.bridge")


class SigningKeyError(CorralError):
    code = "signing_key_error"


class StoredKeyRing(KeyRing):
    def __init__(
        self, records: SigningKeys, master: MasterKeys, rotate_after: float = 6 * 3600
    ) -> None:
        super().__init__(rotate_after)
        self._records = records
        self._master = master
        self._load_lock = threading.Lock()
        self.on_new_key = self._persist
        self._loaded_at = 0.0

    def signing(self, now: float) -> SigningKey:
        if self._loaded_at == 0.0:
            self._load()
        return super().signing(now)

    def public(self, kid: str):  # type: ignore[no-untyped-def]
        key = super().public(kid)
        if key is None and time.monotonic() - self._loaded_at > 0.05:
            self._load()  # minted by another process since we last looked
            key = super().public(kid)
        return key

    def _load(self) -> None:
        with self._load_lock:
            since = datetime.now(UTC) - timedelta(seconds=self.rotate_after + MAX_TOKEN_LIFETIME)
            for stored in self._records.since(since):
                kid, sealed, created = stored.kid, stored.sealed, stored.created_at
                if super().public(kid) is None:
                    try:
                        private = self._unseal(kid, sealed)
                    except SigningKeyError as exc:
                        # Sealed under a master key since retired: tokens it signed cannot be
                        # checked here; a fresh key takes over signing.
                        log.warning("skipping signing key: %s", exc.detail)
                        continue
                    self.add(SigningKey(kid, private, created.timestamp()))
            self._loaded_at = time.monotonic()

    def _persist(self, key: SigningKey) -> None:
        ring = self._master.ring()
        raw = key.private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        nonce = os.urandom(12)
        sealed = (
            ring.primary.encode()
            + b":"
            + nonce
            + AESGCM(ring.primary_key).encrypt(
                nonce, raw, b"corral-signing-key:" + key.kid.encode()
            )
        )
        self._records.add(key.kid, sealed, datetime.fromtimestamp(key.created, UTC))

    def _unseal(self, kid: str, sealed: bytes) -> Ed25519PrivateKey:
        master_kid, _, rest = sealed.partition(b":")
        master = self._master.ring(needing=master_kid.decode()).get(master_kid.decode())
        if master is None:
            raise SigningKeyError(f"signing key {kid} is sealed with an unknown master key")
        try:
            raw = AESGCM(master).decrypt(
                rest[:12], rest[12:], b"corral-signing-key:" + kid.encode()
            )
        except Exception as exc:
            raise SigningKeyError(
                f"signing key {kid} does not unseal: {type(exc).__name__}"
            ) from None
        return Ed25519PrivateKey.from_private_bytes(raw)
