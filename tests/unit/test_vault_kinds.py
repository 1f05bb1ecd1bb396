"""Credential kinds: per-kind validation, and the masked shape a resolved credential has."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import pytest

from corral.config import Secret
from corral.errors import InvalidInput
from corral.store.schema import CREDENTIAL_KINDS
from corral.vault.kinds import KINDS, Credential, CredentialInfo, check_fields, stored_fields

OAUTH: dict[str, Any] = {
    "access_token": "ya29.ACCESS-secret",
    "refresh_token": "1//REFRESH-secret",
    "token_url": "https://oauth2.example.com/token",
    "client_id": "client-123",
    "client_secret": "CLIENT-secret",
}
NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_the_table_allows_exactly_these_kinds() -> None:
    assert KINDS == CREDENTIAL_KINDS


@pytest.mark.parametrize(
    ("kind", "fields"),
    [
        ("bearer", {"token": "t0k"}),
        ("api_key", {"key": "sk-1"}),
        ("basic", {"username": "u", "password": " spaces are fine in a password "}),
        ("oauth2", OAUTH),
        ("oauth2", {**OAUTH, "expires_at": 1_900_000_000}),
        ("oauth2", {**OAUTH, "expires_at": None}),
    ],
)
def test_valid_fields(kind: str, fields: dict[str, Any]) -> None:
    checked = check_fields(kind, fields)
    assert checked == {k: v for k, v in fields.items() if v is not None}


@pytest.mark.parametrize(
    ("kind", "fields", "named"),
    [
        ("bearer", {}, "'token'"),
        ("bearer", {"token": ""}, "'token'"),
        ("api_key", {"token": "x"}, "unknown field"),
        ("basic", {"username": "u"}, "'password'"),
        ("basic", {"password": "p"}, "'username'"),
        ("oauth2", {k: v for k, v in OAUTH.items() if k != "client_secret"}, "'client_secret'"),
        ("oauth2", {k: v for k, v in OAUTH.items() if k != "token_url"}, "'token_url'"),
        ("oauth2", {**OAUTH, "expires_at": "tomorrow"}, "expires_at"),
        ("oauth2", {**OAUTH, "expires_at": -5}, "expires_at"),
        ("oauth2", {**OAUTH, "expires_at": True}, "expires_at"),
        ("oauth2", {**OAUTH, "token_url": "http://evil.example/token"}, "https://"),
        ("bearer", {"token": 12345}, "must be a string, not int"),
        ("bearer", {"token": "abc\r\nX-Injected: 1"}, "control characters"),
        ("bearer", {"token": "abc\n"}, "control characters"),
        ("bearer", {"token": " abc"}, "whitespace"),
        ("passkey", {"token": "x"}, "unknown credential kind"),
    ],
)
def test_invalid_fields_are_named(kind: str, fields: dict[str, Any], named: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        check_fields(kind, fields)
    assert named in caught.value.detail
    for value in fields.values():
        if isinstance(value, str) and len(value) > 4 and "secret" in value.lower():
            assert value not in caught.value.detail


def test_loopback_token_url_may_be_http() -> None:
    assert check_fields("oauth2", {**OAUTH, "token_url": "http://127.0.0.1:8080/token"})


def test_secret_values_are_accepted() -> None:
    assert check_fields("bearer", {"token": Secret("abc")}) == {"token": "abc"}


def test_a_resolved_credential_never_shows_its_secrets() -> None:
    fields = check_fields("oauth2", {**OAUTH, "expires_at": 1_900_000_000})
    cred = Credential.build("alice", "google", "oauth2", fields, NOW)
    shown = [repr(cred), str(cred), f"{cred}", repr(dataclasses.asdict(cred))]
    for text in shown:
        for secret in ("ACCESS-secret", "REFRESH-secret", "CLIENT-secret"):
            assert secret not in text
    assert cred.access_token is not None and cred.access_token.reveal() == OAUTH["access_token"]
    assert cred.client_id == "client-123" and cred.expires_at == 1_900_000_000
    assert cred.token is None and cred.password is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        cred.token = Secret("x")  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kind", "fields", "secret_attr"),
    [
        ("bearer", {"token": "BEARER-secret"}, "token"),
        ("api_key", {"key": "KEY-secret"}, "key"),
        ("basic", {"username": "bob", "password": "PASSWORD-secret"}, "password"),
    ],
)
def test_each_kind_masks_its_secret(kind: str, fields: dict[str, str], secret_attr: str) -> None:
    cred = Credential.build("bob", "svc", kind, check_fields(kind, fields), NOW)
    value = fields[secret_attr]
    assert value not in repr(cred)
    attr = getattr(cred, secret_attr)
    assert isinstance(attr, Secret) and attr.reveal() == value


def test_expiry() -> None:
    fields = check_fields("oauth2", {**OAUTH, "expires_at": 1000})
    cred = Credential.build("a", "g", "oauth2", fields, NOW)
    assert cred.expired(now=950) and cred.expired(leeway=0, now=1000)
    assert not cred.expired(now=900)
    never = Credential.build("a", "g", "oauth2", check_fields("oauth2", OAUTH), NOW)
    assert not never.expired(now=10**12)


def test_info_has_no_secret_field() -> None:
    names = {f.name for f in dataclasses.fields(CredentialInfo)}
    assert names == {"user", "connection", "kind", "key_id", "created_at", "updated_at", "revoked"}


def test_stored_fields_are_checked_for_shape_only() -> None:
    # A rule added to check_fields later must not make an older record unreadable.
    old = {**OAUTH, "token_url": "http://idp.internal/token"}
    assert stored_fields("oauth2", old) == old
    bads: list[object] = [[], {"token": 1.5}, {"token": True}, {}, {"token": "x", "extra": "y"}]
    for bad in bads:
        with pytest.raises(ValueError):
            stored_fields("bearer", bad)


def test_revealed_is_what_goes_on_the_wire() -> None:
    fields = check_fields("oauth2", {**OAUTH, "expires_at": 1_900_000_000})
    cred = Credential.build("alice", "google", "oauth2", fields, NOW)
    assert cred.revealed() == {k: v for k, v in OAUTH.items()}  # no expires_at, no None
    basic = Credential.build("bob", "jira", "basic", {"username": "bob", "password": "pw"}, NOW)
    assert basic.revealed() == {"username": "bob", "password": "pw"}
