"""Environments: the user's verbs on frozen environments.

``create`` starts an environment from the base image or any OCI image; ``exec`` runs a command in
an edit session (a sandbox whose upper directory is the environment's *draft*, capped at the
draft limit (``drafts.py``), and whose network reaches package registries); ``freeze`` turns
the draft into one new OCI layer and snapshot;
``history`` and ``verify`` read them back; ``run`` boots the newest snapshot read-only with a
scratch layer of its own, as every agent run will.

The database says which snapshot is an environment's head; the OCI layout holds the bytes and
tags each head with the environment's name (and every snapshot as ``<name>+<seq>``) for outside
tools. A freeze writes blobs, then moves the head in one compare-and-swap transaction, then tags,
then clears the draft: a crash or a full disk at any step leaves the previous head intact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from corral.config import Settings
from corral.envs.drafts import Drafts, DraftUsage
from corral.errors import (
    Conflict,
    DiskFull,
    EnvironmentBusy,
    EnvironmentExists,
    EnvironmentNotFound,
    NothingToFreeze,
    out_of_space,
)
from corral.sandbox.runtime import NetworkMode, Runtime, SandboxRequest, SandboxResult, Stream
from corral.snapshots import temporaries
from corral.snapshots.fsattr import Immutability
from corral.snapshots.images import Image, Images
from corral.snapshots.layout import Layout
from corral.store import Environment, Snapshot, Store

BASE_SOURCE = "base:bookworm"


@dataclass(frozen=True)
class VerifyReport:
    environment: str
    snapshots: int
    blobs: tuple[tuple[str, int], ...]  # (digest, size), each checked once

    def to_dict(self) -> dict[str, object]:
        return {
            "environment": self.environment,
            "ok": True,
            "snapshots": self.snapshots,
            "blobs": [{"digest": d, "size": s} for d, s in self.blobs],
        }


@dataclass(frozen=True)
class EditResult(SandboxResult):
    """An edit session's result, and how full it left the draft."""

    draft: DraftUsage | None = None


class Environments:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        runtime: Callable[[], Runtime],
        *,
        attrs: Immutability | None = None,
    ) -> None:
        """``runtime`` returns the sandbox runtime, its host prepared (on first use: the
        wiring's choice); ``attrs`` is how the layer cache locks the runner tree, the
        runtime's ``immutability``."""
        self.settings = settings
        self.store = store
        self.layout = Layout(settings.oci_dir).init()
        temporaries.sweep(settings.data_dir)  # platform layers a killed process was building
        self.images = Images(self.layout, settings.data_dir / "layers", attrs)
        self.drafts = Drafts(settings.data_dir / "envs", settings.draft_limit_bytes)
        self._runtime = runtime

    # -- create ------------------------------------------------------------------------------

    def create(self, name: str, source: str | None = None) -> Environment:
        """A new environment whose first snapshot is the base image, or the image at ``source``."""
        with contextlib.suppress(EnvironmentNotFound):
            self.store.environments.get(name)  # validates the name, too
            raise EnvironmentExists(name)
        image = self._base() if source is None else self.images.import_oci(source)
        first = Snapshot(
            digest=image.digest,
            environment=name,
            seq=0,
            parent=None,
            layer=None,
            size=image.size,
            created_at=_now(),
            message=f"created from {source or BASE_SOURCE}",
        )
        env = self.store.environments.create(name, source or BASE_SOURCE, first)
        self._tag(name)
        self._reset_draft(name)
        return env

    def _base(self) -> Image:
        """The base image, imported once per build of the base tarball (keyed by size and mtime)."""
        tar = self.settings.base_image
        marker = self.settings.data_dir / "base.json"
        try:
            st = tar.stat()
            key = {"path": str(tar), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
            cached = json.loads(marker.read_text())
            if {k: cached.get(k) for k in key} == key and self.layout.has_blob(cached["digest"]):
                return self.images.load(cached["digest"])
        except (FileNotFoundError, ValueError, KeyError):
            pass
        image = self.images.import_rootfs(tar)  # no host path: the image is content only
        st = tar.stat()
        marker.write_text(
            json.dumps(
                {
                    "path": str(tar),
                    "size": st.st_size,
                    "mtime_ns": st.st_mtime_ns,
                    "digest": image.digest,
                }
            )
        )
        return image

    # -- edit sessions and freezing ----------------------------------------------------------

    def exec(
        self,
        name: str,
        argv: tuple[str, ...],
        *,
        stdin: Stream = None,
        stdout: Stream = None,
        stderr: Stream = None,
        timeout: float | None = None,
    ) -> EditResult:
        """Run ``argv`` in an edit session: the draft keeps what it changes, until freeze.
        The result says how full the draft is (a write past its limit fails in the sandbox)."""
        self.store.environments.get(name)  # an unknown name fails before any lock file is made
        with self._locked(name):
            image = self.images.load(self.store.environments.get(name).head)  # after a freeze
            draft = self._draft(name)
            request = SandboxRequest(
                layers=tuple(self.images.unpacked(image)),
                argv=argv,
                env=process_env(image),
                network=NetworkMode.EDIT,
                upper=draft / "upper",
                work=draft / "work",
                timeout=timeout,
                label=name,
            )
            result = self._runtime().run(request, stdin=stdin, stdout=stdout, stderr=stderr)
            fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
            return EditResult(**fields, draft=self.drafts.usage(name))

    def freeze(self, name: str, message: str | None = None) -> Snapshot:
        """Freeze the draft into a new snapshot on top of the head. NothingToFreeze if unchanged."""
        self.store.environments.get(name)
        with self._locked(name):
            env = self.store.environments.get(name)
            if not self.drafts.has_changes(name):  # no draft is made just to find it empty
                raise NothingToFreeze(name, env.head)
            upper = self._draft(name) / "upper"
            parent = self.images.load(env.head)
            # Not the environment's name: the same change to the same parent is the same image.
            image = self.images.commit(parent, upper, created_by="corral env freeze")
            self._try_unpack(image)
            snap = self.store.environments.add_snapshot(
                name,
                Snapshot(
                    digest=image.digest,
                    environment=name,
                    seq=0,
                    parent=parent.digest,
                    layer=image.layers[-1].digest,
                    size=image.size,
                    created_at=_now(),
                    message=message,
                ),
                expected_head=env.head,
            )
            self._tag(name)
            self._reset_draft(name)
            return snap

    def _try_unpack(self, image: Image) -> None:
        """Unpack the new layer now (cost proportional to it); a full disk defers it to boot."""
        try:
            self.images.unpacked(image)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
        except DiskFull:
            pass

    def commit_platform_layer(
        self, name: str, parent: str, build: Callable[[Path], None], message: str
    ) -> Snapshot | None:
        """A new head: ``parent`` plus one layer whose upper directory ``build`` writes.

        For Corral's own files (the runner's fold-in), never the user's: every user layer stays
        byte-identical. The head moves only if it is still ``parent``; if the user froze a new
        snapshot meanwhile, nothing is written and None is returned.
        """
        if self.store.environments.get(name).head != parent:
            return None
        base = self.images.load(parent)
        with (
            out_of_space(self.settings.data_dir),  # DiskFull: nothing is stored, head unmoved
            tempfile.TemporaryDirectory(
                dir=self.settings.data_dir, prefix=temporaries.prefix("platform")
            ) as tmp,
        ):
            upper = Path(tmp) / "upper"
            build(upper)
            image = self.images.commit(base, upper, created_by=f"corral: {message}")
        self._try_unpack(image)
        snapshot = Snapshot(
            digest=image.digest,
            environment=name,
            seq=0,
            parent=parent,
            layer=image.layers[-1].digest,
            size=image.size,
            created_at=_now(),
            message=message,
        )
        try:
            stored = self.store.environments.add_snapshot(name, snapshot, expected_head=parent)
        except Conflict:
            return None
        self._tag(name)
        return stored

    def discard(self, name: str) -> None:
        """Throw away the draft: the environment goes back to exactly its head snapshot."""
        self.store.environments.get(name)
        with self._locked(name):
            self._reset_draft(name)

    # -- reading -----------------------------------------------------------------------------

    def get(self, name: str) -> Environment:
        return self.store.environments.get(name)

    def all(self) -> list[Environment]:
        return self.store.environments.all()

    def history(self, name: str) -> list[Snapshot]:
        return self.store.environments.history(name)

    def has_draft(self, name: str) -> bool:
        return self.drafts.has_changes(name)

    def draft_usage(self, name: str) -> DraftUsage | None:
        """How full the environment's draft is; None if it has none."""
        return self.drafts.usage(name)

    def verify(self, name: str) -> VerifyReport:
        """Re-hash every blob of every snapshot in the history; CorruptBlob names a changed one."""
        history = self.store.environments.history(name)
        seen: dict[str, int] = {}
        for snap in history:
            image = self.images.load(snap.digest)
            for digest, size in self.images.verify(image):
                seen[digest] = size
        return VerifyReport(name, len(history), tuple(seen.items()))

    # -- running -----------------------------------------------------------------------------

    def run(
        self,
        name: str,
        argv: tuple[str, ...],
        *,
        digest: str | None = None,
        stdin: Stream = None,
        stdout: Stream = None,
        stderr: Stream = None,
        timeout: float | None = None,
    ) -> SandboxResult:
        """Boot the head snapshot (or ``digest`` of the history), run ``argv``; nothing stays."""
        env = self.store.environments.get(name)
        snap = self.store.environments.snapshot(name, digest) if digest is not None else None
        image = self.images.load(snap.digest if snap else env.head)
        request = SandboxRequest(
            layers=tuple(self.images.unpacked(image)),
            argv=argv,
            env=process_env(image),
            timeout=timeout,
            label=name,
        )
        return self._runtime().run(request, stdin=stdin, stdout=stdout, stderr=stderr)

    # -- helpers -----------------------------------------------------------------------------

    def delete(self, name: str) -> None:
        """Forget the environment and its draft; blobs stay (other environments may share them)."""
        history = self.store.environments.history(name)
        with self._locked(name):
            self.store.environments.delete(name)
            self.layout.untag(name)
            for snap in history:
                self.layout.untag(f"{name}+{snap.seq}")
            self.drafts.clear(name)  # unmounted before its directory goes
        shutil.rmtree(self._env_dir(name), ignore_errors=True)

    def _tag(self, name: str) -> None:
        """Make the layout's tags say what the database says: ``name`` is the head and
        ``name+<seq>`` each snapshot. Only what differs is written, in one rewrite of the
        index, so a tag a crash left behind (after the head moved, before the tags did) is
        put right by the next freeze or fold-in."""
        head = self.store.environments.get(name).head
        wanted = {f"{name}+{s.seq}": s.digest for s in self.store.environments.history(name)}
        wanted[name] = head
        current = self.layout.tags()
        stale = {
            tag: self.images.load(digest).manifest
            for tag, digest in wanted.items()
            if current.get(tag) != digest
        }
        if stale:
            self.layout.tag_many(stale)

    def _env_dir(self, name: str) -> Path:
        return self.settings.data_dir / "envs" / name

    def _draft(self, name: str) -> Path:
        return self.drafts.open(name)

    def _reset_draft(self, name: str) -> None:
        self.drafts.clear(name)  # the next edit session begins a fresh one

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        """One edit session or freeze at a time per environment, across processes."""
        path = self._env_dir(name)
        path.mkdir(parents=True, exist_ok=True)
        with open(path / "lock", "a+b") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise EnvironmentBusy(name) from None
            yield


def process_env(image: Image) -> tuple[tuple[str, str], ...]:
    """The image's Env, with the home and user every sandbox process runs as."""
    pairs = dict(
        entry.split("=", 1)
        for entry in (image.config.get("config") or {}).get("Env") or []
        if "=" in entry
    )
    pairs.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    pairs.update({"HOME": "/home/user", "USER": "user", "LANG": pairs.get("LANG", "C.UTF-8")})
    return tuple(pairs.items())


def _now() -> datetime:
    return datetime.now(UTC)
