"""Publishing runner releases, and the two shapes a release takes in a snapshot.

A release's tarball is stored as a blob in the OCI layout (content-addressed, verified on
read) and recorded in the store; the most recently published or activated release is
*current*. Corral ships one release, its own ``corral/runner`` package, published on first
use. Inside a sandbox a release lives at ``/opt/corral/releases/<id>/`` and
``/opt/corral/runner`` is a symlink to the live one (see docs/design/runner-hot-swap.md).
"""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime
from pathlib import Path

import corral.runner
from corral.errors import ReleaseNotFound
from corral.releases import bundle
from corral.snapshots import digests
from corral.snapshots.layout import Layout
from corral.store import Release, Store

MEDIA_TYPE = "application/vnd.corral.runner.release.v1.tar"
BUNDLED = Path(corral.runner.__file__).parent
RUNNER_LINK = "opt/corral/runner"
RELEASES_DIR = "opt/corral/releases"


class ReleaseService:
    def __init__(self, store: Store, layout: Layout) -> None:
        self.store = store
        self.layout = layout
        self._bundled_known = False

    def publish(self, source: Path, version: str | None = None, origin: str = "") -> Release:
        """Bundle the runner package at ``source``, store it, and make it current."""
        made = bundle.build(source, version)
        blob = self.layout.put_bytes(made.data, MEDIA_TYPE)
        now = datetime.now(UTC)
        return self.store.releases.publish(
            Release(
                digest=blob.digest,
                version=made.version,
                requires_python=f"{made.requires_python[0]}.{made.requires_python[1]}",
                source=origin or str(source),
                published_at=now,
                activated_at=now,
            )
        )

    def current(self) -> Release:
        """The current release. The first time a Corral version meets a store, the release
        bundled with it is published (so upgrading Corral ships its runner); after that,
        whatever was published or activated last wins, rollbacks included."""
        if not self._bundled_known:
            made = bundle.build(BUNDLED)
            try:
                self.store.releases.get(digests.of_bytes(made.data))
            except ReleaseNotFound:
                self.publish(BUNDLED, origin=f"bundled with corral {corral.__version__}")
            self._bundled_known = True
        release = self.store.releases.current()
        assert release is not None  # the bundled one, at least
        return release

    def activate(self, ref: str) -> Release:
        """Make an earlier release current again (a rollback is just another activation)."""
        return self.store.releases.activate(ref, datetime.now(UTC))

    def all(self) -> list[Release]:
        return self.store.releases.all()

    def data(self, release: Release) -> bytes:
        data = self.layout.read_blob(release.digest)
        if digests.of_bytes(data) != release.digest:
            self.layout.verify_blob(release.digest)  # raises CorruptBlob naming the file
        return data

    @staticmethod
    def requires(release: Release) -> tuple[int, int]:
        major, minor = release.requires_python.split(".")
        return int(major), int(minor)

    def fold_in_tree(self, release: Release, replaced: list[str], dest: Path) -> None:
        """The upper directory of a fold-in layer: the release, the link to it, and whiteouts
        for every other release the snapshot held. It depends only on its arguments, so the
        same upgrade yields the same layer (and blob) in every environment."""
        releases = dest / RELEASES_DIR
        releases.mkdir(parents=True, mode=0o755)
        home = releases / release.short_id
        home.mkdir(mode=0o755)
        bundle.extract(self.data(release), home)
        for old in replaced:
            if old != release.short_id:
                os.mknod(releases / old, 0o600 | stat.S_IFCHR, os.makedev(0, 0))
        os.symlink(f"releases/{release.short_id}", dest / RUNNER_LINK)
        for directory in (home, releases, dest / "opt/corral", dest / "opt", dest):
            os.chmod(directory, 0o755)
            os.utime(directory, (bundle.MTIME, bundle.MTIME))
        os.utime(dest / RUNNER_LINK, (bundle.MTIME, bundle.MTIME), follow_symlinks=False)
