"""Envelope encryption of one credential record: AES-256-GCM, a data key per record.

Sealing a record:

1. a fresh random 32-byte data key encrypts the credential's JSON (AES-256-GCM, 12-byte
   random nonce), with associated data binding the record's identity (user, connection,
   kind), so a ciphertext moved to another row, user or kind no longer opens;
2. the primary master key wraps the data key (AES-256-GCM, its own random nonce), with
   associated data binding the key id and the same identity, so the key id column cannot be
   swapped and a wrapped key cannot be moved either.

What is stored: the key id, the wrapped data key and its nonce, the ciphertext and its
nonce. Rotating the master key rewraps only the data key (``rewrap``): the ciphertext is
neither decrypted nor rewritten.

This module is the one place ``cryptography`` exceptions become ``corral.errors``. It never
puts plaintext, a data key or a master key into a message: a failure names the record and
which layer failed. Random nonces are safe here because every data key encrypts exactly
one message, and a master key wraps one 32-byte key per record write - far below the 2^32
messages per key at which random 96-bit nonces start to risk a collision.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from corral.errors import CredentialTampered, UnknownMasterKey
from corral.vault.keys import KeyRing

DATA_KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
_FORMAT: Final = "corral.vault.v1"  # in every associated data: a later format cannot be confused


@dataclass(frozen=True)
class Identity:
    """What a sealed record is bound to; changing any of it makes the record fail to open."""

    user: str
    connection: str
    kind: str

    def __str__(self) -> str:
        return f"{self.user}/{self.connection}"

    def associated_data(self, layer: str, key_id: str = "") -> bytes:
        # A JSON array: unambiguous for any strings, unlike joining them with a separator.
        fields = [_FORMAT, layer, key_id, self.user, self.connection, self.kind]
        return json.dumps(fields, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Sealed:
    """The stored form of one credential: nothing here is secret without a master key."""

    key_id: str
    dek_nonce: bytes = field(repr=False)
    wrapped_dek: bytes = field(repr=False)
    nonce: bytes = field(repr=False)
    ciphertext: bytes = field(repr=False)


def seal(plaintext: bytes, identity: Identity, ring: KeyRing) -> Sealed:
    """Encrypt ``plaintext`` under a fresh data key, wrapped under the ring's primary key."""
    data_key = AESGCM.generate_key(bit_length=DATA_KEY_BYTES * 8)
    nonce = secrets.token_bytes(NONCE_BYTES)
    ciphertext = AESGCM(data_key).encrypt(nonce, plaintext, identity.associated_data("data"))
    dek_nonce, wrapped = _wrap(data_key, identity, ring)
    return Sealed(ring.primary, dek_nonce, wrapped, nonce, ciphertext)


def unseal(sealed: Sealed, identity: Identity, ring: KeyRing) -> bytes:
    """The plaintext of ``sealed``; ``CredentialTampered`` or ``UnknownMasterKey`` if not."""
    data_key = _unwrap(sealed, identity, ring)
    _check_length(sealed.nonce, NONCE_BYTES, "the ciphertext's nonce", identity)
    if len(sealed.ciphertext) < TAG_BYTES:
        raise CredentialTampered(str(identity), "the ciphertext is shorter than its tag")
    try:
        return AESGCM(data_key).decrypt(
            sealed.nonce, sealed.ciphertext, identity.associated_data("data")
        )
    except InvalidTag:
        raise CredentialTampered(
            str(identity),
            "the ciphertext does not decrypt under its data key: the ciphertext, its nonce or "
            "the record's user, connection or kind was altered",
        ) from None


def rewrap(sealed: Sealed, identity: Identity, ring: KeyRing) -> Sealed:
    """``sealed`` with its data key rewrapped under the ring's primary; the ciphertext as is.

    Unwrapping authenticates the data key and its binding to the record. The ciphertext is
    not opened: ``unseal`` will authenticate it whenever it is read.
    """
    data_key = _unwrap(sealed, identity, ring)
    dek_nonce, wrapped = _wrap(data_key, identity, ring)
    return Sealed(ring.primary, dek_nonce, wrapped, sealed.nonce, sealed.ciphertext)


def _wrap(data_key: bytes, identity: Identity, ring: KeyRing) -> tuple[bytes, bytes]:
    nonce = secrets.token_bytes(NONCE_BYTES)
    wrapped = AESGCM(ring.primary_key).encrypt(
        nonce, data_key, identity.associated_data("data-key", ring.primary)
    )
    return nonce, wrapped


def _unwrap(sealed: Sealed, identity: Identity, ring: KeyRing) -> bytes:
    master = ring.get(sealed.key_id)
    if master is None:
        raise UnknownMasterKey(sealed.key_id, str(identity), ring.source)
    _check_length(sealed.dek_nonce, NONCE_BYTES, "the data key's nonce", identity)
    _check_length(sealed.wrapped_dek, DATA_KEY_BYTES + TAG_BYTES, "the wrapped data key", identity)
    try:
        return AESGCM(master).decrypt(
            sealed.dek_nonce,
            sealed.wrapped_dek,
            identity.associated_data("data-key", sealed.key_id),
        )
    except InvalidTag:
        raise CredentialTampered(
            str(identity),
            f"its data key does not unwrap under master key {sealed.key_id}: the wrapped key, "
            "its nonce, the key id or the record's user, connection or kind was altered",
        ) from None


def _check_length(value: bytes, expected: int, what: str, identity: Identity) -> None:
    # AESGCM accepts other nonce lengths; anything but what seal() wrote is damage.
    if len(value) != expected:
        raise CredentialTampered(str(identity), f"{what} is {len(value)} bytes, not {expected}")
