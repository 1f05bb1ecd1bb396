"""The bridge's decisions: who may call, where the call goes, with which credential.

``BridgeGate`` is what the proxy consults. Everything it needs from the database (live runs,
signing keys, connection profiles, credentials) is cached in memory and refreshed off the event
loop, so a call costs dictionary lookups; only the first call of a run, or a credential not
seen before, waits on a worker thread. What it records (audit rows, usage, run events) goes to
``Sink``, which writes in batches from a thread of its own.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import re
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import quote, unquote, unquote_plus

from corral.bridge import http1
from corral.bridge.agents import MAX_WAIT, AgentCalls, call_agent
from corral.bridge.connections import BUILTIN, Connection, credential_headers
from corral.bridge.exchange import Exchange, Head, Route
from corral.bridge.meter import read_usage
from corral.bridge.tokens import Claims, Verifier
from corral.errors import Refused, TokenRefused
from corral.limits import MAX_EVENT, MAX_RESULT, json_size, strict_loads
from corral.vault.kinds import Credential

RESERVED = "_corral"
# Every header a sandbox could use to present a credential of its own; never passed on.
AUTH_HEADERS = frozenset({b"authorization", b"x-api-key", b"cookie", b"proxy-authorization"})
RUNNER_EVENTS = frozenset({"log", "progress", "metric", "result", "error", "runner.started"})
_CREDENTIAL_TTL = 5.0  # a revoked or rotated credential stops working within this

# An endpoint the bridge answers itself: (request head, body) -> (status, JSON body).
LocalHandler = Callable[[Head, bytes], Awaitable[tuple[int, dict[str, Any]]]]


@dataclass(frozen=True)
class _Attach:
    add: list[tuple[bytes, bytes]]  # credential headers
    query: str  # or a credential query parameter, ``name=value``
    drop: frozenset[bytes]  # the sandbox's headers that never pass (canonical names)
    secrets: list[bytes]  # every form of the credential to redact from answers


class Backend(Protocol):
    """What the gate needs from the rest of Corral; every method may block (called off-loop)."""

    def run_is_live(self, run: str) -> bool: ...

    def ended_since(self, since: datetime) -> tuple[list[str], datetime]: ...

    def connection(self, name: str) -> Connection | None: ...

    def credential(self, user: str, connection: str) -> Credential | None: ...

    def refresh(self, user: str, connection: str, credential: Credential) -> Credential: ...

    def write_calls(self, calls: list[dict[str, Any]]) -> None: ...

    def write_usage(self, usage: list[dict[str, Any]]) -> None: ...

    def write_events(self, events: list[tuple[str, str, dict[str, Any]]]) -> None: ...


class Sink:
    """Batches what the bridge records and writes it from one thread, every ``interval``."""

    def __init__(self, backend: Backend, interval: float = 0.05) -> None:
        self._backend = backend
        self._interval = interval
        self._calls: list[dict[str, Any]] = []
        self._usage: list[dict[str, Any]] = []
        self._events: list[tuple[str, str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="bridge-sink", daemon=True)
        self._thread.start()

    def call(self, row: dict[str, Any]) -> None:
        with self._lock:
            self._calls.append(row)

    def usage(self, row: dict[str, Any]) -> None:
        with self._lock:
            self._usage.append(row)

    def events(self, run: str, events: list[tuple[str, dict[str, Any]]]) -> None:
        with self._lock:
            self._events.extend((run, kind, data) for kind, data in events)
        self._wake.set()  # events are awaited by whoever drives the run: write them now

    def flush(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
            usage, self._usage = self._usage, []
            events, self._events = self._events, []
        # Usage and calls first: once a run's result is visible, what it used is recorded.
        # A batch the store refuses goes back in front, with every batch after it, for the
        # next flush: a database blip delays what a run reported, and loses none of it.
        batches: list[tuple[str, list[Any], Callable[[Any], None]]] = [
            ("_usage", usage, self._backend.write_usage),
            ("_calls", calls, self._backend.write_calls),
            ("_events", events, self._backend.write_events),
        ]
        for i, (_, rows, write) in enumerate(batches):
            if not rows:
                continue
            try:
                write(rows)
            except BaseException:
                with self._lock:
                    for name, kept, _ in batches[i:]:
                        setattr(self, name, kept + getattr(self, name))
                raise

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)
        self.flush()

    def _loop(self) -> None:
        import logging

        failing = 0  # consecutive failed flushes: back off, and log the first one only
        while not self._stop:
            self._wake.wait(min(self._interval * 2**failing, 0.5))
            self._wake.clear()
            try:
                self.flush()
                failing = 0
            except Exception:  # a supervisor: a failed batch must not stop the bridge
                if not failing:
                    logging.getLogger("corral.bridge").exception(
                        "could not record bridge activity; keeping it for the next try"
                    )
                failing = min(failing + 1, 8)


class BridgeGate:
    def __init__(
        self,
        subnet: ipaddress.IPv4Network,
        verifier: Verifier,
        backend: Backend,
        sink: Sink,
        *,
        max_body: int = 10 << 20,
        upstream_timeout: float = 60.0,
        clock: Callable[[], float] = time.time,
        agents: AgentCalls | None = None,
    ) -> None:
        self.subnet = subnet
        # Serves agent-to-agent calls (``/_corral/apps/{app}/runs``); without it they get 503.
        self.agents = agents
        self.verifier = verifier
        self.backend = backend
        self.sink = sink
        self.max_body = max_body
        self.upstream_timeout = upstream_timeout
        self._clock = clock
        self._live: set[str] = set()
        self._cursor = datetime.now(UTC)
        self._credentials: dict[tuple[str, str], tuple[float, Credential | None]] = {}
        self._attached: dict[tuple[str, str], tuple[Connection, Credential, _Attach]] = {}
        self._connections: dict[str, tuple[float, Connection | None]] = {}

    # -- the proxy's questions ---------------------------------------------------------------

    def admit(self, peer: str) -> bool:
        try:
            return ipaddress.IPv4Address(peer) in self.subnet
        except ValueError:
            return False

    async def authorize(self, head: Head, peer: str) -> Route:
        name, rest, query = http1.route_target(head.url)
        claims = await self._claims(head, peer)
        head.run, head.connection = claims.run, name
        if name == RESERVED:
            return self._local(rest, claims)
        connection = await self._connection(name)
        if connection is None:
            raise Refused(404, "unknown_connection", f"no connection named {name!r}")
        if not claims.allows(name):
            raise Refused(403, "out_of_scope", f"this run may not use connection {name!r}")
        credential = await self._credential(claims.user, name)
        if credential is None:
            raise Refused(
                403,
                "no_credential",
                f"user {claims.user!r} has no credential for connection {name!r}",
            )
        if credential.expires_at is not None and credential.expires_at <= self._clock() + 30:
            credential = await self._refresh(claims.user, name, credential)
        return self._route(claims, connection, credential, rest, query)

    def _route(
        self,
        claims: Claims,
        connection: Connection,
        credential: Credential,
        rest: bytes,
        query: bytes,
    ) -> Route:
        name = connection.name
        attach = self._attach(claims.user, connection, credential)
        add, query_auth = attach.add, attach.query
        target = (
            (connection.base_path.encode() + b"/" + rest)
            if rest
            else (connection.base_path.encode() or b"/")
        )
        if query_auth:  # the sandbox's own value for the credential's parameter is dropped
            query = _without_param(query, query_auth.split("=", 1)[0])
        extra = "&".join(x for x in (query.decode("latin-1"), query_auth) if x)
        if extra:
            target += b"?" + extra.encode("latin-1")
        scheme, host, port = connection.origin
        return Route(
            scheme=scheme,
            host=host,
            port=port,
            target=target,
            host_header=connection.host_header.encode(),
            drop=attach.drop,
            add=add,
            secrets=attach.secrets,
            connection=name,
            run=claims.run,
            timeout=self.upstream_timeout,
            meter=self._meter(claims, connection) if connection.meter else None,
            reauthorize=self._reauthorizer(claims, connection, credential, rest, query)
            if credential.kind == "oauth2"
            else None,
        )

    def _attach(self, user: str, connection: Connection, credential: Credential) -> _Attach:
        """How a credential goes on a connection's calls, worked out once per cached pair."""
        key = (user, connection.name)
        cached = self._attached.get(key)
        if cached is not None and cached[0] is connection and cached[1] is credential:
            return cached[2]
        fields = credential.revealed()  # host memory only: never logged, never sent back
        add, query = credential_headers(connection, credential.kind, fields)
        attach = _Attach(
            add=add,
            query=query,
            drop=AUTH_HEADERS | {http1.canonical(k) for k, _ in add},
            secrets=_secrets(fields, add),
        )
        if len(self._attached) > 100_000:
            self._attached.clear()
        self._attached[key] = (connection, credential, attach)
        return attach

    def _reauthorizer(
        self,
        claims: Claims,
        connection: Connection,
        credential: Credential,
        rest: bytes,
        query: bytes,
    ) -> Callable[[], Awaitable[Route]]:
        async def again() -> Route:
            fresh = await self._refresh(claims.user, connection.name, credential)
            return self._route(claims, connection, fresh, rest, query)

        return again

    def record(self, exchange: Exchange) -> None:
        route = exchange.route
        path = exchange.head.url.split(b"?", 1)[0].decode("latin-1")[:512]
        self.sink.call(
            {
                "at": datetime.now(UTC),
                "run": route.run if route else exchange.head.run,
                "connection": route.connection if route else exchange.head.connection,
                "method": exchange.head.method.decode("latin-1"),
                "path": path,  # as the sandbox sent it: never with a query-string credential
                "status": exchange.status,
                "bytes_in": exchange.bytes_in,
                "bytes_out": exchange.bytes_out,
                "latency_ms": round((time.perf_counter() - exchange.started) * 1000, 3),
                "error": exchange.error,
                "peer": exchange.peer,
            }
        )

    # -- pieces ------------------------------------------------------------------------------

    async def _claims(self, head: Head, peer: str) -> Claims:
        token = _token(head)
        try:
            claims = self.verifier.verify(token, peer)
        except TokenRefused as refused:
            raise Refused(refused.status, f"token_{refused.reason}", refused.detail) from None
        if claims.run not in self._live:
            live = await asyncio.get_running_loop().run_in_executor(
                None, self.backend.run_is_live, claims.run
            )
            if not live:
                self.verifier.revoke_run(claims.run)
                raise Refused(
                    401, "token_revoked", f"run {claims.run} has ended; its token is revoked"
                )
            self._live.add(claims.run)
        return claims

    def revoke_ended(self) -> list[str]:
        """Called every few tens of milliseconds from a thread: runs that ended lose access.

        Only runs the store says have *ended* are revoked; a run the poll has not seen start
        is not touched, so a slow poll can never cut off a run that is just beginning.
        """
        ended, self._cursor = self.backend.ended_since(self._cursor)
        for run in ended:
            self.verifier.revoke_run(run)
            self._live.discard(run)
        return ended

    async def _connection(self, name: str) -> Connection | None:
        cached = self._connections.get(name)
        if cached is not None and cached[0] > self._clock():
            return cached[1]
        found = await asyncio.get_running_loop().run_in_executor(
            None, self.backend.connection, name
        )
        if found is None:
            found = BUILTIN.get(name)
        self._connections[name] = (self._clock() + 5.0, found)
        return found

    async def _credential(self, user: str, connection: str) -> Credential | None:
        key = (user, connection)
        cached = self._credentials.get(key)
        if cached is not None and cached[0] > self._clock():
            return cached[1]
        found = await asyncio.get_running_loop().run_in_executor(
            None, self.backend.credential, user, connection
        )
        self._credentials[key] = (self._clock() + _CREDENTIAL_TTL, found)
        return found

    async def _refresh(self, user: str, connection: str, credential: Credential) -> Credential:
        try:
            fresh = await asyncio.get_running_loop().run_in_executor(
                None, self.backend.refresh, user, connection, credential
            )
        except Exception as exc:  # the token endpoint's failure is the call's failure
            raise Refused(
                502, "refresh_failed", f"refreshing the {connection} token failed: {exc}"
            ) from None
        self._credentials[(user, connection)] = (self._clock() + _CREDENTIAL_TTL, fresh)
        return fresh

    def _meter(self, claims: Claims, connection: Connection) -> Callable[[bytes, bytes], None]:
        def meter(content_type: bytes, body: bytes) -> None:
            usage = read_usage(connection.meter or "", content_type, body)
            if usage is not None:
                self.sink.usage(
                    {
                        "at": datetime.now(UTC),
                        "run": claims.run,
                        "user": claims.user,
                        "connection": connection.name,
                        **usage,
                    }
                )

        return meter

    def _local(self, rest: bytes, claims: Claims) -> Route:
        """Endpoints the bridge answers itself: the runner's events, and agent-to-agent calls."""
        if rest == b"events":
            return self._local_route(claims, self._events(claims), timeout=10.0)
        parts = rest.split(b"/")
        if len(parts) == 3 and parts[0] == b"apps" and parts[1] and parts[2] == b"runs":
            app = unquote(parts[1].decode("ascii", "replace"))
            return self._local_route(claims, self._agent_call(claims, app), timeout=MAX_WAIT)
        raise Refused(
            404,
            "unknown_endpoint",
            "the bridge serves /_corral/events and /_corral/apps/{app}/runs",
        )

    def _events(self, claims: Claims) -> LocalHandler:
        async def events(head: Head, body: bytes) -> tuple[int, dict[str, Any]]:
            if head.method != b"POST":
                raise Refused(405, "method_not_allowed", "POST events")
            try:  # strictly: a NaN would be stored, then break every reader of the run
                batch = strict_loads(body)["events"]
                assert isinstance(batch, list)
            except (ValueError, KeyError, TypeError, AssertionError):
                raise Refused(400, "bad_events", 'the body must be {"events": [...]}') from None
            accepted = []
            for event in batch[:1000]:
                if isinstance(event, dict) and event.get("type") in RUNNER_EVENTS:
                    data = {k: v for k, v in event.items() if k not in ("type", "at")}
                    if isinstance(event.get("at"), (int, float)):
                        data["sandbox_at"] = event["at"]  # when it happened, by the runner
                    accepted.append(within_limits(str(event["type"]), data))
            self.sink.events(claims.run, accepted)
            return 202, {"accepted": len(accepted)}

        return events

    def _agent_call(self, claims: Claims, app: str) -> LocalHandler:
        async def call(head: Head, body: bytes) -> tuple[int, dict[str, Any]]:
            if head.method != b"POST":
                raise Refused(405, "method_not_allowed", "POST a run of the app")
            if self.agents is None:
                raise Refused(
                    503, "agent_calls_unavailable", "this bridge was started without the pipeline"
                )
            return await call_agent(self.agents, claims, app, body, self._clock)

        return call

    @staticmethod
    def _local_route(claims: Claims, handler: LocalHandler, timeout: float) -> Route:
        return Route(
            scheme="local",
            host="",
            port=0,
            target=b"",
            host_header=b"",
            drop=frozenset(),
            add=[],
            secrets=[],
            connection=RESERVED,
            run=claims.run,
            timeout=timeout,
            local=handler,
        )


def within_limits(kind: str, data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The event as it is, or, if it is over its limit, the error that fails its attempt for
    good (the runner checks first; a sandbox that skips the check gets the same answer)."""
    if kind == "result":
        size, limit, code = json_size(data.get("output")), MAX_RESULT, "result_too_large"
    else:
        size, limit, code = json_size(data), MAX_EVENT, "event_too_large"
    if size <= limit:
        return kind, data
    message = f"the agent's {kind} event is {size} bytes of JSON; the limit is {limit}"
    return "error", {"code": code, "message": message, "attempt": data.get("attempt")}


def _token(head: Head) -> str | None:
    for name, value in head.headers:
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            return value[7:].strip().decode("latin-1")
        if name == b"x-api-key":
            return value.strip().decode("latin-1")
    return None


def _secrets(fields: dict[str, str], add: list[tuple[bytes, bytes]]) -> list[bytes]:
    """Every form in which the credential could come back: raw values, the header values, and
    the spellings an upstream echoing it would use (percent-encoded in a URL, escaped in JSON).
    An upstream that transforms it otherwise (hashes, re-encodes) is beyond what any proxy can
    recognise; see docs/design/bridge.md."""
    raw = {
        str(v).encode()
        for k, v in fields.items()
        if k not in ("token_url", "client_id", "expires_at") and len(str(v)) >= 8
    }
    for _, value in add:
        raw.add(value)
        if value.startswith(b"Basic "):
            raw.add(base64.b64decode(value[6:]))
    out = set(raw)
    for value in raw:
        text = value.decode("latin-1")
        out.add(quote(text, safe="").encode("latin-1"))
        out.add(json.dumps(text)[1:-1].encode("latin-1"))
        out.add(json.dumps(text)[1:-1].replace("/", "\\/").encode("latin-1"))
    return sorted(out, key=len, reverse=True)


def _param_name(raw: bytes) -> str:
    """A query parameter's name as the most lenient server reads it: decoded (``+`` is a
    space), case folded (ASP.NET), with ``' '``, ``.`` and ``[`` read as ``_`` (PHP)."""
    return unquote_plus(raw.decode("latin-1")).lower().translate(_PHP_NAME)


_PHP_NAME = str.maketrans(" .[", "___")


def _without_param(query: bytes, name: str) -> bytes:
    """``query`` without any parameter some server would read as ``name``: pairs end at
    ``&`` or at ``;`` (both separate pairs somewhere), names are compared as ``_param_name``
    reads them. The separators between the pairs kept are kept."""
    target = _param_name(name.encode("latin-1"))
    parts = re.split(rb"([&;])", query)  # pairs at even indexes, separators between
    out = b""
    for i in range(0, len(parts), 2):
        pair = parts[i]
        if pair and _param_name(pair.split(b"=", 1)[0]) != target:
            out += (parts[i - 1] if out else b"") + pair
    return out
