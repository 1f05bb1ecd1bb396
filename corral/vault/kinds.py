"""Credential kinds, their fields, and the two shapes a credential leaves the vault in.

* ``check_fields`` validates what a caller wants stored, per kind. Its messages name the
  kind and the field, and the type of a bad value - never the value.
* ``CredentialInfo`` is metadata only: what ``list``, ``put`` and ``revoke`` return, and all
  the CLI and any API may ever show. It has no secret field, so it cannot leak one.
* ``Credential`` is a resolved credential, for the host-side bridge only: the one shape the
  bridge's gate attaches to a call. Its secret fields are ``Secret``: its ``repr``, a log
  line or an f-string shows ``**********``; ``revealed()`` is for the wire alone.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal
from urllib.parse import urlsplit

from corral.config import Secret
from corral.errors import InvalidInput

Kind = Literal["bearer", "api_key", "basic", "oauth2"]
KINDS: Final[tuple[Kind, ...]] = ("bearer", "api_key", "basic", "oauth2")  # = CREDENTIAL_KINDS

# Per kind: required fields, optional fields.
FIELDS: Final[Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "bearer": (("token",), ()),
    "api_key": (("key",), ()),
    "basic": (("username", "password"), ()),
    "oauth2": (
        ("access_token", "refresh_token", "token_url", "client_id", "client_secret"),
        ("expires_at",),
    ),
}
SECRET_FIELDS: Final = frozenset(
    {"token", "key", "password", "access_token", "refresh_token", "client_secret"}
)
# Every field of every kind but ``expires_at``, in the order they are listed above.
_WIRE_FIELDS: Final = tuple(
    dict.fromkeys(name for kind in KINDS for name in FIELDS[kind][0] if name != "expires_at")
)
_MAX_FIELD: Final = 16 * 1024  # characters; a JWT access token is a few KiB at most
_LOOPBACK: Final = frozenset({"localhost", "127.0.0.1", "::1"})

FieldValue = str | int


def check_kind(kind: str) -> Kind:
    for known in KINDS:
        if kind == known:
            return known
    raise InvalidInput(f"unknown credential kind {kind!r}: one of {', '.join(KINDS)}")


def check_fields(kind: str, fields: Mapping[str, object]) -> dict[str, FieldValue]:
    """The fields of a ``kind`` credential, validated; ``InvalidInput`` naming what is wrong.

    ``Secret`` values are accepted and unwrapped. Every required field must be a non-empty
    string; ``expires_at`` is epoch seconds (an integer, or a number that is one).
    """
    kind = check_kind(kind)
    if not isinstance(fields, Mapping):
        raise InvalidInput(f"a {kind} credential's fields must be an object")
    required, optional = FIELDS[kind]
    expected = ", ".join(required + tuple(f"{o} (optional)" for o in optional))
    unknown = sorted(str(name) for name in fields if name not in required + optional)
    if unknown:
        raise InvalidInput(
            f"unknown field(s) {unknown} for a {kind} credential; it takes {expected}"
        )
    missing = [name for name in required if fields.get(name) in (None, "")]
    if missing:
        raise InvalidInput(
            f"a {kind} credential needs field {missing[0]!r}"
            + (f" (and {missing[1:]})" if missing[1:] else "")
            + f"; it takes {expected}"
        )
    checked: dict[str, FieldValue] = {}
    for name in required:
        checked[name] = _text(kind, name, fields[name])
    if "expires_at" in optional and fields.get("expires_at") is not None:
        checked["expires_at"] = _epoch(kind, fields["expires_at"])
    if "token_url" in checked:
        _check_token_url(str(checked["token_url"]))
    return checked


def stored_fields(kind: str, doc: object) -> dict[str, FieldValue]:
    """The fields of a decrypted record: the right shape for ``kind``, or ``ValueError``.

    Deliberately looser than ``check_fields``: a rule added to it later must not make a
    credential stored before the rule unreadable.
    """
    required, optional = FIELDS[check_kind(kind)]
    if not isinstance(doc, dict) or not set(required) <= set(doc) <= set(required + optional):
        raise ValueError("not the fields of a " + kind)
    if not all(isinstance(v, str | int) and not isinstance(v, bool) for v in doc.values()):
        raise ValueError("a field is neither text nor a number")
    return dict(doc)


def _text(kind: str, name: str, value: object) -> str:
    if isinstance(value, Secret):
        value = value.reveal()
    if not isinstance(value, str):
        raise InvalidInput(
            f"field {name!r} of a {kind} credential must be a string, not {type(value).__name__}"
        )
    if len(value) > _MAX_FIELD:
        raise InvalidInput(f"field {name!r} is longer than {_MAX_FIELD} characters")
    if any(ord(c) < 0x20 or c == "\x7f" for c in value):
        # It will end up in an HTTP header: a newline there is header injection.
        raise InvalidInput(f"field {name!r} of a {kind} credential has control characters")
    if name != "password" and value != value.strip():
        # A token's stray space or newline (from `echo`) would only fail later, upstream.
        raise InvalidInput(f"field {name!r} of a {kind} credential has surrounding whitespace")
    return value


def _epoch(kind: str, value: object) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(
            f"field 'expires_at' of a {kind} credential must be epoch seconds (a non-negative "
            f"integer), not {type(value).__name__}"
        )
    return value


def _check_token_url(url: str) -> None:
    parts = urlsplit(url)
    # The refresh request carries the client secret: plain http only to this very host.
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname in _LOOPBACK:
        return
    # Not echoed: a URL may carry a password in its user part.
    raise InvalidInput("token_url must be an https:// URL (http:// only for localhost)")


@dataclass(frozen=True)
class CredentialInfo:
    """What may be shown about a credential: no secret field, ever."""

    user: str
    connection: str
    kind: str
    key_id: str | None  # the master key wrapping its data key; None once revoked
    created_at: datetime
    updated_at: datetime
    revoked: bool

    def to_dict(self) -> dict[str, object]:
        return {
            "user": self.user,
            "connection": self.connection,
            "kind": self.kind,
            "key_id": self.key_id,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "revoked": self.revoked,
        }


@dataclass(frozen=True)
class Credential:
    """A resolved credential, for the host-side bridge to attach to an outgoing call.

    The fields of other kinds are None. Secrets are ``Secret``: ``.reveal()`` them only to
    put them on the wire, and never into a log line or an error.
    """

    user: str
    connection: str
    kind: Kind
    updated_at: datetime
    token: Secret | None = None  # bearer
    key: Secret | None = None  # api_key
    username: str | None = None  # basic
    password: Secret | None = None  # basic
    access_token: Secret | None = None  # oauth2
    refresh_token: Secret | None = None  # oauth2
    token_url: str | None = None  # oauth2
    client_id: str | None = None  # oauth2
    client_secret: Secret | None = None  # oauth2
    expires_at: int | None = None  # oauth2: epoch seconds; None if the provider gave none

    @classmethod
    def build(
        cls,
        user: str,
        connection: str,
        kind: str,
        fields: Mapping[str, FieldValue],
        updated_at: datetime,
    ) -> Credential:
        values: dict[str, object] = {
            name: Secret(str(value)) if name in SECRET_FIELDS else value
            for name, value in fields.items()
        }
        return cls(user, connection, check_kind(kind), updated_at, **values)  # type: ignore[arg-type]

    def revealed(self) -> dict[str, str]:
        """Every field set, secrets revealed, as text: what the bridge puts on the wire.

        Host memory only: never logged, never sent to a sandbox. ``expires_at`` is not a
        field to send, and stays out.
        """
        out = {}
        for name in _WIRE_FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value.reveal() if isinstance(value, Secret) else str(value)
        return out

    def expired(self, leeway: float = 60.0, now: float | None = None) -> bool:
        """Whether an oauth2 access token expires within ``leeway`` seconds (False if unknown)."""
        if self.expires_at is None:
            return False
        return self.expires_at - leeway <= (time.time() if now is None else now)
