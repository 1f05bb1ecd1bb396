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
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, cast

import httptools

from corral.bridge import http1
from corral.bridge.exchange import (
    HIGH_WATER,
    MAX_HEAD,
    Exchange,
    Gate,
    Head,
    Route,
    no_delay,
)
from corral.bridge.http1 import Delimit, Framing
from corral.bridge.upstream import Pool, UpstreamProtocol
from corral.errors import Refused

__all__ = ["ClientProtocol", "Connections"]

log = logging.getLogger("corral.bridge")

MAX_REPLAY = 64 * 1024
IDLE_S = 30.0  # no complete request head on a connection for this long: it is closed
BODY_IDLE_S = 30.0  # a request body that stalls this long between pieces: 408
# After answering a request whose body was not read, keep reading and discarding for this
# long, or this much, before closing: closing a socket with unread input sends a reset, and
# the client would lose the answer (RFC 9112 section 9.6).
LINGER_S = 3.0
LINGER_BYTES = 64 << 20
INBOX_HIGH = 256 * 1024  # body bytes parsed ahead of the exchange: above this, stop reading
INBOX_LOW = 64 * 1024
# What an inbox event costs beyond its bytes, as Python objects: a pipeline of tiny requests
# is bounded by its heads' number, not only by their few bytes.
HEAD_COST = 1024
PIECE_COST = 64
# Input is parsed this much at a time, so that one read of tiny pipelined requests cannot put
# more than this in the inbox past its bound; the rest waits, unparsed, for room.
FEED_SLICE = 16 * 1024
# Methods whose request body has no defined meaning (RFC 9110 section 9.3): one may be sent
# and is forwarded as framed, but an upstream that ignores it would read it as a request of
# its own, so the connection is never reused afterwards.
BODYLESS_METHODS = frozenset({b"GET", b"HEAD", b"DELETE", b"OPTIONS"})
_NOT_FORWARDED = http1.HOP_BY_HOP | http1.SPOOFABLE | {b"accept-encoding"}
_END = object()  # the end of a request's body, in the inbox


class _Gone(Exception):
    """The sandbox connection ended or idled out while the bridge waited on it."""


class _HeadTooLarge(Exception):
    pass


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
        no_delay(transport)
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
