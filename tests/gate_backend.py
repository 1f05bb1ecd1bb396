"""``MemoryBackend``: the bridge gate's ``Backend`` protocol over dictionaries, so that the real
gate (and the real bridge around it) can be driven without a store: by the bridge's framing
and attack tests (tests/integration/raw_http.py) and the gate's unit tests."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from corral.bridge.connections import Connection
from corral.vault.kinds import Credential


class MemoryBackend:
    """The gate's Backend over dictionaries."""

    def __init__(self) -> None:
        self.connections: dict[str, Connection] = {}
        self.credentials: dict[tuple[str, str], Credential] = {}
        self.live: set[str] = set()
        self.calls: list[dict[str, Any]] = []
        self.usage: list[dict[str, Any]] = []
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.ended: list[str] = []  # runs that ended since the last ``ended_since``
        self.refreshed: dict[tuple[str, str], Credential] = {}  # what a refresh returns
        self.refreshes: list[tuple[str, str]] = []

    def run_is_live(self, run: str) -> bool:
        return run in self.live

    def ended_since(self, since: datetime) -> tuple[list[str], datetime]:
        ended, self.ended = self.ended, []
        return ended, datetime.now(UTC)

    def connection(self, name: str) -> Connection | None:
        return self.connections.get(name)

    def credential(self, user: str, connection: str) -> Credential | None:
        return self.credentials.get((user, connection))

    def refresh(self, user: str, connection: str, credential: Credential) -> Credential:
        self.refreshes.append((user, connection))
        return self.refreshed.get((user, connection), credential)

    def write_calls(self, calls: list[dict[str, Any]]) -> None:
        self.calls.extend(calls)

    def write_usage(self, usage: list[dict[str, Any]]) -> None:
        self.usage.extend(usage)

    def write_events(self, events: list[tuple[str, str, dict[str, Any]]]) -> None:
        self.events.extend(events)
