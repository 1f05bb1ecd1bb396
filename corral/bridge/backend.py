"""The bridge's view of the store and the vault (``gate.Backend``), and OAuth 2 refresh.

Every method here may block on the database or the network; the gate calls them from worker
threads, never on the event loop. A lookup a sandbox's call waits on (is the run live, the
connection, the credential) rides out a database outage of up to ``OUTAGE_WAIT_S``: the call
takes longer and goes through; past that the sandbox is answered 503 ``store_unavailable``.
The only outbound HTTP this module makes is the refresh-token grant to a credential's own
token URL, through ``corral.outbound``.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, TypeVar

from corral.bridge.connections import Connection
from corral.config import Secret
from corral.errors import (
    CredentialNotFound,
    CredentialRevoked,
    OutboundError,
    RefreshFailed,
    Refused,
    StoreUnavailable,
)
from corral.outbound import Client
from corral.store import Store
from corral.store.engine import patiently
from corral.vault.kinds import Credential
from corral.vault.vault import Vault

OUTAGE_WAIT_S = 20.0  # under the runner's retry window and an agent's usual request timeout
T = TypeVar("T")


def _patiently(call: Callable[[], T], what: str) -> T:
    try:
        return patiently(call, f"bridge: {what}", budget=OUTAGE_WAIT_S)
    except StoreUnavailable as exc:  # not the caller's fault, and soon over: retry
        raise Refused(503, exc.code, "the bridge cannot reach its database; retry") from None


class StoreBackend:
    def __init__(self, store: Store, vault: Vault, client: Client | None = None) -> None:
        self.store = store
        self.vault = vault
        self.client = client or Client(timeout=15.0)

    def run_is_live(self, run: str) -> bool:
        return _patiently(lambda: self.store.runs.is_live(run), f"is run {run} live")

    def ended_since(self, since: datetime) -> tuple[list[str], datetime]:
        return self.store.runs.ended_since(since)

    def connection(self, name: str) -> Connection | None:
        row = _patiently(lambda: self.store.connections.get(name), f"connection {name}")
        if row is None:
            return None
        return Connection(row.name, row.base_url, row.auth, row.meter)

    def credential(self, user: str, connection: str) -> Credential | None:
        try:
            found = _patiently(
                lambda: self.vault.resolve(user, connection), f"credential {connection} of {user}"
            )
        except (CredentialNotFound, CredentialRevoked):
            return None  # the gate refuses the call, naming the connection
        # Any other vault error (a tampered record, an unknown master key) is the host's
        # problem, not the caller's: it propagates and the call fails with a 500.
        return found

    def refresh(self, user: str, connection: str, credential: Credential) -> Credential:
        """The refresh-token grant (RFC 6749 section 6); the vault keeps the new tokens."""
        fields = credential.revealed()
        body = urllib.parse.urlencode(
            {
                "grant_type": "refresh_token",
                "refresh_token": fields.get("refresh_token", ""),
                "client_id": fields.get("client_id", ""),
                "client_secret": fields.get("client_secret", ""),
            }
        ).encode()
        headers = {
            "content-type": "application/x-www-form-urlencoded",
            "accept": "application/json",
            "user-agent": "corral-bridge",
        }
        try:
            # Redirects only within the token endpoint's own origin, and as GET: the client
            # secret is never sent anywhere but to the URL stored with it.
            answer = self.client.request(
                "POST", fields.get("token_url", ""), headers=headers, body=body, follow=5
            )
        except OutboundError as exc:  # unreachable, or a URL that is not http(s)
            raise RefreshFailed(f"the token endpoint refused the refresh: {exc.detail}") from None
        if not answer.ok or answer.truncated:
            why = f"HTTP {answer.status}" if not answer.ok else "an answer over 1 MiB"
            raise RefreshFailed(f"the token endpoint refused the refresh: {why}")
        try:
            grant = json.loads(answer.body)
        except ValueError as exc:
            raise RefreshFailed(f"the token endpoint refused the refresh: {exc}") from None
        access = grant.get("access_token") if isinstance(grant, dict) else None
        if not isinstance(access, str) or not access:
            raise RefreshFailed("the token endpoint answered without an access_token")
        expires_in = grant.get("expires_in")
        expires_at = int(time.time() + float(expires_in)) if expires_in else None
        rotated = (
            grant.get("refresh_token") if isinstance(grant.get("refresh_token"), str) else None
        )
        self.vault.update_oauth(user, connection, access, expires_at, rotated)
        return replace(
            credential,
            access_token=Secret(access),
            refresh_token=Secret(rotated) if rotated else credential.refresh_token,
            expires_at=expires_at or None,
        )

    def write_calls(self, calls: list[dict[str, Any]]) -> None:
        self.store.usage.add_calls(calls)

    def write_usage(self, usage: list[dict[str, Any]]) -> None:
        self.store.usage.add_events(usage)

    def write_events(self, events: list[tuple[str, str, dict[str, Any]]]) -> None:
        now = datetime.now(UTC)
        self.store.runs.append_events(
            [(run, now, kind, json.dumps(data, default=repr)) for run, kind, data in events]
        )
