"""Drafts: each environment's unfrozen edits, on a filesystem of its own capped at a limit.

An edit session writes into its environment's draft, the upper directory of its overlay. On
the data disk itself, one user's ``pip install`` (or ``dd``) could fill the disk that every
environment's freeze, and every run's boot, needs. So each draft lives on an ext4 filesystem
of its own, in a sparse image file ``<data>/envs/<name>/draft.img`` loop-mounted at
``<data>/envs/<name>/draft`` (``upper/`` and ``work/`` inside):

* a write past the limit fails inside the sandbox, as it is made, with ENOSPC; the data disk
  holds at most the limit for the draft, and no other environment's draft is touched;
* the image is sparse and mounted with ``discard``: it takes on the data disk what the draft
  holds, and what the draft deletes is given back;
* the image is made (``mkfs.ext4``) at the draft's first use, mounted by whichever Corral
  process needs it first and left mounted (mounts are machine-wide); a freeze, a discard or
  ``rm`` unmounts and deletes it. Its size is ``CORRAL_DRAFT_LIMIT_MB`` when it was made: a new
  limit applies to drafts begun after it is set.

A per-draft lock file serialises mounting across processes (two mounts of one image would
corrupt it). A draft left as a plain directory by an older Corral is copied onto its image at
its next use, or refused with ``DraftFull`` if it is larger than the limit.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from corral.errors import DiskFull, DraftFull, RequirementMissing, SnapshotError
from corral.snapshots import overlay
from corral.snapshots.layers import is_empty

FULL_BELOW = 1 << 20  # free bytes under which a draft reads as full (or 1% of it, if more)
_NO_SPACE = "No space left on device"


@dataclass(frozen=True)
class DraftUsage:
    """How much of its limit an environment's draft holds."""

    environment: str
    used_bytes: int
    limit_bytes: int
    full: bool

    @property
    def notice(self) -> str | None:
        """What to tell the user of a full draft; None while it has room."""
        if not self.full:
            return None
        name = self.environment
        return (
            f"the draft of environment {name!r} is full: it holds {_mb(self.used_bytes)} of "
            f"its {_mb(self.limit_bytes)} limit (CORRAL_DRAFT_LIMIT_MB), and writes past it "
            f"fail with '{_NO_SPACE}'. Freeze it (corral env freeze {name}), delete files in "
            f"it, or discard it (corral env discard {name})"
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "used_bytes": self.used_bytes,
            "limit_bytes": self.limit_bytes,
            "full": self.full,
            "notice": self.notice,
        }


class Drafts:
    def __init__(self, root: Path, limit_bytes: int) -> None:
        self.root = root  # <data>/envs: one directory per environment
        self.limit_bytes = limit_bytes

    def open(self, name: str) -> Path:
        """The draft's mounted directory, with ``upper`` and ``work`` in it; made if missing."""
        mount, image = self._mount(name), self._image(name)
        with self._mount_lock(name):
            if not os.path.ismount(mount):
                if not image.exists():
                    self._make(name)
                # A plain directory here is an older draft, already copied onto the image.
                shutil.rmtree(mount, ignore_errors=True)
                mount.mkdir()
                overlay.mount_image(image, mount)
            for sub in ("upper", "work"):
                (mount / sub).mkdir(exist_ok=True)
        return mount

    def usage(self, name: str) -> DraftUsage | None:
        """How full the draft is; None if the environment has no draft yet."""
        if not self._image(name).exists():
            return None
        st = os.statvfs(self.open(name))
        size, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        full = free < max(FULL_BELOW, size // 100) or (st.f_files > 0 and st.f_favail == 0)
        limit = self._image(name).stat().st_size
        return DraftUsage(name, (st.f_blocks - st.f_bfree) * st.f_frsize, limit, full)

    def has_changes(self, name: str) -> bool:
        if self._image(name).exists():
            return not is_empty(self.open(name) / "upper")
        legacy = self._mount(name) / "upper"
        return legacy.is_dir() and not is_empty(legacy)

    def clear(self, name: str) -> None:
        """Throw the draft away: unmount it, delete its image. Works however full it is."""
        mount = self._mount(name)
        with self._mount_lock(name):
            if os.path.ismount(mount):
                overlay.unmount(mount)  # detached at once; released when its last user goes
            for path in (self._image(name), self._staging_image(name)):
                path.unlink(missing_ok=True)
            shutil.rmtree(mount, ignore_errors=True)

    # -- making one ------------------------------------------------------------------------

    def _make(self, name: str) -> None:
        """A fresh image, carrying an older plain-directory draft over if there is one."""
        staging = self._staging_image(name)
        self._mkfs(staging)
        legacy = self._mount(name) / "upper"
        try:
            if legacy.is_dir() and not is_empty(legacy):
                self._adopt(name, legacy, staging)
        except BaseException:
            staging.unlink(missing_ok=True)
            raise
        os.replace(staging, self._image(name))  # from here on the image is the draft

    def _mkfs(self, image: Path) -> None:
        image.unlink(missing_ok=True)
        with open(image, "wb") as f:
            f.truncate(self.limit_bytes)  # sparse: nothing is allocated yet
        argv = [
            "mkfs.ext4",
            "-q",
            "-F",
            "-m",
            "0",
            "-L",
            "corral-draft",
            "-E",
            "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
            str(image),
        ]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        except FileNotFoundError:
            image.unlink(missing_ok=True)
            raise RequirementMissing(
                "mkfs.ext4", "drafts are ext4 images: apt-get install e2fsprogs"
            ) from None
        if done.returncode != 0:
            image.unlink(missing_ok=True)
            if _NO_SPACE in done.stderr:
                raise DiskFull(str(image))
            raise SnapshotError(f"mkfs.ext4 {image} failed: {done.stderr.strip()}")

    def _adopt(self, name: str, legacy: Path, staging: Path) -> None:
        """Copy an older draft (whiteouts, opaque markers, owners and all) onto ``staging``."""
        target = self._env(name) / "draft.adopting"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        overlay.mount_image(staging, target)
        try:
            (target / "upper").mkdir()
            done = subprocess.run(
                ["cp", "-a", f"{legacy}/.", str(target / "upper")],
                capture_output=True,
                text=True,
                check=False,
            )
        finally:
            overlay.unmount(target)
            target.rmdir()
        if done.returncode == 0:
            return
        if _NO_SPACE in done.stderr:
            raise DraftFull(
                name,
                self.limit_bytes,
                "its edits from before drafts had a limit do not fit: raise the limit to keep "
                f"them, or discard them (corral env discard {name})",
            )
        raise SnapshotError(f"copying the draft of {name!r} failed: {done.stderr.strip()}")

    # -- paths and locks -------------------------------------------------------------------

    def _env(self, name: str) -> Path:
        return self.root / name

    def _mount(self, name: str) -> Path:
        return self._env(name) / "draft"

    def _image(self, name: str) -> Path:
        return self._env(name) / "draft.img"

    def _staging_image(self, name: str) -> Path:
        return self._env(name) / "draft.img.new"

    @contextlib.contextmanager
    def _mount_lock(self, name: str) -> Iterator[None]:
        """Mounting and unmounting a draft, one process at a time (a short, blocking wait)."""
        self._env(name).mkdir(parents=True, exist_ok=True)
        with open(self._env(name) / "draft.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield


def _mb(size: int) -> str:
    return f"{size / (1 << 20):.1f} MB"
