"""Settings: the only reader of ``os.environ``.

Every component receives the frozen ``Settings`` (or the slice it needs) as an argument;
nothing else in Corral looks at the environment. A malformed value fails at start-up and
names the variable.

A secret setting (``CORRAL_MASTER_KEY``) is carried as a ``Secret``, whose ``repr`` and
``str`` are masked, so printing or logging ``Settings`` can never show it; error messages
about it name the variable and the position of the bad part, never its value.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from corral.errors import ConfigError

DEFAULT_DATA_DIR = "/var/lib/corral"
DEFAULT_RUN_DIR = "/run/corral"
DEFAULT_BASE_IMAGE = "/var/cache/corral/base/bookworm.tar"
# Bridge ports sandboxes may reach on the gateway: one per Corral instance (data directory) on
# a host, so that instances never answer for each other's runs.
BRIDGE_PORTS = range(8790, 8890)
MASTER_KEY_BYTES = 32  # AES-256
DEFAULT_DRAFT_LIMIT_MB = 4096
MIN_DRAFT_LIMIT_MB = 16  # the smallest ext4 filesystem with a journal that is of any use


class Secret:
    """A secret string that never shows itself: ``repr``, ``str`` and f-strings are masked.

    ``reveal()`` is the one way to the value, so every use of it is greppable. Equality is
    constant-time, so comparing two secrets leaks nothing through timing.
    """

    __slots__ = ("_value",)
    MASK = "**********"

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"Secret wraps a str, not {type(value).__name__}")
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({self.MASK!r})"

    def __str__(self) -> str:
        return self.MASK

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    # Immutable, so a copy may be the same object; dataclasses.asdict() deep-copies fields.
    def __copy__(self) -> Secret:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> Secret:
        return self

    def __reduce__(self) -> tuple[object, ...]:
        # Pickling would write the value somewhere nobody decided it should go.
        raise TypeError("a Secret cannot be pickled")


@dataclass(frozen=True)
class SandboxLimits:
    """Per-sandbox limits: cgroups, and the size of a run's scratch layer."""

    memory_bytes: int = 512 * 1024 * 1024
    scratch_bytes: int = 1024 * 1024 * 1024  # a run's writable layer: a tmpfs of this size
    pids: int = 256
    cpu_quota_us: int = 100_000  # per cpu_period_us: one full CPU
    cpu_period_us: int = 100_000


@dataclass(frozen=True)
class NetworkSettings:
    """The host-side sandbox subnet. Machine-wide: every Corral on a host must agree."""

    subnet: ipaddress.IPv4Network = ipaddress.IPv4Network("10.213.0.0/16")
    bridge_port: int = 8790  # this instance's bridge; one of BRIDGE_PORTS

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        """The host's address on the sandbox network; the bridge listens here."""
        return self.subnet.network_address + 1


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    run_dir: Path
    database_url: str
    base_image: Path
    limits: SandboxLimits
    network: NetworkSettings
    import_dir: Path  # over HTTP, `from` may name images only under here
    sandbox_timeout: float  # over HTTP: the default and the longest a sandbox may run
    # CORRAL_MASTER_KEY: base64 AES-256 keys, comma-separated, the first one primary.
    # None: the vault keeps its keys in a file under ``vault_dir`` instead.
    master_key: Secret | None = None
    # What one environment's draft (its unfrozen edits) may hold: CORRAL_DRAFT_LIMIT_MB.
    draft_limit_bytes: int = DEFAULT_DRAFT_LIMIT_MB << 20
    # Seconds a run's lease lasts unrenewed (workers and `corral run` renew it every third):
    # how long a dead owner's run waits before another process takes it over or ends it.
    run_lease: float = 10.0

    @property
    def oci_dir(self) -> Path:
        return self.data_dir / "oci"

    @property
    def vault_dir(self) -> Path:
        """Where the vault's master key file lives when CORRAL_MASTER_KEY is not set."""
        return self.data_dir / "vault"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        data_dir = Path(env.get("CORRAL_DATA_DIR", DEFAULT_DATA_DIR))
        if not data_dir.is_absolute():
            raise ConfigError(f"CORRAL_DATA_DIR must be an absolute path, got {str(data_dir)!r}")
        run_dir = Path(env.get("CORRAL_RUN_DIR", DEFAULT_RUN_DIR))
        if not run_dir.is_absolute():
            raise ConfigError(f"CORRAL_RUN_DIR must be an absolute path, got {str(run_dir)!r}")
        database_url = env.get("CORRAL_DATABASE_URL") or f"sqlite:///{data_dir / 'corral.db'}"
        if not database_url.startswith(("sqlite:", "postgresql:", "postgresql+psycopg:")):
            raise ConfigError(
                "CORRAL_DATABASE_URL must be a sqlite:/// or postgresql:// URL, "
                f"got {database_url.split(':', 1)[0]!r}"
            )
        limits = SandboxLimits(
            memory_bytes=_int(env, "CORRAL_SANDBOX_MEMORY_MB", 512) * 1024 * 1024,
            pids=_int(env, "CORRAL_SANDBOX_PIDS", 256),
            scratch_bytes=_int(env, "CORRAL_SANDBOX_SCRATCH_MB", 1024) * 1024 * 1024,
            cpu_quota_us=int(_float(env, "CORRAL_SANDBOX_CPUS", 1.0) * 100_000),
        )
        try:
            subnet = ipaddress.IPv4Network(env.get("CORRAL_SANDBOX_SUBNET", "10.213.0.0/16"))
        except ValueError as exc:
            raise ConfigError(f"CORRAL_SANDBOX_SUBNET is not an IPv4 network: {exc}") from exc
        if subnet.prefixlen > 24:
            raise ConfigError("CORRAL_SANDBOX_SUBNET must be a /24 or larger")
        bridge_port = _int(env, "CORRAL_BRIDGE_PORT", 8790)
        if bridge_port not in BRIDGE_PORTS:
            raise ConfigError(
                f"CORRAL_BRIDGE_PORT must be in {BRIDGE_PORTS.start}-{BRIDGE_PORTS.stop - 1} "
                f"(the range the sandbox network opens), got {bridge_port}"
            )
        network = NetworkSettings(subnet=subnet, bridge_port=bridge_port)
        draft_mb = _int(env, "CORRAL_DRAFT_LIMIT_MB", DEFAULT_DRAFT_LIMIT_MB)
        if draft_mb < MIN_DRAFT_LIMIT_MB:
            raise ConfigError(
                f"CORRAL_DRAFT_LIMIT_MB must be at least {MIN_DRAFT_LIMIT_MB}, got {draft_mb}"
            )
        return cls(
            data_dir=data_dir,
            run_dir=run_dir,
            database_url=database_url,
            base_image=Path(env.get("CORRAL_BASE_IMAGE", DEFAULT_BASE_IMAGE)),
            limits=limits,
            network=network,
            import_dir=Path(env.get("CORRAL_IMPORT_DIR", str(data_dir / "imports"))),
            sandbox_timeout=_float(env, "CORRAL_SANDBOX_TIMEOUT", 600.0),
            master_key=_master_key(env),
            draft_limit_bytes=draft_mb << 20,
            run_lease=_float(env, "CORRAL_RUN_LEASE", 10.0),
        )


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value <= 0:
        raise ConfigError(f"{name} must be positive, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value <= 0:
        raise ConfigError(f"{name} must be positive, got {value}")
    return value


def master_key_parts(raw: str) -> list[bytes]:
    """Decode CORRAL_MASTER_KEY: comma-separated base64 keys of 32 bytes, the first primary.

    Raises ``ConfigError`` naming the variable and the position of a bad key - never the
    key itself, which may be a real key with a typo in it.
    """
    parts = [part.strip() for part in raw.split(",")]
    if not any(parts):
        raise ConfigError("CORRAL_MASTER_KEY is set but empty; unset it or give a base64 key")
    keys = []
    for position, part in enumerate(parts, start=1):
        where = f"key {position} of {len(parts)} in CORRAL_MASTER_KEY"
        try:
            key = base64.b64decode(part, validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(
                f"{where} is not base64; make one with `openssl rand -base64 32`"
            ) from None
        if len(key) != MASTER_KEY_BYTES:
            raise ConfigError(
                f"{where} decodes to {len(key)} bytes, not {MASTER_KEY_BYTES} (AES-256); "
                "make one with `openssl rand -base64 32`"
            )
        keys.append(key)
    return keys


def _master_key(env: Mapping[str, str]) -> Secret | None:
    raw = env.get("CORRAL_MASTER_KEY")
    if raw is None:
        return None
    master_key_parts(raw)  # fail at start-up, not at the first secret
    return Secret(raw)
