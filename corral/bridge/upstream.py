"""The upstream side of the bridge: one connection to an upstream service, and the pools.

``UpstreamProtocol`` reads one exchange's response at a time and writes it, re-framed,
decoded and redacted, to the sandbox's connection (``Downstream``). ``Pool`` keeps idle
connections per run and origin, so a connection never serves two runs.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from typing import cast

import httptools

from corral.bridge import http1
from corral.bridge.exchange import HIGH_WATER, MAX_HEAD, Downstream, Exchange, Route, no_delay
from corral.bridge.http1 import Delimit
from corral.errors import Refused

MAX_DECODED = 64 << 20  # a compressed response may expand to at most this much
_NOT_RETURNED = http1.HOP_BY_HOP | http1.CREDENTIAL_RESPONSE


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
        self.client: Downstream | None = None
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
        self, client: Downstream, exchange: Exchange, route: Route, hold_401: bool = False
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
        no_delay(self.transport)

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
