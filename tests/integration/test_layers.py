"""The layer codec: overlayfs upper directories to OCI tar diffs and back (needs root: mknod)."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from corral.snapshots import digests
from corral.snapshots.layers import OVERLAY_OPAQUE, unpack_layer, write_layer
from tests.conftest import require

pytestmark = pytest.mark.root


@pytest.fixture
def upper(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        require("root", "overlay whiteouts are character devices and trusted.* xattrs")
    u = tmp_path / "upper"
    (u / "home/user").mkdir(parents=True)
    (u / "home/user/plot.py").write_text("print(42)\n")
    os.chown(u / "home/user/plot.py", 1000, 1000)
    os.chmod(u / "home/user/plot.py", 0o640)
    os.link(u / "home/user/plot.py", u / "home/user/plot-link.py")
    os.symlink("plot.py", u / "home/user/latest.py")
    (u / "etc").mkdir()
    os.mknod(u / "etc/motd", 0o600 | stat.S_IFCHR, os.makedev(0, 0))  # deleted
    (u / "opt/app").mkdir(parents=True)
    os.setxattr(u / "opt/app", OVERLAY_OPAQUE, b"y")  # replaced wholesale
    (u / "opt/app/new.txt").write_text("new\n")
    os.setxattr(u / "home/user/plot.py", "user.origin", b"\xff\x00binary")
    return u


def _layer(upper: Path) -> bytes:
    out = io.BytesIO()
    write_layer(upper, out)
    return out.getvalue()


def test_whiteouts_and_metadata_become_oci_entries(upper: Path) -> None:
    with tarfile.open(fileobj=io.BytesIO(_layer(upper))) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert "etc/.wh.motd" in members and members["etc/.wh.motd"].isreg()
    assert "etc/motd" not in members
    assert "opt/app/.wh..wh..opq" in members
    # Hard links: the first name in walk order carries the bytes, the other points at it.
    first, second = members["home/user/plot-link.py"], members["home/user/plot.py"]
    assert (first.uid, first.gid, first.mode, first.size) == (1000, 1000, 0o640, 10)
    assert first.pax_headers["SCHILY.xattr.user.origin"].encode("utf-8", "surrogateescape") == (
        b"\xff\x00binary"
    )
    assert second.islnk() and second.linkname == "home/user/plot-link.py"
    assert members["home/user/latest.py"].issym()
    assert not any("trusted.overlay" in k for m in members.values() for k in m.pax_headers)
    names = [m for m in members]
    assert names.index("home") < names.index("home/user") < names.index("home/user/plot.py")


def test_same_upper_same_digest(upper: Path) -> None:
    assert digests.of_bytes(_layer(upper)) == digests.of_bytes(_layer(upper))


def test_unpack_restores_overlay_form(upper: Path, tmp_path: Path) -> None:
    blob = tmp_path / "layer.tar"
    blob.write_bytes(_layer(upper))
    dest = tmp_path / "unpacked"
    dest.mkdir()
    unpack_layer(blob, dest)
    motd = os.lstat(dest / "etc/motd")
    assert stat.S_ISCHR(motd.st_mode) and motd.st_rdev == 0
    assert os.getxattr(dest / "opt/app", OVERLAY_OPAQUE) == b"y"
    assert not (dest / "opt/app/.wh..wh..opq").exists()
    assert (dest / "home/user/plot.py").read_text() == "print(42)\n"
    st = os.stat(dest / "home/user/plot.py")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1000, 0o640)
    assert st.st_ino == os.stat(dest / "home/user/plot-link.py").st_ino
    # Round trip: the unpacked form writes back to the same bytes.
    assert digests.of_bytes(_layer(dest)) == digests.of_bytes(blob.read_bytes())
