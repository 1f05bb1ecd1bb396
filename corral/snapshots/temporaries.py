"""Temporary files and directories that name the process writing them, and their sweeper.

Everything Corral writes into its data directory is first written under a temporary name and
renamed into place (blobs, ``index.json``, unpacked layers, platform layers). A process killed
mid-write leaves its temporary behind; nothing renames or removes it later. So every such
temporary is named ``.<kind>-<pid>-<start>-<random>``, after its writer (the pid and the
process's start time, ``corral.processes.Owner``: a recycled pid is not mistaken for the
writer), and ``sweep`` removes the ones whose writer is dead. Opening a layout or the layer
cache sweeps it, so a killed freeze leaves nothing behind past the next command.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time
from pathlib import Path

from corral.processes import Owner
from corral.snapshots.fsattr import unlock_everything

log = logging.getLogger("corral.snapshots")

_NAME = re.compile(r"\.(?P<kind>[a-z]+)-(?P<pid>\d+)-(?P<start>\d+)-[^/]+")
# Temporaries of Corral versions that did not name their writer: removed once surely stale.
_UNOWNED = re.compile(r"\.(tmp|unpack)-[^/]+")
_UNOWNED_AGE_S = 6 * 3600


def prefix(kind: str) -> str:
    """The name prefix of a temporary of ``kind`` written by this process (for ``mkstemp``)."""
    me = Owner.me()
    return f".{kind}-{me.pid}-{me.start}-"


def sweep(directory: Path) -> int:
    """Remove the temporaries in ``directory`` whose writer is dead. Returns how many."""
    removed = 0
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        return 0
    for entry in entries:
        named = _NAME.fullmatch(entry.name)
        if named is not None:
            if Owner(int(named["pid"]), int(named["start"])).alive():
                continue  # being written right now
        elif _UNOWNED.fullmatch(entry.name) is None or not _older_than(entry, _UNOWNED_AGE_S):
            continue
        _remove(entry)
        removed += 1
    if removed:
        log.info("removed %d temporaries of dead writers from %s", removed, directory)
    return removed


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.lstat().st_mtime > seconds
    except FileNotFoundError:
        return False


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            unlock_everything(path)  # an unpacked layer's platform trees are immutable
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
