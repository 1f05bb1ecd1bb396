"""Connections: where an authenticated call goes and how its credential is attached.

A bridge URL names the connection in its first path segment: ``/github/user`` goes to
``https://api.github.com/user`` with the user's GitHub credential. So the official SDKs work
unchanged inside a sandbox:

    OpenAI(base_url="http://<bridge>/openai/v1", api_key=<run token>)
    Anthropic(base_url="http://<bridge>/anthropic", api_key=<run token>)

Built-in profiles cover GitHub, Slack, OpenAI and Anthropic; an operator adds custom HTTP
connections (or points a built-in at another base URL) with ``corral connection add``.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from urllib.parse import urlsplit

from corral.errors import InvalidInput

NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
AUTH_STYLES = ("bearer", "basic", "header:", "query:")
METERS = ("openai", "anthropic")


@dataclass(frozen=True)
class Connection:
    name: str
    base_url: str  # scheme://host[:port][/path], no trailing slash
    auth: str = "bearer"  # bearer | basic | header:<Name> | query:<param>
    meter: str | None = None  # model usage to read from responses: openai | anthropic

    def __post_init__(self) -> None:
        if not NAME.match(self.name):
            raise InvalidInput(f"invalid connection name {self.name!r}: lowercase, digits, ._-")
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidInput(f"connection {self.name}: base URL {self.base_url!r} is not http(s)")
        if parts.query or parts.fragment:
            raise InvalidInput(f"connection {self.name}: base URL may not have a query")
        if not (self.auth in ("bearer", "basic") or self.auth.startswith(("header:", "query:"))):
            raise InvalidInput(f"connection {self.name}: auth must be one of {AUTH_STYLES}")
        if self.meter is not None and self.meter not in METERS:
            raise InvalidInput(f"connection {self.name}: meter must be one of {METERS}")

    # Read on every bridged call: worked out once per connection object.
    @cached_property
    def origin(self) -> tuple[str, str, int]:
        parts = urlsplit(self.base_url)
        tls = parts.scheme == "https"
        return parts.scheme, parts.hostname or "", parts.port or (443 if tls else 80)

    @cached_property
    def base_path(self) -> str:
        return urlsplit(self.base_url).path.rstrip("/")

    @cached_property
    def host_header(self) -> str:
        return urlsplit(self.base_url).netloc


BUILTIN: Mapping[str, Connection] = {
    c.name: c
    for c in (
        Connection("github", "https://api.github.com"),
        Connection("slack", "https://slack.com"),
        Connection("openai", "https://api.openai.com", meter="openai"),
        Connection("anthropic", "https://api.anthropic.com", "header:x-api-key", meter="anthropic"),
    )
}


def credential_headers(
    conn: Connection, kind: str, fields: Mapping[str, str]
) -> tuple[list[tuple[bytes, bytes]], str]:
    """The headers (and query suffix) that carry a credential of ``kind`` on ``conn``."""
    secret = fields.get("token") or fields.get("key") or fields.get("access_token") or ""
    if conn.auth == "basic" or kind == "basic":
        pair = f"{fields.get('username', '')}:{fields.get('password', '')}".encode()
        return [(b"authorization", b"Basic " + base64.b64encode(pair))], ""
    if conn.auth == "bearer":
        return [(b"authorization", f"Bearer {secret}".encode())], ""
    if conn.auth.startswith("header:"):
        return [(conn.auth.split(":", 1)[1].lower().encode(), secret.encode())], ""
    param = conn.auth.split(":", 1)[1]
    return [], f"{param}={secret}"
