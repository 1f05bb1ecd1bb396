"""Settings: the only reader of ``os.environ``.

Every component receives the frozen ``Settings`` (or the slice it needs) as an argument;
nothing else in Corral looks at the environment. A malformed value fails at start-up and
names the variable.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from corral.errors import ConfigError

DEFAULT_DATA_DIR = "/var/lib/corral"
DEFAULT_RUN_DIR = "/run/corral"
DEFAULT_BASE_IMAGE = "/var/cache/corral/base/bookworm.tar"


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
    bridge_port: int = 8790

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

    @property
    def oci_dir(self) -> Path:
        return self.data_dir / "oci"

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
        network = NetworkSettings(subnet=subnet, bridge_port=_int(env, "CORRAL_BRIDGE_PORT", 8790))
        return cls(
            data_dir=data_dir,
            run_dir=run_dir,
            database_url=database_url,
            base_image=Path(env.get("CORRAL_BASE_IMAGE", DEFAULT_BASE_IMAGE)),
            limits=limits,
            network=network,
            import_dir=Path(env.get("CORRAL_IMPORT_DIR", str(data_dir / "imports"))),
            sandbox_timeout=_float(env, "CORRAL_SANDBOX_TIMEOUT", 600.0),
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
