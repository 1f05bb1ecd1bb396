"""The bridge's HTTP/1.1 rules (``corral.bridge.http1``), case by case, with hostile input."""

from __future__ import annotations

import gzip
import random
import zlib

import pytest

from corral.bridge import http1
from corral.bridge.http1 import CHUNKED, NO_BODY, UNTIL_CLOSE, Delimit, Framing
from corral.errors import Refused

H = list[tuple[bytes, bytes]]


def hs(*pairs: str) -> H:
    """The notable fields of a head given as ``name: value`` lines."""
    fields = [(k.strip().encode(), v.strip().encode()) for k, v in (p.split(":", 1) for p in pairs)]
    return http1.notable(fields)


# -- framing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers, http10, framing",
    [
        ([], False, NO_BODY),
        (["content-length: 0"], False, NO_BODY),
        (["content-length: 12"], False, Framing(Delimit.LENGTH, 12)),
        (["content-length:  007 "], False, Framing(Delimit.LENGTH, 7)),
        (["transfer-encoding: chunked"], False, CHUNKED),
        (["Transfer-Encoding: CHUNKED"], False, CHUNKED),
        (["content-length: 5"], True, Framing(Delimit.LENGTH, 5)),
    ],
)
def test_request_framing(headers: list[str], http10: bool, framing: Framing) -> None:
    assert http1.request_body(hs(*headers), http10) == framing


@pytest.mark.parametrize(
    "headers, http10, status, code",
    [
        (["transfer-encoding: chunked", "content-length: 3"], False, 400, "ambiguous_framing"),
        (["transfer_encoding: chunked", "content-length: 3"], False, 400, "ambiguous_framing"),
        (["transfer-encoding: chunked", "content_length: 3"], False, 400, "ambiguous_framing"),
        (["transfer-encoding: chunked"], True, 400, "ambiguous_framing"),
        (["transfer-encoding: gzip, chunked"], False, 501, "unsupported_transfer_coding"),
        (["transfer-encoding: chunked, gzip"], False, 501, "unsupported_transfer_coding"),
        (["transfer-encoding: identity"], False, 501, "unsupported_transfer_coding"),
        (
            ["transfer-encoding: chunked", "transfer-encoding: chunked"],
            False,
            501,
            "unsupported_transfer_coding",
        ),
        (["content-length: 3", "content-length: 3"], False, 400, "bad_content_length"),
        (["content-length: 3, 3"], False, 400, "bad_content_length"),
        (["content-length: -1"], False, 400, "bad_content_length"),
        (["content-length: 0x10"], False, 400, "bad_content_length"),
        (["content-length: 1e3"], False, 400, "bad_content_length"),
        (["content-length: " + "9" * 19], False, 400, "bad_content_length"),
        (["content-length: "], False, 400, "bad_content_length"),
    ],
)
def test_ambiguous_requests_are_refused_and_close(
    headers: list[str], http10: bool, status: int, code: str
) -> None:
    with pytest.raises(Refused) as refused:
        http1.request_body(hs(*headers), http10)
    assert (refused.value.status, refused.value.code, refused.value.closes) == (status, code, True)


@pytest.mark.parametrize(
    "method, status, headers, framing",
    [
        (b"HEAD", 200, ["content-length: 99"], NO_BODY),
        (b"HEAD", 200, ["transfer-encoding: chunked"], NO_BODY),
        (b"GET", 100, ["content-length: 5"], NO_BODY),
        (b"GET", 103, [], NO_BODY),
        (b"GET", 204, ["content-length: 5"], NO_BODY),
        (b"GET", 304, ["transfer-encoding: chunked"], NO_BODY),
        (b"GET", 200, [], UNTIL_CLOSE),
        (b"GET", 200, ["content-length: 5"], Framing(Delimit.LENGTH, 5)),
        (b"POST", 500, ["transfer-encoding: chunked"], CHUNKED),
    ],
)
def test_response_framing(method: bytes, status: int, headers: list[str], framing: Framing) -> None:
    assert http1.response_body(method, status, hs(*headers), False) == framing


def test_ambiguous_responses_are_a_502() -> None:
    for headers in (
        ["transfer-encoding: chunked", "content-length: 2"],
        ["transfer-encoding: gzip"],
    ):
        with pytest.raises(Refused) as refused:
            http1.response_body(b"GET", 200, hs(*headers), False)
        assert refused.value.status == 502


def test_expectations() -> None:
    assert http1.expects_continue(hs("expect: 100-Continue")) is True
    assert http1.expects_continue([]) is False
    with pytest.raises(Refused) as refused:
        http1.expects_continue(hs("expect: 200-ok"))
    assert refused.value.status == 417


def test_fields_named_by_connection_are_connection_specific() -> None:
    named = http1.listed_in_connection(hs("connection: keep-alive, X_Secret ,", "connection: a"))
    assert named == {b"keep-alive", b"x-secret", b"a"}


# -- targets -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, expected",
    [
        (b"/github/user", ("github", b"user", b"")),
        (b"/github", ("github", b"", b"")),
        (b"/openai/v1/chat/completions?x=1&y=2", ("openai", b"v1/chat/completions", b"x=1&y=2")),
        (b"/up/a%20b/..c/c..", ("up", b"a%20b/..c/c..", b"")),
        (b"/up/a?path=../../etc", ("up", b"a", b"path=../../etc")),  # a query is not a path
    ],
)
def test_targets_that_stay_inside(url: bytes, expected: tuple[str, bytes, bytes]) -> None:
    assert http1.route_target(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        b"/up/..",
        b"/up/../x",
        b"/up/./x",
        b"/up/a/../../x",
        b"/up/%2e%2e/x",
        b"/up/%2E%2E",
        b"/up/.%2e/x",
        b"/up/%2e./x",
        b"/up/..%2fx",
        b"/up/..%2Fx",
        b"/up/%2e%2e%2fx",
        b"/up/..\\x",
        b"/up/..%5cx",
        b"/up/..%5Cx",
        b"/up/a\\b",
        b"/up/%252e%252e/x",
        b"/up/%25252e%25252e/x",
        b"/up/..;/x",
        b"/up/..;jsessionid=1/x",
        b"/up/%00",
        b"http://evil/x",
        b"//evil/x",
        b"*",
        b"evil:443",
        b"/up/x#frag",
        b"/up/%2525252525252e",
    ],
)
def test_targets_that_could_climb_out_are_refused(url: bytes) -> None:
    with pytest.raises(Refused) as refused:
        http1.route_target(url)
    assert refused.value.status == 400


def test_canonical_names_read_underscores_as_dashes() -> None:
    assert http1.canonical(b"X_Api_Key") == b"x-api-key" == http1.canonical(b"x-api-key")


# -- heads ---------------------------------------------------------------------------------------


def test_the_bridge_writes_its_own_status_line() -> None:
    head = http1.response_head(200, [(b"x-a", b"1")], Framing(Delimit.LENGTH, 3), keep_alive=True)
    assert head == (
        b"HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 3\r\nconnection: keep-alive\r\n\r\n"
    )
    assert http1.response_head(599, [], NO_BODY, keep_alive=False).startswith(b"HTTP/1.1 599 \r\n")
    interim = http1.response_head(103, [(b"link", b"</a>")], NO_BODY, keep_alive=True)
    assert interim == b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n"
    assert b"content-length: 0" in http1.response_head(200, [], NO_BODY, keep_alive=True)
    assert b"content-length" not in http1.response_head(204, [], NO_BODY, keep_alive=True)


def test_request_heads_carry_the_framing_decided() -> None:
    head = http1.request_head(b"POST", b"/v1/x", b"api", [(b"a", b"b")], CHUNKED)
    assert head == (
        b"POST /v1/x HTTP/1.1\r\nhost: api\r\na: b\r\ntransfer-encoding: chunked\r\n"
        b"connection: keep-alive\r\n\r\n"
    )


# -- redaction -----------------------------------------------------------------------------------


def run_redactor(secrets: list[bytes], pieces: list[bytes]) -> bytes:
    r = http1.Redactor(secrets)
    return b"".join(r.feed(p) for p in pieces) + r.flush()


def test_redaction_across_every_split() -> None:
    secret = b"sk-corral-0123456789abcdef"
    data = b"head " + secret + b" mid " + secret + secret + b" tail"
    want = data.replace(secret, b"*" * len(secret))
    for cut in range(len(data) + 1):
        for cut2 in range(cut, len(data) + 1, 7):
            pieces = [data[:cut], data[cut:cut2], data[cut2:]]
            assert run_redactor([secret], pieces) == want, (cut, cut2)


def test_redaction_at_random_with_overlapping_secrets() -> None:
    rng = random.Random(7)
    secrets = [b"abcabcabd", b"zzzz-zzzz-1", b"abcabd-long"]
    for _ in range(300):
        parts = [rng.choice([b"abc", b"zz", b"-", b"d", b"x", *secrets]) for _ in range(20)]
        data = b"".join(parts)
        cuts = sorted(rng.sample(range(len(data) + 1), 4))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        got = run_redactor(sorted(secrets, key=len, reverse=True), pieces)
        assert len(got) == len(data)
        for s in secrets:
            assert s not in got


def test_redaction_holds_back_nothing_that_cannot_start_a_secret() -> None:
    r = http1.Redactor([b"sk-secret-123"])
    assert r.feed(b"data: {}\n\n") == b"data: {}\n\n"  # a server-sent event is not delayed
    assert r.feed(b"x sk-sec") == b"x "
    assert r.feed(b"ret-123!") == b"*" * 13 + b"!"


def test_decoding_undoes_gzip_and_deflate() -> None:
    body = b"the quick brown fox " * 1000
    for coding, data in (
        (b"gzip", gzip.compress(body)),
        (b"gzip", gzip.compress(body[:500]) + gzip.compress(body[500:])),
        (b"deflate", zlib.compress(body)),
        (b"deflate", zlib.compress(body)[2:-4]),  # raw deflate, as some servers send it
    ):
        decoder = http1.content_decoder([(b"content-encoding", coding)], 1 << 30)
        assert decoder is not None
        out = b"".join(decoder.feed(data[i : i + 100]) for i in range(0, len(data), 100))
        assert out + decoder.flush() == body, coding
    assert http1.content_decoder([(b"content-encoding", b"identity")], 10) is None


def test_decoding_refuses_what_it_cannot_search_and_bombs() -> None:
    for coding in (b"br", b"zstd", b"gzip, gzip", b"compress"):
        with pytest.raises(Refused):
            http1.content_decoder([(b"content-encoding", coding)], 10)
    bomb = gzip.compress(b"\0" * (10 << 20))
    decoder = http1.content_decoder([(b"content-encoding", b"gzip")], 1 << 20)
    assert decoder is not None
    with pytest.raises(Refused) as refused:
        decoder.feed(bomb)
    assert refused.value.code == "response_too_large"
    with pytest.raises(Refused):
        broken = http1.content_decoder([(b"content-encoding", b"gzip")], 1 << 20)
        assert broken is not None
        broken.feed(b"not gzip at all")
