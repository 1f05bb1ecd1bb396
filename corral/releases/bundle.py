"""A runner release as bytes: one deterministic tarball, named by its digest.

The tarball holds ``corral_runner/**`` (the package, without bytecode) and ``RELEASE.json``.
Entries are sorted, owned by root, with fixed modes and a fixed mtime, so the same source
always gives the same digest, and the fold-in layer built from it is shared by every
environment that takes the same upgrade.
"""

from __future__ import annotations

import ast
import io
import json
import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

from corral.errors import InvalidInput

PACKAGE = "corral_runner"
RELEASE_FILE = "RELEASE.json"
MTIME = 0  # every entry; bytecode caches keyed on mtime can never match a release by accident


@dataclass(frozen=True)
class Bundle:
    data: bytes
    version: str
    requires_python: tuple[int, int]


def build(source: Path, version: str | None = None) -> Bundle:
    """Bundle the runner package at ``source`` (a directory with ``__init__.py``)."""
    init = source / "__init__.py"
    if not init.is_file():
        raise InvalidInput(f"{source} is not a runner package: it has no __init__.py")
    declared = _constants(init)
    found_version = version or declared.get("__version__")
    if not isinstance(found_version, str) or not found_version:
        raise InvalidInput(f"{init} sets no __version__ string, and no --version was given")
    requires = declared.get("REQUIRES_PYTHON", (3, 8))
    if not (
        isinstance(requires, tuple)
        and len(requires) == 2
        and all(isinstance(x, int) for x in requires)
    ):
        raise InvalidInput(f"{init}: REQUIRES_PYTHON must be a (major, minor) tuple of ints")
    files = sorted(
        p
        for p in source.rglob("*")
        if "__pycache__" not in p.parts and p.suffix != ".pyc" and not p.is_symlink()
    )
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_dir(PACKAGE))
        for path in files:
            name = f"{PACKAGE}/{path.relative_to(source).as_posix()}"
            if path.is_dir():
                tar.addfile(_dir(name))
            elif stat.S_ISREG(path.stat().st_mode):
                _add_file(tar, name, path.read_bytes())
        meta = {"version": found_version, "requires_python": list(requires)}
        _add_file(tar, RELEASE_FILE, json.dumps(meta, sort_keys=True).encode())
    return Bundle(out.getvalue(), found_version, (requires[0], requires[1]))


def extract(data: bytes, dest: Path) -> None:
    """Unpack a release into ``dest`` (an empty directory the caller made), owned by root."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            if member.name.startswith("/") or ".." in member.name.split("/"):
                raise InvalidInput(f"release entry {member.name!r} escapes its directory")
            target = dest / member.name
            if member.isdir():
                target.mkdir(mode=0o755, exist_ok=True)
            elif member.isfile():
                source = tar.extractfile(member)
                assert source is not None
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                with os.fdopen(fd, "wb") as f:
                    f.write(source.read())
            os.chmod(target, member.mode, follow_symlinks=False)
            os.utime(target, (member.mtime, member.mtime), follow_symlinks=False)


def metadata(data: bytes) -> dict[str, object]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = tar.extractfile(RELEASE_FILE)
        assert member is not None
        loaded = json.loads(member.read())
    assert isinstance(loaded, dict)
    return loaded


def _constants(init: Path) -> dict[str, object]:
    """Top-level ``NAME = literal`` assignments of ``init``, read without importing it."""
    try:
        tree = ast.parse(init.read_bytes(), filename=str(init))
    except SyntaxError:
        return {}  # publishable: the sandbox's validation will refuse it, and say why
    out: dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name):
                try:
                    out[target.id] = ast.literal_eval(node.value)
                except ValueError:
                    continue
    return out


def _dir(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, MTIME
    return info


def _add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, MTIME
    tar.addfile(info, io.BytesIO(data))
