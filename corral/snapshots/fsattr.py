"""Inode flags: the only module that sets or lifts the immutable flag (``chattr +i``).

The runner's tree in a snapshot is immutable twice over: in the shared layer cache (lower
layers, where overlayfs honours the flag for every sandbox at no cost per boot), and again in
a sandbox's scratch layer after a hot swap. Lifting the flag needs CAP_LINUX_IMMUTABLE, which
the host has and no sandbox process does.

``Immutability`` is a class so that tests can hand the swap a failing one.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import stat
from pathlib import Path

FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x00000010
# The flags every filesystem with flags at all understands (tmpfs takes only these). Flags
# read through an overlay come from the lower layer's filesystem (ext4's extents flag, say),
# which the scratch layer's tmpfs refuses; ext4, in turn, must never be told to drop them.
GENERIC_FLAGS = 0x00000010 | 0x00000020 | 0x00000040 | 0x00000080  # immutable append nodump noatime


class Immutability:
    def set(self, path: Path, immutable: bool) -> None:
        """Set or lift the immutable flag on one file or directory (never a symlink)."""
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            flags = array.array("l", [0])
            fcntl.ioctl(fd, FS_IOC_GETFLAGS, flags, True)
            want = flags[0] | FS_IMMUTABLE_FL if immutable else flags[0] & ~FS_IMMUTABLE_FL
            if want == flags[0]:
                return
            try:
                fcntl.ioctl(fd, FS_IOC_SETFLAGS, array.array("l", [want]), True)
            except OSError as exc:
                if exc.errno != errno.EOPNOTSUPP or want == want & GENERIC_FLAGS:
                    raise
                fcntl.ioctl(fd, FS_IOC_SETFLAGS, array.array("l", [want & GENERIC_FLAGS]), True)
        finally:
            os.close(fd)

    def is_set(self, path: Path) -> bool:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            flags = array.array("l", [0])
            fcntl.ioctl(fd, FS_IOC_GETFLAGS, flags, True)
            return bool(flags[0] & FS_IMMUTABLE_FL)
        finally:
            os.close(fd)

    def set_tree(self, root: Path, immutable: bool) -> None:
        """Every directory and file under ``root`` (and ``root``): children first when locking,
        so a locked directory never blocks the walk; parents first when unlocking."""
        entries = [root, *_walk(root)]
        for path in reversed(entries) if immutable else entries:
            self.set(path, immutable)


def _walk(root: Path) -> list[Path]:
    """Directories and regular files under ``root``: symlinks, devices (overlay whiteouts)
    and sockets carry no flags."""
    out = []
    for directory, dirs, files in os.walk(root):
        base = Path(directory)
        for name in sorted(dirs) + sorted(files):
            mode = os.lstat(base / name).st_mode
            if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
                out.append(base / name)
    return out


def unlock_layer_caches(root: Path) -> None:
    """Lift the flags Corral sets in every layer cache under ``root`` (data directories made
    by tests and benchmarks), so that they can be deleted."""
    for cache in root.glob("**/layers/*/opt/corral"):
        unlock_everything(cache)


def unlock_everything(root: Path) -> None:
    """Lift the flag from every entry under ``root`` that has it, so that it can be deleted."""
    attrs = Immutability()
    if not root.exists():
        return
    for path in [root, *_walk(root)]:
        try:
            if attrs.is_set(path):
                attrs.set(path, False)
        except OSError:
            continue  # device nodes, whiteouts: never immutable here
