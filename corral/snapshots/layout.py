"""An OCI image layout on disk: ``oci-layout``, ``index.json`` and ``blobs/sha256/``.

The only module that writes blobs. A blob is written to a temporary file in the blob directory,
fsynced, and renamed onto its digest, so a reader sees either no blob or the whole blob; a blob
that exists is never rewritten. ``index.json`` names manifests with the standard
``org.opencontainers.image.ref.name`` annotation, so ``skopeo inspect oci:<layout>:<tag>`` reads
any snapshot. Running out of space abandons the write and raises DiskFull: nothing already stored
is touched. Temporaries are named after their writer (``temporaries``): opening the layout
removes those of writers that died mid-write.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from corral.errors import BlobMissing, CorruptBlob, DiskFull, SnapshotError, SnapshotNotFound
from corral.snapshots import digests, temporaries

REF_NAME = "org.opencontainers.image.ref.name"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_TYPES = {
    MEDIA_LAYER,
    MEDIA_LAYER_GZIP,
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
}


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Descriptor:
        try:
            return cls(
                media_type=str(raw["mediaType"]),
                digest=digests.check(str(raw["digest"])),
                size=int(raw["size"]),
                annotations=tuple(sorted((raw.get("annotations") or {}).items())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SnapshotError(f"malformed OCI descriptor {raw!r}: {exc}") from exc


class Layout:
    """One OCI image layout directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"

    # -- setup -------------------------------------------------------------------------------

    def init(self) -> Layout:
        self.blobs.mkdir(parents=True, exist_ok=True)
        for directory in (self.blobs, self.root):
            temporaries.sweep(directory)  # a writer killed mid-write left these
        marker = self.root / "oci-layout"
        if not marker.exists():
            _atomic_write(marker, json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        if not (self.root / "index.json").exists():
            self._write_index({"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": []})
        return self

    # -- blobs -------------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return self.blobs / digests.hex_of(digest)

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).exists()

    def read_blob(self, digest: str) -> bytes:
        try:
            return self.blob_path(digest).read_bytes()
        except FileNotFoundError:
            raise BlobMissing(digest, str(self.blobs)) from None

    def put_bytes(self, data: bytes, media_type: str) -> Descriptor:
        digest = digests.of_bytes(data)
        if not self.has_blob(digest):
            self._write_blob(lambda f: f.write(data), expect=digest)
        return Descriptor(media_type, digest, len(data))

    def put_json(self, obj: dict[str, Any], media_type: str) -> Descriptor:
        return self.put_bytes(canonical_json(obj), media_type)

    def put_stream(self, produce: Callable[[BinaryIO], object], media_type: str) -> Descriptor:
        """Write a blob whose bytes ``produce`` writes to the file object it is given."""
        digest, size = self._write_blob(produce, expect=None)
        return Descriptor(media_type, digest, size)

    def put_file(self, path: Path, media_type: str) -> Descriptor:
        """Copy ``path`` in as a blob, hashing while copying (one read of the source)."""

        def copy(out: BinaryIO) -> None:
            with open(path, "rb") as src:
                while chunk := src.read(digests.CHUNK):
                    out.write(chunk)

        return self.put_stream(copy, media_type)

    def verify_blob(self, digest: str) -> int:
        """Re-hash one blob; CorruptBlob if its bytes changed. Returns its size."""
        path = self.blob_path(digest)
        try:
            with open(path, "rb") as f:
                actual, size = digests.of_stream(f)
        except FileNotFoundError:
            raise BlobMissing(digest, str(self.blobs)) from None
        if actual != digest:
            raise CorruptBlob(digest, actual, str(path))
        return size

    def _write_blob(
        self, produce: Callable[[BinaryIO], object], expect: str | None
    ) -> tuple[str, int]:
        fd, tmp = tempfile.mkstemp(prefix=temporaries.prefix("tmp"), dir=self.blobs)
        try:
            with os.fdopen(fd, "wb") as raw:
                writer = digests.HashingWriter(raw)
                produce(writer)  # type: ignore[arg-type]
                raw.flush()
                os.fsync(raw.fileno())
            digest = writer.digest
            if expect is not None and digest != expect:
                raise SnapshotError(f"blob written as {expect} hashed to {digest}")
            final = self.blob_path(digest)
            if final.exists():
                os.unlink(tmp)  # identical bytes are stored once
            else:
                os.chmod(tmp, 0o444)
                os.rename(tmp, final)
                _fsync_dir(self.blobs)
            return digest, writer.size
        except OSError as exc:
            _unlink_quietly(tmp)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(str(self.blobs)) from exc
            raise
        except BaseException:
            _unlink_quietly(tmp)
            raise

    # -- manifests, configs and the index ----------------------------------------------------

    def read_json(self, digest: str) -> dict[str, Any]:
        try:
            obj = json.loads(self.read_blob(digest))
        except json.JSONDecodeError as exc:
            raise SnapshotError(f"blob {digest} is not JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise SnapshotError(f"blob {digest} is not a JSON object")
        return obj

    def index(self) -> dict[str, Any]:
        try:
            obj = json.loads((self.root / "index.json").read_bytes())
        except FileNotFoundError:
            raise SnapshotError(f"{self.root} is not an OCI image layout (no index.json)") from None
        except json.JSONDecodeError as exc:
            raise SnapshotError(f"{self.root}/index.json is not JSON: {exc}") from exc
        if not isinstance(obj, dict) or not isinstance(obj.get("manifests"), list):
            raise SnapshotError(f"{self.root}/index.json has no manifests list")
        return obj

    def resolve(self, tag: str) -> Descriptor:
        """The manifest descriptor tagged ``tag``; SnapshotNotFound if none."""
        for raw in self.index()["manifests"]:
            if (raw.get("annotations") or {}).get(REF_NAME) == tag:
                return Descriptor.from_json(raw)
        raise SnapshotNotFound(tag, str(self.root))

    def tag(self, tag: str, manifest: Descriptor) -> None:
        """Point ``tag`` at ``manifest`` (one atomic rewrite of index.json under a lock)."""
        self.tag_many({tag: manifest})

    def tags(self) -> dict[str, str]:
        """Every tag and the digest of the manifest it points at."""
        return {
            m["annotations"][REF_NAME]: m.get("digest", "")
            for m in self.index()["manifests"]
            if REF_NAME in (m.get("annotations") or {})
        }

    def tag_many(self, tags: dict[str, Descriptor]) -> None:
        """Point each tag at its manifest, in one atomic rewrite of index.json under a lock."""
        with self._index_lock():
            index = self.index()
            kept = [
                m
                for m in index["manifests"]
                if (m.get("annotations") or {}).get(REF_NAME) not in tags
            ]
            for tag, manifest in tags.items():
                entry = manifest.to_json()
                entry["annotations"] = {**entry.get("annotations", {}), REF_NAME: tag}
                kept.append(entry)
            index["manifests"] = kept
            self._write_index(index)

    def untag(self, tag: str) -> None:
        with self._index_lock():
            index = self.index()
            index["manifests"] = [
                m for m in index["manifests"] if (m.get("annotations") or {}).get(REF_NAME) != tag
            ]
            self._write_index(index)

    @contextlib.contextmanager
    def _index_lock(self) -> Iterator[None]:
        with open(self.root / ".index.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _write_index(self, index: dict[str, Any]) -> None:
        try:
            _atomic_write(self.root / "index.json", json.dumps(index, indent=2).encode())
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(str(self.root / "index.json")) from exc
            raise


def canonical_json(obj: dict[str, Any]) -> bytes:
    """The one serialisation of a manifest or config, so equal content gets an equal digest."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=temporaries.prefix("tmp"), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
