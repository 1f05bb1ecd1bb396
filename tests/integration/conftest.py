"""Fixtures for tests that boot real sandboxes: root, runc, overlayfs, netns, nftables.

Lifecycle, as in Firecracker's uvm fixtures: ``corral`` (a Corral on a private data directory,
shared by the session; its first environment imports the base image once) -> ``env`` (a fresh
environment from the base image) -> ``frozen_env`` (``env`` with a file and a package frozen in).
A failing test keeps its data directory (``tmp_path_factory`` keeps the last three runs).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.config import Settings
from corral.context import Corral
from corral.errors import RequirementMissing
from tests.conftest import require


def need_sandboxes() -> None:
    if os.geteuid() != 0:
        require("root", "sandboxes mount overlays and create network namespaces")
    if shutil.which("runc") is None:
        require("runc", "apt-get install runc (scripts/install-deps.sh)")


@pytest.fixture(scope="session")
def corral(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Corral]:
    need_sandboxes()
    data = tmp_path_factory.mktemp("corral-data")
    port = os.environ.get("CORRAL_BRIDGE_PORT") or str(8800 + secrets.randbelow(80))
    settings = Settings.from_env(
        {**os.environ, "CORRAL_DATA_DIR": str(data), "CORRAL_BRIDGE_PORT": port}
    )
    if not settings.base_image.is_file():
        require("runc", f"the base image {settings.base_image}: run scripts/build-base-image.sh")
    c = Corral(settings)
    try:
        c.sandboxes()
    except RequirementMissing as exc:
        require("runc", exc.detail)
    yield c
    c.close()


@pytest.fixture
def env(corral: Corral) -> Iterator[str]:
    name = f"t-{secrets.token_hex(4)}"
    corral.envs.create(name)
    yield name
    corral.envs.delete(name)


def run(
    corral: Corral, name: str, *argv: str, edit: bool = False, timeout: float = 60
) -> tuple[int, str, str]:
    """Run ``argv`` in a sandbox (an edit session with ``edit``); (exit code, stdout, stderr)."""
    start = corral.envs.exec if edit else corral.envs.run
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"corral-test-{secrets.token_hex(4)}"
    with open(f"{out}.out", "w+b") as o, open(f"{out}.err", "w+b") as e:
        try:
            result = start(
                name, tuple(argv), stdin=subprocess.DEVNULL, stdout=o, stderr=e, timeout=timeout
            )
            o.seek(0)
            e.seek(0)
            return result.exit_code, o.read().decode(), e.read().decode()
        finally:
            os.unlink(f"{out}.out")
            os.unlink(f"{out}.err")
