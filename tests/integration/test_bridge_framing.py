"""The bridge's HTTP framing, attacked with crafted bytes against an upstream that logs them.

Every test here speaks raw HTTP/1.1 to the real bridge (``Bridge``, ``BridgeGate``, the
proxy) on loopback and reads what the upstream received, parsed by h11. The cases are the
known ways to desynchronise a proxy from what is behind it (request smuggling in its forms,
interim responses, pipelining, HEAD framing) and the ways a reflecting upstream could hand a
secret back (reason phrase, compressed body, a secret split between chunks), plus the limits
that keep one sandbox from starving the others.
"""

from __future__ import annotations

import gzip
import logging
import socket
import time
import zlib
from collections.abc import Iterator

import pytest

from corral.bridge import proxy
from tests.integration.raw_http import (
    ProxyWorld,
    Received,
    echo,
    proxy_world,
    respond,
    wait_until,
)


@pytest.fixture
def world() -> Iterator[ProxyWorld]:
    with proxy_world() as w:
        yield w


def head(method: str, path: str, token: str, *extra: str, version: str = "1.1") -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "host: bridge", f"authorization: Bearer {token}"]
    return ("\r\n".join([*lines, *extra]) + "\r\n\r\n").encode()


# -- request smuggling ---------------------------------------------------------------------------

SMUGGLED = b"POST /store HTTP/1.1\r\nhost: up\r\ncontent-length: 300\r\n\r\n"


def test_a_chunked_body_on_a_get_is_forwarded_framed_and_steals_nothing() -> None:
    """The attack of the issue: alice's GET carries a chunked body that is itself the start of
    a request; bob's next call must not become its body, and alice reads back no key."""
    stored: list[bytes] = []

    def store_and_return(request: Received) -> bytes:
        if request.target.endswith("/store"):
            stored.append(request.body)
            return respond(200, b"stored")
        if request.target.endswith("/fetch"):
            return respond(200, b"|".join(stored))
        return echo(request)

    with proxy_world(store_and_return) as world:
        alice, bob = world.token("alice"), world.token("bob")
        attacker = world.client()
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)
        attacker.send(head("GET", "/up/fetch", alice, "transfer-encoding: chunked") + body)
        assert attacker.read_response().status == 200
        victim = world.client()
        for _ in range(3):
            assert victim.request("GET", "/up/fetch", bob).status == 200
        again = world.client().request("GET", "/up/fetch", alice)
        assert world.keys["bob"].encode() not in again.body
        assert world.upstream.errors == []
        # The upstream saw alice's GET with her body as a body, never as a request of its own.
        assert [r.target for r in world.upstream.requests if r.method == "POST"] == []
        first = world.upstream.requests[0]
        assert (first.method, first.body, first.header("transfer-encoding")) == (
            "GET",
            SMUGGLED,
            ["chunked"],
        )
        # ... and that connection was never used again, by anyone.
        later = [r.connection for r in world.upstream.requests[1:]]
        assert first.connection not in later


def test_a_connection_upstream_is_never_shared_between_runs(world: ProxyWorld) -> None:
    alice, bob = world.token("alice"), world.token("bob")
    for token in (alice, bob, alice, bob):
        c = world.client()
        assert c.request("GET", "/up/x", token).status == 200
        c.close()
    by_user: dict[int, set[str]] = {}
    for r in world.upstream.requests:
        user = "alice" if world.keys["alice"] in r.header("authorization")[0] else "bob"
        by_user.setdefault(r.connection, set()).add(user)
    assert all(len(users) == 1 for users in by_user.values()), by_user
    # Keep-alive still works within a run: two calls of alice's run, one connection.
    assert len(by_user) == 2


@pytest.mark.parametrize(
    "framing, status, code",
    [
        # llhttp refuses these first; the bridge's own rules would too.
        (["transfer-encoding: chunked", "content-length: 4"], 400, "bad_request"),
        (["content-length: 4", "transfer-encoding: chunked"], 400, "bad_request"),
        (["transfer-encoding: gzip, chunked"], 501, "unsupported_transfer_coding"),
        (["transfer-encoding: chunked", "transfer-encoding: chunked"], 400, "bad_request"),
        (["transfer-encoding: chunked, identity"], 400, "bad_request"),
        (["transfer_encoding: chunked", "content-length: 4"], 400, "ambiguous_framing"),
        (["content-length: 4", "content-length: 5"], 400, "bad_request"),
        (["content-length: +4"], 400, "bad_request"),
        (["content-length: 4, 4"], 400, "bad_request"),
        (["content-length : 4"], 400, "bad_request"),
        (["x-folded: a", " b", "content-length: 4"], 400, "bad_request"),
    ],
)
def test_ambiguous_framing_is_refused_before_any_upstream(
    world: ProxyWorld, framing: list[str], status: int, code: str
) -> None:
    c = world.client()
    c.send(head("POST", "/up/x", world.token("alice"), *framing) + b"4\r\nabcd\r\n0\r\n\r\n")
    answer = c.read_response()
    assert (answer.status, answer.json()["error"]) == (status, code)
    assert c.closed_by_peer()
    assert world.upstream.connections == []


def test_chunked_in_http10_and_absolute_targets_are_refused(world: ProxyWorld) -> None:
    token = world.token("alice")
    c = world.client()
    c.send(head("POST", "/up/x", token, "transfer-encoding: chunked", version="1.0") + b"0\r\n\r\n")
    assert c.read_response().json()["error"] == "ambiguous_framing"
    c = world.client()
    c.send(head("GET", f"http://127.0.0.1:{world.upstream.port}/x", token))
    assert c.read_response().json()["error"] == "bad_target"
    assert world.upstream.connections == []


@pytest.mark.parametrize("first", ["CONNECT /up/tunnel", "CONNECT 127.0.0.1:{port}", "GET /up/ws"])
def test_tunnels_and_upgrades_never_reach_the_upstream(world: ProxyWorld, first: str) -> None:
    token = world.token("alice")
    assert world.client().request("GET", "/up/warm", token).status == 200  # caches are warm
    c = world.client()
    method, path = first.format(port=world.upstream.port).split(" ", 1)
    c.send(
        head(method, path, token, "connection: upgrade", "upgrade: websocket")
        + b"GET /up/after HTTP/1.1\r\nhost: x\r\n\r\n"
    )
    answer = c.read_response()
    assert answer.json()["error"] == "upgrade_refused"
    assert c.closed_by_peer()
    time.sleep(0.3)  # the refused request's task, if any, would have reached the upstream now
    assert [r.target for r in world.upstream.requests] == ["/warm"]
    assert len(world.upstream.connections) == 1


def test_a_body_is_forwarded_with_the_framing_it_came_with(world: ProxyWorld) -> None:
    token = world.token("alice")
    c = world.client()
    c.send(
        head("POST", "/up/chunked", token, "transfer-encoding: chunked")
        + b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nx-trailer: 1\r\n\r\n"
    )
    assert c.read_response().status == 200
    assert c.request("POST", "/up/sized", token, b"hello").status == 200
    chunked, sized = world.upstream.requests
    assert (chunked.body, chunked.header("transfer-encoding"), chunked.header("x-trailer")) == (
        b"abcde",
        ["chunked"],
        [],
    )
    assert (sized.body, sized.header("content-length")) == (b"hello", ["5"])
    assert world.upstream.errors == []


# -- interim responses, pipelining, HEAD -----------------------------------------------------------


def test_expect_100_continue_is_met_by_the_bridge_and_the_pool_stays_in_step(
    world: ProxyWorld,
) -> None:
    token = world.token("alice")
    c = world.client()
    c.send(head("POST", "/up/one", token, "expect: 100-continue", "content-length: 3"))
    c.sock.settimeout(5)
    assert c.sock.recv(4096).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    c.send(b"abc")
    first = c.read_response("POST")
    second = c.request("GET", "/up/two", token)
    assert (first.status, first.body.split()[1]) == (200, b"/one")
    assert (second.status, second.body.split()[1]) == (200, b"/two")
    assert [r.header("expect") for r in world.upstream.requests] == [[], []]


def test_interim_responses_pass_and_never_stand_in_for_the_final_one() -> None:
    def interim(request: Received) -> bytes:
        if request.target.endswith("/hints"):
            return b"HTTP/1.1 103 Early Hints\r\nlink: </a>; rel=preload\r\n\r\n"
        return b"HTTP/1.1 100 Continue\r\n\r\n"

    with proxy_world(on_head=interim) as world:
        token = world.token("alice")
        c = world.client()
        hints = c.request("GET", "/up/hints", token)
        plain = c.request("POST", "/up/posted", token, b"xyz")
        after = c.request("GET", "/up/after", token)
        assert (hints.interim, hints.body.split()[1]) == ([103], b"/hints")
        assert (plain.interim, plain.body.split()[1]) == ([100], b"/posted")
        assert after.body.split()[1] == b"/after"  # not the previous call's answer


def test_an_upstream_switching_protocols_is_a_502_and_closes() -> None:
    with proxy_world(
        lambda r: (
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n"
            b"connection: upgrade\r\n\r\nraw bytes"
        )
    ) as world:
        answer = world.client().request("GET", "/up/x", world.token("alice"))
        assert (answer.status, answer.json()["error"]) == (502, "upstream_protocol")


def test_pipelined_requests_are_answered_in_order(world: ProxyWorld) -> None:
    token = world.token("alice")
    c = world.client()
    c.send(b"".join(head("GET", f"/up/p{i}", token) for i in range(5)))
    bodies = [c.read_response().body.split()[1] for _ in range(5)]
    assert bodies == [f"/p{i}".encode() for i in range(5)]


def test_pipelining_after_a_closing_request_is_ignored(world: ProxyWorld) -> None:
    token = world.token("alice")
    c = world.client()
    c.send(head("GET", "/up/last", token, "connection: close") + head("GET", "/up/never", token))
    assert c.read_response().body.split()[1] == b"/last"
    assert c.closed_by_peer()
    assert [r.target for r in world.upstream.requests] == ["/last"]


def test_head_responses_end_at_their_head() -> None:
    def answer(request: Received) -> bytes:
        if request.method == "HEAD":
            return b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n"
        return echo(request)

    with proxy_world(answer) as world:
        token = world.token("alice")
        c = world.client()
        first = c.request("HEAD", "/up/h", token)
        assert (first.status, first.header("content-length"), first.body) == (200, ["1234"], b"")
        assert c.request("GET", "/up/next", token).body.split()[1] == b"/next"


def test_a_response_ended_by_close_is_reframed_and_the_connection_not_reused() -> None:
    def until_close(request: Received) -> bytes:
        return b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it"

    with proxy_world(until_close) as world:
        token = world.token("alice")
        c = world.client()
        first = c.request("GET", "/up/a", token)
        assert (first.body, first.header("transfer-encoding")) == (b"all of it", ["chunked"])
        assert c.request("GET", "/up/b", token).body == b"all of it"
        assert len(world.upstream.connections) == 2


def test_bytes_after_a_response_reach_nobody() -> None:
    def double(request: Received) -> bytes:
        return echo(request) + respond(200, b"SMUGGLED RESPONSE")

    with proxy_world(double) as world:
        token = world.token("alice")
        c = world.client()
        answers = [c.request("GET", f"/up/{i}", token).body for i in range(3)]
        assert all(b"SMUGGLED" not in a for a in answers), answers
        assert len(world.upstream.connections) == 3  # each one closed after its anomaly


# -- secrets in what comes back ----------------------------------------------------------------


def reflect(request: Received) -> bytes:
    """Returns the credential it was sent in every way it can."""
    key = request.header("authorization")[0].split(" ", 1)[1].encode()
    if request.target.endswith("/reason"):
        return b"HTTP/1.1 200 " + key + b"\r\ncontent-length: 2\r\n\r\nok"
    if request.target.endswith("/gzip"):
        return respond(200, gzip.compress(b"your key: " + key), {"content-encoding": "gzip"})
    if request.target.endswith("/deflate"):
        return respond(200, zlib.compress(b"your key: " + key), {"content-encoding": "deflate"})
    if request.target.endswith("/brotli"):
        return respond(200, b"\x1b\x00opaque", {"content-encoding": "br"})
    if request.target.endswith("/split"):
        half = len(key) // 2
        chunks = [b"key=" + key[:half], key[half:] + b";"]
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in chunks) + b"0\r\n\r\n"
        return b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + body
    if request.target.endswith("/header"):
        return respond(
            200, b"ok", {key.decode(): key.decode(), "set-cookie": "session=" + key.decode()}
        )
    return respond(200, b"plain")


@pytest.mark.parametrize("path", ["reason", "gzip", "deflate", "split", "header"])
def test_an_echoed_secret_never_reaches_the_sandbox(path: str) -> None:
    with proxy_world(reflect) as world:
        c = world.client()
        answer = c.request(
            "GET",
            f"/up/{path}",
            world.token("alice"),
            headers={"accept-encoding": "gzip, deflate, br"},
        )
        seen = answer.reason + repr(answer.headers).encode() + answer.body
        key = world.keys["alice"].encode()
        assert key not in seen, seen
        assert answer.status == 200
        if path in ("gzip", "deflate"):
            assert answer.body == b"your key: " + b"*" * len(key)
            assert answer.header("content-encoding") == []
        assert world.upstream.requests[0].header("accept-encoding") == ["identity"]


def test_a_coding_the_bridge_cannot_read_is_refused() -> None:
    with proxy_world(reflect) as world:
        answer = world.client().request("GET", "/up/brotli", world.token("alice"))
        assert (answer.status, answer.json()["error"]) == (502, "undecodable_response")


def test_a_secret_split_across_many_small_chunks_is_still_redacted() -> None:
    def trickle(request: Received) -> bytes:
        key = request.header("authorization")[0].split(" ", 1)[1].encode()
        data = b"<" + key + b">" + key
        body = b"".join(b"1\r\n%s\r\n" % data[i : i + 1] for i in range(len(data)))
        return b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + body + b"0\r\n\r\n"

    with proxy_world(trickle) as world:
        answer = world.client().request("GET", "/up/t", world.token("alice"))
        stars = b"*" * len(world.keys["alice"])
        assert answer.body == b"<" + stars + b">" + stars


# -- what the sandbox may send -------------------------------------------------------------------


def test_only_the_bridge_credential_reaches_the_upstream(world: ProxyWorld) -> None:
    world.backend.connections["hdr"] = world.backend.connections["up"].__class__(
        "hdr", f"http://127.0.0.1:{world.upstream.port}", "header:x-api-key"
    )
    world.backend.credentials[("alice", "hdr")] = world.backend.credentials[("alice", "up")]
    token = world.token("alice", connections=("up", "hdr"))
    sneaky = {
        "X_Api_Key": "evil-1",
        "x-api-key": "evil-2",
        "Cookie": "evil-3",
        "Forwarded": "for=1.2.3.4",
        "X-Forwarded-For": "1.2.3.4",
        "X-Original-URL": "/admin",
        "X-Secret-Route": "evil-4",
        "Connection": "keep-alive, X-Secret-Route",
        "Proxy-Authorization": "evil-5",
        "X_Forwarded_Host": "evil-6",
    }
    c = world.client()
    assert c.request("GET", "/hdr/x", token, headers=sneaky).status == 200
    assert c.request("GET", "/up/x", token, headers=sneaky).status == 200
    raw = world.upstream.raw()
    for value in ("evil-", "1.2.3.4", "/admin"):
        assert value.encode() not in raw, raw
    hdr, up = world.upstream.requests
    assert hdr.header("x-api-key") == [world.keys["alice"]]
    assert up.header("authorization") == [f"Bearer {world.keys['alice']}"]


def test_a_query_credential_cannot_be_overridden() -> None:
    with proxy_world(auth="query:api_key") as world:
        world.backend.credentials[("alice", "up")] = world.backend.credentials[("alice", "up")]
        answer = world.client().request(
            "GET", "/up/x?api_key=mine&q=1&api%5Fkey=x", world.token("alice")
        )
        assert answer.status == 200
        target = world.upstream.requests[0].target
        assert target == f"/x?q=1&api_key={world.keys['alice']}", target


@pytest.mark.parametrize(
    "path",
    [
        "/up/../other",
        "/up/a/../../x",
        "/up/%2e%2e/x",
        "/up/%2E%2e%2fx",
        "/up/..%2fx",
        "/up/..%5cx",
        "/up/..\\x",
        "/up/a/%252e%252e/x",
        "/up/..;/x",
        "/up/./x",
        "/up/%00",
    ],
)
def test_a_path_cannot_leave_the_connection(path: str) -> None:
    with proxy_world(base="/tenant/alice") as world:
        answer = world.client().request("GET", path, world.token("alice"))
        assert (answer.status, answer.json()["error"]) in ((400, "bad_path"), (400, "bad_request"))
        assert world.upstream.connections == []


def test_the_base_path_is_kept() -> None:
    with proxy_world(base="/tenant/alice") as w:
        assert w.client().request("GET", "/up/a/b.c?x=1", w.token("alice")).status == 200
        assert w.upstream.requests[0].target == "/tenant/alice/a/b.c?x=1"


# -- limits ----------------------------------------------------------------------------------------


def test_a_request_head_that_never_ends_is_cut_off(
    world: ProxyWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(proxy, "IDLE_S", 0.5)
    c = world.client()
    c.send(b"GET /up/x HTTP/1.1\r\nhost: bridge\r\nx-slow: ")
    assert c.closed_by_peer(within=5)
    idle = world.client()  # and a connection that never says anything
    assert idle.closed_by_peer(within=5)


def test_one_sandbox_cannot_hold_unbounded_connections(world: ProxyWorld) -> None:
    cap = 8
    world.bridge._conns.per_peer = cap
    held = [world.client() for _ in range(cap)]
    token = world.token("alice")
    assert held[0].request("GET", "/up/x", token).status == 200
    with socket.create_connection(("127.0.0.1", world.port), timeout=5) as extra:
        extra.sendall(head("GET", "/up/x", token))
        try:
            refused = extra.recv(100) == b""
        except ConnectionResetError:
            refused = True
    assert refused
    held.pop().close()
    assert wait_until(lambda: world.bridge._conns.held_by("127.0.0.1") < cap)
    assert world.client().request("GET", "/up/y", token).status == 200


def test_a_large_body_to_the_bridge_itself_is_read_to_its_end(world: ProxyWorld) -> None:
    """9 MiB of events (under the 10 MiB limit) must get a 202, not a reset."""
    import json

    token = world.token("alice")
    message = "x" * 1000
    events = {"events": [{"type": "log", "message": message}] * 9000}
    body = json.dumps(events).encode()
    assert 8 << 20 < len(body) < 10 << 20
    answer = world.client().request("POST", "/_corral/events", token, body)
    assert (answer.status, answer.json()) == (202, {"accepted": 1000})


def test_a_large_body_is_streamed_upstream(world: ProxyWorld) -> None:
    body = bytes(range(256)) * (9 << 12)
    answer = world.client().request("POST", "/up/big", world.token("alice"), body)
    assert answer.status == 200
    assert world.upstream.requests[0].body == body


def test_an_early_answer_keeps_both_connections_in_step() -> None:
    def early(request: Received) -> bytes:
        return respond(413, b"too big for me")

    with proxy_world(early) as world:
        token = world.token("alice")
        c = world.client()
        assert c.request("POST", "/up/x", token, b"y" * 200_000).status == 413
        assert c.request("GET", "/up/x", token).status == 413


def test_stopping_the_bridge_mid_exchange_leaves_no_task(caplog: pytest.LogCaptureFixture) -> None:
    def slow(request: Received) -> bytes:
        time.sleep(2)
        return echo(request)

    with caplog.at_level(logging.ERROR, logger="asyncio"), proxy_world(slow) as world:
        c = world.client()
        c.send(head("GET", "/up/slow", world.token("alice")))
        wait_until(lambda: world.upstream.connections)
        world.bridge.stop()
    assert not [r for r in caplog.records if "destroyed but it is pending" in r.getMessage()]


def test_calls_are_recorded_with_their_refusals(world: ProxyWorld) -> None:
    c = world.client()
    c.request("GET", "/up/../x", world.token("alice"))
    assert wait_until(lambda: [x["error"] for x in world.calls()]) == ["bad_path"]
