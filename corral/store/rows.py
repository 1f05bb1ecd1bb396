"""The row types the store hands out, and the rules their values must follow.

Every row the store returns is one of these frozen dataclasses, a mirror of one row of a
table in ``schema.py`` (``TreeMember`` and ``App`` add what a query sums or joins). Each is
built from its table in one place: the aggregate module that owns the table (``runs.py``
builds ``Run`` and ``RunEvent``, ``ledger.py`` builds ``LedgerEntry``, ...). The ``check_*``
functions are the store's input validation: every value a caller passes in goes through one
of them before any SQL is built, and a bad value raises ``InvalidInput`` naming the value and
the rule it broke.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from corral.errors import InvalidInput

# Each rule is one regular expression, matched whole; the API's OpenAPI document states the
# same expressions (``corral/api/models.py``), so a schema-valid name is a valid name.
NAME_RULE = "1-63 characters from a-z, 0-9, '_', '.', '-', starting with a letter or digit"
NAME_PATTERN = r"[a-z0-9][a-z0-9_.-]{0,62}"
_NAME_RE = re.compile(NAME_PATTERN)

DIGEST_RULE = "'sha256:' followed by 64 lowercase hex digits"
DIGEST_PATTERN = r"sha256:[0-9a-f]{64}"
_DIGEST_RE = re.compile(DIGEST_PATTERN)


@dataclass(frozen=True)
class Environment:
    """One row of ``environments``: a named line of snapshots and where it now stands."""

    name: str
    base: str  # where it was created from: ``base:bookworm``, ``oci-archive:/path`` ...
    head: str  # manifest digest of its newest snapshot
    created_at: datetime  # aware, UTC
    updated_at: datetime  # aware, UTC; moves whenever ``head`` does


@dataclass(frozen=True)
class Snapshot:
    """One row of ``snapshots``: a frozen image of an environment at one point in its history.

    ``seq`` is 0 on a snapshot that has not been stored yet; the store assigns 1, 2, 3 ...
    per environment and returns the stored row.
    """

    digest: str  # manifest digest
    environment: str
    seq: int
    parent: str | None  # manifest digest of the previous snapshot; None for the first
    layer: str | None  # digest of the layer added on top of ``parent``; None for an import
    size: int  # bytes of all layers together
    created_at: datetime  # aware, UTC
    message: str | None = None


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid environment name, else raise ``InvalidInput``."""
    if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
        raise InvalidInput(f"invalid environment name {name!r}: must be {NAME_RULE}")
    return name


def check_digest(value: str, what: str = "digest") -> str:
    """Return ``value`` if it is a sha256 digest, else raise ``InvalidInput`` naming ``what``."""
    if not isinstance(value, str) or _DIGEST_RE.fullmatch(value) is None:
        raise InvalidInput(f"invalid {what} {value!r}: must be {DIGEST_RULE}")
    return value


def check_aware(value: datetime, what: str) -> datetime:
    """Return ``value`` converted to UTC; a naive datetime raises ``InvalidInput``."""
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise InvalidInput(f"{what} must be a timezone-aware datetime, got {value!r}")
    return value.astimezone(UTC)


def check_snapshot(snap: Snapshot, environment: str) -> Snapshot:
    """Validate a snapshot about to be stored in ``environment``; return it normalised.

    The returned copy names ``environment`` and carries ``created_at`` in UTC. A snapshot
    that already names a different environment is refused rather than silently moved.
    """
    if snap.environment not in ("", environment):
        raise InvalidInput(
            f"snapshot {snap.digest} names environment {snap.environment!r} "
            f"but is being stored in {environment!r}"
        )
    check_digest(snap.digest, "snapshot digest")
    if snap.parent is not None:
        check_digest(snap.parent, "parent digest")
    if snap.layer is not None:
        check_digest(snap.layer, "layer digest")
    if isinstance(snap.size, bool) or not isinstance(snap.size, int) or snap.size < 0:
        raise InvalidInput(f"snapshot size must be a non-negative integer, got {snap.size!r}")
    if snap.message is not None and not isinstance(snap.message, str):
        raise InvalidInput(f"snapshot message must be text, got {type(snap.message).__name__}")
    return Snapshot(
        digest=snap.digest,
        environment=environment,
        seq=snap.seq,
        parent=snap.parent,
        layer=snap.layer,
        size=snap.size,
        created_at=check_aware(snap.created_at, "snapshot created_at"),
        message=snap.message,
    )


@dataclass(frozen=True)
class Release:
    """One published runner release."""

    digest: str  # sha256 of the release tarball: its identity
    version: str
    requires_python: str  # "3.8"
    source: str
    published_at: datetime
    activated_at: datetime

    @property
    def short_id(self) -> str:
        """The directory name the release lives under inside a sandbox."""
        return self.digest.split(":", 1)[1][:16]


@dataclass(frozen=True)
class Run:
    """One row of ``runs``: what an agent run booted, what it ran, how it ended."""

    id: str
    environment: str
    snapshot: str
    entrypoint: str
    input: str  # JSON
    trigger: str
    status: str  # a ``corral.states.RunStatus`` value
    created_at: datetime
    result: str | None = None  # JSON
    error_code: str | None = None
    error: str | None = None
    runner_version: str | None = None
    runner_digest: str | None = None
    swapped: bool = False
    folded_snapshot: str | None = None
    attempts: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    user: str = "local"
    app: str | None = None
    app_version: int | None = None
    parent_run: str | None = None
    depth: int = 0
    options: str | None = None  # JSON: timeout, connections, budget... as admitted
    lease_owner: str | None = None
    lease_expires: datetime | None = None
    available_at: datetime | None = None
    deliveries: int = 0  # how many times a worker has taken it
    cancel_requested: bool = False
    root_run: str | None = None  # the run that started its call tree; None: itself
    awaited: bool = False  # an agent call whose caller is blocked waiting for it
    announced_at: datetime | None = None  # when its completion hooks fired

    @property
    def root(self) -> str:
        """The id of the run at the root of this run's call tree."""
        return self.root_run or self.id


@dataclass(frozen=True)
class TreeMember:
    """One run of a call tree and what it has used so far, billed or not."""

    id: str
    parent_run: str | None
    status: str
    started_at: datetime | None
    budget: float | None  # its budget_per_run as admitted; None: unbounded
    input_tokens: int = 0
    output_tokens: int = 0
    sandbox_seconds: float = 0.0  # recorded when an execution of it ends
    bridge_calls: int = 0  # calls the bridge forwarded (its own endpoints are free)


@dataclass(frozen=True)
class RunEvent:
    """One row of ``run_events``: an entry of a run's append-only log."""

    run_id: str
    seq: int
    at: datetime
    kind: str
    data: str  # JSON object


@dataclass(frozen=True)
class CredentialRow:
    """One row of ``credentials``: a sealed credential, or what is left of a revoked one.

    The byte columns are ciphertext and wrapped keys, safe to hold but useless to show, so
    they stay out of ``repr``. On a revoked row every sealed column is None.
    """

    user: str
    connection: str
    kind: str
    key_id: str | None
    dek_nonce: bytes | None = field(repr=False)
    wrapped_dek: bytes | None = field(repr=False)
    nonce: bytes | None = field(repr=False)
    ciphertext: bytes | None = field(repr=False)
    created_at: datetime
    updated_at: datetime
    revoked_at: datetime | None = None


CONNECTION_RULE = NAME_RULE  # github, slack, openai, anthropic, or a custom name
USER_RULE = (
    "1-128 characters from a-z, 0-9, '_', '.', '@', '+', '-', starting with a letter or digit"
)
USER_PATTERN = r"[a-z0-9][a-z0-9_.@+-]{0,127}"
_USER_RE = re.compile(USER_PATTERN)


def check_user(user: str) -> str:
    """Return ``user`` if it is a valid credential owner (an email address fits), else raise."""
    if not isinstance(user, str) or _USER_RE.fullmatch(user) is None:
        raise InvalidInput(f"invalid user {user!r}: must be {USER_RULE}")
    return user


def check_connection(connection: str) -> str:
    """Return ``connection`` if it is a valid connection name, else raise ``InvalidInput``."""
    if not isinstance(connection, str) or _NAME_RE.fullmatch(connection) is None:
        raise InvalidInput(f"invalid connection name {connection!r}: must be {CONNECTION_RULE}")
    return connection


@dataclass(frozen=True)
class KeyBinding:
    """One row of ``idempotency_keys``: the run an idempotency key admitted."""

    user: str
    app: str
    key: str
    request_hash: str  # of the request that bound it: a replay must carry the same
    run_id: str
    created_at: datetime


@dataclass(frozen=True)
class App:
    """One row of ``apps``: an app and its current version."""

    name: str
    version: int
    spec: dict[str, Any]  # decoded JSON AppSpec of the current version
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class AppVersion:
    """One row of ``app_versions``: one version of an app, as it was stored."""

    app: str
    version: int
    spec: dict[str, Any]  # decoded JSON AppSpec
    created_at: datetime


@dataclass(frozen=True)
class LedgerEntry:
    """One row of ``ledger``, in integer micro-credits (``id`` is None until stored)."""

    user: str
    run: str | None
    app: str | None
    source: str  # what it is for: at most one entry each
    kind: str  # grant | deduction | adjustment | voided
    micros: int  # + grant, - deduction
    detail: str | None
    at: datetime
    id: int | None = None


@dataclass(frozen=True)
class BridgeCall:
    """One row of ``bridge_calls``: the audit record of one call through the bridge."""

    id: int
    at: datetime
    run: str | None
    connection: str | None  # None: refused before a connection was known
    method: str
    path: str
    status: int
    bytes_in: int
    bytes_out: int
    latency_ms: float
    error: str | None
    peer: str


@dataclass(frozen=True)
class UsageEvent:
    """One row of ``usage_events``: model tokens, a bridge call or sandbox seconds."""

    id: int
    at: datetime
    run: str
    user: str
    connection: str | None
    kind: str  # model_tokens | bridge_call | sandbox_seconds
    input_tokens: int
    output_tokens: int
    quantity: float


@dataclass(frozen=True)
class ConnectionProfile:
    """One row of ``connections``: where a connection goes and how it authenticates."""

    name: str
    base_url: str
    auth: str
    meter: str | None
    updated_at: datetime


@dataclass(frozen=True)
class SealedSigningKey:
    """One row of ``signing_keys``: a run-token signing key, sealed by the vault."""

    kid: str
    sealed: bytes = field(repr=False)
    created_at: datetime


@dataclass(frozen=True)
class Span:
    """One row of ``spans``: a finished OpenTelemetry span of a run's trace."""

    span_id: str
    trace_id: str
    parent_id: str | None
    run_id: str | None
    name: str
    start: datetime
    end: datetime
    attributes: str  # JSON object
    status: str


@dataclass(frozen=True)
class Schedule:
    """One row of ``schedules``."""

    id: str
    app: str
    cron: str
    timezone: str
    input: Any  # decoded JSON
    user: str
    misfire: str  # skip | run_once
    paused: bool
    next_fire: datetime  # aware UTC
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "app": self.app,
            "cron": self.cron,
            "timezone": self.timezone,
            "input": self.input,
            "user": self.user,
            "misfire": self.misfire,
            "paused": self.paused,
            "next_fire": self.next_fire.isoformat(),
            "created_at": self.created_at.isoformat(),
        }


@dataclass(frozen=True)
class Tick:
    """One row of ``schedule_ticks``: a fire time and what became of it."""

    schedule_id: str
    fire_time: datetime
    run_id: str | None
    outcome: str  # claimed | enqueued | refused | skipped_misfire
    scheduler: str
    at: datetime  # when it was claimed (or retaken), or recorded as skipped


@dataclass(frozen=True)
class Delivery:
    """One row of ``webhook_deliveries``."""

    id: int
    run_id: str
    url: str
    body: str  # JSON: exactly the bytes that are signed and sent
    attempts: int  # attempts started so far (counted when leased)
    next_attempt: datetime
    status: str  # pending | delivered | failed
    last_error: str | None = None
    lease_owner: str | None = None
    lease_expires: datetime | None = None
    delivered_at: datetime | None = None
