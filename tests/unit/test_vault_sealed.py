"""Envelope encryption: a data key per record, wrapped under a master key, all authenticated."""

from __future__ import annotations

import dataclasses

import pytest

from corral.errors import CredentialTampered, UnknownMasterKey
from corral.vault.keys import MasterKeyRing, new_key
from corral.vault.sealed import (
    DATA_KEY_BYTES,
    NONCE_BYTES,
    TAG_BYTES,
    Identity,
    Sealed,
    SigningKeyIdentity,
    pack,
    packed,
    rewrap,
    seal,
    unpack,
    unseal,
)

SECRET = b'{"token":"ghp_0123456789abcdefSECRET"}'
ALICE = Identity("alice", "github", "bearer")


@pytest.fixture
def ring() -> MasterKeyRing:
    return MasterKeyRing.of([new_key()], "test")


def flip(data: bytes, at: int = 0) -> bytes:
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :]


def test_round_trip_and_shape(ring: MasterKeyRing) -> None:
    sealed = seal(SECRET, ALICE, ring)
    assert sealed.key_id == ring.primary
    assert len(sealed.nonce) == len(sealed.dek_nonce) == NONCE_BYTES
    assert len(sealed.wrapped_dek) == DATA_KEY_BYTES + TAG_BYTES
    assert len(sealed.ciphertext) == len(SECRET) + TAG_BYTES
    assert SECRET not in sealed.ciphertext and b"ghp_" not in sealed.ciphertext
    assert unseal(sealed, ALICE, ring) == SECRET


def test_every_seal_is_fresh(ring: MasterKeyRing) -> None:
    a, b = seal(SECRET, ALICE, ring), seal(SECRET, ALICE, ring)
    assert a.ciphertext != b.ciphertext and a.wrapped_dek != b.wrapped_dek
    assert a.nonce != b.nonce and a.dek_nonce != b.dek_nonce


@pytest.mark.parametrize(
    ("column", "layer"),
    [
        ("ciphertext", "ciphertext"),
        ("nonce", "ciphertext"),
        ("wrapped_dek", "data key"),
        ("dek_nonce", "data key"),
    ],
)
@pytest.mark.parametrize("at", [0, -1])
def test_a_flipped_bit_anywhere_is_detected(
    ring: MasterKeyRing, column: str, layer: str, at: int
) -> None:
    sealed = seal(SECRET, ALICE, ring)
    value: bytes = getattr(sealed, column)
    changed: dict[str, bytes] = {column: flip(value, at % len(value))}
    tampered = dataclasses.replace(sealed, **changed)  # type: ignore[arg-type]
    with pytest.raises(CredentialTampered) as caught:
        unseal(tampered, ALICE, ring)
    assert layer in caught.value.detail and "alice/github" in caught.value.detail
    assert "ghp_" not in caught.value.detail and "SECRET" not in caught.value.detail


@pytest.mark.parametrize("column", ["nonce", "dek_nonce", "wrapped_dek", "ciphertext"])
def test_truncated_columns_are_detected(ring: MasterKeyRing, column: str) -> None:
    sealed = seal(SECRET, ALICE, ring)
    with pytest.raises(CredentialTampered):
        unseal(dataclasses.replace(sealed, **{column: getattr(sealed, column)[:5]}), ALICE, ring)


@pytest.mark.parametrize(
    "other",
    [
        Identity("mallory", "github", "bearer"),
        Identity("alice", "slack", "bearer"),
        Identity("alice", "github", "api_key"),
    ],
)
def test_a_record_moved_to_another_identity_does_not_open(
    ring: MasterKeyRing, other: Identity
) -> None:
    with pytest.raises(CredentialTampered, match="data key"):
        unseal(seal(SECRET, ALICE, ring), other, ring)


def test_a_swapped_key_id_is_detected(ring: MasterKeyRing) -> None:
    two = ring.promoted(new_key())
    sealed = seal(SECRET, ALICE, ring)  # under the old primary
    relabelled = dataclasses.replace(sealed, key_id=two.primary)
    with pytest.raises(CredentialTampered, match=two.primary):
        unseal(relabelled, ALICE, two)


def test_the_data_layer_is_bound_to_identity_too(ring: MasterKeyRing) -> None:
    # The wrapped key of one record spliced onto another record's ciphertext.
    a = seal(SECRET, ALICE, ring)
    b = seal(b'{"token":"other"}', ALICE, ring)
    spliced = Sealed(a.key_id, a.dek_nonce, a.wrapped_dek, b.nonce, b.ciphertext)
    with pytest.raises(CredentialTampered, match="ciphertext"):
        unseal(spliced, ALICE, ring)


def test_a_different_master_key_cannot_open(ring: MasterKeyRing) -> None:
    sealed = seal(SECRET, ALICE, ring)
    stranger = MasterKeyRing.of([new_key()], "CORRAL_MASTER_KEY")
    with pytest.raises(UnknownMasterKey) as caught:
        unseal(sealed, ALICE, stranger)
    assert sealed.key_id in caught.value.detail and "CORRAL_MASTER_KEY" in caught.value.detail
    # Even forced under the record's key id, a different key fails authentication.
    forged = MasterKeyRing(primary=ring.primary, keys=dict(ring.keys), source="x")
    object.__setattr__(forged, "keys", {ring.primary: new_key()})
    with pytest.raises(CredentialTampered):
        unseal(sealed, ALICE, forged)


def test_rewrap_moves_the_data_key_and_keeps_the_ciphertext(ring: MasterKeyRing) -> None:
    sealed = seal(SECRET, ALICE, ring)
    two = ring.promoted(new_key())
    moved = rewrap(sealed, ALICE, two)
    assert moved.key_id == two.primary != sealed.key_id
    assert (moved.nonce, moved.ciphertext) == (sealed.nonce, sealed.ciphertext)
    assert moved.wrapped_dek != sealed.wrapped_dek
    assert unseal(moved, ALICE, two) == unseal(sealed, ALICE, two) == SECRET
    only_new = two.without(ring.primary)
    assert unseal(moved, ALICE, only_new) == SECRET
    with pytest.raises(UnknownMasterKey):
        unseal(sealed, ALICE, only_new)


def test_sealed_repr_shows_no_bytes(ring: MasterKeyRing) -> None:
    sealed = seal(SECRET, ALICE, ring)
    assert repr(sealed) == f"Sealed(key_id={sealed.key_id!r})"


def test_a_signing_key_is_sealed_the_same_way_and_bound_to_its_key_id(ring: MasterKeyRing) -> None:
    private = bytes(range(32))
    sealed = seal(private, SigningKeyIdentity("k1"), ring)
    assert unseal(sealed, SigningKeyIdentity("k1"), ring) == private
    with pytest.raises(CredentialTampered, match="signing key k2"):
        unseal(sealed, SigningKeyIdentity("k2"), ring)
    # A credential and a signing key can never be taken for each other.
    with pytest.raises(CredentialTampered, match="credential k1/"):
        unseal(sealed, Identity("k1", "", ""), ring)


def test_packed_round_trip(ring: MasterKeyRing) -> None:
    identity = SigningKeyIdentity("k1")
    sealed = seal(bytes(32), identity, ring)
    blob = pack(sealed)
    assert packed(blob) and unpack(blob, identity) == sealed
    assert not packed(ring.primary.encode() + b":" + bytes(60))  # the bridge's old format
    for damaged in (blob[:60], b"corral.sealed.v1:" + b"Z" * 16 + blob[33:], b"junk"):
        with pytest.raises(CredentialTampered, match="signing key k1"):
            unpack(damaged, identity)
