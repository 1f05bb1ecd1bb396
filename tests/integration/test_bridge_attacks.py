"""The bridge attacked as a hostile sandbox (and a hostile upstream) would, beyond the framing
cases of ``test_bridge_framing.py``.

Each test speaks raw bytes to the real bridge on loopback. The goals of the attacker: another
user's credential or another run's responses (desynchronisation), the secret itself back in a
response, a path outside the connection's base path, and the starving of other sandboxes
(memory, file descriptors, the one event loop every sandbox shares). Where a test looks inside
the bridge (its buffers, its inbox), it does so on the bridge's own event loop.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from typing import TypeVar

import h11
import pytest

from corral.bridge import exchange, proxy
from corral.bridge.connections import Connection
from corral.bridge.proxy import ClientProtocol
from tests.integration.raw_http import (
    Client,
    ProxyWorld,
    Received,
    Response,
    echo,
    proxy_world,
    respond,
    wait_until,
)

T = TypeVar("T")


@pytest.fixture
def world() -> Iterator[ProxyWorld]:
    with proxy_world() as w:
        yield w


def head(method: str, path: str, token: str, *extra: str, version: str = "1.1") -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "host: bridge", f"authorization: Bearer {token}"]
    return ("\r\n".join([*lines, *extra]) + "\r\n\r\n").encode("latin-1")


def on_loop(world: ProxyWorld, fn: Callable[[], T]) -> T:
    """``fn()`` run on the bridge's event loop (its state is only read there)."""
    loop = world.bridge._loop
    assert loop is not None

    async def call() -> T:
        return fn()

    return asyncio.run_coroutine_threadsafe(call(), loop).result(5)


def the_connection(world: ProxyWorld) -> ClientProtocol:
    (conn,) = on_loop(world, lambda: list(world.bridge._conns.open))
    return conn


def responses(client: Client, method: str = "GET", most: int = 5) -> list[Response]:
    """Responses until the bridge closes the connection (or ``most`` of them)."""
    out: list[Response] = []
    for _ in range(most):
        try:
            out.append(client.read_response(method))
        except TimeoutError:
            raise  # neither an answer nor a close: the bridge is stuck
        except (h11.RemoteProtocolError, OSError):
            break
    return out


def send_until_blocked(sock: socket.socket, data: bytes, stall: float = 1.0) -> None:
    """Send ``data`` until the peer stops reading (a send stalls for ``stall`` s) or closes."""
    sock.settimeout(stall)
    sent = 0
    try:
        while sent < len(data):
            sent += sock.send(data[sent : sent + 65536])
    except (TimeoutError, BrokenPipeError, ConnectionResetError):
        pass
    finally:
        sock.settimeout(10)


def key_of(request: Received) -> bytes:
    return request.header("authorization")[0].split(" ", 1)[1].encode()


# -- request smuggling: what llhttp reads and what the bridge declares must agree -----------------

BODY = b"5\r\nhello\r\n0\r\n\r\n"


@pytest.mark.parametrize(
    "framing, body",
    [
        (["Transfer-Encoding:\tchunked"], BODY),
        (["Transfer-Encoding: chunked   "], BODY),
        (["Transfer-Encoding: CHUNKED"], BODY),
        (["Transfer-Encoding: ,chunked"], BODY),
        (["Transfer-Encoding: identity, chunked"], BODY),
        (["Transfer-Encoding: chunked,"], BODY),
        (["Transfer-Encoding: xchunked"], BODY),
        (["Transfer-Encoding: chunked;q=1"], BODY),
        (["Transfer-Encoding : chunked"], BODY),
        (["Transfer-Encoding: \x0bchunked"], BODY),
        (["Transfer-Encoding: \x00chunked"], BODY),
        (["Transfer-Encoding: chunked\nX: y"], BODY),
        (["Transfer-Encoding: chunked\rX: y"], BODY),
        (["X: y", "\tTransfer-Encoding: chunked"], BODY),
        (["Transfer_Encoding: chunked"], BODY),
        (["Transfer-Encoding: chunked", "Content_Length: 3"], BODY),
        (["Transfer-Encoding: chunked"], b"000005\r\nhello\r\n0\r\n\r\n"),
        (["Transfer-Encoding: chunked"], b"5;" + b"x" * 100_000 + b"\r\nhello\r\n0\r\n\r\n"),
        (["Transfer-Encoding: chunked"], b'5;a="b\r\nc"\r\nhello\r\n0\r\n\r\n'),
        (["Transfer-Encoding: chunked"], b"5\nhello\r\n0\r\n\r\n"),
        (["Transfer-Encoding: chunked"], b"5\r\nhello\n0\r\n\r\n"),
        (["Transfer-Encoding: chunked"], b"ffffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
        (["Transfer-Encoding: chunked"], b"-5\r\nhello\r\n0\r\n\r\n"),
        (["Transfer-Encoding: chunked"], b"5\r\nhello\r\n0\r\ncontent-length: 40\r\n\r\n"),
        (["Transfer-Encoding: chunked"], b"5\r\nhello\r\n0\r\nauthorization: Bearer x\r\n\r\n"),
        (["Content-Length: 5"], b"hello"),
        (["Content-Length: 05"], b"hello"),
        (["Content-Length:\t5"], b"hello"),
        (["Content-Length: 5 "], b"hello"),
        (["Content-Length\x00: 5"], b"hello"),
        (["Content-Length\t: 5"], b"hello"),
        (["Content-Length: 5\x00"], b"hello"),
        (["X\x7fY: 1", "Content-Length: 5"], b"hello"),
        (["X\x80: 1", "Content-Length: 5"], b"hello"),
        ([" Content-Length: 5"], b"hello"),
        (["Content-Length: 5", "Content-Length : 0"], b"hello"),
    ],
)
def test_what_the_upstream_reads_is_what_the_sandbox_framed(
    world: ProxyWorld, framing: list[str], body: bytes
) -> None:
    """Whatever the spelling, the upstream gets either the body ``hello`` exactly or nothing,
    and a request pipelined after it is never read as part of it (nor the other way round)."""
    world.gate.upstream_timeout = 2.0  # a body declared but never sent ends as a 504
    token = world.token("alice")
    c = world.client()
    c.send(head("POST", "/up/x", token, *framing) + body + head("GET", "/up/after", token))
    answers = responses(c, "POST", most=2)
    assert answers, "the bridge answered nothing"
    time.sleep(0.2)  # anything still on its way upstream has arrived
    seen = [(r.method, r.target, r.body) for r in world.upstream.requests]
    assert set(seen) <= {("POST", "/x", b"hello"), ("GET", "/after", b"")}, seen
    assert all("without sending complete message" in e for e in world.upstream.errors), (
        world.upstream.errors
    )
    if ("POST", "/x", b"hello") not in seen:  # refused: with the connection, never in step
        assert answers[0].status in (400, 501), answers[0]
        assert c.closed_by_peer()


def test_an_underscored_content_length_is_refused_not_half_believed(world: ProxyWorld) -> None:
    """llhttp ignores ``Content_Length`` (no body); a bridge reading it as Content-Length would
    promise the upstream 5 bytes it never sends, and the next request would become them."""
    world.gate.upstream_timeout = 2.0
    c = world.client()
    c.send(head("POST", "/up/x", world.token("alice"), "Content_Length: 5"))
    answer = c.read_response("POST")
    assert (answer.status, answer.json()["error"]) == (400, "ambiguous_framing")
    assert world.upstream.connections == []


def test_an_upstream_framing_field_with_an_underscore_is_refused() -> None:
    """The response side of the same: llhttp reads this body to the connection's end; the
    bridge must not promise the sandbox two bytes and send seven."""

    def answer(request: Received) -> bytes:
        if request.target == "/cl":
            return b"HTTP/1.1 200 OK\r\nContent_Length: 2\r\nconnection: close\r\n\r\nokEXTRA"
        return b"HTTP/1.1 200 OK\r\nTransfer_Encoding: chunked\r\nconnection: close\r\n\r\nok"

    with proxy_world(answer) as world:
        token = world.token("alice")
        for path in ("/up/cl", "/up/te"):
            c = world.client()
            answer_ = c.request("GET", path, token)
            assert (answer_.status, answer_.json()["error"]) == (502, "ambiguous_framing"), path
            assert c.request("GET", "/up/cl", token).status == 502  # still in step


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "DELETE"])
def test_a_body_on_a_bodyless_method_never_reaches_a_later_request(method: str) -> None:
    """CL.0: an upstream that ignores the body would read it as a request of its own; the
    bridge forwards it as framed and never puts that connection back in the pool."""
    with proxy_world() as world:
        token = world.token("alice")
        smuggled = b"GET /smuggled HTTP/1.1\r\nhost: up\r\n\r\n"
        c = world.client()
        c.send(head(method, "/up/x", token, f"content-length: {len(smuggled)}") + smuggled)
        assert c.read_response(method).status == 200
        assert c.request("GET", "/up/next", token).status == 200
        first, second = world.upstream.requests
        assert (first.target, first.body, second.target) == ("/x", smuggled, "/next")
        assert first.connection != second.connection


def test_an_early_answer_with_a_pipelined_request_behind_the_body() -> None:
    """The upstream answers before the body arrives; the rest of the body is read and
    dropped, and the request pipelined behind it is served as itself."""

    def early(request: Received) -> bytes:
        return respond(413, b"early") if request.target == "/big" else b""

    def answer(request: Received) -> bytes:
        return b"" if request.target == "/big" else echo(request)

    with proxy_world(answer, on_head=early) as world:
        token = world.token("alice")
        c = world.client()
        body = b"z" * 600_000
        c.send(
            head("POST", "/up/big", token, f"content-length: {len(body)}")
            + body
            + head("GET", "/up/next", token)
        )
        first, second = c.read_response("POST"), c.read_response()
        assert (first.status, first.body) == (413, b"early")
        assert (second.status, second.body.split()[1]) == (200, b"/next")


@pytest.mark.parametrize(
    "method, raw",
    [
        ("GET", b"HTTP/1.1 204 No Content\r\ncontent-length: 40\r\n\r\n"),
        ("GET", b"HTTP/1.1 304 Not Modified\r\ntransfer-encoding: chunked\r\n\r\n"),
        ("HEAD", b"HTTP/1.1 200 OK\r\ncontent-length: 40\r\n\r\n"),
    ],
)
def test_a_response_hidden_in_a_body_that_cannot_exist_reaches_nobody(
    method: str, raw: bytes
) -> None:
    """204, 304 and HEAD responses end at their head, whatever their fields say; what follows
    (here a whole response) is never taken for the answer to a later request."""
    hidden = respond(200, b"SMUGGLED RESPONSE!")

    def answer(request: Received) -> bytes:
        return raw + hidden if request.target == "/trick" else echo(request)

    with proxy_world(answer) as world:
        token = world.token("alice")
        c = world.client()
        first = c.request(method, "/up/trick", token)
        assert first.body == b""
        for i in range(3):
            later = c.request("GET", f"/up/n{i}", token)
            assert later.body.split()[1] == f"/n{i}".encode(), later.body


def test_an_upstream_closing_mid_body_closes_the_sandbox_connection() -> None:
    """The sandbox sees its answer cut short and the connection end, never a reuse of it."""

    def short(request: Received) -> bytes:
        return b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\nconnection: close\r\n\r\nonly ten!!"

    with proxy_world(short) as world:
        c = world.client()
        c.send(head("GET", "/up/short", world.token("alice")))
        with pytest.raises(h11.RemoteProtocolError):
            c.read_response()
        assert c.closed_by_peer()


def test_interim_tricks() -> None:
    """An interim response with a body (llhttp reads the body as the next response), and
    interim responses to an HTTP/1.0 client, which must not see them at all."""

    def interim(request: Received) -> bytes:
        if request.target == "/body":
            return b"HTTP/1.1 100 Continue\r\ncontent-length: 9\r\n\r\nSMUGGLED!"
        return b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n"

    with proxy_world(on_head=interim) as world:
        token = world.token("alice")
        answer = world.client().request("GET", "/up/body", token)
        assert (answer.status, answer.json()["error"]) == (502, "upstream_protocol")
        c = world.client()
        c.send(head("GET", "/up/old", token, version="1.0"))
        assert c.closed_by_peer()
        assert c.buffer.startswith(b"HTTP/1.1 200 OK\r\n"), c.buffer
        assert b"103" not in c.buffer.split(b"\r\n\r\n")[0]


@pytest.mark.parametrize("status", [b"099", b"000"])
def test_a_status_below_100_is_a_502(status: bytes) -> None:
    """llhttp reads "099" as a final status with a body; the bridge must not take it for an
    interim one (nor write "HTTP/1.1 99" to the sandbox)."""

    def odd(request: Received) -> bytes:
        return b"HTTP/1.1 " + status + b" Odd\r\ncontent-length: 2\r\n\r\nok"

    with proxy_world(odd) as world:
        world.gate.upstream_timeout = 2.0
        c = world.client()
        answer = c.request("GET", "/up/x", world.token("alice"))
        assert answer.interim == []
        assert (answer.status, answer.json()["error"]) == (502, "upstream_protocol")


def test_an_http10_keep_alive_client_gets_a_close_when_its_body_ends_by_close() -> None:
    """A body the bridge frames by closing the connection (HTTP/1.0 client, upstream chunked)
    must end with the connection; otherwise the client waits, and a pipelined answer would be
    read as more of the body."""

    def chunked(request: Received) -> bytes:
        return b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nall\r\n0\r\n\r\n"

    with proxy_world(chunked) as world:
        token = world.token("alice")
        c = world.client()
        c.send(
            head("GET", "/up/a", token, "connection: keep-alive", version="1.0")
            + head("GET", "/up/b", token, "connection: keep-alive", version="1.0")
        )
        assert c.closed_by_peer(within=5)
        assert c.buffer.endswith(b"\r\n\r\nall"), c.buffer
        assert [r.target for r in world.upstream.requests] == ["/a"]


# -- the secret, back in a response ---------------------------------------------------------------


def gz_members(data: bytes, cut: int) -> bytes:
    return gzip.compress(data[:cut]) + gzip.compress(data[cut:])


def trickled(body: bytes, size: int, headers: bytes = b"") -> bytes:
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size])
        for i in range(0, len(body), size)
    )
    return b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n" + headers + b"\r\n" + chunks


def leaky(request: Received) -> bytes:
    key = key_of(request)
    text = b"your key is " + key + b"."
    kind = request.target.rsplit("/", 1)[1]
    if kind == "gzip-members":
        return trickled(gz_members(text, 16), 7, b"content-encoding: gzip\r\n") + b"0\r\n\r\n"
    if kind == "deflate-raw":
        raw = zlib.compressobj(wbits=-15)
        data = raw.compress(text) + raw.flush()
        return trickled(data, 3, b"content-encoding: deflate\r\n") + b"0\r\n\r\n"
    if kind == "x-gzip":
        return respond(200, gzip.compress(text), {"content-encoding": "x-gzip"})
    if kind == "coding-underscore":
        return respond(200, gzip.compress(text), {"Content_Encoding": "gzip"})
    if kind == "trailer":
        return trickled(b"ok", 2) + b"0\r\nx-key: " + key + b"\r\n\r\n"
    if kind == "location":
        return respond(302, b"", {"location": "https://x.test/?k=" + key.decode()})
    if kind == "until-close":
        return b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n" + text
    if kind == "bearer":
        return respond(200, b"Authorization: Bearer " + key)
    return respond(200, b"plain")


def interim_leak(request: Received) -> bytes:
    key = key_of(request)
    if request.target.endswith("/interim-header"):
        return b"HTTP/1.1 103 Early Hints\r\nlink: <" + key + b">\r\n\r\n"
    if request.target.endswith("/interim-reason"):
        return b"HTTP/1.1 100 " + key + b"\r\n\r\n"
    return b""


@pytest.mark.parametrize(
    "path",
    [
        "gzip-members",
        "deflate-raw",
        "x-gzip",
        "coding-underscore",
        "trailer",
        "location",
        "until-close",
        "bearer",
        "interim-header",
        "interim-reason",
    ],
)
def test_the_secret_never_comes_back(path: str) -> None:
    with proxy_world(leaky, on_head=interim_leak) as world:
        c = world.client()
        c.send(head("GET", f"/up/{path}", world.token("alice")))
        answer = c.read_response()
        key = world.keys["alice"].encode()
        seen = c.buffer + answer.reason + repr(answer.headers).encode() + answer.body
        assert answer.status in (200, 302)
        assert key not in seen, seen
        assert key[:-1] not in answer.body  # not even most of it


# -- the connection's base path -------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/up/%c0%ae%c0%ae/x",  # overlong UTF-8 for '.', decoded by some servers
        "/up/%e0%80%ae%e0%80%ae/x",
        "/up/..%c0%afx",  # overlong '/'
        "/up/%ef%bc%8e%ef%bc%8e/x",  # fullwidth full stops: '..' once NFKC-normalised
        "/up/%e2%80%a5/x",  # two dot leader: '..' once normalised
        "/up/..%ef%bc%8fx",  # fullwidth solidus
        "/up/..%ef%bc%bcx",  # fullwidth reverse solidus
        "/up/%ef%bc%85%ef%bc%92%ef%bd%85%ef%bc%85%ef%bc%92%ef%bd%85/x",  # fullwidth '%2e%2e'
        "/up/%u002e%u002e/x",  # IIS %u escapes
        "/up/%U002E%U002E/x",
        "/up/.../x",  # Windows trims trailing dots
        "/up/..%20/x",  # ... and spaces
        "/up/.%20./x",
        "/up/..%09/x",
        "/up/..;a=b;c/x",
        "/up/%2e%2e;/x",
        "/up//evil.test/x",  # would be sent as '//evil.test/x', a network-path reference
        "/up/%2fevil.test/x",
        "/up/%252fevil.test/x",
    ],
)
def test_a_path_cannot_leave_the_connection_however_it_is_spelled(path: str) -> None:
    with proxy_world(base="") as world:
        answer = world.client().request("GET", path, world.token("alice"))
        assert (answer.status, answer.json()["error"]) in ((400, "bad_path"), (400, "bad_request"))
        assert world.upstream.connections == []


@pytest.mark.parametrize(
    "path, target",
    [
        ("/up/a%2fb", "/base/a%2fb"),  # an encoded slash inside a segment (GitLab ids)
        ("/up/main...topic", "/base/main...topic"),  # GitHub's compare
        ("/up/caf%c3%a9/..x/x..", "/base/caf%c3%a9/..x/x.."),
        ("/up/a;b=c/d", "/base/a;b=c/d"),
        ("/up/v1/https%3A%2F%2Fexample.com", "/base/v1/https%3A%2F%2Fexample.com"),
    ],
)
def test_paths_that_stay_inside_still_pass(path: str, target: str) -> None:
    with proxy_world(base="/base") as world:
        assert world.client().request("GET", path, world.token("alice")).status == 200
        assert world.upstream.requests[0].target == target


def test_a_query_credential_cannot_be_shadowed_by_another_spelling() -> None:
    """Servers differ in how they read a query: some split on ';' too, ASP.NET ignores case,
    PHP reads 'api.key' and 'api key' as 'api_key'. A sandbox's own 'api_key' in any of those
    spellings would come first and could win; none may reach the upstream."""
    with proxy_world(auth="query:api_key") as world:
        query = "q=1;api_key=m1&API_KEY=m2&api.key=m3&api+key=m4&api%20key=m5&z=a;b"
        answer = world.client().request("GET", f"/up/x?{query}", world.token("alice"))
        assert answer.status == 200
        target = world.upstream.requests[0].target
        assert target == f"/x?q=1&z=a;b&api_key={world.keys['alice']}", target


# -- starving the others --------------------------------------------------------------------------


def test_a_head_that_never_ends_is_not_buffered_without_bound(world: ProxyWorld) -> None:
    """httptools gathers a header's value until its end: the bridge must count the bytes of
    an unfinished head itself, or one sandbox fills the host's memory (and, copying the
    growing value on every read, stalls the event loop every sandbox shares)."""
    c = world.client()
    c.send(b"GET /up/x HTTP/1.1\r\nhost: bridge\r\nx-long: ")
    send_until_blocked(c.sock, b"a" * (16 << 20))  # (it reads and discards after refusing)
    answer = c.read_response()
    assert (answer.status, answer.json()["error"]) == (431, "head_too_large")


def test_an_upstream_head_that_never_ends_is_cut_off() -> None:
    """The same from a hostile upstream: a response head that does not end is cut off by its
    size, not held until the call's timeout."""

    def endless(request: Received) -> bytes:
        return b"HTTP/1.1 200 OK\r\nx-long: " + b"a" * (2 << 20)

    with proxy_world(endless) as world:
        world.gate.upstream_timeout = 8.0
        answer = world.client().request("GET", "/up/x", world.token("alice"))
        assert (answer.status, answer.json()["error"]) == (502, "upstream_protocol")


def test_a_client_that_never_reads_cannot_grow_the_bridges_buffers(world: ProxyWorld) -> None:
    """Pipelined requests answered by the bridge itself (here: refused, no token), while the
    client reads nothing: each answer is ten times the request; the bridge stops reading
    instead of buffering answers without bound."""
    c = world.client()
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    request = b"GET /up/x HTTP/1.1\r\n\r\n"
    send_until_blocked(c.sock, request * 400_000)
    conn = the_connection(world)
    buffered = on_loop(
        world, lambda: conn.transport.get_write_buffer_size() if conn.transport else 0
    )
    assert buffered <= 4 * exchange.HIGH_WATER, buffered


def test_a_refused_request_with_a_large_body_does_not_stall_the_next(world: ProxyWorld) -> None:
    """A body that fills the inbox (reading pauses) while the gate decides (a run's first
    call asks the store), then is dropped with its refusal: reading must resume, or the
    connection is closed; it may not sit until the idle timeout."""
    token = world.token("alice", connections=("up", "nope"))
    c = world.client()
    body = b"q" * (proxy.INBOX_HIGH + 40_000)
    c.send(head("POST", "/nope/x", token, f"content-length: {len(body)}") + body)
    assert c.read_response("POST").status == 404
    c.send(head("GET", "/up/y", token))
    assert [a.status for a in responses(c, most=1)] in ([], [200])


def test_pipelined_heads_behind_a_slow_exchange_are_bounded() -> None:
    """Heads parsed ahead wait in the inbox; their count, not only their bytes, is bounded."""
    release = threading.Event()

    def slow(request: Received) -> bytes:
        if request.target == "/slow":
            release.wait(10)
        return echo(request)

    with proxy_world(slow) as world:
        token = world.token("alice")
        c = world.client()
        c.send(head("GET", "/up/slow", token))
        wait_until(lambda: world.upstream.requests)
        send_until_blocked(c.sock, b"GET /u HTTP/1.1\r\n\r\n" * 1_000_000)
        conn = the_connection(world)
        waiting = on_loop(world, lambda: len(conn._inbox))
        release.set()
        assert waiting < 20_000, waiting


@pytest.mark.parametrize("closes", [False, True])
def test_a_decompression_bomb_waits_for_a_client_that_does_not_read(closes: bool) -> None:
    """60 KiB of gzip is 60 MiB of zeros: decoded only as fast as the sandbox reads, and
    still delivered whole when the upstream closes as soon as it has sent it."""
    bomb = gzip.compress(b"\0" * (60 << 20), compresslevel=9)

    def answer(request: Received) -> bytes:
        extra = {"connection": "close"} if closes else {}
        return respond(200, bomb, {"content-encoding": "gzip", **extra})

    with proxy_world(answer) as world:
        c = world.client()
        c.send(head("GET", "/up/bomb", world.token("alice")))
        wait_until(lambda: world.upstream.requests)
        time.sleep(0.5)  # the whole compressed body has reached the bridge
        conn = the_connection(world)
        buffered = on_loop(
            world, lambda: conn.transport.get_write_buffer_size() if conn.transport else 0
        )
        assert buffered <= 4 * exchange.HIGH_WATER, buffered
        # ... and a client that does read gets all of it.
        assert c.read_response().body == b"\0" * (60 << 20)


class SilentUpstream:
    """Accepts connections and never reads from them nor answers."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for s in self.held:
            s.close()


@pytest.mark.parametrize("body", [None, 8 << 20])
def test_a_stuck_upstream_is_a_504_whatever_the_request_was_doing(
    world: ProxyWorld, body: int | None
) -> None:
    """An upstream that never reads (the upload stalls) or never answers: the call's timeout
    covers the whole exchange, not only the wait after the last byte of the body."""
    silent = SilentUpstream()
    try:
        world.backend.connections["stuck"] = Connection("stuck", f"http://127.0.0.1:{silent.port}")
        world.backend.credentials[("alice", "stuck")] = world.backend.credentials[("alice", "up")]
        world.gate.upstream_timeout = 1.0
        token = world.token("alice", connections=("stuck",))
        c = world.client()
        data = None if body is None else b"b" * body
        if data is None:
            answer = c.request("GET", "/stuck/x", token)
        else:
            c.send(head("POST", "/stuck/x", token, f"content-length: {len(data)}"))
            uploader = threading.Thread(target=send_until_blocked, args=(c.sock, data, 5.0))
            uploader.daemon = True
            uploader.start()
            answer = c.read_response("POST")
        assert (answer.status, answer.json()["error"]) == (504, "upstream_timeout")
    finally:
        silent.close()


@pytest.mark.parametrize("how", ["stall", "malformed", "gone"])
def test_an_abandoned_upload_closes_its_upstream_connection(
    world: ProxyWorld, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """A request body that stalls, turns malformed or whose client leaves: the half-sent
    request upstream is closed with it, not left holding a socket (a sandbox repeating this
    would exhaust the host's descriptors)."""
    monkeypatch.setattr(proxy, "BODY_IDLE_S", 0.5)
    token = world.token("alice")
    c = world.client()
    c.send(head("POST", "/up/x", token, "transfer-encoding: chunked") + b"5\r\nhello\r\n")
    wait_until(lambda: world.upstream.connections and world.upstream.connections[0].raw)
    if how == "malformed":
        c.send(b"zz\r\n")
    elif how == "gone":
        c.close()
    assert wait_until(lambda: world.upstream.connections[0].closed), "upstream left open"


def test_clients_leaving_at_every_moment_leave_no_task_and_no_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Resets in the middle of a head, of a body, and of an answer; then the bridge stops:
    nothing is logged (no task destroyed while pending, no exception in a callback)."""
    release = threading.Event()

    def slow(request: Received) -> bytes:
        release.wait(0.3)
        return respond(200, b"x" * 300_000)

    with caplog.at_level(logging.WARNING), proxy_world(slow) as world:
        token = world.token("alice")
        for cut in (10, 60, len(head("POST", "/up/x", token)) + 3, None):
            c = world.client()
            message = head("POST", "/up/x", token, "content-length: 5") + b"hello"
            c.send(message if cut is None else message[:cut])
            if cut is None:
                c.sock.recv(100)  # the answer has begun
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            c.close()  # a reset, at once
        release.set()
        assert world.client().request("GET", "/up/x", token).status == 200
        world.bridge.stop()
    problems = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert problems == []


def test_a_usage_body_that_is_not_what_the_meter_expects_breaks_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The meter reads the provider's answer; an answer with odd usage fields must cost a
    usage row at most, never the response or an error in the event loop."""

    def odd_usage(request: Received) -> bytes:
        body = {
            "/a": b'{"usage": {"prompt_tokens": "many", "completion_tokens": [1]}}',
            "/b": b'{"type": "message_start", "message": "not an object"}',
            "/c": b'{"usage": {"prompt_tokens": 1e999}}',
        }[request.target]
        return (
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n" + body
        )

    with caplog.at_level(logging.WARNING), proxy_world(odd_usage) as world:
        for kind in ("openai", "anthropic"):
            world.backend.connections[kind] = Connection(
                kind, f"http://127.0.0.1:{world.upstream.port}", meter=kind
            )
            world.backend.credentials[("alice", kind)] = world.backend.credentials[("alice", "up")]
        token = world.token("alice", connections=("openai", "anthropic"))
        for path in ("/openai/a", "/anthropic/b", "/openai/c"):
            answer = world.client().request("GET", path, token)
            assert answer.status == 200, (path, answer.body)
            assert answer.body.startswith(b"{"), path
    problems = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert problems == []
