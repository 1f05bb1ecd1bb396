"""Snapshots are content only: the same content gives the same digest on any host, at any time.

Nothing of the host belongs in a snapshot: not the path the base image was imported from, not
the time of a freeze, not the environment's name.
"""

from __future__ import annotations

import io
import json
import secrets
import shutil
import tarfile
from pathlib import Path

import pytest

from corral.config import Settings
from corral.context import Corral
from corral.snapshots.images import EPOCH
from tests.integration.conftest import run


def rootfs_tar(path: Path) -> Path:
    path.parent.mkdir(parents=True)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("etc/hostname", b"sandbox\n"), ("bin/true", b"#!/bin/sh\n")):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 1_600_000_000, 0o755
            tar.addfile(info, io.BytesIO(data))
    return path


def image_json(corral: Corral, digest: str) -> tuple[bytes, bytes]:
    """The manifest's and the config's bytes."""
    manifest = corral.envs.layout.read_blob(digest)
    config = json.loads(manifest)["config"]["digest"]
    return manifest, corral.envs.layout.read_blob(config)


def test_the_same_base_imported_on_two_hosts_is_the_same_snapshot(tmp_path: Path) -> None:
    first_tar = rootfs_tar(tmp_path / "host-a" / "var" / "cache" / "base.tar")
    second_tar = tmp_path / "host-b" / "opt" / "images" / "rootfs.tar"
    second_tar.parent.mkdir(parents=True)
    shutil.copy(first_tar, second_tar)
    heads = []
    for host, tar in (("host-a", first_tar), ("host-b", second_tar)):
        settings = Settings.from_env(
            {"CORRAL_DATA_DIR": str(tmp_path / host / "corral"), "CORRAL_BASE_IMAGE": str(tar)}
        )
        corral = Corral(settings)
        try:
            heads.append(corral.envs.create("analyst").head)
            manifest, config = image_json(corral, heads[-1])
        finally:
            corral.close()
        assert json.loads(config)["created"] == EPOCH
        for blob in (manifest, config):
            assert str(tmp_path).encode() not in blob and b"/var/cache" not in blob
            assert tar.name.encode() not in blob
    assert heads[0] == heads[1]


@pytest.mark.root
@pytest.mark.runc
def test_the_same_change_frozen_in_two_environments_is_the_same_snapshot(
    corral: Corral,
) -> None:
    names = [f"t-{secrets.token_hex(4)}" for _ in range(2)]
    digests, created = [], []
    try:
        for name in names:
            created.append(corral.envs.create(name).name)
            code, _, err = run(
                corral,
                name,
                "sh",
                "-c",
                "echo same > /home/user/f && touch -d @1000000000 /home/user/f /home/user",
                edit=True,
            )
            assert code == 0, err
            digests.append(corral.envs.freeze(name, message=f"in {name}").digest)
    finally:
        for name in created:
            corral.envs.delete(name)
    assert digests[0] == digests[1]
    manifest, config = image_json(corral, digests[0])
    history = json.loads(config)["history"]
    assert [h["created"] for h in history] == [EPOCH] * len(history)
    for blob in (manifest, config):
        assert str(corral.settings.data_dir).encode() not in blob
        assert not any(name.encode() in blob for name in names)
