"""The one module that runs GNU tar.

Corral writes tar with Python's ``tarfile`` (``layers.write_layer``, where every header must
be exactly what Corral decides), but extracts with GNU tar, which restores device nodes,
hard links, numeric owners and extended attributes as the kernel expects them. Two
extractions, both here: a layer into its overlayfs form (``layers.unpack_layer``) and an
``oci-archive:`` into a plain OCI layout (``images.import_oci``). What a failure means is the
caller's to say; this module only runs tar and reports what tar said.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

# Everything a layer carries: owners by number (the sandbox's, not this host's names),
# modes, ownership, every extended attribute; and a directory that exists already (the
# destination itself) keeps its own metadata.
_LAYER = (
    "--numeric-owner",
    "--same-permissions",
    "--same-owner",
    "--xattrs",
    "--xattrs-include=*",
    "--no-overwrite-dir",
)
# How GNU tar says it ran out of space (in English; ``ran_out_of_space`` also looks at the disk
# for the other locales).
_NO_SPACE = ("No space left on device", "Disk quota exceeded")


def extract(archive: str | Path, dest: Path, *, layer: bool = False) -> str | None:
    """Extract ``archive`` into the directory ``dest``: None once done, else tar's stderr.

    ``layer``: keep numeric owners, permissions and extended attributes exactly, as an OCI
    layer needs; otherwise tar's defaults (an archive of plain files and JSON).
    """
    argv = ["tar", "-x", "-f", str(archive), "-C", str(dest), *(_LAYER if layer else ())]
    proc = subprocess.run(argv, capture_output=True, text=True)
    return None if proc.returncode == 0 else proc.stderr.strip()


def ran_out_of_space(stderr: str, dest: Path) -> bool:
    """Whether a failed extraction into ``dest`` ran out of space (or quota)."""
    return any(s in stderr for s in _NO_SPACE) or _no_room(dest)


def _no_room(path: Path) -> bool:
    """Less than a MiB left for ``path``'s filesystem: what a write that failed there met."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize < 1 << 20
