"""The bridge's HTTP/1.1 proxy: asyncio protocols over llhttp (httptools), rules from ``http1``.

A sandbox connection is served by one ``ClientProtocol``. llhttp tokenises what arrives into
an *inbox* of events in arrival order: a request head, body pieces, the end of a body, or a
refusal (malformed bytes, a CONNECT, an upgrade). One task per connection takes events from
the inbox and serves exchanges strictly one after another, so a pipelined request waits,
parsed, until the answer before it is complete, and can never be mixed into it. The order of
one exchange:

1. ``connection_made``: the peer address must be in the sandbox subnet, and the peer must be
   under its connection cap, or the socket is aborted before a byte is read (nftables already
   drops other sources; this is the second lock on the same door).
2. the head: its framing is decided by ``http1.request_body`` (ambiguity is refused, never
   guessed); ``Gate.authorize`` checks the run token and the route and returns where to go and
   which credential to add. Body bytes wait in the inbox meanwhile (bounded: reading pauses).
3. upstream, on a keep-alive connection of *this run's* pool (``Pool``), with every
   connection-specific header, every header the sandbox could authenticate or route with, and
   every header the ``Connection`` field names removed (compared by ``http1.canonical``
   name); the body is forwarded with the framing it arrived with. ``Expect: 100-continue`` is
   the bridge's to meet: it answers ``100 Continue`` once the call is authorized.
4. the response streams back through ``UpstreamProtocol``: interim (1xx) responses are passed
   on to HTTP/1.1 clients, the final one is re-framed by the bridge with its own status line,
   decoded if the upstream compressed it (only as fast as the sandbox reads), and redacted
   (``http1.Redactor``) on the way. The next exchange waits until the sandbox has read this
   one's answer, so a sandbox that reads nothing holds at most one answer's buffer.
5. the exchange is recorded (``Gate.record``): status, bytes, latency, never a credential.

An upstream connection goes back to its run's pool only if the request was written to its
end, the final response ended by its own framing (not by the connection closing), the
upstream asked to keep it, and nothing unexpected happened: bytes after the response, a
response while idle, a HEAD, a body on a method whose body means nothing. Anything else
closes it. A sandbox connection stays open only if the request was read to its end and the
answer was complete; otherwise it is closed after a lingering half-close (the client can
still read the answer, RFC 9112 section 9.6).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import httptools

from corral.bridge import http1
from corral.bridge.http1 import Delimit, Framing, Refused

__all__ = ["ClientProtocol", "Connections", "Exchange", "Gate", "Head", "Pool", "Refused", "Route"]

log = logging.getLogger("corral.bridge")

MAX_HEAD = 64 * 1024
MAX_REPLAY = 64 * 1024
IDLE_S = 30.0  # no complete request head on a connection for this long: it is closed
BODY_IDLE_S = 30.0  # a request body that stalls this long between pieces: 408
# After answering a request whose body was not read, keep reading and discarding for this
# long, or this much, before closing: closing a socket with unread input sends a reset, and
# the client would lose the answer (RFC 9112 section 9.6).
LINGER_S = 3.0
LINGER_BYTES = 64 << 20
HIGH_WATER = 256 * 1024
INBOX_HIGH = 256 * 1024  # body bytes parsed ahead of the exchange: above this, stop reading
INBOX_LOW = 64 * 1024
# What an inbox event costs beyond its bytes, as Python objects: a pipeline of tiny requests
# is bounded by its heads' number, not only by their few bytes.
HEAD_COST = 1024
PIECE_COST = 64
# Input is parsed this much at a time, so that one read of tiny pipelined requests cannot put
# more than this in the inbox past its bound; the rest waits, unparsed, for room.
FEED_SLICE = 16 * 1024
MAX_DECODED = 64 << 20  # a compressed response may expand to at most this much
# Methods whose request body has no defined meaning (RFC 9110 section 9.3): one may be sent
# and is forwarded as framed, but an upstream that ignores it would read it as a request of
# its own, so the connection is never reused afterwards.
BODYLESS_METHODS = frozenset({b"GET", b"HEAD", b"DELETE", b"OPTIONS"})
_NOT_FORWARDED = http1.HOP_BY_HOP | http1.SPOOFABLE | {b"accept-encoding"}
_NOT_RETURNED = http1.HOP_BY_HOP | http1.CREDENTIAL_RESPONSE
_END = object()  # the end of a request's body, in the inbox


class _Gone(Exception):
    """The sandbox connection ended or idled out while the bridge waited on it."""


class _HeadTooLarge(Exception):
    pass


@dataclass
class Head:
    method: bytes
    url: bytes
    headers: list[tuple[bytes, bytes]]  # names lowercase, in order, duplicates kept
    keep_alive: bool
    notable: list[tuple[bytes, bytes]] = field(default_factory=list)  # see http1.NOTABLE
    http10: bool = False
    run: str | None = None  # known once the token checks out: refused calls are still its own
    connection: str | None = None
    size: int = 0  # bytes of the head as received, for the inbox's bound

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
    drop: frozenset[bytes]  # request headers the sandbox may not pass on (``http1.canonical``)
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
    answered: bool = False  # a final response head went to the sandbox
    complete: bool = False  # ... and its body was sent to its end
    closing: bool = False  # the connection ends after this exchange, whatever else holds


class Gate(Protocol):
    def admit(self, peer: str) -> bool: ...

    async def authorize(self, head: Head, peer: str) -> Route: ...

    def record(self, exchange: Exchange) -> None: ...

    max_body: int


class Connections:
    """Every open sandbox connection: the cap per sandbox address, and the list to close."""

    def __init__(self, per_peer: int = 256) -> None:
        self.per_peer = per_peer
        self.open: set[ClientProtocol] = set()
        self._by_peer: dict[str, int] = {}

    def add(self, conn: ClientProtocol) -> bool:
        held = self._by_peer.get(conn.peer, 0)
        if held >= self.per_peer:
            return False
        self._by_peer[conn.peer] = held + 1
        self.open.add(conn)
        return True

    def remove(self, conn: ClientProtocol) -> None:
        if conn in self.open:
            self.open.discard(conn)
            left = self._by_peer.get(conn.peer, 1) - 1
            if left:
                self._by_peer[conn.peer] = left
            else:
                self._by_peer.pop(conn.peer, None)

    def held_by(self, peer: str) -> int:
        return self._by_peer.get(peer, 0)

    async def close(self) -> None:
        """Abort every connection and wait for their tasks (no task is left pending)."""
        tasks = []
        for conn in list(self.open):
            if conn.task is not None:
                tasks.append(conn.task)
            if conn.transport is not None:
                conn.transport.abort()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


class ClientProtocol(asyncio.Protocol):
    """One sandbox's connection to the bridge."""

    def __init__(self, gate: Gate, pool: Pool, conns: Connections | None = None) -> None:
        self.gate, self.pool = gate, pool
        self.conns = conns or Connections()
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.task: asyncio.Task[None] | None = None
        self.parser = httptools.HttpRequestParser(self)
        # What llhttp parsed, in order: Head, bytes, _END or Refused.
        self._inbox: deque[object] = deque()
        self._inbox_bytes = 0
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._ignoring = False  # input after a refusal or a closing request is discarded
        self._discarded = 0
        self._paused = False
        self._upstream: UpstreamProtocol | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._notable: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._in_head = False
        self._request_done = True  # the current request has been read to its end
        self._unparsed = b""  # input held back while the inbox is full
        self._unreleased = 0  # bytes fed since the parser last released an event (see _feed)
        self._in_message = False  # the parser is inside a request (head, body or trailers)
        self._writable = asyncio.Event()  # the sandbox reads what the bridge writes
        self._writable.set()

    # -- transport callbacks -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peername = transport.get_extra_info("peername")
        self.peer = str(peername[0]) if peername else ""
        if not self.gate.admit(self.peer) or not self.conns.add(self):
            transport.abort()  # before any byte of HTTP is read
            return
        self.transport = transport
        transport.set_write_buffer_limits(high=HIGH_WATER)
        _no_delay(transport)
        self.task = asyncio.get_running_loop().create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        if self._ignoring:
            self._discarded += len(data)
            if self._discarded > LINGER_BYTES and self.transport is not None:
                self.transport.close()
            return
        if self._unparsed:  # (arrived before reading paused)
            self._unparsed += data
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        """Parse ``data`` a slice at a time; once the inbox is full, hold the rest back and
        stop reading until the exchange has taken from it (``_take``).

        httptools gathers a header's name and value until the header ends, so the size of an
        unfinished head (or trailer section) is counted here, by the bytes fed since the
        parser last released an event; a slice that releases one resets the count, so what
        httptools holds stays under MAX_HEAD and a slice."""
        view = memoryview(data)
        for start in range(0, len(data), FEED_SLICE):
            if self._ignoring:
                return
            if self._inbox_bytes > INBOX_HIGH:
                self._unparsed = bytes(view[start:])
                self._pause()
                return
            piece = view[start : start + FEED_SLICE]
            events = len(self._inbox)
            self._parse(piece)
            if len(self._inbox) == events and self._in_message:
                self._unreleased += len(piece)
                if self._unreleased > MAX_HEAD + FEED_SLICE and not self._ignoring:
                    self._refuse_input(_HeadTooLarge())
            else:
                self._unreleased = 0
        if self._inbox_bytes > INBOX_HIGH:
            self._pause()

    def _parse(self, data: memoryview) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._ignoring = True  # the refusal was queued when the head completed
        except httptools.HttpParserError as exc:
            if not self._ignoring:  # not merely data after a request that closes
                self._refuse_input(exc)

    def _refuse_input(self, exc: Exception) -> None:
        too_large = isinstance(exc, _HeadTooLarge) or isinstance(exc.__context__, _HeadTooLarge)
        self._push(
            Refused(431, "head_too_large", f"request heads are limited to {MAX_HEAD} bytes")
            if too_large
            else Refused(400, "bad_request", f"malformed HTTP: {exc}")
        )
        self._ignoring = True

    def _pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self._eof = True  # a half-close: answer what was asked, then close
        self._wake()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.conns.remove(self)
        self._eof = True
        self._wake()
        self._writable.set()
        if self.task is not None and not self.task.done():
            self.task.cancel()
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            upstream.abort()  # the sandbox is gone: nothing it started goes on

    def pause_writing(self) -> None:
        self._writable.clear()
        if self._upstream is not None:
            self._upstream.pause_reading()

    def resume_writing(self) -> None:
        self._writable.set()
        if self._upstream is not None:
            self._upstream.resume_reading()

    @property
    def writable(self) -> bool:
        return self._writable.is_set()

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url, self._headers, self._notable = b"", [], []
        self._head_bytes, self._in_head, self._in_message = 0, True, True

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._guard_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._guard_head(len(name) + len(value) + 4)
        if self._in_head:  # trailers of a chunked body are dropped
            name = name.lower()
            self._headers.append((name, value))
            c = name.replace(b"_", b"-") if b"_" in name else name
            if c in http1.NOTABLE:
                self._notable.append((name if c in http1.FRAMING else c, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self.parser
        method = parser.get_method()
        if method == b"CONNECT" or parser.should_upgrade():
            self._push(
                Refused(
                    405 if method == b"CONNECT" else 400,
                    "upgrade_refused",
                    "the bridge forwards HTTP requests only: no CONNECT tunnels, "
                    "no protocol upgrades",
                )
            )
            self._ignoring = True
            return
        if method == b"TRACE":
            self._push(Refused(405, "method_not_allowed", "TRACE is not bridged"))
            self._ignoring = True
            return
        self._push(
            Head(
                method=method,
                url=self._url,
                headers=self._headers,
                keep_alive=parser.should_keep_alive(),
                http10=parser.get_http_version() == "1.0",
                notable=self._notable,
                size=self._head_bytes,
            )
        )

    def on_body(self, body: bytes) -> None:
        if not self._ignoring:
            self._push(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        if self._ignoring:
            return
        self._push(_END)
        if not self.parser.should_keep_alive():
            self._ignoring = True  # nothing after a request that closes the connection

    # -- the inbox -----------------------------------------------------------------------------

    def _guard_head(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > MAX_HEAD:
            raise _HeadTooLarge()

    def _push(self, event: object) -> None:
        self._inbox.append(event)
        self._inbox_bytes += _size(event)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _take(self, timeout: float) -> object:
        """The next event; ``_Gone`` if the connection ends or stays silent for ``timeout``."""
        inbox = self._inbox
        if not inbox:
            if self._eof:
                raise _Gone()
            loop = asyncio.get_running_loop()
            self._waiter = waiter = loop.create_future()
            timer = loop.call_later(timeout, _expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
            if not inbox:
                raise _Gone()
        return self._pop()

    def _pop(self) -> object:
        """The inbox's first event; reading resumes once the inbox has room again."""
        event = self._inbox.popleft()
        self._inbox_bytes -= _size(event)
        if self._paused and self._inbox_bytes < INBOX_LOW and self.transport is not None:
            self._paused = False
            held, self._unparsed = self._unparsed, b""
            if held:
                self._feed(held)  # which may fill the inbox and pause again
            if not self._paused:
                self.transport.resume_reading()
        return event

    async def _body(self) -> AsyncIterator[bytes]:
        """The current request's body, piece by piece, to its end."""
        while not self._request_done:
            event = await self._take(BODY_IDLE_S)
            if event is _END:
                self._request_done = True
                return
            if isinstance(event, Refused):
                raise event  # malformed bytes in the middle of the body
            yield cast(bytes, event)

    def _discard_buffered_body(self) -> None:
        """Drop the rest of the current body if all of it has arrived already."""
        if self._request_done or _END not in self._inbox:
            return
        while True:
            if self._pop() is _END:
                self._request_done = True
                return

    # -- serving -------------------------------------------------------------------------------

    async def _serve(self) -> None:
        try:
            while True:
                if not self._writable.is_set() and not await self._drained(IDLE_S):
                    if self.transport is not None:  # it stopped reading its answers
                        self.transport.abort()
                    return
                try:
                    event = await self._take(IDLE_S)
                except _Gone:
                    self._close()
                    return
                if isinstance(event, Refused):
                    exchange = Exchange(Head(b"-", b"", [], keep_alive=False), self.peer)
                    exchange.error = event.code
                    self._respond_json(
                        exchange, event.status, {"error": event.code, "detail": event.detail}
                    )
                    self.gate.record(exchange)
                    self._close(linger=True)
                    return
                if not isinstance(event, Head):
                    continue  # unreachable: bodies follow their head
                exchange = Exchange(event, self.peer)
                self._request_done = False
                try:
                    await self._exchange(exchange)
                finally:
                    upstream, self._upstream = self._upstream, None
                    if upstream is not None:
                        upstream.abort()  # left mid-request (the body failed): never reused
                    self.gate.record(exchange)
                self._discard_buffered_body()
                if not self._reusable(exchange):
                    self._close(linger=not self._request_done)
                    return
        except _Gone:
            self._close()
        except asyncio.CancelledError:
            pass

    async def _drained(self, timeout: float) -> bool:
        """Wait until the sandbox has read enough of what the bridge wrote (bounded memory:
        no next exchange is served into a full buffer); False if it does not within
        ``timeout``."""
        try:
            await asyncio.wait_for(self._writable.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _reusable(self, exchange: Exchange) -> bool:
        transport = self.transport
        return (
            exchange.head.keep_alive
            and not exchange.closing
            and self._request_done
            and exchange.complete
            and not self._eof
            and transport is not None
            and not transport.is_closing()
        )

    def _close(self, linger: bool = False) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        # Closing waits until the sandbox has read what is buffered; one that never reads
        # would hold the connection (and the buffer) for ever.
        asyncio.get_running_loop().call_later(IDLE_S, transport.abort)
        if not linger:
            transport.close()
            return
        # Half-close after the answer, discard what still arrives, close on EOF or later.
        self._ignoring = True
        self._unparsed = b""
        with contextlib.suppress(OSError, RuntimeError):
            if transport.can_write_eof():
                transport.write_eof()
        if self._paused:
            self._paused = False
            transport.resume_reading()
        asyncio.get_running_loop().call_later(LINGER_S, transport.close)

    async def _exchange(self, exchange: Exchange) -> None:
        head = exchange.head
        try:
            framing = http1.request_body(head.notable, head.http10)
            if framing.delimit is Delimit.LENGTH and framing.length > self.gate.max_body:
                raise Refused(
                    413,
                    "body_too_large",
                    f"request bodies are limited to {self.gate.max_body} bytes",
                )
            expect = http1.expects_continue(head.notable) and not head.http10
            exchange.route = route = await self.gate.authorize(head, self.peer)
            if route.local is not None:
                if expect:
                    self.send(http1.CONTINUE)
                data = await self._read_all(self.gate.max_body)
                exchange.bytes_in = len(data)
                status, payload = await route.local(head, data)
                self._respond_json(exchange, status, payload)
            else:
                await self._forward(exchange, route, framing, expect)
        except Refused as refused:
            exchange.error = refused.code
            self._refuse(exchange, refused)
        except _Gone:
            exchange.error = exchange.error or "client_gone"
            raise
        except asyncio.CancelledError:
            exchange.error = exchange.error or "client_gone"
            raise
        except Exception:  # a supervisor: one broken exchange answers 500, the bridge goes on
            log.exception("bridge exchange failed")
            exchange.error = "internal_error"
            self._refuse(exchange, Refused(500, "internal_error", "the bridge failed; see its log"))

    def _refuse(self, exchange: Exchange, refused: Refused) -> None:
        exchange.closing = exchange.closing or refused.closes
        if exchange.answered:
            exchange.complete = False  # mid-response: the sandbox sees the connection end
            return
        self._discard_buffered_body()
        self._respond_json(
            exchange, refused.status, {"error": refused.code, "detail": refused.detail}
        )

    async def _read_all(self, limit: int) -> bytes:
        parts, size = [], 0
        async for piece in self._body():
            size += len(piece)
            if size > limit:
                raise Refused(413, "body_too_large", f"request bodies are limited to {limit} bytes")
            parts.append(piece)
        return b"".join(parts)

    def _respond_json(self, exchange: Exchange, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        keep = exchange.head.keep_alive and self._request_done and not exchange.closing
        head = http1.response_head(
            status,
            [(b"content-type", b"application/json")],
            Framing(Delimit.LENGTH, len(body)),
            keep_alive=keep,
        )
        exchange.status = status
        exchange.answered = exchange.complete = True
        exchange.bytes_out += len(body)
        self.send(head + body)

    # -- forwarding ----------------------------------------------------------------------------

    async def _forward(
        self, exchange: Exchange, route: Route, framing: Framing, expect: bool
    ) -> None:
        replayable = (
            route.reauthorize is not None
            and not expect
            and (
                framing.delimit is Delimit.NONE
                or (framing.delimit is Delimit.LENGTH and framing.length <= MAX_REPLAY)
            )
        )
        kept: list[bytes] | None = [] if replayable else None
        bodyless = framing.delimit is Delimit.NONE
        retried = await self._send(
            exchange,
            route,
            framing,
            None if bodyless else self._body(),
            kept,
            hold_401=replayable,
            expect=expect,
        )
        if retried and route.reauthorize is not None and kept is not None:
            exchange.route = route = await route.reauthorize()
            replay = None if bodyless else _replay(kept)
            await self._send(exchange, route, framing, replay, None, hold_401=False, expect=False)

    def _upstream_headers(self, head: Head, route: Route) -> list[tuple[bytes, bytes]]:
        """The sandbox's headers minus everything the bridge decides itself, plus the credential."""
        named = http1.listed_in_connection(head.notable)
        drop = route.drop | named if named else route.drop
        out = []
        for name, value in head.headers:
            c = name.replace(b"_", b"-") if b"_" in name else name
            if c in _NOT_FORWARDED or c in drop:
                continue
            out.append((name, value))
        out.append((b"accept-encoding", b"identity"))  # the bridge must read bodies to redact
        out.extend(route.add)
        return out

    async def _send(
        self,
        exchange: Exchange,
        route: Route,
        framing: Framing,
        body: AsyncIterator[bytes] | None,
        kept: list[bytes] | None,
        hold_401: bool,
        expect: bool,
    ) -> bool:
        """One attempt upstream. True if a held-back 401 asks for a refresh and a retry."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + route.timeout
        try:
            upstream = self.pool.take(route)
            if upstream is None:
                upstream = await asyncio.wait_for(
                    self.pool.connect(route), timeout=min(route.timeout, 10)
                )
        except (TimeoutError, OSError) as exc:
            code = "upstream_timeout" if isinstance(exc, TimeoutError) else "upstream_unreachable"
            raise Refused(
                504 if code == "upstream_timeout" else 502,
                code,
                f"connection {route.connection}: cannot reach the upstream ({exc})",
            ) from None
        self._upstream = upstream
        upstream.begin(self, exchange, route, hold_401)
        # The call's time runs from here, the upload included: an upstream that stops reading
        # the body is as stuck as one that never answers.
        timer = loop.call_at(deadline, upstream.time_out)
        try:
            return await self._attempt(exchange, route, framing, body, kept, expect, upstream)
        finally:
            timer.cancel()

    async def _attempt(
        self,
        exchange: Exchange,
        route: Route,
        framing: Framing,
        body: AsyncIterator[bytes] | None,
        kept: list[bytes] | None,
        expect: bool,
        upstream: UpstreamProtocol,
    ) -> bool:
        head = exchange.head
        if framing.delimit is not Delimit.NONE and head.method in BODYLESS_METHODS:
            upstream.reusable_after = False
        pending = http1.request_head(
            head.method,
            route.target,
            route.host_header,
            self._upstream_headers(head, route),
            framing,
        )
        if expect or not self._inbox:  # with what of the body is here already, if any
            upstream.write(pending)
            pending = b""
        if expect:
            self.send(http1.CONTINUE)
        sent = 0
        forwarding = True
        if framing.delimit is Delimit.NONE:
            if not self._request_done:
                event = await self._take(BODY_IDLE_S)  # the end of a request without a body
                if isinstance(event, Refused):
                    raise event
                self._request_done = True
        elif body is not None:
            async for piece in body:
                sent += len(piece)
                if sent > self.gate.max_body:
                    upstream.abort()
                    raise Refused(
                        413,
                        "body_too_large",
                        f"request bodies are limited to {self.gate.max_body} bytes",
                    )
                if kept is not None:
                    kept.append(piece)
                if upstream.failed is not None:
                    forwarding = False  # the upstream is gone or timed out: answer now,
                    break  # and read no more of the body
                if forwarding and upstream.finished.done():
                    forwarding = False  # answered early: read the rest, send no more of it
                if forwarding:
                    data = http1.chunk(piece) if framing.delimit is Delimit.CHUNKED else piece
                    upstream.write(pending + data if pending else data)
                    pending = b""
                    await upstream.drained()
        if forwarding and framing.delimit is Delimit.CHUNKED:
            pending += http1.LAST_CHUNK
        if pending:
            upstream.write(pending)
        upstream.request_sent = forwarding
        exchange.bytes_in = sent
        await upstream.finished
        failed = upstream.failed
        if failed is not None:
            upstream.abort()
            if not exchange.answered:
                raise Refused(
                    failed.status, failed.code, f"connection {route.connection}: {failed.detail}"
                )
            exchange.error = (
                "timeout_mid" if failed.code == "upstream_timeout" else "upstream_reset"
            )
            return False
        held = upstream.held_401
        self._upstream = None
        self.pool.release(upstream)
        if held:
            exchange.status = 0
        return held

    # -- called by the upstream side ---------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


async def _replay(kept: list[bytes]) -> AsyncIterator[bytes]:
    for piece in kept:
        yield piece


def _size(event: object) -> int:
    """What an inbox event counts against the inbox's bound: pipelined heads count too, and
    every event costs its Python objects besides its bytes."""
    kind = type(event)
    if kind is bytes:
        return len(cast(bytes, event)) + PIECE_COST
    if kind is Head:
        return cast(Head, event).size + HEAD_COST
    return PIECE_COST


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class UpstreamProtocol(asyncio.Protocol):
    """One connection to an upstream, reading one exchange's response at a time.

    States: idle (in a pool, or new), active (an exchange's request is going out and its
    response coming in), done. Zero or more interim (1xx) responses may precede the final
    one. Bytes while idle, a second final response, a protocol switch or a malformed response
    make the connection unusable, and it is closed.
    """

    def __init__(self, key: tuple[str, str, str, int]) -> None:
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpResponseParser | None = None
        self.client: ClientProtocol | None = None
        self.exchange: Exchange | None = None
        self.route: Route | None = None
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.failed: Refused | None = None
        self.active = False
        self.clean = False  # the final response ended by its own framing, keep-alive asked
        self.request_sent = False  # the whole request went out
        self.reusable_after = True  # False: something about this exchange forbids reuse
        self.held_401 = False
        self.idle_since = 0.0
        self._writable = asyncio.Event()
        self._writable.set()
        self._paused = False
        self._outgoing: list[bytes] | None = None
        self._budget = HIGH_WATER  # decoded bytes to send before waiting on the sandbox
        self._released = False  # the last read gave the parser something to pass on
        self._unreleased = 0  # bytes read since (httptools holds an unfinished head's bytes)
        self._reset_message()

    def _reset_message(self) -> None:
        self._head_bytes = 0  # heads and trailers of this exchange, interim ones included
        self._headers: list[tuple[bytes, bytes]] = []
        self._notable: list[tuple[bytes, bytes]] = []
        self._interim = False
        self._final = False  # the final response's head arrived
        self._out = http1.NO_BODY  # framing towards the sandbox
        self._in = http1.NO_BODY  # framing from the upstream
        self._decoder: http1.Decoder | None = None
        self._redactor = http1.Redactor([])
        self._meter_buf = bytearray()
        self._hold_401 = False
        self._backlog = False  # decoded output waits for the sandbox to read (see _pump)
        self._ended: bool | None = None  # the response ended during a backlog: clean?

    @property
    def reusable(self) -> bool:
        transport = self.transport
        return (
            self.clean
            and self.request_sent
            and self.reusable_after
            and not self.active
            and transport is not None
            and not transport.is_closing()
        )

    def begin(
        self, client: ClientProtocol, exchange: Exchange, route: Route, hold_401: bool = False
    ) -> None:
        self.client, self.exchange, self.route = client, exchange, route
        self.finished = asyncio.get_running_loop().create_future()
        self.failed = None
        self.active, self.clean, self.request_sent, self.held_401 = True, False, False, False
        self.reusable_after = True
        self.parser = httptools.HttpResponseParser(self)
        self._reset_message()
        self._hold_401 = hold_401
        self.resume_reading()
        self._redactor = http1.Redactor(route.secrets)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    async def drained(self) -> None:
        await self._writable.wait()

    def abort(self) -> None:
        self.clean = False
        if self.transport is not None:
            self.transport.abort()

    def pause_reading(self) -> None:
        if self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._backlog:
            self._continue()  # what is held is decoded before anything more is read
        elif self.transport is not None and self._paused:
            self._paused = False
            self.transport.resume_reading()

    # -- transport callbacks -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.set_write_buffer_limits(high=HIGH_WATER)
        _no_delay(self.transport)

    def data_received(self, data: bytes) -> None:
        if not self.active or self.parser is None:
            self.abort()  # bytes nobody asked for: this connection cannot be trusted again
            return
        # What one read produces for the sandbox (a head and a body, often) goes in one write.
        self._outgoing = out = cast(list[bytes], [])
        self._budget = HIGH_WATER
        self._released = False
        try:
            self.parser.feed_data(data)
            self._unreleased = 0 if self._released else self._unreleased + len(data)
            if self._unreleased > 4 * MAX_HEAD:
                self._fail(
                    Refused(502, "upstream_protocol", "the upstream's response head is too large")
                )
        except httptools.HttpParserUpgrade:
            self._fail(
                Refused(
                    502,
                    "upstream_protocol",
                    "the upstream switched protocols, which the bridge does not bridge",
                )
            )
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            self._fail(
                cause
                if isinstance(cause, Refused)
                else Refused(
                    502, "upstream_protocol", f"the upstream sent a malformed response ({exc})"
                )
            )
        finally:
            self._outgoing = None
            if out and self.client is not None:
                self.client.send(b"".join(out))

    def _emit(self, data: bytes) -> None:
        """To the sandbox: gathered while a read is parsed, sent at once otherwise."""
        if self._outgoing is not None:
            self._outgoing.append(data)
        elif self.client is not None:
            self.client.send(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._writable.set()
        if not self.active or self._ended is not None:
            return  # (a response that ended is completed once its backlog is sent)
        if self._final and self._in.delimit is Delimit.CLOSE:
            if self._backlog:
                self._ended = False
            else:
                self._complete(clean=False)  # the connection's end was the body's end
        else:
            self._fail(
                Refused(
                    502,
                    "upstream_reset",
                    "the upstream closed the connection before answering in full",
                )
            )

    # The request body loop awaits ``drained()`` before taking more from the sandbox's inbox,
    # and a full inbox pauses the sandbox's socket: that is the whole of the back-pressure.
    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def time_out(self) -> None:
        assert self.route is not None
        self._fail(Refused(504, "upstream_timeout", f"no answer in {self.route.timeout:g}s"))

    def _fail(self, why: Refused) -> None:
        self.clean = False
        self.reusable_after = False
        if self.active and not self.finished.done():
            self.failed = why
            self.active = False
            self.finished.set_result(None)
        if self.transport is not None:
            self.transport.abort()

    def _complete(self, clean: bool) -> None:
        assert self.client is not None and self.exchange is not None and self.route is not None
        if not self.held_401:
            tail = self._redactor.feed(self._decoder.flush()) if self._decoder else b""
            tail += self._redactor.flush()
            if tail:
                self._send_body(tail)
            if self._out.delimit is Delimit.CHUNKED:
                self._emit(http1.LAST_CHUNK)
            self.exchange.complete = True
            if self.route.meter is not None:
                ctype = next((v for k, v in self._headers if k == b"content-type"), b"")
                self.route.meter(ctype, bytes(self._meter_buf))
        self.clean = clean
        self.active = False
        if not self.finished.done():
            self.finished.set_result(None)

    # -- httptools callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if not self.active or self._final:
            raise Refused(502, "upstream_protocol", "the upstream sent a second response")
        self._headers, self._notable = [], []

    def on_status(self, status: bytes) -> None:
        self._guard_head(len(status))  # the reason phrase itself is never passed on

    def on_header(self, name: bytes, value: bytes) -> None:
        self._guard_head(len(name) + len(value) + 4)
        if not self._final:  # trailers are dropped
            name = name.lower()
            self._headers.append((name, value))
            c = name.replace(b"_", b"-") if b"_" in name else name
            if c in http1.NOTABLE:
                self._notable.append((name if c in http1.FRAMING else c, value))

    def _guard_head(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > 4 * MAX_HEAD:
            raise Refused(502, "upstream_protocol", "the upstream's response head is too large")

    def on_headers_complete(self) -> None:
        assert self.client is not None and self.exchange is not None and self.route is not None
        self._released = True
        parser = cast(httptools.HttpResponseParser, self.parser)
        status = parser.get_status_code()
        client_head = self.exchange.head
        if status < 100:  # llhttp takes "099" for a final status; nobody else would
            raise Refused(502, "upstream_protocol", f"the upstream sent status {status:03d}")
        if status < 200:
            self._interim = True
            if status != 101 and not client_head.http10 and not self._hold_401:
                self._emit(
                    http1.response_head(
                        status, self._passed_headers(), http1.NO_BODY, keep_alive=True
                    )
                )
            return
        self._final = True
        self.exchange.status = status
        self._in = http1.response_body(
            client_head.method, status, self._notable, parser.get_http_version() == "1.0"
        )
        if status == 401 and self._hold_401:
            self.held_401 = True  # the sandbox never sees it: refresh, then try again
            return
        if self._in.delimit is not Delimit.NONE:
            self._decoder = http1.content_decoder(self._notable, MAX_DECODED)
        if self._in.delimit is Delimit.LENGTH and self._decoder is None:
            self._out = self._in
        elif self._in.delimit is Delimit.NONE:
            self._out = http1.NO_BODY
        else:  # chunked, until close, or decoded: the bridge frames it itself
            self._out = http1.UNTIL_CLOSE if client_head.http10 else http1.CHUNKED
        keep = client_head.keep_alive and self._out.delimit is not Delimit.CLOSE
        if not keep:
            self.exchange.closing = True  # the sandbox is told so, and it must be true
        headers = self._passed_headers(drop_coding=self._decoder is not None)
        if client_head.method == b"HEAD":
            # What a GET would have carried is advertised; no body follows, by definition.
            advertised = http1.head_framing(status, self._notable, parser.get_http_version())
            self._emit(http1.response_head(status, headers, advertised, keep_alive=keep))
            self.exchange.answered = True
            self.reusable_after = False  # a HEAD response's length field misleads llhttp
            self._complete(clean=False)
            return
        self._emit(http1.response_head(status, headers, self._out, keep_alive=keep))
        self.exchange.answered = True

    def _passed_headers(self, drop_coding: bool = False) -> list[tuple[bytes, bytes]]:
        assert self.route is not None
        out = []
        for name, value in self._headers:
            c = name.replace(b"_", b"-") if b"_" in name else name
            if c in _NOT_RETURNED or (drop_coding and c == b"content-encoding"):
                continue
            out.append((name, value))
        return http1.redact_fields(out, self.route.secrets)

    def on_body(self, body: bytes) -> None:
        self._released = True
        if not self.active or self.held_401 or not self._final:
            return
        if self._decoder is not None:
            self._decoder.push(body)
            if not self._backlog:
                self._pump()
            return
        body = self._redactor.feed(body)
        if body:
            self._send_body(body)

    def _pump(self) -> None:
        """Decode and send what the decoder holds, ``_budget`` bytes per read of the upstream
        at most and only while the sandbox reads: a few KiB of gzip can decode to 64 MiB,
        which a sandbox that does not read would otherwise have the bridge hold for it. What
        remains is a backlog: the upstream is not read, and the response does not complete,
        until the sandbox has read and the backlog is sent (``_continue``)."""
        decoder, client = self._decoder, self.client
        assert decoder is not None and client is not None
        while decoder.pending and self._budget > 0 and self.active and client.writable:
            out = decoder.pull(min(self._budget, 64 * 1024))
            self._budget -= len(out)
            out = self._redactor.feed(out)
            if out:
                self._send_body(out)
        self._backlog = decoder.pending
        if self._backlog:
            self.pause_reading()
            if client.writable:
                asyncio.get_running_loop().call_soon(self._continue)

    def _continue(self) -> None:
        if not self._backlog or not self.active or self.client is None:
            return
        if not self.client.writable:
            return  # its resume_writing calls resume_reading, which comes back here
        self._budget = HIGH_WATER
        try:
            self._pump()
        except Refused as refused:
            self._fail(refused)
            return
        if self._backlog:
            return
        if self._ended is not None:
            self._complete(self._ended)
        else:
            self.resume_reading()

    def _send_body(self, body: bytes) -> None:
        assert self.client is not None and self.exchange is not None and self.route is not None
        self.exchange.bytes_out += len(body)
        if self.route.meter is not None and len(self._meter_buf) < 4 << 20:
            self._meter_buf += body
        self._emit(http1.chunk(body) if self._out.delimit is Delimit.CHUNKED else body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False  # the final response is still to come
            self._headers = []
            return
        if not self.active:
            return
        parser = cast(httptools.HttpResponseParser, self.parser)
        if self._backlog:
            self._ended = parser.should_keep_alive()
        else:
            self._complete(clean=parser.should_keep_alive())


class Pool:
    """Idle keep-alive upstream connections, per run and origin.

    A connection serves exchanges of one run only, so whatever a hostile sandbox manages to
    leave on a connection (a half-read response, bytes an upstream misread) can reach no other
    run, let alone another user's (see docs/design/bridge.md). Idle connections close after
    ``idle_s`` and when their run ends (``forget``).
    """

    def __init__(self, per_key: int = 256, most: int = 4096, idle_s: float = 15.0) -> None:
        self._idle: dict[tuple[str, str, str, int], list[UpstreamProtocol]] = {}
        self._per_key = per_key  # a run's concurrency to one origin, kept warm
        self._most = most  # idle connections in all, whatever the runs
        self._count = 0
        self._idle_s = idle_s
        self._tls = ssl.create_default_context()
        self._sweeping = False

    @staticmethod
    def key(route: Route) -> tuple[str, str, str, int]:
        return (route.run, route.scheme, route.host, route.port)

    def take(self, route: Route) -> UpstreamProtocol | None:
        """An idle connection of this run to this origin, if there is one."""
        idle = self._idle.get(self.key(route))
        while idle:
            conn = idle.pop()
            self._count -= 1
            if conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def acquire(self, route: Route) -> UpstreamProtocol:
        return self.take(route) or await self.connect(route)

    async def connect(self, route: Route) -> UpstreamProtocol:
        key = self.key(route)
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(
            lambda: UpstreamProtocol(key),
            route.host,
            route.port,
            ssl=self._tls if route.scheme == "https" else None,
        )
        return proto

    def release(self, conn: UpstreamProtocol) -> None:
        if not conn.reusable:
            conn.abort()
            return
        conn.client = conn.exchange = conn.route = None
        conn.parser = None
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= self._per_key or self._count >= self._most:
            conn.abort()
            return
        self._count += 1
        conn.idle_since = time.monotonic()
        conn.resume_reading()  # an idle connection must still notice its upstream closing
        idle.append(conn)
        if not self._sweeping:
            self._sweeping = True
            asyncio.get_running_loop().call_later(self._idle_s, self._sweep)

    def idle_count(self, run: str | None = None) -> int:
        return sum(len(v) for k, v in self._idle.items() if run is None or k[0] == run)

    def forget(self, run: str) -> None:
        """Close the idle connections of a run that has ended."""
        for key in [k for k in self._idle if k[0] == run]:
            for conn in self._idle.pop(key):
                self._count -= 1
                conn.abort()

    def _sweep(self) -> None:
        cutoff = time.monotonic() - self._idle_s
        for key in list(self._idle):
            keep = []
            for conn in self._idle[key]:
                if conn.idle_since < cutoff or conn.transport is None:
                    self._count -= 1
                    conn.abort()
                else:
                    keep.append(conn)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        self._sweeping = bool(self._idle)
        if self._sweeping:
            asyncio.get_running_loop().call_later(self._idle_s, self._sweep)

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.abort()
        self._idle.clear()
        self._count = 0


def _no_delay(transport: asyncio.Transport) -> None:
    """Heads and bodies go out in separate writes: never let Nagle hold the second back."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
