"""The bridge's HTTP/1.1 proxy: asyncio protocols over httptools, nothing else on the hot path.

One ``ClientProtocol`` per sandbox connection, one exchange at a time on it (keep-alive, no
pipelining). The order of every exchange:

1. ``connection_made``: the peer address must be in the sandbox subnet, or the socket is
   aborted before a byte is read (nftables already drops other sources; this is the second
   lock on the same door).
2. headers complete: ``Gate.authorize`` checks the run token and the route and returns where to
   go and which credential headers to add. Until it answers, body bytes wait in memory.
3. the request goes upstream on a pooled keep-alive connection, with hop-by-hop headers and
   every header the sandbox could use to authenticate removed, the credential added, and the
   body streamed as it arrives; the response streams back the same way. Each side pauses the
   other when its buffers fill, so memory stays bounded whatever the sizes.
4. the exchange is recorded (``Gate.record``): status, bytes, latency, never a credential.

Upstream responses pass through ``redact``: any occurrence of the attached secret is overwritten
with asterisks of the same length, so a reflecting upstream cannot hand it to the sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import httptools

log = logging.getLogger("corral.bridge")

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
    }
)
MAX_HEAD = 64 * 1024
MAX_REPLAY = 64 * 1024
# After answering a request whose body was not read (a refusal), keep reading and discarding
# for this long, or this much, before closing: closing a socket with unread input sends a
# reset, and the client would lose the answer (RFC 9112 section 9.6).
LINGER_S = 3.0
LINGER_BYTES = 64 << 20  # a request this small is kept, so it can be retried after a refresh
HIGH_WATER = 256 * 1024


class Refused(Exception):
    """The bridge answers the request itself with ``status`` and ``{"error": code, ...}``."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


@dataclass
class Head:
    method: bytes
    url: bytes
    headers: list[tuple[bytes, bytes]]
    keep_alive: bool
    content_length: int | None
    run: str | None = None  # known once the token checks out: refused calls are still its own
    connection: str | None = None

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


@dataclass
class Route:
    """Where an authorized request goes, decided by the gate."""

    scheme: str
    host: str
    port: int
    target: bytes  # path and query as sent upstream
    host_header: bytes
    drop: frozenset[bytes]  # request headers the sandbox may not pass on (lowercase)
    add: list[tuple[bytes, bytes]]  # credential headers
    secrets: list[bytes]  # values to redact from anything flowing back
    connection: str
    run: str
    timeout: float
    meter: Callable[[bytes, bytes], None] | None = None  # (content-type, body prefix) -> usage
    # OAuth: on a 401, refresh the credential and return the route to try once more with
    reauthorize: Callable[[], Awaitable[Route]] | None = None
    local: Callable[[Head, bytes], Awaitable[tuple[int, dict[str, Any]]]] | None = None


@dataclass
class Exchange:
    head: Head
    peer: str
    started: float = field(default_factory=time.perf_counter)
    route: Route | None = None
    status: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    error: str | None = None


class Gate(Protocol):
    def admit(self, peer: str) -> bool: ...

    async def authorize(self, head: Head, peer: str) -> Route: ...

    def record(self, exchange: Exchange) -> None: ...

    max_body: int


def refusal_bytes(status: int, code: str, detail: str, keep_alive: bool) -> bytes:
    body = json.dumps({"error": code, "detail": detail}).encode()
    reason = _REASONS.get(status, "Error")
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        f"connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    )
    return head.encode() + body


_REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    413: "Payload Too Large",
    502: "Bad Gateway",
    504: "Gateway Timeout",
    200: "OK",
    202: "Accepted",
    503: "Service Unavailable",
}


class ClientProtocol(asyncio.Protocol):
    """One sandbox's connection to the bridge."""

    def __init__(self, gate: Gate, pool: Pool) -> None:
        self.gate, self.pool = gate, pool
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._body: asyncio.Queue[bytes | None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._exchange: Exchange | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._upstream: UpstreamProtocol | None = None
        self._complete = False  # the current request has been read to its end
        self._lingering = -1  # bytes discarded while lingering; -1 when not lingering
        self._body_paused = False  # reading paused because the body queue filled up

    # -- transport callbacks -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else ""
        if not self.gate.admit(self.peer):
            transport.abort()  # before any byte of HTTP is read
            return
        self.transport = transport
        transport.set_write_buffer_limits(high=HIGH_WATER)
        _no_delay(transport)

    def data_received(self, data: bytes) -> None:
        if self._lingering >= 0:
            self._lingering += len(data)
            if self._lingering > LINGER_BYTES and self.transport is not None:
                self.transport.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail_now(400, "upgrade_refused", "protocol upgrades are not bridged")
        except httptools.HttpParserError as exc:
            self._fail_now(400, "bad_request", f"malformed HTTP: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._body is not None:
            self._body.put_nowait(None)

    def pause_writing(self) -> None:
        self._writable.clear()
        if self._upstream is not None and self._upstream.transport is not None:
            self._upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        self._writable.set()
        if self._upstream is not None and self._upstream.transport is not None:
            self._upstream.transport.resume_reading()

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url, self._headers, self._head_bytes = b"", [], 0
        self._complete = self._body_paused = False

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._guard_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))
        self._guard_head(len(name) + len(value))

    def on_headers_complete(self) -> None:
        length = next((v for k, v in self._headers if k == b"content-length"), None)
        head = Head(
            method=self.parser.get_method(),
            url=self._url,
            headers=self._headers,
            keep_alive=self.parser.should_keep_alive(),
            content_length=int(length) if length is not None and length.isdigit() else None,
        )
        self._body = asyncio.Queue()
        self._exchange = Exchange(head, self.peer)
        self._task = asyncio.get_running_loop().create_task(self._serve(self._exchange, self._body))

    def on_body(self, body: bytes) -> None:
        if self._body is not None:
            self._body.put_nowait(body)
            if self._body.qsize() > 16 and self.transport is not None:
                self._body_paused = True
                self.transport.pause_reading()  # the upstream is slower than the sandbox

    def on_message_complete(self) -> None:
        self._complete = True
        if self._body is not None:
            self._body.put_nowait(None)
        if self.transport is not None:
            self.transport.pause_reading()  # one exchange at a time; resumed when it ends

    # -- serving -----------------------------------------------------------------------------

    def _guard_head(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > MAX_HEAD:
            raise httptools.HttpParserError("request head too large")

    def _fail_now(self, status: int, code: str, detail: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(refusal_bytes(status, code, detail, keep_alive=False))
            self.transport.close()

    async def _serve(self, exchange: Exchange, body: asyncio.Queue[bytes | None]) -> None:
        head = exchange.head
        try:
            if head.content_length is not None and head.content_length > self.gate.max_body:
                raise Refused(
                    413,
                    "body_too_large",
                    f"request bodies are limited to {self.gate.max_body} bytes",
                )
            exchange.route = route = await self.gate.authorize(head, self.peer)
            if route.local is not None:
                data = await _read_all(body, self.gate.max_body)
                exchange.bytes_in = len(data)
                status, payload = await route.local(head, data)
                self._respond_json(exchange, status, payload)
            else:
                await self._forward(exchange, route, body)
        except Refused as refused:
            exchange.error = refused.code
            await _drain(body)
            self._respond_json(
                exchange, refused.status, {"error": refused.code, "detail": refused.detail}
            )
        except asyncio.CancelledError:
            exchange.error = exchange.error or "client_gone"
            raise
        except Exception:  # a supervisor: one broken exchange answers 500, the bridge goes on
            log.exception("bridge exchange failed")
            exchange.error = "internal_error"
            await _drain(body)
            self._respond_json(
                exchange,
                500,
                {"error": "internal_error", "detail": "the bridge failed; see its log"},
            )
        finally:
            self._upstream = None
            self.gate.record(exchange)
        self._next(exchange)

    def _next(self, exchange: Exchange) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not self._complete:
            self._linger(transport)  # an unread body must not be parsed as the next request
            return
        broken = exchange.error in ("upstream_reset", "timeout_mid")
        if not exchange.head.keep_alive or broken:
            transport.close()
            return
        self._body = None
        transport.resume_reading()

    def _linger(self, transport: asyncio.Transport) -> None:
        """Half-close after the answer, discard what still arrives, close on EOF or later."""
        self._lingering = 0
        self._body = None
        with contextlib.suppress(OSError, RuntimeError):
            if transport.can_write_eof():
                transport.write_eof()
        transport.resume_reading()
        asyncio.get_running_loop().call_later(LINGER_S, transport.close)

    def _reusable(self, exchange: Exchange) -> bool:
        return exchange.head.keep_alive and self._complete

    def _respond_json(self, exchange: Exchange, status: int, payload: dict[str, Any]) -> None:
        exchange.status = status
        body = json.dumps(payload).encode()
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: {'keep-alive' if self._reusable(exchange) else 'close'}"
            "\r\n\r\n"
        ).encode()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(head + body)
        exchange.bytes_out += len(body)

    async def _forward(
        self, exchange: Exchange, route: Route, body: asyncio.Queue[bytes | None]
    ) -> None:
        head = exchange.head
        replayable = route.reauthorize is not None and (head.content_length or 0) <= MAX_REPLAY
        if head.content_length is None and head.method not in (b"GET", b"HEAD", b"DELETE"):
            replayable = False  # a chunked body of unknown size is never held back
        kept: list[bytes] | None = [] if replayable else None
        retried = await self._send(exchange, route, body, kept, hold_401=replayable)
        if retried and route.reauthorize is not None and kept is not None:
            exchange.route = route = await route.reauthorize()
            replay: asyncio.Queue[bytes | None] = asyncio.Queue()
            for chunk in kept:
                replay.put_nowait(chunk)
            replay.put_nowait(None)
            await self._send(exchange, route, replay, None, hold_401=False)

    async def _send(
        self,
        exchange: Exchange,
        route: Route,
        body: asyncio.Queue[bytes | None],
        kept: list[bytes] | None,
        hold_401: bool,
    ) -> bool:
        """One attempt upstream. True if a held-back 401 asks for a refresh and a retry."""
        head = exchange.head
        loop = asyncio.get_running_loop()
        deadline = loop.time() + route.timeout
        try:
            upstream = await asyncio.wait_for(
                self.pool.acquire(route), timeout=min(route.timeout, 10)
            )
        except (TimeoutError, OSError) as exc:
            code = "upstream_timeout" if isinstance(exc, TimeoutError) else "upstream_unreachable"
            raise Refused(
                504 if code == "upstream_timeout" else 502,
                code,
                f"connection {route.connection}: cannot reach the upstream ({exc})",
            ) from None
        self._upstream = upstream
        assert self.transport is not None
        upstream.begin(self, exchange, route, hold_401)
        lines = [b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (head.method, route.target, route.host_header)]
        for name, value in head.headers:
            if name not in HOP_BY_HOP and name not in route.drop:
                lines.append(name + b": " + value + b"\r\n")
        for name, value in route.add:
            lines.append(name + b": " + value + b"\r\n")
        bodyless = head.method in (b"GET", b"HEAD", b"DELETE", b"OPTIONS")
        chunked = head.content_length is None and not bodyless
        if head.content_length is not None:
            lines.append(b"content-length: %d\r\n" % head.content_length)
        elif chunked:
            lines.append(b"transfer-encoding: chunked\r\n")
        lines.append(b"connection: keep-alive\r\n\r\n")
        upstream.write(b"".join(lines))
        sent = 0
        while True:
            chunk = await body.get()
            if chunk is None:
                break
            sent += len(chunk)
            if sent > self.gate.max_body:
                upstream.abort()
                raise Refused(
                    413,
                    "body_too_large",
                    f"request bodies are limited to {self.gate.max_body} bytes",
                )
            if kept is not None:
                kept.append(chunk)
            upstream.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            if self._body_paused and body.qsize() < 4:
                self._body_paused = False
                self.transport.resume_reading()
            await upstream.drained()
        if chunked:
            upstream.write(b"0\r\n\r\n")
        exchange.bytes_in = sent
        try:
            await asyncio.wait_for(upstream.finished, timeout=max(0.0, deadline - loop.time()))
        except TimeoutError:
            upstream.abort()
            if exchange.status == 0:
                raise Refused(
                    504,
                    "upstream_timeout",
                    f"connection {route.connection}: no answer in {route.timeout:g}s",
                ) from None
            exchange.error = "timeout_mid"
            return False
        if upstream.failed is not None and exchange.status == 0:
            raise Refused(
                502,
                "upstream_reset",
                f"connection {route.connection}: the upstream {upstream.failed}",
            )
        if upstream.failed is not None:
            exchange.error = "upstream_reset"
            return False
        held = upstream.held_401
        self.pool.release(upstream)
        if held:
            exchange.status = 0
        return held

    # -- called by the upstream side ---------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


class UpstreamProtocol(asyncio.Protocol):
    """One pooled connection to an upstream, reading one response at a time."""

    def __init__(self, key: tuple[str, str, int]) -> None:
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.client: ClientProtocol | None = None
        self.exchange: Exchange | None = None
        self.route: Route | None = None
        self.finished: asyncio.Future[None] = asyncio.get_event_loop().create_future()
        self.failed: str | None = None
        self.reusable = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._chunked_out = False
        self._meter_buf = bytearray()
        self._carry = b""
        self.hold_401 = self.held_401 = False

    def begin(
        self, client: ClientProtocol, exchange: Exchange, route: Route, hold_401: bool = False
    ) -> None:
        self.client, self.exchange, self.route = client, exchange, route
        self.hold_401, self.held_401 = hold_401, False
        self.finished = asyncio.get_running_loop().create_future()
        self.failed = None
        self.parser = httptools.HttpResponseParser(self)
        self._headers, self._reason, self._meter_buf, self._carry = [], b"", bytearray(), b""

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    async def drained(self) -> None:
        await self._writable.wait()

    def abort(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.abort()

    # transport callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.set_write_buffer_limits(high=HIGH_WATER)
        _no_delay(self.transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(f"sent a malformed response ({exc})")

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.reusable = False
        if not self.finished.done():
            self._fail("closed the connection before answering in full")

    def pause_writing(self) -> None:
        self._writable.clear()
        if self.client is not None and self.client.transport is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        self._writable.set()

    def _fail(self, why: str) -> None:
        self.failed = why
        self.reusable = False
        if not self.finished.done():
            self.finished.set_result(None)

    # httptools callbacks
    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        assert self.client is not None and self.exchange is not None and self.route is not None
        status = self.parser.get_status_code()
        self.exchange.status = status
        if status == 401 and self.hold_401:
            self.held_401 = True  # the sandbox never sees it: refresh, then try again
            return
        keep = self.exchange.head.keep_alive
        out = [b"HTTP/1.1 %d %s\r\n" % (status, self._reason or b"OK")]
        length = None
        for name, value in self._headers:
            if name == b"content-length":
                length = value
            if name in HOP_BY_HOP:
                continue
            out.append(name + b": " + self._redact(value) + b"\r\n")
        no_body = self.exchange.head.method == b"HEAD" or status in (204, 304) or status < 200
        if length is not None:
            out.append(b"content-length: " + length + b"\r\n")
        elif not no_body:
            self._chunked_out = True
            out.append(b"transfer-encoding: chunked\r\n")
        out.append(b"connection: keep-alive\r\n\r\n" if keep else b"connection: close\r\n\r\n")
        self.client.send(b"".join(out))

    def on_body(self, body: bytes) -> None:
        assert self.client is not None and self.exchange is not None and self.route is not None
        if self.held_401:
            return
        body = self._redact_body(body)
        self.exchange.bytes_out += len(body)
        if self.route.meter is not None and len(self._meter_buf) < 4 << 20:
            self._meter_buf += body
        self.client.send(b"%x\r\n%s\r\n" % (len(body), body) if self._chunked_out else body)

    def on_message_complete(self) -> None:
        assert self.client is not None and self.route is not None
        if self.held_401:
            self.reusable = self.parser.should_keep_alive()
            if not self.finished.done():
                self.finished.set_result(None)
            return
        if self._chunked_out:
            self.client.send(b"0\r\n\r\n")
            self._chunked_out = False
        if self.route.meter is not None:
            ctype = next((v for k, v in self._headers if k == b"content-type"), b"")
            self.route.meter(ctype, bytes(self._meter_buf))
        self.reusable = self.parser.should_keep_alive()
        if not self.finished.done():
            self.finished.set_result(None)

    def _redact(self, value: bytes) -> bytes:
        assert self.route is not None
        for secret in self.route.secrets:
            if secret and secret in value:
                value = value.replace(secret, b"*" * len(secret))
        return value

    def _redact_body(self, body: bytes) -> bytes:
        """Overwrite secrets, including one split across two chunks (same length: framing holds)."""
        assert self.route is not None
        if not self.route.secrets:
            return body
        longest = max(len(s) for s in self.route.secrets)
        joined = self._carry + body
        cleaned = self._redact(joined)
        keep = min(len(self._carry), len(cleaned))
        self._carry = joined[-(longest - 1) :] if longest > 1 else b""
        return cleaned[keep:]


class Pool:
    """Idle keep-alive connections per upstream origin."""

    def __init__(self, limit_per_origin: int = 256) -> None:
        self._idle: dict[tuple[str, str, int], list[UpstreamProtocol]] = {}
        self._limit = limit_per_origin
        self._tls = ssl.create_default_context()

    async def acquire(self, route: Route) -> UpstreamProtocol:
        key = (route.scheme, route.host, route.port)
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                return conn
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(
            lambda: UpstreamProtocol(key),
            route.host,
            route.port,
            ssl=self._tls if route.scheme == "https" else None,
        )
        return proto

    def release(self, conn: UpstreamProtocol) -> None:
        if not conn.reusable or conn.transport is None or conn.transport.is_closing():
            if conn.transport is not None:
                conn.transport.close()
            return
        conn.client = conn.exchange = conn.route = None
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) < self._limit:
            idle.append(conn)
        else:
            conn.transport.close()

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                if conn.transport is not None:
                    conn.transport.close()
        self._idle.clear()


async def _read_all(body: asyncio.Queue[bytes | None], limit: int) -> bytes:
    parts, size = [], 0
    while (chunk := await body.get()) is not None:
        size += len(chunk)
        if size > limit:
            raise Refused(413, "body_too_large", f"request bodies are limited to {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


async def _drain(body: asyncio.Queue[bytes | None]) -> None:
    while not body.empty():
        if body.get_nowait() is None:
            return


def _no_delay(transport: asyncio.Transport) -> None:
    """Heads and bodies go out in separate writes: never let Nagle hold the second back."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
