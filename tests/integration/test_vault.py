"""The vault over a real store, on SQLite and PostgreSQL, and ``corral secret`` as a user runs it.

The database is read behind the vault's back (a second engine on the same URL) to check
what is really stored, and written behind its back to play the attacker who can change
rows but holds no master key.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from sqlalchemy import select, update
from sqlalchemy.engine import Engine, make_url

from corral.bridge import tokens
from corral.bridge.tokens import KEY_KEPT_FOR, SigningKey, SigningKeyRing, Verifier
from corral.config import Secret, Settings
from corral.context import Corral
from corral.errors import (
    CredentialNotFound,
    CredentialRevoked,
    CredentialTampered,
    InvalidInput,
    MasterKeyError,
    MasterKeyInUse,
    TokenRefused,
    UnknownMasterKey,
)
from corral.store import Store
from corral.store.engine import make_engine
from corral.store.schema import credentials, signing_keys
from corral.vault import MasterKeys, Vault, key_id
from corral.vault.keys import new_key
from corral.vault.signing import SealedSigningKeys

SECRETS: dict[tuple[str, str, str], dict[str, Any]] = {
    ("alice", "github", "bearer"): {"token": "ghp_R4nd0mT0kenValue1234567890abcdef"},
    ("alice", "openai", "api_key"): {"key": "sk-proj-Zx9Yw8Vu7Ts6Rq5Po4Nm3Lk2"},
    ("bob@example.com", "jira", "basic"): {"username": "bob", "password": "Pa55w0rd!Unique#42"},
    ("carol", "google", "oauth2"): {
        "access_token": "ya29.AccessTokenValue_0987654321",
        "refresh_token": "1//RefreshTokenValue_abcdefghij",
        "token_url": "https://oauth2.googleapis.com/token",
        "client_id": "1234-client.apps.example",
        "client_secret": "GOCSPX-ClientSecretValue_zyxw",
        "expires_at": 1_900_000_000,
    },
}
KEPT_FOR = timedelta(seconds=KEY_KEPT_FOR)
SECRET_FIELDS = ("token", "key", "password", "access_token", "refresh_token", "client_secret")
SECRET_VALUES = [v for f in SECRETS.values() for k, v in f.items() if k in SECRET_FIELDS]


@pytest.fixture
def keys(tmp_path: Path) -> MasterKeys:
    return MasterKeys(None, tmp_path / "vault" / "master.keys")


def vault_of(store: Store, keys: MasterKeys) -> Vault:
    """A vault as Corral builds one: the credentials and the bridge's signing keys."""
    return Vault(store.credentials, keys, SealedSigningKeys(store.signing_keys, keys, KEPT_FOR))


@pytest.fixture
def vault(store: Store, keys: MasterKeys) -> Vault:
    return vault_of(store, keys)


@pytest.fixture
def raw(store_url: str) -> Iterator[Engine]:
    """A second engine on the store's database: what is really there, and the attacker."""
    engine = make_engine(store_url)
    try:
        yield engine
    finally:
        engine.dispose()


def put_all(vault: Vault) -> None:
    for (user, connection, kind), fields in SECRETS.items():
        vault.put(user, connection, kind, fields)


def secret_of(vault: Vault, user: str, connection: str) -> str:
    cred = vault.resolve(user, connection)
    value = cred.token or cred.key or cred.password or cred.access_token
    assert value is not None
    return value.reveal()


def tamper(raw: Engine, user: str, connection: str, **values: Any) -> None:
    with raw.begin() as conn:
        conn.execute(
            update(credentials)
            .where(credentials.c.user == user, credentials.c.connection == connection)
            .values(**values)
        )


def stored(raw: Engine, user: str, connection: str) -> Any:
    with raw.connect() as conn:
        return conn.execute(
            select(credentials).where(
                credentials.c.user == user, credentials.c.connection == connection
            )
        ).one()


def assert_no_secret_in(blob: bytes) -> None:
    for secret in SECRET_VALUES:
        assert secret.encode() not in blob
        for start in range(len(secret) - 5):  # no recognisable piece either
            assert secret[start : start + 6].encode() not in blob, secret[start : start + 6]


def test_round_trip_every_kind(vault: Vault) -> None:
    put_all(vault)
    for (user, connection, kind), fields in SECRETS.items():
        cred = vault.resolve(user, connection)
        assert (cred.user, cred.connection, cred.kind) == (user, connection, kind)
        for name, value in fields.items():
            got = getattr(cred, name)
            assert (got.reveal() if isinstance(got, Secret) else got) == value
            assert name not in SECRET_FIELDS or str(value) not in repr(cred)


def test_the_database_holds_no_secret(vault: Vault, raw: Engine, store_url: str) -> None:
    put_all(vault)
    with raw.connect() as conn:
        rows = conn.execute(select(credentials)).all()
    assert len(rows) == len(SECRETS)
    blob = b"".join(
        bytes(v) if isinstance(v, bytes | memoryview) else str(v).encode()
        for row in rows
        for v in row
    )
    assert_no_secret_in(blob)
    url = make_url(store_url)
    if url.get_backend_name() == "sqlite":  # the files themselves, WAL included
        assert url.database
        for path in Path(url.database).parent.glob("corral.db*"):
            assert_no_secret_in(path.read_bytes())


def test_list_shows_metadata_only(vault: Vault) -> None:
    put_all(vault)
    infos = vault.list()
    assert [(i.user, i.connection) for i in infos] == sorted((u, c) for u, c, _ in SECRETS)
    shown = repr(infos) + json.dumps([i.to_dict() for i in infos], default=str)
    assert_no_secret_in(shown.encode())
    assert {i.key_id for i in infos} == {vault.keys()[0].key_id}
    assert [i.connection for i in vault.list("alice")] == ["github", "openai"]
    assert vault.list("nobody") == []


@pytest.mark.parametrize("column", ["ciphertext", "nonce", "wrapped_dek", "dek_nonce"])
def test_a_changed_byte_in_the_row_is_detected(vault: Vault, raw: Engine, column: str) -> None:
    put_all(vault)
    value = bytes(getattr(stored(raw, "alice", "github"), column))
    tamper(raw, "alice", "github", **{column: bytes([value[0] ^ 0x80]) + value[1:]})
    with pytest.raises(CredentialTampered) as caught:
        vault.resolve("alice", "github")
    assert "alice/github" in caught.value.detail
    assert_no_secret_in(caught.value.detail.encode())
    assert secret_of(vault, "alice", "openai")  # the others are untouched


def test_a_changed_key_id_or_kind_is_detected(vault: Vault, keys: MasterKeys, raw: Engine) -> None:
    put_all(vault)
    other = keys.promote(None).primary  # a key the ring holds, but not the one that sealed it
    tamper(raw, "alice", "github", key_id=other)
    with pytest.raises(CredentialTampered, match="data key"):
        vault.resolve("alice", "github")
    tamper(raw, "alice", "github", key_id="0123456789abcdef")
    with pytest.raises(UnknownMasterKey, match="0123456789abcdef"):
        vault.resolve("alice", "github")
    tamper(raw, "alice", "openai", kind="bearer")
    with pytest.raises(CredentialTampered):
        vault.resolve("alice", "openai")


def test_a_row_copied_to_another_user_does_not_open(vault: Vault, raw: Engine) -> None:
    put_all(vault)
    vault.put("mallory", "github", "bearer", {"token": "mallorys-own-token"})
    alice = stored(raw, "alice", "github")
    sealed = {c: getattr(alice, c) for c in ("key_id", "dek_nonce", "wrapped_dek", "nonce")}
    tamper(raw, "mallory", "github", ciphertext=alice.ciphertext, **sealed)
    with pytest.raises(CredentialTampered):
        vault.resolve("mallory", "github")


def test_a_different_master_key_cannot_open(store: Store, tmp_path: Path) -> None:
    first = vault_of(store, MasterKeys(Secret(b64(new_key())), tmp_path / "a"))
    first.put("alice", "github", "bearer", {"token": "only-for-the-first-key"})
    for stranger in (
        MasterKeys(Secret(b64(new_key())), tmp_path / "b"),
        MasterKeys(None, tmp_path / "vault" / "master.keys"),
    ):
        with pytest.raises(UnknownMasterKey):
            vault_of(store, stranger).resolve("alice", "github")


def test_rotation_rewraps_every_record_and_retires_the_old_key(
    vault: Vault, keys: MasterKeys
) -> None:
    put_all(vault)
    old = keys.ring().primary
    with pytest.raises(MasterKeyError, match="primary"):
        vault.retire(old)

    # Mid-rotation: a new primary, records under both keys; everything opens.
    new = keys.promote(None).primary
    vault.put("dave", "slack", "bearer", {"token": "xoxb-sealed-under-the-new-key"})
    by_key = {i.connection: i.key_id for i in vault.list()}
    assert by_key["slack"] == new and by_key["github"] == old
    assert secret_of(vault, "dave", "slack") == "xoxb-sealed-under-the-new-key"
    assert secret_of(vault, "alice", "github") == SECRETS["alice", "github", "bearer"]["token"]
    with pytest.raises(MasterKeyInUse, match=f"{old} still seals {len(SECRETS)}"):
        vault.retire(old)

    done = vault.rotate(new_key=None)
    assert done.primary != old and done.rewrapped == len(SECRETS) + 1 and done.failed == ()
    assert done.usage == {done.primary: len(SECRETS) + 1}
    assert {i.key_id for i in vault.list()} == {done.primary}
    assert vault.retire(old) == (done.primary, new)
    assert vault.retire(new) == (done.primary,)
    for (user, connection, _), fields in SECRETS.items():
        cred = vault.resolve(user, connection)
        first = cred.token or cred.key or cred.password or cred.access_token
        assert first is not None and first.reveal() in fields.values()
    again = vault.rotate(new_key())
    assert again.rewrapped == len(SECRETS) + 1 and again.primary != done.primary


def test_rotation_keeps_updated_at_and_ciphertext(vault: Vault, raw: Engine) -> None:
    put_all(vault)
    before = stored(raw, "alice", "github")
    vault.rotate()
    after = stored(raw, "alice", "github")
    assert after.key_id != before.key_id and bytes(after.wrapped_dek) != bytes(before.wrapped_dek)
    assert bytes(after.ciphertext) == bytes(before.ciphertext)
    assert after.updated_at == before.updated_at


def test_readers_never_fail_during_a_rotation(vault: Vault, store: Store, keys: MasterKeys) -> None:
    for n in range(12):
        vault.put(f"user{n}", "github", "bearer", {"token": f"token-number-{n}"})
    reader = vault_of(store, MasterKeys(None, keys.path))  # as another process would
    errors: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            for n in range(12):
                try:
                    assert secret_of(reader, f"user{n}", "github") == f"token-number-{n}"
                except BaseException as exc:
                    errors.append(exc)
                    return

    threads = [threading.Thread(target=read) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(3):
            assert vault.rotate().rewrapped == 12
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []


def test_another_process_sees_a_rotation(vault: Vault, store: Store, keys: MasterKeys) -> None:
    other = vault_of(store, MasterKeys(None, keys.path))
    vault.put("alice", "github", "bearer", {"token": "before-rotation"})
    assert secret_of(other, "alice", "github") == "before-rotation"
    done = vault.rotate()
    assert secret_of(other, "alice", "github") == "before-rotation"
    assert other.put("alice", "slack", "bearer", {"token": "t"}).key_id == done.primary


def test_a_record_that_fails_to_rewrap_is_reported(vault: Vault, raw: Engine) -> None:
    put_all(vault)
    old = vault.keys()[0].key_id
    wrapped = bytes(stored(raw, "alice", "github").wrapped_dek)
    tamper(raw, "alice", "github", wrapped_dek=wrapped[::-1])
    done = vault.rotate()
    assert done.failed == ("alice/github: credential_tampered",)
    assert done.rewrapped == len(SECRETS) - 1 and done.usage[old] == 1
    with pytest.raises(MasterKeyInUse):
        vault.retire(old)


def test_env_key_rotation(store: Store, tmp_path: Path) -> None:
    old, new = new_key(), new_key()
    before = vault_of(store, MasterKeys(Secret(b64(old)), tmp_path / "unused"))
    put_all(before)
    with pytest.raises(MasterKeyError, match="must already be first"):
        before.rotate(new)
    during = vault_of(store, MasterKeys(Secret(f"{b64(new)},{b64(old)}"), tmp_path))
    assert secret_of(during, "alice", "openai") == SECRETS["alice", "openai", "api_key"]["key"]
    done = during.rotate(new)
    assert done.primary == key_id(new) and done.rewrapped == len(SECRETS)
    with pytest.raises(MasterKeyError, match="remove key"):
        during.retire(key_id(old))
    after = vault_of(store, MasterKeys(Secret(b64(new)), tmp_path / "unused"))
    assert secret_of(after, "alice", "openai") == SECRETS["alice", "openai", "api_key"]["key"]
    assert not (tmp_path / "unused").exists()


def test_revoke_destroys_and_refuses(vault: Vault, raw: Engine) -> None:
    put_all(vault)
    info = vault.revoke("alice", "github")
    assert info.revoked and info.key_id is None
    row = stored(raw, "alice", "github")
    assert row.revoked_at is not None
    assert [row.key_id, row.dek_nonce, row.wrapped_dek, row.nonce, row.ciphertext] == [None] * 5
    with pytest.raises(CredentialRevoked):
        vault.resolve("alice", "github")
    assert vault.revoke("alice", "github").revoked  # idempotent
    listed = {i.connection: i for i in vault.list("alice")}
    assert listed["github"].revoked and not listed["openai"].revoked
    assert vault.rotate().rewrapped == len(SECRETS) - 1  # nothing to rewrap in a revoked row
    with pytest.raises(CredentialNotFound):
        vault.revoke("alice", "nothing")
    again = vault.put("alice", "github", "bearer", {"token": "a-brand-new-token"})
    assert not again.revoked and again.created_at == info.created_at
    assert secret_of(vault, "alice", "github") == "a-brand-new-token"


def test_put_replaces(vault: Vault) -> None:
    first = vault.put("alice", "github", "bearer", {"token": "one"})
    second = vault.put("alice", "github", "api_key", {"key": "two"})
    assert second.created_at == first.created_at and second.updated_at >= first.updated_at
    assert second.kind == "api_key" and secret_of(vault, "alice", "github") == "two"
    assert len(vault.list()) == 1


def test_update_oauth(vault: Vault, keys: MasterKeys) -> None:
    put_all(vault)
    base = SECRETS["carol", "google", "oauth2"]
    new_primary = keys.promote(None).primary
    info = vault.update_oauth("carol", "google", "ya29.fresh-access", 2_000_000_000)
    assert info.key_id == new_primary  # resealed under the primary
    cred = vault.resolve("carol", "google")
    assert cred.access_token == Secret("ya29.fresh-access") and cred.expires_at == 2_000_000_000
    assert cred.refresh_token == Secret(base["refresh_token"])  # kept
    assert cred.client_secret == Secret(base["client_secret"])
    vault.update_oauth("carol", "google", Secret("ya29.third"), None, refresh_token="1//rotated")
    cred = vault.resolve("carol", "google")
    assert cred.refresh_token == Secret("1//rotated") and cred.expires_at is None
    with pytest.raises(InvalidInput, match="not oauth2"):
        vault.update_oauth("alice", "github", "x", None)
    with pytest.raises(InvalidInput, match="access_token"):
        vault.update_oauth("carol", "google", "", None)
    vault.revoke("carol", "google")
    with pytest.raises(CredentialRevoked):
        vault.update_oauth("carol", "google", "x", None)


@pytest.mark.parametrize(
    ("user", "connection", "kind", "fields", "named"),
    [
        ("alice", "GitHub", "bearer", {"token": "x"}, "connection name"),
        ("alice", "-x", "bearer", {"token": "x"}, "connection name"),
        ("alice", "a" * 64, "bearer", {"token": "x"}, "connection name"),
        ("Alice", "github", "bearer", {"token": "x"}, "invalid user"),
        ("alice", "github", "bearer", {}, "'token'"),
        ("alice", "jira", "basic", {"username": "a"}, "'password'"),
        ("alice", "github", "ssh", {"token": "x"}, "kind"),
    ],
)
def test_bad_input_stores_nothing(
    vault: Vault, user: str, connection: str, kind: str, fields: dict[str, str], named: str
) -> None:
    with pytest.raises(InvalidInput, match=named):
        vault.put(user, connection, kind, fields)
    assert vault.list() == []


def test_unknown_credential(vault: Vault) -> None:
    with pytest.raises(CredentialNotFound, match="secret list"):
        vault.resolve("alice", "github")


# -- the bridge's signing keys: sealed by the vault, rewrapped with the credentials -------------

PEER = "10.0.0.2"


def mint(ring: SigningKeyRing, run: str = "run-1") -> str:
    return tokens.mint(
        ring,
        user="alice",
        app="a",
        session=run,
        run=run,
        connections=(),
        address=PEER,
        lifetime=600,
    )


def verified_elsewhere(store: Store, keys: MasterKeys, token: str) -> str:
    """The run a token names, as a process that has only just started checks it."""
    ring = SigningKeyRing(store=vault_of(store, MasterKeys(None, keys.path)).signing_keys)
    return Verifier(ring).verify(token, PEER).run


def stored_signing_key(raw: Engine, kid: str) -> bytes:
    with raw.connect() as conn:
        row = conn.execute(select(signing_keys).where(signing_keys.c.kid == kid)).one()
    return bytes(row.sealed_private_key)


def kid_of(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


def legacy_seal(keys: MasterKeys, kid: str, private: Ed25519PrivateKey) -> bytes:
    """A signing key as the bridge sealed it itself before issue 9."""
    ring = keys.ring()
    raw = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    nonce = os.urandom(12)
    aad = b"corral-signing-key:" + kid.encode()
    return ring.primary.encode() + b":" + nonce + AESGCM(ring.primary_key).encrypt(nonce, raw, aad)


def test_rotation_rewraps_the_signing_keys_and_retiring_orphans_none(
    vault: Vault, store: Store, keys: MasterKeys, raw: Engine
) -> None:
    token = mint(SigningKeyRing(store=vault.signing_keys))
    kid, old = kid_of(token), keys.ring().primary
    blob = stored_signing_key(raw, kid)
    assert blob.startswith(b"corral.sealed.v1:" + old.encode())
    statuses = vault.keys()
    assert [(k.key_id, k.records, k.signing_keys) for k in statuses] == [(old, 0, 1)]

    middle = keys.promote(None).primary  # a new primary, nothing rewrapped yet
    with pytest.raises(MasterKeyInUse, match=r"0 credential\(s\) and 1 signing key"):
        vault.retire(old)
    done = vault.rotate()
    assert (done.signing_keys, done.rewrapped, done.failed) == (1, 0, ())
    assert stored_signing_key(raw, kid).startswith(b"corral.sealed.v1:" + done.primary.encode())
    assert vault.retire(old) == (done.primary, middle)
    assert vault.retire(middle) == (done.primary,)
    assert verified_elsewhere(store, keys, token) == "run-1"  # the old key's tokens still check
    assert vault.rotate().signing_keys == 1


def test_signing_keys_sealed_the_old_way_are_read_then_rewrapped(
    vault: Vault, store: Store, keys: MasterKeys, raw: Engine
) -> None:
    private, now = Ed25519PrivateKey.generate(), datetime.now(UTC)
    store.signing_keys.add("kold0001", legacy_seal(keys, "kold0001", private), now)
    token = mint(SigningKeyRing(keys=[SigningKey("kold0001", private, now.timestamp())]))
    old = keys.ring().primary
    assert verified_elsewhere(store, keys, token) == "run-1"
    statuses = vault.keys()
    assert [(k.key_id, k.signing_keys) for k in statuses] == [(old, 1)]

    done = vault.rotate()
    assert (done.signing_keys, done.failed) == (1, ())
    blob = stored_signing_key(raw, "kold0001")
    assert blob.startswith(b"corral.sealed.v1:" + done.primary.encode())
    raw_private = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    assert raw_private not in blob
    assert vault.retire(old) == (done.primary,)
    assert verified_elsewhere(store, keys, token) == "run-1"


def test_a_signing_key_that_fails_to_rewrap_is_reported(
    vault: Vault, store: Store, keys: MasterKeys, raw: Engine
) -> None:
    token = mint(SigningKeyRing(store=vault.signing_keys))
    kid, old = kid_of(token), keys.ring().primary
    blob = stored_signing_key(raw, kid)
    at = len(b"corral.sealed.v1:") + 16 + 12 + 5  # a byte of the wrapped data key
    with raw.begin() as conn:
        conn.execute(
            update(signing_keys)
            .where(signing_keys.c.kid == kid)
            .values(sealed_private_key=blob[:at] + bytes([blob[at] ^ 1]) + blob[at + 1 :])
        )
    done = vault.rotate()
    assert (done.signing_keys, done.failed) == (0, (f"signing key {kid}: credential_tampered",))
    with pytest.raises(MasterKeyInUse, match="1 signing key"):
        vault.retire(old)
    with pytest.raises(TokenRefused, match="not signed by a Corral key"):
        verified_elsewhere(store, keys, token)  # skipped as it loads: never a wrong key


def test_a_signing_key_too_old_to_matter_is_left_alone(
    vault: Vault, store: Store, keys: MasterKeys, raw: Engine
) -> None:
    private = Ed25519PrivateKey.generate()
    long_ago = datetime.now(UTC) - KEPT_FOR - timedelta(hours=1)
    sealed = legacy_seal(keys, "kancient", private)
    store.signing_keys.add("kancient", sealed, long_ago)
    old = keys.ring().primary
    done = vault.rotate()
    assert (done.signing_keys, done.failed) == (0, ())
    assert vault.retire(old) == (done.primary,)  # it verifies no token: nothing is orphaned
    assert stored_signing_key(raw, "kancient") == sealed


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


# -- the CLI, as a user runs it: no root needed, SQLite under a temporary data dir ------


@pytest.fixture
def corral_cli(tmp_path: Path) -> Any:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    environ["CORRAL_DATA_DIR"] = str(tmp_path / "data")

    def cli(*args: str, stdin: str = "", ok: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "corral.cli", *args],
            env=environ,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if ok:
            assert proc.returncode == 0, proc.stderr
        return proc

    return cli


def test_cli_reads_secrets_from_stdin_and_never_prints_them(
    corral_cli: Any, tmp_path: Path
) -> None:
    token = SECRETS["alice", "github", "bearer"]["token"]
    out = corral_cli(
        "secret",
        "set",
        "alice",
        "github",
        "--kind",
        "bearer",
        "--json",
        stdin=json.dumps({"token": token}),
    )
    info = json.loads(out.stdout)
    assert info["user"] == "alice" and info["kind"] == "bearer" and not info["revoked"]
    key = SECRETS["alice", "openai", "api_key"]["key"]
    corral_cli("secret", "set", "alice", "openai", "--kind", "api_key", stdin=key + "\n")
    basic = SECRETS["bob@example.com", "jira", "basic"]
    corral_cli(
        "secret", "set", "bob@example.com", "jira", "--kind", "basic", stdin=json.dumps(basic)
    )
    listed = corral_cli("secret", "list", "--json")
    rows = json.loads(listed.stdout)
    assert {(r["user"], r["connection"], r["kind"]) for r in rows} == {
        ("alice", "github", "bearer"),
        ("alice", "openai", "api_key"),
        ("bob@example.com", "jira", "basic"),
    }
    human = corral_cli("secret", "list", "--user", "alice")
    assert len(human.stdout.splitlines()) == 2
    for proc in (out, listed, human):
        assert_no_secret_in((proc.stdout + proc.stderr).encode())

    keyfile = tmp_path / "data" / "vault" / "master.keys"
    assert keyfile.stat().st_mode & 0o777 == 0o600

    # What the CLI stored is what the bridge will get.
    corral = Corral(Settings.from_env({"CORRAL_DATA_DIR": str(tmp_path / "data")}))
    try:
        assert secret_of(corral.vault, "alice", "github") == token
        assert secret_of(corral.vault, "alice", "openai") == key
    finally:
        corral.close()


def test_cli_refuses_bad_stdin_without_echoing_it(corral_cli: Any) -> None:
    bad = corral_cli(
        "secret",
        "set",
        "alice",
        "jira",
        "--kind",
        "basic",
        "--json",
        stdin='{"username": "a", "pass": "Pa55w0rd!Unique#42"}',
        ok=False,
    )
    assert bad.returncode == 2 and json.loads(bad.stderr)["error"] == "invalid_input"
    assert "unknown field(s) ['pass']" in bad.stderr
    assert_no_secret_in(bad.stderr.encode() + bad.stdout.encode())
    two_lines = corral_cli(
        "secret",
        "set",
        "alice",
        "github",
        "--kind",
        "bearer",
        stdin="line-one\nline-two\n",
        ok=False,
    )
    assert two_lines.returncode == 2 and "one line" in two_lines.stderr
    assert "line-one" not in two_lines.stderr
    empty = corral_cli("secret", "set", "alice", "github", "--kind", "bearer", ok=False)
    assert empty.returncode == 2 and "empty" in empty.stderr
    not_json = corral_cli(
        "secret", "set", "alice", "jira", "--kind", "basic", stdin="Pa55w0rd!Unique#42", ok=False
    )
    assert not_json.returncode == 2 and "JSON object" in not_json.stderr
    assert_no_secret_in(not_json.stderr.encode())
    # There is no way to pass a secret in argv: no such option exists.
    help_text = corral_cli("secret", "set", "--help").stdout
    assert "--token" not in help_text and "--password" not in help_text


def test_cli_revoke_and_rotate(corral_cli: Any, tmp_path: Path) -> None:
    corral_cli("secret", "set", "alice", "github", "--kind", "bearer", stdin="tok-1")
    corral_cli("secret", "set", "alice", "slack", "--kind", "bearer", stdin="tok-2")
    revoked = json.loads(corral_cli("secret", "revoke", "alice", "slack", "--json").stdout)
    assert revoked["revoked"] and revoked["key_id"] is None
    keys_before = json.loads(corral_cli("vault", "keys", "--json").stdout)
    rotated = json.loads(corral_cli("vault", "rotate", "--json").stdout)
    assert rotated["rewrapped"] == 1 and rotated["failed"] == []
    assert rotated["primary"] != keys_before[0]["key_id"]
    assert rotated["usage"] == {rotated["primary"]: 1}
    retired = corral_cli("vault", "retire", keys_before[0]["key_id"], "--json")
    assert json.loads(retired.stdout)["keys"] == [rotated["primary"]]
    missing = corral_cli("secret", "revoke", "alice", "nothing", "--json", ok=False)
    assert json.loads(missing.stderr)["error"] == "credential_not_found"


def test_cli_refuses_a_malformed_master_key_at_start_up(corral_cli: Any, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env.update(CORRAL_DATA_DIR=str(tmp_path / "data"), CORRAL_MASTER_KEY="c2hvcnQ=")
    proc = subprocess.run(
        [sys.executable, "-m", "corral.cli", "secret", "list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "CORRAL_MASTER_KEY" in proc.stderr
    assert "c2hvcnQ=" not in proc.stderr


def test_cli_refuses_a_world_readable_key_file(corral_cli: Any, tmp_path: Path) -> None:
    corral_cli("secret", "set", "alice", "github", "--kind", "bearer", stdin="tok")
    keyfile = tmp_path / "data" / "vault" / "master.keys"
    keyfile.chmod(0o644)
    proc = corral_cli("secret", "set", "alice", "slack", "--kind", "bearer", stdin="t", ok=False)
    assert proc.returncode == 1 and str(keyfile) in proc.stderr and "chmod 600" in proc.stderr
