"""The runner hot swap: a new runner into a booted sandbox, without touching anything else.

Each step reports itself through ``step(name, **details)`` (they become run events), and any
failure raises; the caller then kills the sandbox and boots a fresh one. Nothing here runs
an agent, so a half-upgraded runner can never run one.

1. **stage**: unpack the release into a fresh directory under the sandbox's ``/tmp``;
2. **validate**: the sandbox's own interpreter (the bootstrap) compiles every file and imports
   the package from there; a syntax error or too old a Python ends here (RunnerInvalid);
3. **swap**: lift the immutable flag on ``/opt/corral`` and its ``releases/`` (overlayfs copies
   them up into this sandbox's scratch layer; the shared layers keep their flag), move the
   staged directory to ``releases/<id>`` with one rename, and repoint the ``runner`` symlink
   with another (the atomic moment);
4. **purge**: delete any bytecode under the new release (a stale copy of ``releases/<id>`` in
   the snapshot could carry ``.pyc`` files whose recorded size and mtime match the new
   sources: every release has mtime 0);
5. **lock**: set the immutable flag again on the release, ``releases/`` and ``/opt/corral``.

The host works on the sandbox's root through its own mount, as root, so every path it
touches is checked with ``lstat`` first: a snapshot cannot steer these writes through a
symlink onto the host.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Callable
from pathlib import Path

from corral.errors import RunnerInvalid, SwapFailed
from corral.releases import bundle
from corral.sandbox.runtime import Sandbox
from corral.snapshots.fsattr import Immutability
from corral.store import Release

STAGE_PARENT = "tmp"
CORRAL_HOME = "opt/corral"
_RELEASE_ID = re.compile(r"^[0-9a-f]{16}$")
VALIDATE_TIMEOUT_S = 30.0

Step = Callable[..., None]


def installed(rootfs: Path) -> tuple[str | None, list[str]]:
    """The live release id in a sandbox's root (None if none), and every release dir there."""
    home = rootfs / CORRAL_HOME
    link = home / "runner"
    live = None
    if link.is_symlink():
        target = os.readlink(link)
        name = target.removeprefix("releases/")
        if target.startswith("releases/") and _RELEASE_ID.match(name):
            live = name
    releases = home / "releases"
    present = []
    if _is_real_dir(releases):
        present = sorted(p.name for p in releases.iterdir() if _RELEASE_ID.match(p.name))
    return live, present


def swap(
    sandbox: Sandbox,
    release: Release,
    data: bytes,
    requires: tuple[int, int],
    step: Step,
    attrs: Immutability,
) -> None:
    rootfs = sandbox.rootfs
    began = time.perf_counter()

    # 1. stage
    tmp = rootfs / STAGE_PARENT
    _require_real_dir(tmp, "/tmp")
    stage = tmp / f".corral-stage-{secrets.token_hex(6)}"
    stage.mkdir(mode=0o755)
    bundle.extract(data, stage)
    step("staged", path=f"/{STAGE_PARENT}/{stage.name}", release=release.short_id)

    # 2. validate, with the sandbox's own interpreter
    sandbox.send(
        {
            "op": "validate",
            "path": sandbox.inside(f"/{STAGE_PARENT}/{stage.name}"),
            "package": bundle.PACKAGE,
            "requires": list(requires),
        }
    )
    reply, _ = sandbox.expect(
        ("boot.validated", "boot.invalid"), time.monotonic() + VALIDATE_TIMEOUT_S
    )
    if reply["type"] == "boot.invalid":
        raise RunnerInvalid(
            f"runner {release.version} ({release.short_id}) does not work in this environment: "
            f"{reply.get('error')}"
        )
    step("validated", python=".".join(str(v) for v in reply.get("python", [])))

    # 3. swap
    home = rootfs / CORRAL_HOME
    for parent in (rootfs / "opt", home):
        if not os.path.lexists(parent):
            parent.mkdir(mode=0o755)
        _require_real_dir(parent, "/" + str(parent.relative_to(rootfs)))
    releases = home / "releases"
    attrs.set(home, False)
    if not os.path.lexists(releases):
        releases.mkdir(mode=0o755)
    _require_real_dir(releases, "/opt/corral/releases")
    attrs.set(releases, False)
    target = releases / release.short_id
    if os.path.lexists(target):  # a stale copy in the snapshot: replace it wholesale
        _require_real_dir(target, f"/opt/corral/releases/{release.short_id}")
        attrs.set_tree(target, False)
        shutil.rmtree(target)
    os.rename(stage, target)
    link = home / "runner"
    if os.path.lexists(link) and not link.is_symlink():
        raise SwapFailed("/opt/corral/runner in this snapshot is not a symlink; cannot swap")
    pending = home / f".runner-{secrets.token_hex(6)}"
    os.symlink(f"releases/{release.short_id}", pending)
    os.rename(pending, link)
    step("swapped", release=release.short_id, version=release.version)

    # 4. purge stale bytecode
    removed = 0
    for path in sorted(target.rglob("*"), reverse=True):
        if path.name == "__pycache__" and path.is_dir() and not path.is_symlink():
            removed += sum(1 for _ in path.rglob("*"))
            shutil.rmtree(path)
        elif path.suffix in (".pyc", ".pyo") and path.is_file():
            path.unlink()
            removed += 1
    step("purged", removed=removed)

    # 5. lock
    attrs.set_tree(target, True)
    attrs.set(releases, True)
    attrs.set(home, True)
    step("locked", seconds=round(time.perf_counter() - began, 6))


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _require_real_dir(path: Path, shown: str) -> None:
    if not _is_real_dir(path):
        raise SwapFailed(f"{shown} in this snapshot is not a directory; refusing to swap there")
