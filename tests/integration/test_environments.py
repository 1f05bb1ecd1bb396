"""Frozen environments end to end, on real runc and overlayfs: what a user can rely on."""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import subprocess
import zipfile
from pathlib import Path

import pytest

from corral.context import Corral
from corral.errors import (
    CommandNotFound,
    CorruptBlob,
    EnvironmentBusy,
    EnvironmentExists,
    EnvironmentNotFound,
    ImportFailed,
    InvalidInput,
    NothingToFreeze,
    SnapshotNotFound,
)
from corral.snapshots import digests
from tests.integration.conftest import run

pytestmark = [pytest.mark.root, pytest.mark.runc]


def _wheel(tmp_path: Path) -> Path:
    """A real wheel of a tiny package (PEP 427 layout, RECORD with hashes), built offline."""
    files = {
        "corralprobe/__init__.py": b"VALUE = 7\n",
        "corralprobe-1.0.dist-info/METADATA": (
            b"Metadata-Version: 2.1\nName: corralprobe\nVersion: 1.0\n"
        ),
        "corralprobe-1.0.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: corral-tests\n"
            b"Root-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = [
        f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}"
        for name, data in files.items()
    ]
    record.append("corralprobe-1.0.dist-info/RECORD,,")
    files["corralprobe-1.0.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = tmp_path / "corralprobe-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return wheel


def test_run_sees_frozen_files_and_packages(corral: Corral, env: str, tmp_path: Path) -> None:
    wheel = _wheel(tmp_path)
    with open(wheel, "rb") as f:
        result = corral.envs.exec(
            env,
            ("sh", "-c", f"cat > /tmp/{wheel.name} && pip install -q --no-index /tmp/{wheel.name}"),
            stdin=f,
            stdout=subprocess.DEVNULL,
        )
    assert result.exit_code == 0
    assert run(corral, env, "sh", "-c", "echo 'print(42)' > /home/user/plot.py", edit=True)[0] == 0
    snap = corral.envs.freeze(env, "matplotlib stand-in")
    assert snap.seq == 2 and snap.parent is not None

    code, out, err = run(
        corral,
        env,
        "python3",
        "-c",
        "import corralprobe, runpy; print(corralprobe.VALUE); runpy.run_path('/home/user/plot.py')",
    )
    assert (code, out) == (0, "7\n42\n"), err


def test_a_runs_writes_are_gone_in_the_next(corral: Corral, env: str) -> None:
    code, _, err = run(corral, env, "sh", "-c", "echo scratch > /home/user/left.txt")
    assert code == 0, err
    code, out, _ = run(corral, env, "sh", "-c", "cat /home/user/left.txt || echo absent")
    assert out.strip().endswith("absent")
    assert not corral.envs.has_draft(env)  # a run never touches the edit draft


def test_snapshot_bytes_never_change_across_boots(corral: Corral, env: str) -> None:
    run(corral, env, "sh", "-c", "echo v1 > /home/user/a.txt", edit=True)
    corral.envs.freeze(env)
    head = corral.envs.get(env).head
    image = corral.envs.images.load(head)
    before = {
        d: corral.envs.layout.blob_path(d).read_bytes() for d, _ in corral.envs.images.verify(image)
    }
    for _ in range(3):
        run(corral, env, "sh", "-c", "rm -f /home/user/a.txt; echo x > /etc/hostname; true")
        assert run(corral, env, "cat", "/home/user/a.txt")[1] == "v1\n"
    assert corral.envs.get(env).head == head
    after = {d: corral.envs.layout.blob_path(d).read_bytes() for d in before}
    assert after == before
    assert all(digests.of_bytes(b) == d for d, b in after.items())


def test_deletions_and_replaced_directories_survive_freeze(corral: Corral, env: str) -> None:
    assert run(corral, env, "test", "-e", "/etc/debian_version")[0] == 0
    # As uid 1000 the user cannot touch root's files: edit sessions run as the user, too.
    code, _, err = run(corral, env, "sh", "-c", "rm /etc/debian_version", edit=True)
    assert code != 0 and "Permission denied" in err
    run(
        corral,
        env,
        "sh",
        "-c",
        "mkdir -p /home/user/d && touch /home/user/d/old /home/user/gone",
        edit=True,
    )
    corral.envs.freeze(env)
    run(
        corral,
        env,
        "sh",
        "-c",
        "rm /home/user/gone && rm -rf /home/user/d && mkdir /home/user/d && touch /home/user/d/new",
        edit=True,
    )
    corral.envs.freeze(env)
    code, out, err = run(
        corral, env, "sh", "-c", "ls /home/user/d; test -e /home/user/gone || echo gone"
    )
    assert (code, out.split()) == (0, ["new", "gone"]), err


def test_history_is_newest_first_and_tags_are_readable_by_skopeo(corral: Corral, env: str) -> None:
    run(corral, env, "touch", "/home/user/one", edit=True)
    s2 = corral.envs.freeze(env)
    run(corral, env, "touch", "/home/user/two", edit=True)
    s3 = corral.envs.freeze(env)
    history = corral.envs.history(env)
    assert [s.seq for s in history] == [3, 2, 1]
    assert [s.digest for s in history[:2]] == [s3.digest, s2.digest]
    assert history[0].parent == s2.digest
    layout = corral.settings.oci_dir
    for ref, digest in ((env, s3.digest), (f"{env}+2", s2.digest)):
        proc = subprocess.run(
            ["skopeo", "inspect", f"oci:{layout}:{ref}"], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        assert f'"Digest": "{digest}"' in proc.stdout


def _skopeo_export(corral: Corral, env: str, archive: Path, *flags: str) -> None:
    subprocess.run(
        [
            "skopeo",
            "copy",
            "-q",
            *flags,
            f"oci:{corral.settings.oci_dir}:{env}",
            f"oci-archive:{archive}:exported",
        ],
        check=True,
    )


def test_oci_archive_round_trip_stores_identical_blobs_once(
    corral: Corral, env: str, tmp_path: Path
) -> None:
    run(corral, env, "touch", "/home/user/exported", edit=True)
    head = corral.envs.freeze(env).digest
    archive = tmp_path / "export.tar"
    _skopeo_export(
        corral, env, archive, "--preserve-digests", "--dest-oci-accept-uncompressed-layers"
    )
    blobs = set(os.listdir(corral.settings.oci_dir / "blobs/sha256"))
    copy = f"t-{secrets.token_hex(4)}"
    created = corral.envs.create(copy, f"oci-archive:{archive}:exported")
    try:
        assert created.head == head  # the same bytes have the same digest...
        assert set(os.listdir(corral.settings.oci_dir / "blobs/sha256")) == blobs  # ...stored once
        assert run(corral, copy, "test", "-e", "/home/user/exported")[0] == 0
    finally:
        corral.envs.delete(copy)
    with pytest.raises(ImportFailed, match="no image tagged 'nope'"):
        corral.envs.create(f"t-{secrets.token_hex(4)}", f"oci-archive:{archive}:nope")
    with pytest.raises(InvalidInput, match="expected oci:PATH"):
        corral.envs.create(f"t-{secrets.token_hex(4)}", "docker://debian")


def test_foreign_image_with_gzip_layers_boots(corral: Corral, env: str, tmp_path: Path) -> None:
    run(corral, env, "sh", "-c", "echo from-gzip > /home/user/marker", edit=True)
    corral.envs.freeze(env)
    layout = tmp_path / "layout"
    subprocess.run(
        ["skopeo", "copy", "-q", f"oci:{corral.settings.oci_dir}:{env}", f"oci:{layout}:v1"],
        check=True,
    )  # skopeo gzips the layers
    copy = f"t-{secrets.token_hex(4)}"
    created = corral.envs.create(copy, f"oci:{layout}:v1")
    try:
        image = corral.envs.images.load(created.head)
        assert {d.media_type for d in image.layers} == {
            "application/vnd.oci.image.layer.v1.tar+gzip"
        }
        assert run(corral, copy, "cat", "/home/user/marker")[:2] == (0, "from-gzip\n")
    finally:
        corral.envs.delete(copy)


def test_verify_names_a_changed_byte(corral: Corral, env: str) -> None:
    run(corral, env, "sh", "-c", "echo precious > /home/user/data", edit=True)
    snap = corral.envs.freeze(env)
    assert corral.envs.verify(env).snapshots == 2
    blob = corral.envs.layout.blob_path(snap.layer or "")
    original = blob.read_bytes()
    os.chmod(blob, 0o644)
    try:
        flipped = bytearray(original)
        flipped[len(flipped) // 2] ^= 0x01
        blob.write_bytes(bytes(flipped))
        with pytest.raises(CorruptBlob) as caught:
            corral.envs.verify(env)
        assert caught.value.digest == snap.layer and str(blob) in str(caught.value)
    finally:
        blob.write_bytes(original)
        os.chmod(blob, 0o444)
    assert corral.envs.verify(env).snapshots == 2


def test_bad_input_is_named_and_loses_nothing(corral: Corral, env: str) -> None:
    head = corral.envs.get(env).head
    with pytest.raises(EnvironmentNotFound, match="no environment named 'missing'"):
        run(corral, "missing", "true")
    with pytest.raises(EnvironmentExists):
        corral.envs.create(env)
    with pytest.raises(InvalidInput, match="invalid environment name"):
        corral.envs.create("Bad/Name")
    with pytest.raises(SnapshotNotFound):
        corral.envs.run(env, ("true",), digest="sha256:" + "0" * 64)
    with pytest.raises(InvalidInput, match="digest"):
        corral.envs.run(env, ("true",), digest="sha256:nothex")
    with pytest.raises(CommandNotFound, match="'no-such-command' is not found"):
        run(corral, env, "no-such-command")
    with pytest.raises(NothingToFreeze, match="no new snapshot"):
        corral.envs.freeze(env)
    assert [s.digest for s in corral.envs.history(env)] == [head]


def test_one_edit_session_at_a_time(corral: Corral, env: str) -> None:
    with corral.envs._locked(env), pytest.raises(EnvironmentBusy):
        corral.envs.freeze(env)
