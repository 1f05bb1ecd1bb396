"""The OCI runtime ``config.json`` for one sandbox: the only place one is built.

This module owns every isolation decision that reaches runc: namespaces, capabilities,
mounts, masked paths, cgroup limits, devices, rlimits and (via ``corral.sandbox.seccomp``)
the syscall filter. It targets runtime spec 1.0.2 as accepted by runc 1.1. It is pure: it
never writes files, runs runc, creates the network namespace or cgroups, or reads the
environment. Callers write the returned dict as ``config.json`` and hand it to runc; they
must not patch it afterwards, so that every weakening has to happen here, in review.

Why there is no user namespace: a sandbox's root filesystem is an overlay of root-owned
layer files on the host, and runc 1.1 cannot idmap mounts, so a user namespace would
either show every file as ``nobody`` or need a chown of each layer per sandbox. Instead,
agent code runs as uid 1000 with empty effective, permitted, inheritable and ambient
capability sets, ``noNewPrivileges`` (so setuid binaries cannot raise them back), a
minimal bounding set, the seccomp allowlist, and private pid/mount/ipc/uts/cgroup
namespaces. The network namespace is one Corral has already created and wired up; the
sandbox joins it by path rather than getting a fresh, unconnected one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final

from corral.config import SandboxLimits
from corral.errors import InvalidInput
from corral.sandbox import seccomp

OCI_VERSION: Final = "1.0.2"

# The bounding set: the ceiling for anything that ever runs in the sandbox (a process run as
# uid 0, which Corral itself never asks for, would get exactly these). It is the classic
# container set minus MKNOD, NET_RAW, SYS_CHROOT and friends.
BOUNDING_CAPABILITIES: Final = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_AUDIT_WRITE",
)
# Must never appear in any capability set; the unit tests assert it.
FORBIDDEN_CAPABILITIES: Final = frozenset(
    {
        "CAP_SYS_ADMIN",
        "CAP_LINUX_IMMUTABLE",
        "CAP_NET_ADMIN",
        "CAP_NET_RAW",
        "CAP_SYS_MODULE",
        "CAP_SYS_PTRACE",
        "CAP_SYS_CHROOT",
        "CAP_MKNOD",
    }
)

NOFILE_LIMIT: Final = 4096
OOM_SCORE_ADJ: Final = 500  # a runaway sandbox should die before Corral or the database

# Kernel interfaces that leak host information or offer a lever on the host; bind-mounted
# over with /dev/null (files) or an empty read-only tmpfs (directories) by runc.
MASKED_PATHS: Final = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)
# Readable but never writable: /proc/sys holds host-wide sysctls, sysrq-trigger can reboot.
READONLY_PATHS: Final = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)

# Mount points runc sets up itself; a caller's bind mount on or under one of them could
# undo the masking above or expose host devices, so it is refused.
_RESERVED_DESTINATIONS: Final = ("/proc", "/sys", "/dev")

# (major, minor) of the character devices a sandbox may open; None is "any minor".
_ALLOWED_CHAR_DEVICES: Final[tuple[tuple[str, int, int | None], ...]] = (
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
    ("ptmx", 5, 2),
    ("pts", 136, None),
)

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


@dataclass(frozen=True)
class BindMount:
    """A host path bind-mounted into the sandbox (read-only unless said otherwise)."""

    source: Path
    destination: str
    readonly: bool = True

    def __post_init__(self) -> None:
        if not self.source.is_absolute():
            raise InvalidInput(f"bind mount source must be absolute, got {str(self.source)!r}")
        _check_container_path("bind mount destination", self.destination)
        dest = PurePosixPath(self.destination)
        if dest == PurePosixPath("/"):
            raise InvalidInput("a bind mount cannot replace the sandbox's root")
        for reserved in _RESERVED_DESTINATIONS:
            if dest == PurePosixPath(reserved) or PurePosixPath(reserved) in dest.parents:
                raise InvalidInput(f"bind mount destination {self.destination!r} is reserved")


@dataclass(frozen=True)
class ProcessSpec:
    """The sandbox's first process: what to run, as whom, where and with which environment."""

    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]  # ordered name/value pairs; rendered as NAME=value
    cwd: str = "/home/user"
    uid: int = 1000
    gid: int = 1000
    terminal: bool = False

    def __post_init__(self) -> None:
        if not self.argv or not self.argv[0]:
            raise InvalidInput("a sandbox process needs a non-empty argv")
        if any("\0" in arg for arg in self.argv):
            raise InvalidInput("argv must not contain NUL bytes")
        seen: set[str] = set()
        for name, value in self.env:
            # '=' in a name would split differently on the way back out of the environment.
            if not _ENV_NAME.fullmatch(name):
                raise InvalidInput(f"invalid environment variable name {name!r}")
            if "\0" in value:
                raise InvalidInput(f"environment variable {name} contains a NUL byte")
            if name in seen:
                raise InvalidInput(f"environment variable {name} is given twice")
            seen.add(name)
        _check_container_path("working directory", self.cwd)
        for label, ident in (("uid", self.uid), ("gid", self.gid)):
            if not 0 <= ident < 2**32 - 1:
                raise InvalidInput(f"{label} {ident} is out of range")


def runtime_config(
    *,
    rootfs: Path,
    process: ProcessSpec,
    hostname: str,
    netns: Path,
    cgroups_path: str,
    limits: SandboxLimits,
    mounts: Sequence[BindMount] = (),
) -> dict[str, object]:
    """The complete ``config.json`` object for one sandbox.

    ``rootfs`` is the merged overlay (writable: its upper layer is the sandbox's scratch),
    ``netns`` a bind-mounted network namespace such as ``/run/netns/corral-…``, and
    ``cgroups_path`` an absolute cgroupfs path (Corral runs runc without
    ``--systemd-cgroup``) that runc creates and removes under every v1 controller.
    """
    if not rootfs.is_absolute():
        raise InvalidInput(f"rootfs must be an absolute path, got {str(rootfs)!r}")
    if not netns.is_absolute():
        raise InvalidInput(f"netns must be an absolute path, got {str(netns)!r}")
    if not cgroups_path.startswith("/") or ".." in cgroups_path.split("/"):
        raise InvalidInput(f"cgroups_path must be absolute, got {cgroups_path!r}")
    if not _HOSTNAME.fullmatch(hostname):
        raise InvalidInput(f"invalid sandbox hostname {hostname!r}")
    _check_limits(limits)

    return {
        "ociVersion": OCI_VERSION,
        "process": _process(process),
        "root": {"path": str(rootfs), "readonly": False},
        "hostname": hostname,
        "mounts": _system_mounts() + [_bind(m) for m in mounts],
        "linux": {
            "namespaces": [
                {"type": "pid"},
                {"type": "mount"},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "cgroup"},
                {"type": "network", "path": str(netns)},
                # No "user" entry: see the module docstring.
            ],
            "cgroupsPath": cgroups_path,
            "resources": _resources(limits),
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
            "seccomp": seccomp.profile(),
        },
    }


def _process(process: ProcessSpec) -> dict[str, object]:
    bounding = list(BOUNDING_CAPABILITIES)
    # A non-root process gets nothing to use: it could only gain capabilities through
    # execve of a file with caps or a setuid binary, and noNewPrivileges rules both out.
    # Root may use the whole bounding set; Corral runs user code, edits included, as uid 1000.
    usable = list(BOUNDING_CAPABILITIES) if process.uid == 0 else []
    return {
        "terminal": process.terminal,
        "user": {"uid": process.uid, "gid": process.gid, "additionalGids": []},
        "args": list(process.argv),
        "env": [f"{name}={value}" for name, value in process.env],
        "cwd": process.cwd,
        "capabilities": {
            "bounding": bounding,
            "effective": usable,
            "permitted": list(usable),
            "inheritable": [],
            "ambient": [],
        },
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": NOFILE_LIMIT, "soft": NOFILE_LIMIT}],
        "noNewPrivileges": True,
        "oomScoreAdj": OOM_SCORE_ADJ,
    }


def _system_mounts() -> list[dict[str, object]]:
    # Order matters: /dev must exist before /dev/pts, /sys before /sys/fs/cgroup.
    return [
        {
            "destination": "/proc",
            "type": "proc",
            "source": "proc",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            # newinstance: a private pty namespace, not the host's /dev/pts.
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        {
            "destination": "/dev/mqueue",
            "type": "mqueue",
            "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"],
        },
        {
            "destination": "/sys/fs/cgroup",
            "type": "cgroup",
            "source": "cgroup",
            # With the cgroup namespace the sandbox sees only its own subtree, read-only.
            "options": ["nosuid", "noexec", "nodev", "relatime", "ro"],
        },
    ]


def _bind(mount: BindMount) -> dict[str, object]:
    # The plain flags apply to the top mount only; the "r" forms (mount_setattr with
    # AT_RECURSIVE: kernel 5.12+, runc 1.1+) also cover every submount rbind carried along,
    # which would otherwise keep its host flags (a writable, suid-capable submount of a
    # read-only layer). The integration test checks a submount to prove they are honoured.
    options = ["rbind", "nosuid", "nodev", "rnosuid", "rnodev"]
    if mount.readonly:
        options += ["ro", "rro"]
    return {
        "destination": mount.destination,
        "type": "bind",
        "source": str(mount.source),
        "options": options,
    }


def _resources(limits: SandboxLimits) -> dict[str, object]:
    devices: list[dict[str, object]] = [{"allow": False, "access": "rwm"}]
    for _name, major, minor in _ALLOWED_CHAR_DEVICES:
        rule: dict[str, object] = {"allow": True, "type": "c", "major": major, "access": "rwm"}
        if minor is not None:
            rule["minor"] = minor
        devices.append(rule)
    return {
        "devices": devices,
        # swap is memory+swap on cgroup v1 (memory.memsw.limit_in_bytes): equal values
        # mean the sandbox cannot push its overflow into swap.
        "memory": {"limit": limits.memory_bytes, "swap": limits.memory_bytes},
        "cpu": {"quota": limits.cpu_quota_us, "period": limits.cpu_period_us},
        "pids": {"limit": limits.pids},
    }


def _check_limits(limits: SandboxLimits) -> None:
    # Zero or negative values mean "unlimited" to runc; never let one through by accident.
    for name in ("memory_bytes", "pids", "cpu_quota_us", "cpu_period_us"):
        value = getattr(limits, name)
        if not isinstance(value, int) or value <= 0:
            raise InvalidInput(f"sandbox limit {name} must be a positive integer, got {value!r}")


def _check_container_path(label: str, path: str) -> None:
    parts = PurePosixPath(path).parts
    if not path.startswith("/") or ".." in parts or "\0" in path:
        raise InvalidInput(f"{label} must be an absolute path without '..', got {path!r}")
