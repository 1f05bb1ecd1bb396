"""The bridge's gate: which calls pass, where they go, with which credential, and every refusal.
The real gate and verifier over ``MemoryBackend``; no socket, no store."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from corral.bridge import tokens
from corral.bridge.connections import Connection
from corral.bridge.exchange import Exchange, Head, Route
from corral.bridge.gate import AUTH_HEADERS, BridgeGate, Sink
from corral.bridge.tokens import SigningKeyRing, Verifier
from corral.errors import Refused
from corral.limits import MAX_RESULT
from corral.vault.kinds import Credential
from tests.gate_backend import MemoryBackend

SANDBOX = "10.213.0.7"
SECRET = "sk-alice-0123456789abcdef"


@dataclass
class World:
    gate: BridgeGate
    backend: MemoryBackend
    ring: SigningKeyRing
    now: list[float]

    def token(self, run: str = "run-1", connections: tuple[str, ...] = ("up", "q")) -> str:
        self.backend.live.add(run)
        return tokens.mint(
            self.ring,
            user="alice",
            app="analyst",
            session=run,
            run=run,
            connections=connections,
            address=SANDBOX,
            lifetime=300,
        )

    def authorize(
        self, url: str, token: str | None = None, peer: str = SANDBOX, method: bytes = b"GET"
    ) -> tuple[Route, Head]:
        headers = [] if token is None else [(b"authorization", f"Bearer {token}".encode())]
        head = Head(method, url.encode(), headers, keep_alive=True)
        return asyncio.run(self.gate.authorize(head, peer)), head

    def refused(self, url: str, token: str | None = None, peer: str = SANDBOX) -> Refused:
        with pytest.raises(Refused) as caught:
            self.authorize(url, token, peer)
        return caught.value


def credential(connection: str, kind: str, **fields: str | int) -> Credential:
    return Credential.build("alice", connection, kind, fields, datetime.now(UTC))


@pytest.fixture
def world() -> Iterator[World]:
    backend = MemoryBackend()
    backend.connections["up"] = Connection("up", "https://api.example.com/v2")
    backend.connections["q"] = Connection("q", "http://127.0.0.1:8080/x", "query:api_key")
    for name in ("up", "q"):
        backend.credentials[("alice", name)] = credential(name, "bearer", token=SECRET)
    ring = SigningKeyRing()
    now = [time.time()]
    sink = Sink(backend)
    gate = BridgeGate(
        ipaddress.IPv4Network("10.213.0.0/16"),
        Verifier(ring),
        backend,
        sink,
        clock=lambda: now[0],
    )
    yield World(gate, backend, ring, now)
    sink.close()


def test_a_call_goes_to_its_connection_with_the_users_credential(world: World) -> None:
    route, head = world.authorize("/up/repos/acme?page=2", world.token())
    assert (route.scheme, route.host, route.port) == ("https", "api.example.com", 443)
    assert route.target == b"/v2/repos/acme?page=2" and route.host_header == b"api.example.com"
    assert route.add == [(b"authorization", f"Bearer {SECRET}".encode())]
    assert route.drop >= AUTH_HEADERS  # the sandbox's own credentials never pass
    assert SECRET.encode() in route.secrets  # redacted from anything coming back
    assert (route.run, route.connection, head.run, head.connection) == ("run-1", "up") * 2


def test_a_query_credential_replaces_any_the_sandbox_sent(world: World) -> None:
    route, _ = world.authorize("/q/search?api_key=mine&z=1;Api.Key=evil", world.token())
    assert route.target == f"/x/search?z=1&api_key={SECRET}".encode()
    assert route.add == []


def test_a_connection_outside_the_tokens_scope_is_refused(world: World) -> None:
    refusal = world.refused("/q/search", world.token(connections=("up",)))
    assert (refusal.status, refusal.code) == (403, "out_of_scope")


def test_unknown_connections_and_missing_credentials_are_named(world: World) -> None:
    token = world.token(connections=("*",))
    unknown = world.refused("/nowhere/x", token)
    assert (unknown.status, unknown.code) == (404, "unknown_connection")
    none = world.refused("/github/user", token)  # a built-in profile; alice has no credential
    assert (none.status, none.code) == (403, "no_credential")


def test_token_refusals_carry_their_reason(world: World) -> None:
    token = world.token()
    missing = world.refused("/up/x")
    assert (missing.status, missing.code) == (401, "token_missing")
    elsewhere = world.refused("/up/x", token, peer="10.213.0.8")
    assert (elsewhere.status, elsewhere.code) == (403, "token_wrong_sandbox")
    bad = world.refused("/up/x", "garbage")
    assert (bad.status, bad.code) == (401, "token_malformed")


def test_a_run_that_is_not_live_loses_its_tokens(world: World) -> None:
    token = world.token()
    world.backend.live.clear()  # the run ended before this call
    refusal = world.refused("/up/x", token)
    assert (refusal.status, refusal.code) == (401, "token_revoked")
    world.backend.live.add("run-1")  # revoked for good: the backend is not asked again
    assert world.refused("/up/x", token).code == "token_revoked"


def test_runs_that_end_are_revoked_by_the_poll(world: World) -> None:
    token = world.token()
    world.authorize("/up/x", token)
    world.backend.ended.append("run-1")
    assert world.gate.revoke_ended() == ["run-1"]
    assert world.refused("/up/x", token).code == "token_revoked"


def test_a_revoked_credential_stops_working_once_its_cache_entry_ages(world: World) -> None:
    token = world.token()
    world.authorize("/up/x", token)
    del world.backend.credentials[("alice", "up")]
    world.authorize("/up/x", token)  # still cached
    world.now[0] += 6
    assert world.refused("/up/x", token).code == "no_credential"


def test_an_oauth_token_about_to_expire_is_refreshed_before_the_call(world: World) -> None:
    soon = int(world.now[0]) + 10
    world.backend.credentials[("alice", "up")] = credential(
        "up", "oauth2", access_token="old-access-token", expires_at=soon
    )
    world.backend.refreshed[("alice", "up")] = credential(
        "up", "oauth2", access_token="new-access-token", expires_at=soon + 3600
    )
    route, _ = world.authorize("/up/x", world.token())
    assert world.backend.refreshes == [("alice", "up")]
    assert route.add == [(b"authorization", b"Bearer new-access-token")]
    assert route.reauthorize is not None  # a 401 upstream refreshes once more


def _local(world: World, url: str, body: bytes, method: bytes = b"POST") -> tuple[int, object]:
    route, head = world.authorize(url, world.token())
    assert route.local is not None and route.connection == "_corral"
    head.method = method
    local = route.local

    async def call() -> tuple[int, object]:
        return await local(head, body)

    return asyncio.run(call())


def test_the_runners_events_are_accepted_by_type_and_checked_against_their_limits(
    world: World,
) -> None:
    batch = {
        "events": [
            {"type": "log", "message": "hi", "at": 12.5},
            {"type": "run.finished", "status": "succeeded"},  # the host's alone: dropped
            {"type": "result", "output": "x" * (MAX_RESULT + 1), "attempt": 1},
        ]
    }
    status, answer = _local(world, "/_corral/events", json.dumps(batch).encode())
    assert (status, answer) == (202, {"accepted": 2})
    world.gate.sink.flush()
    [(run, kind, data), (_, second, error)] = world.backend.events
    assert (run, kind, data) == ("run-1", "log", {"message": "hi", "sandbox_at": 12.5})
    assert (second, error["code"], error["attempt"]) == ("error", "result_too_large", 1)


@pytest.mark.parametrize(
    ("body", "method", "code"),
    [
        (b'{"events": [{"type": "log", "x": NaN}]}', b"POST", "bad_events"),
        (b'{"evnts": []}', b"POST", "bad_events"),
        (b"", b"GET", "method_not_allowed"),
    ],
)
def test_an_events_call_out_of_protocol_is_refused(
    world: World, body: bytes, method: bytes, code: str
) -> None:
    with pytest.raises(Refused) as caught:
        _local(world, "/_corral/events", body, method)
    assert caught.value.code == code


def test_the_bridges_own_endpoints_are_only_those_it_serves(world: World) -> None:
    with pytest.raises(Refused) as caught:
        _local(world, "/_corral/apps/other/runs", b"{}")
    assert (caught.value.status, caught.value.code) == (503, "agent_calls_unavailable")
    unknown = world.refused("/_corral/secrets", world.token())
    assert (unknown.status, unknown.code) == (404, "unknown_endpoint")


def test_only_the_sandbox_subnet_is_admitted(world: World) -> None:
    assert world.gate.admit(SANDBOX)
    assert not world.gate.admit("127.0.0.1")
    assert not world.gate.admit("::1") and not world.gate.admit("")


def test_the_audit_row_never_holds_the_query_string(world: World) -> None:
    route, head = world.authorize("/q/search?api_key=mine", world.token())
    exchange = Exchange(head, SANDBOX, route=route, status=200)
    world.gate.record(exchange)
    world.gate.sink.flush()
    [row] = world.backend.calls
    assert (row["path"], row["run"], row["connection"], row["status"]) == (
        "/q/search",
        "run-1",
        "q",
        200,
    )
