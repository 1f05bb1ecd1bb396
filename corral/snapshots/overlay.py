"""Overlayfs mounts: the only module that mounts or unmounts anything.

A sandbox's root is an overlay of a snapshot's unpacked layers (read-only lower directories,
top layer first) and an upper directory of its own. Mounting goes straight to mount(2) through
libc rather than forking ``mount``: it is on the boot path, and a fork/exec costs milliseconds.
An environment's draft is the exception: a filesystem image loop-mounted by util-linux's
``mount`` (which finds a free loop device, races included), once per draft, off the boot path.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from corral.errors import RequirementMissing, SnapshotError

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

MNT_DETACH = 2
MS_NOSUID = 0x2
MS_NODEV = 0x4
# The kernel takes mount options in one page; lowerdir paths are the bulk of it.
_MAX_OPTIONS = 4095

# index/redirect_dir/metacopy off: the upper directory must be a plain tar-able diff, with
# whiteouts and opaque markers only, so that it can be frozen into an OCI layer as it is.
_FIXED_OPTIONS = "index=off,redirect_dir=off,metacopy=off,xino=off"


def mount(lowers: Sequence[Path], upper: Path, work: Path, target: Path) -> None:
    """Mount an overlay of ``lowers`` (topmost first) with ``upper`` at ``target``."""
    if not lowers:
        raise SnapshotError("an overlay needs at least one lower layer")
    lower = ":".join(str(p) for p in lowers)
    options = f"lowerdir={lower},upperdir={upper},workdir={work},{_FIXED_OPTIONS}"
    if len(options) > _MAX_OPTIONS:
        raise SnapshotError(
            f"{len(lowers)} layers are too many to mount in one overlay ({len(options)} bytes of "
            f"options, the kernel takes {_MAX_OPTIONS}); squash the environment's history"
        )
    rc = _libc.mount(
        b"overlay", os.fsencode(target), b"overlay", MS_NOSUID | MS_NODEV, options.encode()
    )
    if rc != 0:
        err = ctypes.get_errno()
        if err == errno.ENODEV:
            raise RequirementMissing("overlayfs", "load it with `modprobe overlay`")
        if err == errno.EPERM:
            raise RequirementMissing("root", "mounting an overlay needs CAP_SYS_ADMIN; run as root")
        raise SnapshotError(f"mount overlay on {target} failed: {os.strerror(err)} ({options})")


def mount_scratch(target: Path, size_bytes: int) -> None:
    """A tmpfs of ``size_bytes`` at ``target``: a run's scratch layer, capped and thrown away.

    Its pages are charged to the memory cgroup of whoever writes them, so a sandbox's writes
    also count against its memory limit; either cap stops a sandbox from filling the host.
    """
    options = f"size={size_bytes},mode=0755".encode()
    rc = _libc.mount(
        b"corral-scratch", os.fsencode(target), b"tmpfs", MS_NOSUID | MS_NODEV, options
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise SnapshotError(f"mount tmpfs on {target} failed: {os.strerror(err)}")


# discard: what the draft deletes is punched out of the image, so the data disk gets it back;
# noinit_itable: the image is sparse and reads as zeros, so nothing needs zeroing after mkfs.
_IMAGE_OPTIONS = "loop,nosuid,nodev,noatime,discard,noinit_itable,errors=remount-ro"


def mount_image(image: Path, target: Path) -> None:
    """Loop-mount the ext4 filesystem in the file ``image`` at ``target`` (a draft)."""
    argv = ["mount", "-t", "ext4", "-o", _IMAGE_OPTIONS, str(image), str(target)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except FileNotFoundError:
        raise RequirementMissing("mount", "apt-get install mount (util-linux)") from None
    if done.returncode == 0:
        return
    said = done.stderr.strip()
    if "loop" in said and ("free" in said or "setup" in said or "No such" in said):
        raise RequirementMissing(
            "loop devices", f"`mount -o loop` failed ({said}); load the module: `modprobe loop`"
        )
    if "unknown filesystem type" in said:
        raise RequirementMissing("ext4", f"{said}; load the module: `modprobe ext4`")
    raise SnapshotError(f"mount {image} on {target} failed: {said}")


def unmount(target: Path) -> None:
    """Detach the mount at ``target``; a missing mount is not an error (teardown is idempotent)."""
    rc = _libc.umount2(os.fsencode(target), MNT_DETACH)
    if rc != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):
            return
        raise SnapshotError(f"umount {target} failed: {os.strerror(err)}")


def mounted_under(prefix: Path) -> list[Path]:
    """Every mount point at or below ``prefix`` (deepest first), from /proc/self/mountinfo."""
    root = str(prefix).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if (point + "/").startswith(root):
                found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)
