"""Envelope encryption of one sealed record: AES-256-GCM, a data key per record.

Two kinds of record are sealed, both here: users' credentials (``Identity``: user,
connection, kind) and the bridge's Ed25519 signing keys (``SigningKeyIdentity``: key id).
This is the vault's one sealing scheme; nothing outside ``corral/vault`` encrypts at rest.

Sealing a record:

1. a fresh random 32-byte data key encrypts the record (AES-256-GCM, 12-byte random nonce),
   with associated data binding the record's identity, so a ciphertext moved to another
   row, user, kind or key id no longer opens;
2. the primary master key wraps the data key (AES-256-GCM, its own random nonce), with
   associated data binding the key id and the same identity, so the key id column cannot be
   swapped and a wrapped key cannot be moved either.

What is stored: the key id, the wrapped data key and its nonce, the ciphertext and its
nonce: as columns for a credential, packed into one value (``pack``) for a signing key.
Rotating the master key rewraps only the data key (``rewrap``): the ciphertext is neither
decrypted nor rewritten.

This module is the one place ``cryptography`` exceptions become ``corral.errors``. It never
puts plaintext, a data key or a master key into a message: a failure names the record and
which layer failed. Random nonces are safe here because every data key encrypts exactly
one message, and a master key wraps one 32-byte key per record write - far below the 2^32
messages per key at which random 96-bit nonces start to risk a collision.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Final, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from corral.errors import CredentialTampered, UnknownMasterKey
from corral.vault.keys import KEY_ID_HEX, MasterKeyRing

DATA_KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
_FORMAT: Final = "corral.vault.v1"  # in every associated data: a later format cannot be confused


class Binding(Protocol):
    """What a sealed record is bound to; changing any of it makes the record fail to open."""

    @property
    def described(self) -> str:
        """The record, for messages: ``credential alice/github``. Never secret."""
        ...

    def associated_data(self, layer: str, key_id: str = "") -> bytes: ...


@dataclass(frozen=True)
class Identity:
    """A credential: its user, connection and kind."""

    user: str
    connection: str
    kind: str

    def __str__(self) -> str:
        return f"{self.user}/{self.connection}"

    @property
    def described(self) -> str:
        return f"credential {self}"

    def associated_data(self, layer: str, key_id: str = "") -> bytes:
        # A JSON array: unambiguous for any strings, unlike joining them with a separator.
        fields = [_FORMAT, layer, key_id, self.user, self.connection, self.kind]
        return json.dumps(fields, separators=(",", ":")).encode()


@dataclass(frozen=True)
class SigningKeyIdentity:
    """A signing key of the bridge: its key id (the ``kid`` of the tokens it signs)."""

    kid: str

    @property
    def described(self) -> str:
        return f"signing key {self.kid}"

    def associated_data(self, layer: str, key_id: str = "") -> bytes:
        # Five fields where a credential's have six: the two can never be taken for each other.
        fields = [_FORMAT, layer, key_id, "signing-key", self.kid]
        return json.dumps(fields, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Sealed:
    """The stored form of one record: nothing here is secret without a master key."""

    key_id: str
    dek_nonce: bytes = field(repr=False)
    wrapped_dek: bytes = field(repr=False)
    nonce: bytes = field(repr=False)
    ciphertext: bytes = field(repr=False)


def seal(plaintext: bytes, identity: Binding, ring: MasterKeyRing) -> Sealed:
    """Encrypt ``plaintext`` under a fresh data key, wrapped under the ring's primary key."""
    data_key = AESGCM.generate_key(bit_length=DATA_KEY_BYTES * 8)
    nonce = secrets.token_bytes(NONCE_BYTES)
    ciphertext = AESGCM(data_key).encrypt(nonce, plaintext, identity.associated_data("data"))
    dek_nonce, wrapped = _wrap(data_key, identity, ring)
    return Sealed(ring.primary, dek_nonce, wrapped, nonce, ciphertext)


def unseal(sealed: Sealed, identity: Binding, ring: MasterKeyRing) -> bytes:
    """The plaintext of ``sealed``; ``CredentialTampered`` or ``UnknownMasterKey`` if not."""
    data_key = _unwrap(sealed, identity, ring)
    _check_length(sealed.nonce, NONCE_BYTES, "the ciphertext's nonce", identity)
    if len(sealed.ciphertext) < TAG_BYTES:
        raise CredentialTampered(identity.described, "the ciphertext is shorter than its tag")
    try:
        return AESGCM(data_key).decrypt(
            sealed.nonce, sealed.ciphertext, identity.associated_data("data")
        )
    except InvalidTag:
        raise CredentialTampered(
            identity.described,
            "the ciphertext does not decrypt under its data key: the ciphertext, its nonce or "
            "the record's user, connection or kind was altered",
        ) from None


def rewrap(sealed: Sealed, identity: Binding, ring: MasterKeyRing) -> Sealed:
    """``sealed`` with its data key rewrapped under the ring's primary; the ciphertext as is.

    Unwrapping authenticates the data key and its binding to the record. The ciphertext is
    not opened: ``unseal`` will authenticate it whenever it is read.
    """
    data_key = _unwrap(sealed, identity, ring)
    dek_nonce, wrapped = _wrap(data_key, identity, ring)
    return Sealed(ring.primary, dek_nonce, wrapped, sealed.nonce, sealed.ciphertext)


# -- one value: how a record without columns of its own stores its ``Sealed`` -------------

_PACKED: Final = b"corral.sealed.v1:"  # never a key id's first bytes: they are hex digits
_KEY_ID: Final = re.compile(f"[0-9a-f]{{{KEY_ID_HEX}}}")


def pack(sealed: Sealed) -> bytes:
    """``sealed`` as one value: a prefix, the key id, then each part at its fixed size."""
    if not _KEY_ID.fullmatch(sealed.key_id):
        raise ValueError(f"not a master key id: {sealed.key_id!r}")
    return (
        _PACKED
        + sealed.key_id.encode()
        + sealed.dek_nonce
        + sealed.wrapped_dek
        + sealed.nonce
        + sealed.ciphertext
    )


def packed(blob: bytes) -> bool:
    """Whether ``blob`` was written by ``pack`` (rather than in an older format)."""
    return blob.startswith(_PACKED)


def unpack(blob: bytes, identity: Binding) -> Sealed:
    """The ``Sealed`` that ``pack`` wrote; ``CredentialTampered`` if ``blob`` cannot be one."""
    if not packed(blob):
        raise CredentialTampered(identity.described, "its sealed value has no known format")
    at = len(_PACKED)
    key_id = blob[at : at + KEY_ID_HEX].decode("ascii", "replace")
    if not _KEY_ID.fullmatch(key_id):
        raise CredentialTampered(identity.described, "its master key id is malformed")
    at += KEY_ID_HEX
    parts = []
    for size in (NONCE_BYTES, DATA_KEY_BYTES + TAG_BYTES, NONCE_BYTES):
        parts.append(blob[at : at + size])
        at += size
    if len(blob) < at + TAG_BYTES:
        raise CredentialTampered(identity.described, "its sealed value is truncated")
    return Sealed(key_id, parts[0], parts[1], parts[2], blob[at:])


def unseal_direct(
    blob: bytes, identity: Binding, associated_data: bytes, ring: MasterKeyRing
) -> bytes:
    """Open a record sealed directly under a master key, with no data key:
    ``<master key id>:<12-byte nonce><AES-GCM ciphertext>``.

    Only the bridge's signing keys were ever stored so (before issue 9 they were sealed by
    the bridge itself); they are read until ``rewrap`` has moved them to ``pack``'s format.
    """
    key_id = blob[:KEY_ID_HEX].decode("ascii", "replace")
    colon, rest = blob[KEY_ID_HEX : KEY_ID_HEX + 1], blob[KEY_ID_HEX + 1 :]
    if colon != b":" or not _KEY_ID.fullmatch(key_id) or len(rest) < NONCE_BYTES + TAG_BYTES:
        raise CredentialTampered(identity.described, "its sealed value has no known format")
    master = ring.get(key_id)
    if master is None:
        raise UnknownMasterKey(key_id, identity.described, ring.source)
    try:
        return AESGCM(master).decrypt(rest[:NONCE_BYTES], rest[NONCE_BYTES:], associated_data)
    except InvalidTag:
        raise CredentialTampered(
            identity.described, f"it does not decrypt under master key {key_id}"
        ) from None


def direct_key_id(blob: bytes) -> str | None:
    """The master key id a directly sealed record names (see ``unseal_direct``), if any."""
    key_id = blob[:KEY_ID_HEX].decode("ascii", "replace")
    return (
        key_id if blob[KEY_ID_HEX : KEY_ID_HEX + 1] == b":" and _KEY_ID.fullmatch(key_id) else None
    )


def _wrap(data_key: bytes, identity: Binding, ring: MasterKeyRing) -> tuple[bytes, bytes]:
    nonce = secrets.token_bytes(NONCE_BYTES)
    wrapped = AESGCM(ring.primary_key).encrypt(
        nonce, data_key, identity.associated_data("data-key", ring.primary)
    )
    return nonce, wrapped


def _unwrap(sealed: Sealed, identity: Binding, ring: MasterKeyRing) -> bytes:
    master = ring.get(sealed.key_id)
    if master is None:
        raise UnknownMasterKey(sealed.key_id, identity.described, ring.source)
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
            identity.described,
            f"its data key does not unwrap under master key {sealed.key_id}: the wrapped key, "
            "its nonce, the key id or the record's user, connection or kind was altered",
        ) from None


def _check_length(value: bytes, expected: int, what: str, identity: Binding) -> None:
    # AESGCM accepts other nonce lengths; anything but what seal() wrote is damage.
    if len(value) != expected:
        raise CredentialTampered(
            identity.described, f"{what} is {len(value)} bytes, not {expected}"
        )
