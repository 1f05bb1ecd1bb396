"""Inode flags: the only module that sets or lifts the immutable flag (``chattr +i``).

The runner's tree in a snapshot is immutable twice over: in the shared layer cache (lower
layers, where overlayfs honours the flag for every sandbox at no cost per boot), and again in
a sandbox's scratch layer after a hot swap. Lifting the flag needs CAP_LINUX_IMMUTABLE, which
the host has and no sandbox process does.

``Immutability`` is a class so that tests can hand the swap a failing one.
"""

from __future__ import annotations

import array
import fcntl
import os
from pathlib import Path

FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x00000010


class Immutability:
    def set(self, path: Path, immutable: bool) -> None:
        """Set or lift the immutable flag on one file or directory (never a symlink)."""
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            flags = array.array("l", [0])
            fcntl.ioctl(fd, FS_IOC_GETFLAGS, flags, True)
            want = flags[0] | FS_IMMUTABLE_FL if immutable else flags[0] & ~FS_IMMUTABLE_FL
            if want != flags[0]:
                fcntl.ioctl(fd, FS_IOC_SETFLAGS, array.array("l", [want]), True)
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
    out = []
    for directory, dirs, files in os.walk(root):
        base = Path(directory)
        out += [base / d for d in sorted(dirs) if not (base / d).is_symlink()]
        out += [base / f for f in sorted(files) if not (base / f).is_symlink()]
    return out


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
