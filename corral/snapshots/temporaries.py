"""Working directories on the data disk that a killed process must not leave there forever.

Unpacking a layer (``.unpack-*`` in the layer cache) and building a runner fold-in
(``.platform-*`` in the data directory) each work in a directory of their own and are done
with it in seconds; a process killed meanwhile leaves it behind, possibly holding immutable
files. So the process holds an ``flock`` on its directory for as long as it works there, and
``sweep`` removes exactly the directories nobody holds: their owner died. Making and locking a
directory, and sweeping, both happen under the parent's own lock file, so a sweeper never
meets a live directory that is not yet locked. (An age limit instead would remove a slow live
one, or wait needlessly on a dead one.)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from corral.snapshots.fsattr import unlock_everything


@contextlib.contextmanager
def working_dir(parent: Path, prefix: str) -> Iterator[Path]:
    """A fresh directory ``<parent>/<prefix><random>``, held for the block, then removed
    (whatever is left of it: the block may have renamed it away)."""
    parent.mkdir(parents=True, exist_ok=True)
    with _parent_lock(parent, prefix):
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        held = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(held, fcntl.LOCK_EX)
    try:
        yield path
    finally:
        if path.exists():
            unlock_everything(path)
            shutil.rmtree(path, ignore_errors=True)
        os.close(held)


def sweep(parent: Path, prefix: str) -> int:
    """Remove the ``prefix`` directories under ``parent`` whose owner died; how many."""
    if not parent.is_dir():
        return 0
    removed = 0
    with _parent_lock(parent, prefix):
        for path in parent.glob(f"{prefix}*"):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            except OSError:  # gone meanwhile, or not a directory: not ours to sweep
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its owner is alive
            finally:
                os.close(fd)
            unlock_everything(path)
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed


@contextlib.contextmanager
def _parent_lock(parent: Path, prefix: str) -> Iterator[None]:
    with open(parent / f"{prefix.rstrip('-')}.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
