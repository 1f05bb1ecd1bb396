"""The signing key ring over a key store: what one process signs, another verifies; a key that
could not be stored never signs."""

from __future__ import annotations

import time
from collections.abc import Collection
from datetime import datetime

import pytest

from corral.bridge import tokens
from corral.bridge.tokens import SigningKeyRing, Verifier
from corral.errors import TokenRefused


class MemoryKeys:
    """A ``KeyStore`` in a dictionary, shared by rings as the database is by processes."""

    def __init__(self) -> None:
        self.keys: dict[str, tuple[bytes, datetime]] = {}
        self.down = False
        self.loads = 0

    def save(self, kid: str, private: bytes, created: datetime) -> None:
        if self.down:
            raise ConnectionError("the database is down")
        self.keys[kid] = (private, created)

    def load(self, known: Collection[str] = ()) -> list[tuple[str, bytes, datetime]]:
        self.loads += 1
        return [(kid, raw, at) for kid, (raw, at) in self.keys.items() if kid not in known]


def mint(ring: SigningKeyRing, now: float | None = None) -> str:
    return tokens.mint(
        ring,
        user="u",
        app="a",
        session="s",
        run="r",
        connections=(),
        address="10.0.0.2",
        lifetime=600,
        now=now,
    )


def test_another_process_verifies_what_one_signed() -> None:
    store = MemoryKeys()
    token = mint(SigningKeyRing(store=store))
    assert len(store.keys) == 1
    assert Verifier(SigningKeyRing(store=store)).verify(token, "10.0.0.2").run == "r"


def test_a_key_minted_since_the_last_look_is_found() -> None:
    store = MemoryKeys()
    verifier_ring = SigningKeyRing(store=store)
    verifier_ring.public("nothing-yet")  # the first look: nothing is stored
    token = mint(SigningKeyRing(store=store))
    time.sleep(0.06)  # past the 50 ms between looks (a wait, not a timed assertion)
    assert Verifier(verifier_ring).verify(token, "10.0.0.2").run == "r"


def test_a_key_that_could_not_be_stored_never_signs() -> None:
    store = MemoryKeys()
    store.down = True
    ring = SigningKeyRing(store=store)
    with pytest.raises(ConnectionError):
        mint(ring)
    store.down = False
    token = mint(ring)
    assert len(store.keys) == 1  # the key that failed to be stored was dropped
    assert Verifier(SigningKeyRing(store=store)).verify(token, "10.0.0.2").run == "r"


def test_keys_rotate_and_the_newest_signs() -> None:
    store = MemoryKeys()
    ring = SigningKeyRing(rotate_after=100, store=store)
    first = mint(ring, now=1000.0)
    assert mint(ring, now=1050.0).split(".")[0] == first.split(".")[0]  # the same key id
    mint(ring, now=1100.0)
    assert len(store.keys) == 2


def test_a_ring_in_memory_alone_knows_only_its_own_keys() -> None:
    token = mint(SigningKeyRing())
    with pytest.raises(TokenRefused, match="not signed by a Corral key"):
        Verifier(SigningKeyRing()).verify(token, "10.0.0.2")
