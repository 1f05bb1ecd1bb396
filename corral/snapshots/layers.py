"""Layers: the tar diff of an edit session, and its unpacked form for overlayfs.

Two translations between overlayfs and the OCI layer format, one in each direction:

========================  =====================================  ===========================
change                    overlayfs upper / lower directory      OCI layer tar
========================  =====================================  ===========================
file deleted              character device 0:0 named ``name``    empty file ``.wh.name``
directory replaced        xattr ``trusted.overlay.opaque=y``     empty file ``.wh..wh..opq``
========================  =====================================  ===========================

``write_layer`` walks an upper directory in sorted order and writes a PAX tar with numeric
owners, modes, mtimes, hard links and xattrs (``trusted.overlay.*`` is overlayfs bookkeeping and
stays out). Its cost is proportional to the size of the change, never to the environment.
``unpack_layer`` extracts a layer (plain or gzip) with GNU tar (``tar.py``) and turns OCI
whiteouts back into overlayfs whiteouts, so the directory can serve as a read-only lower layer.
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from corral.errors import DiskFull, SnapshotError, out_of_space
from corral.snapshots.tar import extract, ran_out_of_space

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OVERLAY_OPAQUE = "trusted.overlay.opaque"
_SKIP_XATTR_PREFIXES = ("trusted.overlay.",)


def is_empty(upper: Path) -> bool:
    """True when an upper directory records no change at all."""
    with os.scandir(upper) as it:
        return next(it, None) is None


def write_layer(upper: Path, out: BinaryIO) -> None:
    """Write the OCI tar diff of the overlayfs upper directory ``upper`` to ``out``."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        links: dict[tuple[int, int], str] = {}
        for rel, st in _walk(upper):
            path = upper / rel
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                tar.addfile(_whiteout(rel, st))
                continue
            if stat.S_ISSOCK(st.st_mode):
                continue  # sockets are runtime state, not environment
            info = _info(path, rel, st)
            if info.isreg() and st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                if key in links:
                    info.type, info.linkname, info.size = tarfile.LNKTYPE, links[key], 0
                    tar.addfile(info)
                    continue
                links[key] = rel
            if info.isreg():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
            if info.isdir() and _getxattr(path, OVERLAY_OPAQUE) == b"y":
                marker = tarfile.TarInfo(f"{rel}/{OPAQUE_MARKER}")
                marker.mtime = int(st.st_mtime)
                tar.addfile(marker)


def unpack_layer(blob: Path, dest: Path) -> None:
    """Extract the layer ``blob`` into the empty directory ``dest`` in overlayfs form."""
    failed = extract(blob, dest, layer=True)
    if failed is not None:
        if ran_out_of_space(failed, dest):
            raise DiskFull(str(dest))
        raise SnapshotError(f"could not unpack layer {blob.name}: {failed}")
    with out_of_space(dest):
        _overlay_whiteouts(dest)


def _overlay_whiteouts(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            if not name.startswith(WHITEOUT_PREFIX):
                continue
            marker = os.path.join(dirpath, name)
            os.unlink(marker)
            if name == OPAQUE_MARKER:
                os.setxattr(dirpath, OVERLAY_OPAQUE, b"y")
            else:
                target = os.path.join(dirpath, name[len(WHITEOUT_PREFIX) :])
                if os.path.lexists(target):
                    raise SnapshotError(f"layer has both {target} and its whiteout")
                os.mknod(target, 0o600 | stat.S_IFCHR, os.makedev(0, 0))
        dirnames.sort()


def _walk(root: Path, rel: str = "") -> Iterator[tuple[str, os.stat_result]]:
    """Every entry under ``root``, depth first, parents before children, siblings sorted."""
    with os.scandir(root / rel if rel else root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        child = f"{rel}/{entry.name}" if rel else entry.name
        st = entry.stat(follow_symlinks=False)
        yield child, st
        if stat.S_ISDIR(st.st_mode):
            yield from _walk(root, child)


def _whiteout(rel: str, st: os.stat_result) -> tarfile.TarInfo:
    parent, _, name = rel.rpartition("/")
    info = tarfile.TarInfo(
        f"{parent}/{WHITEOUT_PREFIX}{name}" if parent else WHITEOUT_PREFIX + name
    )
    info.mtime = int(st.st_mtime)
    return info


def _info(path: Path, rel: str, st: os.stat_result) -> tarfile.TarInfo:
    info = tarfile.TarInfo(rel)
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.uname = info.gname = ""
    info.mtime = int(st.st_mtime)
    if stat.S_ISREG(st.st_mode):
        info.type, info.size = tarfile.REGTYPE, st.st_size
    elif stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(st.st_mode):
        info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
    elif stat.S_ISFIFO(st.st_mode):
        info.type = tarfile.FIFOTYPE
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        info.type = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    xattrs = _xattrs(path)
    if xattrs:
        info.pax_headers = {
            f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in xattrs.items()
        }
    return info


def _xattrs(path: Path) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for name in sorted(names):
        if name.startswith(_SKIP_XATTR_PREFIXES):
            continue
        value = _getxattr(path, name)
        if value is not None:
            out[name] = value
    return out


def _getxattr(path: Path, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None
