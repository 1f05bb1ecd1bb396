"""Run tokens: what a token lets through, and every way one is refused."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Collection
from datetime import datetime

import jwt
import pytest

from corral.bridge import tokens
from corral.bridge.tokens import SigningKeyRing, Verifier
from corral.errors import TokenRefused

PEER = "10.213.0.7"


def mint(ring: SigningKeyRing, **kw: object) -> str:
    fields: dict[str, object] = {
        "user": "alice",
        "app": "analyst",
        "session": "s-1",
        "run": "run-1",
        "connections": ("github", "slack"),
        "address": PEER,
        "lifetime": 60.0,
    }
    fields.update(kw)
    return tokens.mint(ring, **fields)  # type: ignore[arg-type]


def refused(verifier: Verifier, token: str | None, peer: str = PEER) -> TokenRefused:
    with pytest.raises(TokenRefused) as caught:
        verifier.verify(token, peer)
    return caught.value


def test_a_token_carries_its_claims_to_the_bridge() -> None:
    ring = SigningKeyRing()
    claims = Verifier(ring).verify(mint(ring, token_id="run-1.1.1.ab"), PEER)
    assert (claims.user, claims.app, claims.session, claims.run) == (
        "alice",
        "analyst",
        "s-1",
        "run-1",
    )
    assert claims.connections == frozenset({"github", "slack"})
    assert claims.token_id == "run-1.1.1.ab" and claims.address == PEER
    assert claims.allows("github") and not claims.allows("openai")
    assert Verifier(ring).verify(mint(ring, connections=("*",)), PEER).allows("openai")


def test_a_token_works_only_from_the_sandbox_it_was_minted_for() -> None:
    ring = SigningKeyRing()
    error = refused(Verifier(ring), mint(ring), peer="10.213.0.8")
    assert (error.reason, error.status) == ("wrong_sandbox", 403)


def test_an_expired_token_is_refused_when_first_seen_and_once_cached() -> None:
    ring = SigningKeyRing()
    stale = mint(ring, now=time.time() - 120, lifetime=60)
    assert refused(Verifier(ring), stale).reason == "expired"

    now = [time.time()]
    verifier = Verifier(ring, clock=lambda: now[0])
    fresh = mint(ring, lifetime=60)
    verifier.verify(fresh, PEER)  # checked once, then cached
    now[0] += 61
    assert refused(verifier, fresh).reason == "expired"


def test_revoking_an_attempts_token_spares_the_runs_next_attempt() -> None:
    ring = SigningKeyRing()
    verifier = Verifier(ring)
    first = mint(ring, token_id="run-1.1.1.aa")
    second = mint(ring, token_id="run-1.1.2.bb")
    verifier.verify(first, PEER)
    verifier.revoke_token("run-1.1.1.aa", time.time() + 60)
    assert refused(verifier, first).reason == "revoked"
    assert verifier.verify(second, PEER).run == "run-1"


def test_revoking_a_run_refuses_all_its_tokens_and_no_other_runs() -> None:
    ring = SigningKeyRing()
    verifier = Verifier(ring)
    mine, theirs = mint(ring), mint(ring, run="run-2")
    verifier.revoke_run("run-1")
    error = refused(verifier, mine)
    assert (error.reason, error.status) == ("revoked", 401)
    assert verifier.revoked("run-1") and not verifier.revoked("run-2")
    assert verifier.verify(theirs, PEER).run == "run-2"


def _parts(token: str) -> list[str]:
    return token.split(".")


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _claims(token: str) -> dict[str, object]:
    payload = _parts(token)[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


def test_forged_tokens_are_refused() -> None:
    ring = SigningKeyRing()
    verifier = Verifier(ring)
    good = mint(ring)
    header, _, signature = _parts(good)

    other = mint(SigningKeyRing())  # a well-formed token from keys Corral never had
    assert refused(verifier, other).reason == "forged"

    more = _b64({**_claims(good), "con": ["*"], "run": "run-9"})  # widened, same signature
    assert refused(verifier, f"{header}.{more}.{signature}").reason == "forged"

    kid = jwt.get_unverified_header(good)["kid"]
    unsigned = jwt.encode(_claims(good), "", algorithm="none", headers={"kid": kid})
    assert refused(verifier, unsigned).reason == "forged"
    hmac = jwt.encode(_claims(good), "a-guessed-secret-long-enough-32b!", algorithm="HS256")
    assert refused(verifier, hmac).reason == "forged"


def test_a_token_missing_a_claim_or_not_a_jwt_is_malformed() -> None:
    ring = SigningKeyRing()
    verifier = Verifier(ring)
    key = ring.signing(time.time())
    claims = {k: v for k, v in _claims(mint(ring)).items() if k != "adr"}
    no_address = jwt.encode(claims, key.private, algorithm="EdDSA", headers={"kid": key.kid})
    assert refused(verifier, no_address).reason == "malformed"
    assert refused(verifier, "not-a-token").reason == "malformed"
    assert refused(verifier, None).reason == "missing"
    assert refused(verifier, "").reason == "missing"


class Keys:
    """A ``KeyStore`` in memory, shared by rings as the store is by processes."""

    def __init__(self, down: bool = False) -> None:
        self.saved: list[tuple[str, bytes, datetime]] = []
        self.down = down

    def save(self, kid: str, private: bytes, created: datetime) -> None:
        if self.down:
            raise OSError("the database is down")
        self.saved.append((kid, private, created))

    def load(self, known: Collection[str] = ()) -> list[tuple[str, bytes, datetime]]:
        return [key for key in self.saved if key[0] not in known]


def test_a_new_signing_key_is_stored_before_it_signs_and_old_ones_still_verify() -> None:
    keys = Keys()
    ring = SigningKeyRing(rotate_after=3600, store=keys)
    early = mint(ring, now=time.time() - 4000, lifetime=8000)
    late = mint(ring)
    kids = [jwt.get_unverified_header(t)["kid"] for t in (early, late)]
    assert kids[0] != kids[1] and [k for k, _, _ in keys.saved] == kids  # rotated; stored
    verifier = Verifier(ring)
    assert verifier.verify(early, PEER).run == verifier.verify(late, PEER).run == "run-1"
    elsewhere = Verifier(SigningKeyRing(store=keys))  # another process, the same store
    assert elsewhere.verify(late, PEER).run == "run-1"


def test_a_key_that_could_not_be_stored_never_signs() -> None:
    keys = Keys(down=True)
    ring = SigningKeyRing(store=keys)
    with pytest.raises(OSError):
        mint(ring)
    keys.down = False
    token = mint(ring)  # the key that could not be stored was not kept: a new one signs
    assert [k for k, _, _ in keys.saved] == [jwt.get_unverified_header(token)["kid"]]
