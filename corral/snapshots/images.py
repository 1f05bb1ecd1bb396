"""Images: snapshots as OCI manifests, and the layer cache that boots them.

A snapshot *is* an OCI image manifest; its digest is the snapshot's name. ``Images`` imports
images (a base rootfs tar, an ``oci:`` layout or an ``oci-archive:``), commits an edit session's
upper directory as one new layer on top of a parent, unpacks layers for overlayfs (once per layer,
shared by every environment that has it) and re-hashes every blob on demand.

An image Corral writes depends on its content and lineage only, never on when or where it was
written: equal content gets an equal digest, on any host. Every time in a config is
``EPOCH`` (as with ``SOURCE_DATE_EPOCH=0`` in reproducible builds); when a snapshot was taken
is the store's business (``snapshots.created_at``, ``corral env history``). History entries
name the Corral step that made a layer, never a host path or an environment's name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.errors import (
    ImageNotFound,
    ImportFailed,
    InvalidInput,
    RequirementMissing,
    SnapshotError,
    SnapshotNotFound,
    out_of_space,
)
from corral.snapshots import digests, temporaries
from corral.snapshots.fsattr import Immutability, unlock_everything
from corral.snapshots.layers import unpack_layer, write_layer
from corral.snapshots.layout import (
    LAYER_TYPES,
    MEDIA_CONFIG,
    MEDIA_LAYER,
    MEDIA_MANIFEST,
    Descriptor,
    Layout,
)
from corral.snapshots.tar import extract

# Platform-owned trees: immutable in the layer cache, so that overlayfs refuses every change
# to them in every sandbox (lifting the flag needs CAP_LINUX_IMMUTABLE; no sandbox has it).
PROTECTED = ("opt/corral",)
DEFAULT_PATH = "/home/user/.local/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
EPOCH = "1970-01-01T00:00:00Z"  # every time an image config records (see above)


@dataclass(frozen=True)
class Image:
    manifest: Descriptor
    config: dict[str, Any]
    config_descriptor: Descriptor
    layers: tuple[Descriptor, ...]

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def size(self) -> int:
        """Bytes of all layers: what booting this snapshot reads."""
        return sum(layer.size for layer in self.layers)


class Images:
    def __init__(self, layout: Layout, cache: Path, attrs: Immutability | None = None) -> None:
        self.layout = layout
        self.cache = cache
        # How the runner tree is locked in the cache (the sandbox runtime's choice: a test
        # runtime that isolates nothing locks nothing).
        self.attrs = attrs or Immutability()
        temporaries.sweep(cache)  # unpacks and imports a killed process left half done

    # -- reading -----------------------------------------------------------------------------

    def load(self, digest: str) -> Image:
        manifest = self.layout.read_json(digests.check(digest))
        try:
            if manifest.get("mediaType", MEDIA_MANIFEST) != MEDIA_MANIFEST:
                raise SnapshotError(f"{digest} is a {manifest.get('mediaType')}, not an image")
            config_desc = Descriptor.from_json(manifest["config"])
            layers = tuple(Descriptor.from_json(raw) for raw in manifest["layers"])
        except (KeyError, TypeError) as exc:
            raise SnapshotError(f"manifest {digest} is malformed: missing {exc}") from exc
        for layer in layers:
            if layer.media_type not in LAYER_TYPES:
                raise SnapshotError(f"layer {layer.digest} has unsupported type {layer.media_type}")
        size = len(self.layout.read_blob(digest))
        return Image(
            manifest=Descriptor(MEDIA_MANIFEST, digest, size),
            config=self.layout.read_json(config_desc.digest),
            config_descriptor=config_desc,
            layers=layers,
        )

    def verify(self, image: Image) -> list[tuple[str, int]]:
        """Re-hash the manifest, config and every layer; CorruptBlob names the first bad blob."""
        checked = []
        for desc in (image.manifest, image.config_descriptor, *image.layers):
            checked.append((desc.digest, self.layout.verify_blob(desc.digest)))
        return checked

    # -- writing -----------------------------------------------------------------------------

    def import_rootfs(self, tar: Path, created_by: str = "corral: base image") -> Image:
        """A plain rootfs tarball as a one-layer image (how the base image enters the store).
        The same tarball, wherever it lies, gives the same image."""
        if not tar.is_file():
            raise RequirementMissing(
                f"the base image {tar}",
                "build it with scripts/build-base-image.sh (`make demo` does)",
            )
        layer = self.layout.put_file(tar, MEDIA_LAYER)
        config = {
            "created": EPOCH,
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "User": "1000:1000",
                "WorkingDir": "/home/user",
                "Env": [f"PATH={DEFAULT_PATH}", "HOME=/home/user", "LANG=C.UTF-8"],
            },
            "rootfs": {"type": "layers", "diff_ids": [layer.digest]},
            "history": [{"created": EPOCH, "created_by": created_by}],
        }
        return self._write_image(config, [layer])

    def import_oci(self, source: str) -> Image:
        """Import ``oci:PATH[:TAG]`` or ``oci-archive:PATH[:TAG]``; every blob is re-hashed."""
        kind, _, rest = source.partition(":")
        if kind not in ("oci", "oci-archive") or not rest:
            raise InvalidInput(
                f"--from {source!r}: expected oci:PATH[:TAG] or oci-archive:PATH[:TAG]"
            )
        path, _, tag = rest.partition(":")
        if not Path(path).exists():
            raise ImageNotFound(path)
        with contextlib.ExitStack() as stack:
            root = Path(path)
            if kind == "oci-archive":
                tmp = Path(
                    stack.enter_context(
                        tempfile.TemporaryDirectory(
                            prefix=temporaries.prefix("import"), dir=self.cache
                        )
                    )
                )
                failed = extract(path, tmp)
                if failed is not None:
                    raise ImportFailed(f"cannot read OCI archive {path}: {failed}")
                root = tmp
            if not (root / "index.json").is_file():
                raise ImportFailed(f"{path} is not an OCI image layout (no index.json)")
            return self._copy_from(Layout(root), tag, source)

    def commit(self, parent: Image, upper: Path, created_by: str) -> Image:
        """A new image: ``parent`` plus the tar diff of ``upper`` as one new top layer."""
        layer = self.layout.put_stream(lambda out: write_layer(upper, out), MEDIA_LAYER)
        config = dict(parent.config)
        rootfs = dict(config.get("rootfs") or {"type": "layers", "diff_ids": []})
        rootfs["diff_ids"] = [*rootfs.get("diff_ids", []), layer.digest]
        config["rootfs"] = rootfs
        config["created"] = EPOCH
        config["history"] = [
            *config.get("history", []),
            {"created": EPOCH, "created_by": created_by},
        ]
        return self._write_image(config, [*parent.layers, layer])

    def _write_image(self, config: dict[str, Any], layers: list[Descriptor]) -> Image:
        config_desc = self.layout.put_json(config, MEDIA_CONFIG)
        manifest = {
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": config_desc.to_json(),
            "layers": [layer.to_json() for layer in layers],
        }
        desc = self.layout.put_json(manifest, MEDIA_MANIFEST)
        return Image(desc, config, config_desc, tuple(layers))

    def _copy_from(self, src: Layout, tag: str, source: str) -> Image:
        desc = self._pick_manifest(src, tag, source)
        manifest = src.read_json(desc.digest)
        if manifest.get("mediaType", MEDIA_MANIFEST) == "application/vnd.oci.image.index.v1+json":
            desc = _pick_platform(manifest, source)
            manifest = src.read_json(desc.digest)
        try:
            config_desc = Descriptor.from_json(manifest["config"])
            layers = [Descriptor.from_json(raw) for raw in manifest["layers"]]
        except (KeyError, TypeError) as exc:
            raise ImportFailed(f"{source}: manifest {desc.digest} is malformed ({exc})") from exc
        for layer in layers:
            if layer.media_type not in LAYER_TYPES:
                raise ImportFailed(f"{source}: layer type {layer.media_type} is not supported")
        # Manifest last: once it is in, every blob it names is already here and verified.
        for blob in [*layers, config_desc, desc]:
            if not src.blob_path(blob.digest).is_file():
                raise ImportFailed(f"{source}: blob {blob.digest} is missing from the image")
            copied = self.layout.put_file(src.blob_path(blob.digest), blob.media_type)
            if copied.digest != blob.digest:
                raise ImportFailed(
                    f"{source}: blob {blob.digest} hashes to {copied.digest}; refusing it"
                )
        return self.load(desc.digest)

    @staticmethod
    def _pick_manifest(src: Layout, tag: str, source: str) -> Descriptor:
        if tag:
            try:
                return src.resolve(tag)
            except SnapshotNotFound:
                raise ImportFailed(f"{source}: no image tagged {tag!r}") from None
        manifests = src.index()["manifests"]
        if len(manifests) != 1:
            raise ImportFailed(
                f"{source}: the layout holds {len(manifests)} images; name one with :TAG"
            )
        return Descriptor.from_json(manifests[0])

    # -- the unpacked layer cache ------------------------------------------------------------

    def unpacked(self, image: Image) -> list[Path]:
        """Unpacked directories of ``image``'s layers, topmost first, unpacking any missing."""
        return [self._unpack(layer) for layer in reversed(image.layers)]

    def _unpack(self, layer: Descriptor) -> Path:
        dest = self.cache / digests.hex_of(layer.digest)
        if dest.is_dir():
            return dest
        self.cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=temporaries.prefix("unpack"), dir=self.cache))
        try:
            with out_of_space(self.cache):
                os.chmod(tmp, 0o755)
                unpack_layer(self.layout.blob_path(layer.digest), tmp)
                for tree in PROTECTED:
                    if (tmp / tree).is_dir() and not (tmp / tree).is_symlink():
                        self.attrs.set_tree(tmp / tree, True)
                try:
                    os.rename(tmp, dest)
                except OSError:
                    if not dest.is_dir():  # anything but "another process unpacked it first"
                        raise
        finally:
            if tmp.exists():
                unlock_everything(tmp)
                shutil.rmtree(tmp, ignore_errors=True)
        return dest


def _pick_platform(index: dict[str, Any], source: str) -> Descriptor:
    for raw in index.get("manifests", []):
        platform = raw.get("platform") or {}
        if platform.get("os") == "linux" and platform.get("architecture") == "amd64":
            return Descriptor.from_json(raw)
    raise ImportFailed(f"{source}: no linux/amd64 image in its index")
