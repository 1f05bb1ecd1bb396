"""Run tokens: short-lived EdDSA JWTs minted per run, checked by the bridge on every call.

A token names who and what is calling (user, app, session, run), the connections it may use,
the sandbox address it may be used from, and an expiry that covers the run window and no more.
Signing keys are Ed25519, named by a key id in the JWT header, and rotate: the newest key
signs, every key younger than the longest token lifetime still verifies. A ``SigningKeyRing``
holds them; with a ``KeyStore`` it shares them with every Corral process through the store,
sealed by the vault (``corral/vault/signing.py``).

The verifier is built for the bridge's hot path: a token's signature is checked once and the
claims cached until the token expires; revocation is a set consulted on every call. Two things
are revoked: one token (by its id, ``jti``) when the attempt it was minted for ends, whatever
became of the run; and every token of a run once the run has *ended* (a final status). A run
that was merely interrupted (its worker lost the database or its lease) is redelivered under
the same run id, so it is never revoked by run id until it truly ends.

``TokenIssuer`` is the run side of the same lifetime: whoever executes a run (a worker, the
CLI) mints a token per attempt through it and revokes what it minted; the pipeline only says
when an attempt or a run has ended.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from corral.errors import TokenRefused
from corral.store import Run

ISSUER = "corral"
AUDIENCE = "corral-bridge"
ALGORITHM = "EdDSA"
ROTATE_AFTER = 6 * 3600.0  # seconds a signing key signs before a fresh one takes over
MAX_TOKEN_LIFETIME = 24 * 3600.0
# How long a signing key matters: it signs for ROTATE_AFTER, and the last token it signed
# lives for MAX_TOKEN_LIFETIME more. Older keys are never loaded, rewrapped or counted.
KEY_KEPT_FOR = ROTATE_AFTER + MAX_TOKEN_LIFETIME
_CACHE_LIMIT = 100_000


@dataclass(frozen=True)
class Claims:
    user: str
    app: str
    session: str
    run: str
    connections: frozenset[str]
    address: str
    expires: float
    token_id: str

    def allows(self, connection: str) -> bool:
        return connection in self.connections or "*" in self.connections


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private: Ed25519PrivateKey
    created: float

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()

    @classmethod
    def generate(cls, now: float) -> SigningKey:
        return cls(f"k{secrets.token_hex(6)}", Ed25519PrivateKey.generate(), now)


class KeyStore(Protocol):
    """Where a ring keeps its keys, so that every process verifies what any of them signed
    (``corral.vault.signing.SealedSigningKeys``: sealed in the store under the master keys)."""

    def save(self, kid: str, private: bytes, created: datetime) -> None: ...

    def load(self, known: Collection[str] = ()) -> list[tuple[str, bytes, datetime]]: ...


class SigningKeyRing:
    """Signing keys: the newest signs, all verify until they are too old to matter.

    In memory only, or backed by a ``KeyStore`` shared by every Corral process: then a new
    key is stored before it signs anything, and a key id this ring has not seen is looked up
    in the store (at most every 50 ms) before a token signed with it is refused.
    """

    def __init__(
        self,
        rotate_after: float = ROTATE_AFTER,
        keys: Iterable[SigningKey] = (),
        store: KeyStore | None = None,
    ) -> None:
        self.rotate_after = rotate_after
        self._keys: dict[str, SigningKey] = {k.kid: k for k in keys}
        self._lock = threading.Lock()
        self._store = store
        self._load_lock = threading.Lock()
        self._loaded_at = 0.0

    def signing(self, now: float) -> SigningKey:
        if self._store is not None and self._loaded_at == 0.0:
            self._load()
        with self._lock:
            newest = max(self._keys.values(), key=lambda k: k.created, default=None)
            if newest is None or now - newest.created >= self.rotate_after:
                newest = SigningKey.generate(now)
                if self._store is not None:
                    # Stored first: if that fails (the database is down) the key is not used,
                    # and the next call makes another; no token is signed by a key that other
                    # processes cannot find.
                    raw = newest.private.private_bytes(
                        Encoding.Raw, PrivateFormat.Raw, NoEncryption()
                    )
                    self._store.save(newest.kid, raw, datetime.fromtimestamp(newest.created, UTC))
                self._keys[newest.kid] = newest
            return newest

    def public(self, kid: str) -> Ed25519PublicKey | None:
        key = self._keys.get(kid)
        if key is None and self._store is not None and time.monotonic() - self._loaded_at > 0.05:
            self._load()  # minted by another process since we last looked
            key = self._keys.get(kid)
        return None if key is None else key.public

    def add(self, key: SigningKey) -> None:
        with self._lock:
            self._keys[key.kid] = key

    def _load(self) -> None:
        assert self._store is not None
        with self._load_lock:
            for kid, raw, created in self._store.load(known=set(self._keys)):
                private = Ed25519PrivateKey.from_private_bytes(raw)
                self.add(SigningKey(kid, private, created.timestamp()))
            self._loaded_at = time.monotonic()


def mint(
    ring: SigningKeyRing,
    *,
    user: str,
    app: str,
    session: str,
    run: str,
    connections: Iterable[str],
    address: str,
    lifetime: float,
    now: float | None = None,
    token_id: str | None = None,
) -> str:
    issued = time.time() if now is None else now
    key = ring.signing(issued)
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": user,
        "app": app,
        "ses": session,
        "run": run,
        "con": sorted(set(connections)),
        "adr": address,
        "iat": int(issued),
        "nbf": int(issued) - 1,
        "exp": int(issued + lifetime),
        "jti": token_id or f"{run}.{secrets.token_hex(4)}",
    }
    return jwt.encode(claims, key.private, algorithm=ALGORITHM, headers={"kid": key.kid})


class Verifier:
    """Checks run tokens. Thread-safe; the bridge calls ``verify`` on every request."""

    def __init__(self, ring: SigningKeyRing, clock: Callable[[], float] = time.time) -> None:
        self._ring = ring
        self._clock = clock
        self._cache: dict[str, Claims] = {}
        self._revoked_runs: set[str] = set()
        self._revoked_tokens: dict[str, float] = {}  # token id -> when it expires anyway
        self._prune_at = 1024
        self._lock = threading.Lock()

    def revoke_run(self, run: str) -> None:
        """Every token of ``run`` is refused from now on. Only for a run that has ended:
        a run that is redelivered keeps its id, and its next attempt must still be served."""
        with self._lock:
            self._revoked_runs.add(run)

    def revoke_token(self, token_id: str, expires: float) -> None:
        """The one token ``token_id`` is refused from now on (its attempt is over)."""
        with self._lock:
            if len(self._revoked_tokens) >= self._prune_at:  # an expired token is refused anyway
                now = self._clock()
                self._revoked_tokens = {t: e for t, e in self._revoked_tokens.items() if e > now}
                self._prune_at = max(1024, 2 * len(self._revoked_tokens))
            self._revoked_tokens[token_id] = expires

    def revoked(self, run: str) -> bool:
        return run in self._revoked_runs

    def verify(self, token: str | None, peer: str) -> Claims:
        if not token:
            raise TokenRefused(
                "missing", "no run token: send it as 'Authorization: Bearer <token>'"
            )
        claims = self._cache.get(token)
        if claims is None:
            claims = self._decode(token)
            with self._lock:
                if len(self._cache) >= _CACHE_LIMIT:
                    self._cache.clear()
                self._cache[token] = claims
        if claims.expires <= self._clock():
            raise TokenRefused("expired", "the run token has expired")
        if claims.run in self._revoked_runs:
            raise TokenRefused("revoked", f"run {claims.run} has ended; its token is revoked")
        if claims.token_id in self._revoked_tokens:
            raise TokenRefused(
                "revoked", f"this token's attempt at run {claims.run} is over; it is revoked"
            )
        if claims.address != peer:
            raise TokenRefused(
                "wrong_sandbox",
                "this run token belongs to another sandbox; a token works only where it was minted",
                status=403,
            )
        return claims

    def _decode(self, token: str) -> Claims:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenRefused("malformed", "the run token is not a JWT") from None
        if header.get("alg") != ALGORITHM:
            raise TokenRefused("forged", f"run tokens are signed with {ALGORITHM}")
        key = self._ring.public(str(header.get("kid", "")))
        if key is None:
            raise TokenRefused("forged", "the run token was not signed by a Corral key")
        try:
            raw = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=AUDIENCE,
                issuer=ISSUER,
                options={"require": ["exp", "iat", "sub", "run", "adr", "jti"]},
            )
        except jwt.ExpiredSignatureError:
            raise TokenRefused("expired", "the run token has expired") from None
        except jwt.InvalidSignatureError:
            raise TokenRefused("forged", "the run token's signature does not verify") from None
        except jwt.PyJWTError as exc:
            raise TokenRefused("malformed", f"the run token is invalid: {exc}") from None
        return Claims(
            user=str(raw["sub"]),
            app=str(raw.get("app", "")),
            session=str(raw.get("ses", "")),
            run=str(raw["run"]),
            connections=frozenset(str(c) for c in raw.get("con", [])),
            address=str(raw["adr"]),
            expires=float(raw["exp"]),
            token_id=str(raw["jti"]),
        )


@dataclass(frozen=True)
class Issued:
    """A token minted for one attempt of a run."""

    token: str
    token_id: str
    expires: float


class TokenIssuer:
    """Mints a token per attempt once its sandbox's address is known; revokes that token when
    the attempt ends, and the run's tokens once the run has ended.

    Revocation here reaches this process's bridge at once (``verifier``); bridges in other
    processes learn of ended runs from the store within their poll interval.
    """

    def __init__(self, ring: SigningKeyRing, verifier: Verifier | None = None) -> None:
        self.ring, self.verifier = ring, verifier

    def mint(
        self,
        run: Run,
        *,
        connections: Iterable[str],
        address: str,
        lifetime: float,
        attempt: int,
        session: str = "",
    ) -> Issued:
        """A token for ``attempt`` of ``run``, usable from ``address`` for ``connections``,
        as the run's user and app, for ``lifetime`` seconds."""
        token_id = f"{run.id}.{run.deliveries}.{attempt}.{secrets.token_hex(4)}"
        now = time.time()
        token = mint(
            self.ring,
            user=run.user,
            app=run.app or "",
            session=session or run.id,
            run=run.id,
            connections=connections,
            address=address,
            lifetime=lifetime,
            now=now,
            token_id=token_id,
        )
        return Issued(token, token_id, now + lifetime)

    def revoke(self, issued: Issued) -> None:
        """The attempt ``issued`` was minted for is over, however it ended."""
        if self.verifier is not None:
            self.verifier.revoke_token(issued.token_id, issued.expires)

    def ended(self, run: Run) -> None:
        """``run``'s final status is stored: none of its tokens may be used again. Never for a
        run that may be redelivered (its next attempt is served under the same run id)."""
        if self.verifier is not None:
            self.verifier.revoke_run(run.id)
