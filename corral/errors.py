"""The root of every error Corral raises on purpose, and the whole tree of them.

::

    CorralError                       root; ``code`` is the machine-readable name
    ├── ConfigError                   a CORRAL_* variable is missing or malformed
    ├── NotFound                      base of every "no such thing"
    │   ├── EnvironmentNotFound
    │   ├── SnapshotNotFound
    │   ├── ImageNotFound             an oci:/oci-archive: source names nothing that exists
    │   ├── AppNotFound               no app of that name (or no such version of it)
    │   ├── RunNotFound
    │   ├── ReleaseNotFound           no runner release of that digest or version
    │   ├── ScheduleNotFound
    │   └── DeliveryNotFound          no webhook delivery of that id
    ├── Conflict                      the request contradicts what is stored
    │   ├── EnvironmentExists
    │   ├── EnvironmentBusy           another edit session or freeze holds the environment
    │   ├── AppExists
    │   ├── BalanceLimit              a credit would lift a balance past what is stored exactly
    │   ├── LeaseLost                 a worker's lease on a run was taken over
    │   ├── BudgetExhausted           the user's credits, or an app's budget, are spent
    │   ├── ConcurrencyLimit          the app's concurrency policy refuses the run for now
    │   ├── IdempotencyMismatch       an idempotency key first used with another request
    │   └── CallRefused               an agent-to-agent call too deep, or a cycle
    ├── InvalidInput                  a name, digest, reference or argument is malformed
    │   ├── ImportForbidden           over HTTP, an image outside the server's import directory
    │   ├── InputTooLarge             a run's input over ``corral.limits.MAX_INPUT``
    │   ├── InvalidCron               names the expression and what is wrong with it
    │   └── InvalidTimeZone           not an IANA time zone name
    ├── StoreError                    the database refused or is unreachable
    │   └── StoreUnavailable          transient: unreachable, restarting, or a dropped session
    ├── SnapshotError                 OCI layout and layer problems
    │   ├── NothingToFreeze           the edit session changed nothing
    │   ├── CorruptBlob               a blob's bytes no longer match its digest
    │   ├── BlobMissing               a stored snapshot names a blob that is gone
    │   ├── ImportFailed              an oci:/oci-archive: source is unreadable
    │   ├── DiskFull                  a write ran out of space; nothing stored was changed
    │   └── DraftFull                 a draft does not fit the per-environment draft limit
    ├── SandboxError                  booting, running or tearing down a sandbox
    │   ├── RequirementMissing        the host lacks root, runc, overlayfs, nftables ...
    │   ├── RuncError                 runc exited non-zero (argv, returncode, stderr)
    │   ├── NetworkError              ip/nft refused a change
    │   ├── SandboxCapacity           every address of the sandbox subnet is taken; retry
    │   ├── SandboxDied               the sandbox was killed before its command started
    │   ├── CommandNotFound           the command to run does not exist in the sandbox
    │   ├── SessionEnded              the sandbox ended before it answered
    │   ├── ProtocolError             the sandbox broke the event protocol
    │   ├── SessionTimeout            the sandbox did not answer in time
    │   ├── SwapFailed                a step of the runner's hot swap failed
    │   └── RunnerInvalid             the runner release does not work in this environment
    ├── VaultError                    sealed records and the master keys that seal them
    │   ├── MasterKeyError            no usable master key: an unsafe or malformed key file ...
    │   ├── UnknownMasterKey          a record is sealed under a key id the key ring lacks
    │   ├── CredentialTampered        a sealed record (credential, signing key) was altered
    │   ├── CredentialNotFound        (also a NotFound) no credential for that user+connection
    │   ├── CredentialRevoked         the credential was revoked; its sealed bytes are gone
    │   └── MasterKeyInUse            (also a Conflict) retiring a key records still use
    ├── BridgeError                   the host-side bridge between sandboxes and the world
    │   ├── Refused                   the bridge answers a call itself: status, code, detail
    │   ├── TokenRefused              a run token missing, malformed, forged, expired, revoked
    │   ├── RefreshFailed             a credential's token endpoint refused an OAuth refresh
    │   └── BridgeUnavailable         the bridge could not start listening
    ├── PipelineError                 executing runs, and announcing that they ended
    │   ├── NoWorker                  no live worker would execute a run someone waits for
    │   └── DeliveryFailed            one webhook attempt failed (``permanent``: never retried)
    └── OutboundError                 a request to another host (``corral.outbound``) failed
        └── UnusableURL               not an http(s)://host/ URL: no retry can fix it

A class with two parents is drawn under its first and names the other ("also a ...").

Foreign exceptions are translated once, in the edge module that calls the foreign thing
(``store`` for SQLAlchemy, ``sandbox/runc.py`` for runc, ``vault/sealed.py`` for
cryptography, ``outbound.py`` for sockets and TLS), with ``raise ... from exc``. A vault
error never carries secret material: it names the record, the key id or the file, and what
failed. The HTTP status for each ``code`` is data in ``corral/statuses.py``, read by the API
and by the bridge alike.

Not drawn, because they are control flow that never leaves its module (or, for ``Stopped``,
its package) and never reaches a caller: ``_Gone`` and ``_HeadTooLarge``
(``bridge/proxy.py``), ``_Lost`` (``store/schedules.py``), ``HandedBack``
(``pipeline/worker.py``), ``Stopped`` (``pipeline/executor.py``, how a worker tells the
executor to stop a run), ``_NotJSON`` (``limits.py``). The runner (``corral/runner``) runs
inside the sandbox and imports nothing from corral: its ``AgentError`` and
``AgentCallRefused`` are the agent's, not Corral's.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator, Sequence
from pathlib import Path


class CorralError(Exception):
    """Something Corral refused or could not do."""

    code = "corral_error"

    def __init__(self, detail: str | None = None) -> None:
        self.detail = detail or (self.__doc__ or self.code).strip()
        super().__init__(self.detail)

    def to_dict(self) -> dict[str, str]:
        return {"error": self.code, "detail": self.detail}


class ConfigError(CorralError):
    """A CORRAL_* setting is missing or malformed."""

    code = "config_error"


class NotFound(CorralError):
    """The named thing does not exist."""

    code = "not_found"


class EnvironmentNotFound(NotFound):
    code = "environment_not_found"

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(
            f"no environment named {name!r}; `corral env list` shows the ones there are"
        )


class SnapshotNotFound(NotFound):
    code = "snapshot_not_found"

    def __init__(self, ref: str, where: str = "") -> None:
        self.ref = ref
        suffix = f" in {where}" if where else ""
        super().__init__(f"no snapshot {ref!r}{suffix}")


class ImageNotFound(NotFound):
    code = "image_not_found"

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(f"no OCI image layout or archive at {path}")


class Conflict(CorralError):
    """The request contradicts what is already stored."""

    code = "conflict"


class EnvironmentExists(Conflict):
    code = "environment_exists"

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"an environment named {name!r} already exists")


class EnvironmentBusy(Conflict):
    code = "environment_busy"

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"environment {name!r} is held by another edit session or freeze")


class BudgetExhausted(Conflict):
    """The user's credits, or the app's budget for a run, are spent."""

    code = "budget_exhausted"


class ConcurrencyLimit(Conflict):
    """The app's concurrency policy refuses the run for now (``reject``, ``max_concurrent``)."""

    code = "concurrency_limit"


class IdempotencyMismatch(Conflict):
    """The idempotency key was first used with another request."""

    code = "idempotency_mismatch"


class CallRefused(Conflict):
    """An agent-to-agent call the guard refuses: too deep, or a cycle."""

    code = "agent_call_refused"


class InvalidInput(CorralError):
    """A name, digest, reference or argument is malformed."""

    code = "invalid_input"


class ImportForbidden(InvalidInput):
    """Over HTTP, an image is imported only from the server's import directory."""

    code = "import_forbidden"


class InputTooLarge(InvalidInput):
    """The run's input is over ``corral.limits.MAX_INPUT``: refused before anything is stored."""

    code = "input_too_large"


CRON_FORMAT = "five fields: minute hour day-of-month month day-of-week, e.g. '0 9 * * MON'"


class InvalidCron(InvalidInput):
    code = "invalid_cron"

    def __init__(self, expr: object, reason: str) -> None:
        self.expr = expr
        super().__init__(f"invalid cron expression {expr!r}: {reason}; expected {CRON_FORMAT}")


class InvalidTimeZone(InvalidInput):
    code = "invalid_time_zone"

    def __init__(self, name: object, reason: str = "it is not an IANA time zone name") -> None:
        self.name = name
        super().__init__(
            f"invalid time zone {name!r}: {reason}; use an IANA name such as "
            "'Europe/Paris', 'America/New_York' or 'UTC'"
        )


class StoreError(CorralError):
    """The database refused the operation or could not be reached."""

    code = "store_error"


class StoreUnavailable(StoreError):
    """The database could not be reached, is restarting, or dropped the session mid-way.

    Transient by nature: the same operation may succeed a moment later, so the long-running
    parts of Corral (workers, the bridge) wait it out (``store.engine.patiently``); a one-shot
    command reports it at once.
    """

    code = "store_unavailable"


class SnapshotError(CorralError):
    """An OCI layout, manifest or layer could not be read or written."""

    code = "snapshot_error"


class NothingToFreeze(SnapshotError):
    code = "nothing_to_freeze"

    def __init__(self, name: str, head: str) -> None:
        super().__init__(
            f"environment {name!r} has no changes since {head}; no new snapshot was written"
        )


class CorruptBlob(SnapshotError):
    code = "corrupt_blob"

    def __init__(self, digest: str, actual: str, path: str) -> None:
        self.digest, self.actual, self.path = digest, actual, path
        super().__init__(f"blob {digest} at {path} hashes to {actual}: its bytes have changed")


class BlobMissing(SnapshotError):
    code = "blob_missing"

    def __init__(self, digest: str, path: str) -> None:
        self.digest, self.path = digest, path
        super().__init__(f"blob {digest} is missing from {path}: the store is damaged")


class ImportFailed(SnapshotError):
    code = "import_failed"


class DiskFull(SnapshotError):
    code = "disk_full"

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(
            f"no space left while writing {path}; the write was abandoned and every stored "
            "snapshot is unchanged"
        )


class DraftFull(SnapshotError):
    code = "draft_full"

    def __init__(self, name: str, limit_bytes: int, detail: str) -> None:
        self.name, self.limit_bytes = name, limit_bytes
        super().__init__(
            f"the draft of environment {name!r} is full: a draft holds at most "
            f"{limit_bytes >> 20} MB (CORRAL_DRAFT_LIMIT_MB); {detail}"
        )


@contextlib.contextmanager
def out_of_space(path: str | Path) -> Iterator[None]:
    """Writes under ``path`` in this block: running out of space (or quota) is DiskFull."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(str(path)) from exc
        raise


class SandboxError(CorralError):
    """A sandbox could not be booted, run or torn down."""

    code = "sandbox_error"


class RequirementMissing(SandboxError):
    code = "requirement_missing"

    def __init__(self, what: str, hint: str) -> None:
        self.what = what
        super().__init__(f"this host lacks {what}: {hint}")


class RuncError(SandboxError):
    code = "runc_error"

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv, self.returncode, self.stderr = list(argv), returncode, stderr
        super().__init__(f"{' '.join(self.argv[:4])} ... exited {returncode}: {stderr.strip()}")


class NetworkError(SandboxError):
    code = "network_error"

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv, self.returncode, self.stderr = list(argv), returncode, stderr
        super().__init__(f"{' '.join(self.argv)} exited {returncode}: {stderr.strip()}")


class SandboxCapacity(SandboxError):
    code = "sandbox_capacity"


class SandboxDied(SandboxError):
    code = "sandbox_died"

    def __init__(self, container: str) -> None:
        self.container = container
        super().__init__(f"sandbox {container} was killed before its command started")


class CommandNotFound(SandboxError):
    code = "command_not_found"

    def __init__(self, command: str, env: str) -> None:
        self.command = command
        super().__init__(f"{command!r} is not found in environment {env!r}")


class SessionEnded(SandboxError):
    code = "sandbox_ended"

    def __init__(self, detail: str = "the sandbox ended before it answered") -> None:
        super().__init__(detail)


class ProtocolError(SandboxError):
    """The sandbox broke the event protocol."""

    code = "protocol_error"


class SessionTimeout(SandboxError):
    """The sandbox did not answer in time."""

    code = "sandbox_timeout"


class SwapFailed(SandboxError):
    """A swap step failed in a way a fresh sandbox may not repeat."""

    code = "runner_swap_failed"


class RunnerInvalid(SandboxError):
    """The release does not work with this environment's interpreter: retrying cannot help."""

    code = "runner_invalid"


class VaultError(CorralError):
    """A credential could not be sealed, opened or found, or the master keys are unusable."""

    code = "vault_error"


class MasterKeyError(VaultError):
    """The master keys are missing, malformed or unsafely stored."""

    code = "master_key_error"


class UnknownMasterKey(VaultError):
    """``record`` names what is sealed: ``credential alice/github``, ``signing key k1f2e``."""

    code = "unknown_master_key"

    def __init__(self, key_id: str, record: str, source: str) -> None:
        self.key_id, self.record = key_id, record
        super().__init__(
            f"{record} is sealed under master key {key_id}, which {source} does not hold: "
            "restore that key (as a non-primary key) to open it"
        )


class CredentialTampered(VaultError):
    """A sealed record (a credential, or a signing key of the bridge) failed authentication."""

    code = "credential_tampered"

    def __init__(self, record: str, what: str) -> None:
        self.record, self.what = record, what
        super().__init__(f"{record} failed authentication: {what}")


class CredentialNotFound(VaultError, NotFound):
    code = "credential_not_found"

    def __init__(self, user: str, connection: str) -> None:
        self.user, self.connection = user, connection
        super().__init__(
            f"no credential {connection!r} for user {user!r}; `corral secret list` shows them"
        )


class CredentialRevoked(VaultError):
    code = "credential_revoked"

    def __init__(self, user: str, connection: str) -> None:
        self.user, self.connection = user, connection
        super().__init__(
            f"credential {connection!r} of user {user!r} was revoked; "
            "`corral secret set` stores a new one"
        )


class MasterKeyInUse(VaultError, Conflict):
    code = "master_key_in_use"

    def __init__(self, key_id: str, records: int, signing_keys: int = 0) -> None:
        self.key_id, self.records, self.signing_keys = key_id, records, signing_keys
        also = f" and {signing_keys} signing key(s) of the bridge" if signing_keys else ""
        super().__init__(
            f"master key {key_id} still seals {records} credential(s){also}; "
            "`corral vault rotate` rewraps them first"
        )


class BridgeError(CorralError):
    """The host-side bridge could not serve a sandbox's call, or refused it."""

    code = "bridge_error"


class Refused(BridgeError):
    """The bridge answers the request itself with ``status`` and ``{"error": code, ...}``.

    ``code`` is per refusal (``unknown_connection``, ``token_expired``, ``body_too_large``
    ...), as is ``status``. ``closes``: the refusal is about the message's framing, so where
    the next message would begin is itself in doubt; the connection is closed after the
    answer (RFC 9112 6.3).
    """

    code = "refused"

    def __init__(self, status: int, code: str, detail: str, closes: bool = False) -> None:
        super().__init__(detail)
        self.status, self.code, self.closes = status, code, closes


class TokenRefused(BridgeError):
    """A run token was missing, malformed, forged, expired, revoked or out of scope."""

    code = "token_refused"

    def __init__(self, reason: str, detail: str, status: int = 401) -> None:
        self.reason, self.status = reason, status
        super().__init__(detail)


class RefreshFailed(BridgeError):
    """A credential's token endpoint refused an OAuth refresh, or answered nonsense."""

    code = "refresh_failed"


class BridgeUnavailable(BridgeError):
    """The bridge could not start listening."""

    code = "bridge_unavailable"


class PipelineError(CorralError):
    """A run could not be executed, or its end could not be announced."""

    code = "pipeline_error"


class NoWorker(PipelineError):
    """No worker is alive to execute a run someone is about to wait for."""

    code = "no_worker"


class DeliveryFailed(PipelineError):
    """One webhook attempt failed: connection error, timeout, or a status other than 2xx.

    ``permanent``: no retry can fix it (a URL that is not http(s), a run no longer recorded).
    """

    code = "delivery_failed"

    def __init__(self, reason: str, *, permanent: bool = False) -> None:
        self.reason, self.permanent = reason, permanent
        super().__init__(reason)


class OutboundError(CorralError):
    """A request Corral sent to another host got no answer: refused, reset, timed out, TLS."""

    code = "outbound_error"


class UnusableURL(OutboundError):
    """The URL is not ``http(s)://host/...``: no retry can fix it."""

    code = "unusable_url"


# -- the store's records: apps, runs, releases, the ledger, schedules, webhook deliveries --------


class AppNotFound(NotFound):
    code = "app_not_found"

    def __init__(self, name: str, version: int | None = None) -> None:
        self.name, self.version = name, version
        shown = f"{name!r} version {version}" if version else repr(name)
        super().__init__(f"no app {shown}; `corral app list` shows them")


class RunNotFound(NotFound):
    code = "run_not_found"

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        super().__init__(f"no run with id {run_id!r}")


class ReleaseNotFound(NotFound):
    code = "release_not_found"

    def __init__(self, ref: str) -> None:
        self.ref = ref
        super().__init__(f"no runner release {ref!r}; `corral runner list` shows them")


class ScheduleNotFound(NotFound):
    code = "schedule_not_found"

    def __init__(self, schedule_id: str) -> None:
        self.schedule_id = schedule_id
        super().__init__(f"no schedule {schedule_id!r}; `corral schedule list` shows them")


class DeliveryNotFound(NotFound):
    code = "delivery_not_found"

    def __init__(self, ref: str) -> None:
        self.ref = ref
        super().__init__(f"no webhook delivery {ref}")


class AppExists(Conflict):
    code = "app_exists"

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"an app named {name!r} already exists")


class LeaseLost(Conflict):
    code = "lease_lost"

    def __init__(self, run_id: str, worker: str) -> None:
        self.run_id, self.worker = run_id, worker
        super().__init__(f"worker {worker} no longer holds the lease on {run_id}")


class BalanceLimit(Conflict):
    """A credit would lift a balance past ``LEDGER_MAX_MICROS``: what is stored says no."""

    code = "balance_limit"
