"""Master keys: CORRAL_MASTER_KEY, the key file, and the masked ``Secret`` that carries them."""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import os
import pickle
import stat
from pathlib import Path

import pytest

from corral.config import Secret, Settings
from corral.errors import ConfigError, MasterKeyError
from corral.vault.keys import MasterKeyRing, MasterKeys, key_id, new_key


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def settings(tmp_path: Path, **env: str) -> Settings:
    return Settings.from_env({"CORRAL_DATA_DIR": str(tmp_path / "data"), **env})


def file_keys(tmp_path: Path) -> MasterKeys:
    return MasterKeys(None, tmp_path / "vault" / "master.keys")


def test_key_id_is_the_sha256_prefix() -> None:
    key = bytes(range(32))
    assert key_id(key) == "630dcd2966c43366"  # sha256(00 01 .. 1f)[:16]
    assert len(key_id(new_key())) == 16


def test_secret_is_masked_everywhere_but_reveal() -> None:
    s = Secret("hunter2-the-password")
    for shown in (repr(s), str(s), f"{s}", f"{s!r}", format(s), str([s]), repr({"k": s})):
        assert "hunter2" not in shown
        assert "**********" in shown
    assert s.reveal() == "hunter2-the-password"
    assert s == Secret("hunter2-the-password") and s != Secret("other")
    assert copy.deepcopy(s) is s
    with pytest.raises(TypeError):
        pickle.dumps(s)


def test_settings_repr_masks_the_master_key(tmp_path: Path) -> None:
    raw = b64(new_key())
    s = settings(tmp_path, CORRAL_MASTER_KEY=raw)
    assert isinstance(s.master_key, Secret) and s.master_key.reveal() == raw
    for shown in (repr(s), str(s), repr(dataclasses.asdict(s))):
        assert raw not in shown and raw[:12] not in shown
    assert settings(tmp_path).master_key is None


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("not base64 at all!", "not base64"),
        (b64(b"short"), "decodes to 5 bytes"),
        (b64(new_key()) + "," + b64(b"x" * 31), "key 2 of 2"),
        (b64(new_key()) + ",", "key 2 of 2"),
        ("  ", "empty"),
    ],
)
def test_malformed_master_key_fails_at_start_up(tmp_path: Path, value: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings(tmp_path, CORRAL_MASTER_KEY=value)
    assert "CORRAL_MASTER_KEY" in caught.value.detail and problem in caught.value.detail
    for part in value.split(","):
        if part.strip():
            assert part.strip() not in caught.value.detail  # never the key, even a bad one


def test_env_keys_first_is_primary_rest_kept(tmp_path: Path) -> None:
    new, old = new_key(), new_key()
    keys = MasterKeys(Secret(f"{b64(new)}, {b64(old)}"), tmp_path / "unused")
    ring = keys.ring()
    assert ring.primary == key_id(new) and ring.primary_key == new
    assert ring.get(key_id(old)) == old
    assert ring.key_ids == (key_id(new), key_id(old))
    assert keys.source == "CORRAL_MASTER_KEY" and keys.from_env
    assert not (tmp_path / "unused").exists()  # the env source never writes a file


def test_env_source_rotation_needs_the_new_key_first(tmp_path: Path) -> None:
    first = new_key()
    keys = MasterKeys(Secret(b64(first)), tmp_path / "unused")
    assert keys.promote(None).primary == key_id(first)
    assert keys.promote(first).primary == key_id(first)
    with pytest.raises(MasterKeyError, match="must already be first"):
        keys.promote(new_key())
    with pytest.raises(MasterKeyError, match="remove key"):
        keys.remove(key_id(first))


def test_key_file_is_created_0600_in_a_0700_directory(tmp_path: Path) -> None:
    keys = file_keys(tmp_path)
    old_umask = os.umask(0o022)
    try:
        ring = keys.ring()
    finally:
        os.umask(old_umask)
    path = tmp_path / "vault" / "master.keys"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    doc = json.loads(path.read_text())
    assert doc["primary"] == ring.primary and set(doc["keys"]) == {ring.primary}
    assert base64.b64decode(doc["keys"][ring.primary]) == ring.primary_key
    assert file_keys(tmp_path).ring().primary == ring.primary  # the same key next time
    assert keys.source == str(path) and not keys.from_env


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_key_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    file_keys(tmp_path).ring()
    path = tmp_path / "vault" / "master.keys"
    path.chmod(mode)
    with pytest.raises(MasterKeyError) as caught:
        file_keys(tmp_path).ring()
    assert str(path) in caught.value.detail
    assert f"chmod 600 {path}" in caught.value.detail
    assert f"{mode:04o}" in caught.value.detail


def test_key_file_symlink_is_refused(tmp_path: Path) -> None:
    real = file_keys(tmp_path / "real")
    real.ring()
    link = tmp_path / "vault" / "master.keys"
    link.parent.mkdir(mode=0o700)
    link.symlink_to(real.path)
    with pytest.raises(MasterKeyError, match="symlink"):
        file_keys(tmp_path).ring()


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("nonsense", "not JSON"),
        ('{"primary": "x"}', '"keys"'),
        ('{"primary": "abc", "keys": {"abc": "!!"}}', "not base64"),
        ('{"primary": "abc", "keys": {"abc": "' + b64(bytes(32)) + '"}}', "with that id"),
        ('{"primary": "nope", "keys": {}}', "'primary'"),
    ],
)
def test_malformed_key_file_names_the_file(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "vault" / "master.keys"
    path.parent.mkdir(mode=0o700)
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(MasterKeyError) as caught:
        file_keys(tmp_path).ring()
    assert str(path) in caught.value.detail and problem in caught.value.detail


def test_promote_and_remove_in_the_key_file(tmp_path: Path) -> None:
    keys = file_keys(tmp_path)
    old = keys.ring().primary
    given = new_key()
    ring = keys.promote(given)
    assert ring.primary == key_id(given) and set(ring.keys) == {old, key_id(given)}
    assert stat.S_IMODE(keys.path.stat().st_mode) == 0o600
    generated = keys.promote(None)
    assert generated.primary not in (old, key_id(given)) and len(generated.keys) == 3
    with pytest.raises(MasterKeyError, match="primary"):
        keys.remove(generated.primary)
    assert keys.remove(old).key_ids == (generated.primary, key_id(given))
    with pytest.raises(MasterKeyError, match="holds no key"):
        keys.remove(old)
    assert not list(keys.path.parent.glob("*.tmp"))


def test_a_rotation_by_another_process_is_seen(tmp_path: Path) -> None:
    server, cli = file_keys(tmp_path), file_keys(tmp_path)
    before = server.ring()
    after = cli.promote(None)
    assert server.ring().primary == after.primary != before.primary


def test_ring_repr_hides_keys() -> None:
    key = new_key()
    ring = MasterKeyRing.of([key], "test")
    assert b64(key) not in repr(ring) and repr(key) not in repr(ring)
    with pytest.raises(MasterKeyError):
        MasterKeyRing(primary="0" * 16, keys={key_id(key): key}, source="test")
    with pytest.raises(MasterKeyError):
        MasterKeyRing(primary="0" * 16, keys={"0" * 16: key}, source="test")
