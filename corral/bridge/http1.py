"""HTTP/1.1 message rules for the bridge, without I/O: framing, targets, headers, redaction.

The proxy (``proxy.py``) tokenises bytes with llhttp (httptools, strict mode) and asks this
module every question whose wrong answer could desynchronise a connection or hand a secret to
a sandbox. Each answer is a pure function of the message, so each is tested with hostile
bytes in ``tests/unit/test_http1.py``:

The rules read a message's *notable* fields (``notable()``: framing, expectation, connection
and coding fields, under canonical names), which the proxy gathers while it parses.

* ``request_body`` / ``response_body``: how a message's body is delimited (RFC 9112 section
  6.3). Anything ambiguous is refused, never guessed: Transfer-Encoding beside Content-Length,
  a transfer coding other than exactly ``chunked``, a Content-Length that is not one decimal
  number, chunked framing in HTTP/1.0, a framing field spelled with ``_`` (llhttp, which
  delimits the bytes, ignores ``Content_Length``; the bridge must not believe it either).
* ``route_target``: the request target split into connection name, rest and query. Only the
  origin form is accepted, and a path that could climb out of the connection's base path
  (dot segments however they are spelled: ``..``, ``%2e%2e``, ``..%2f``, ``..\\``, ``..;``,
  ``%u002e``, overlong UTF-8, fullwidth forms, trailing dots and spaces) is refused.
* ``canonical``: the name under which a header is compared with the bridge's lists. Names are
  compared with ``_`` read as ``-``, because CGI-style servers do (``X_Api_Key`` reaches them as
  ``X-Api-Key``); a header the bridge drops cannot come back under another spelling.
* ``response_head`` / ``request_head``: every head the bridge writes is its own. The status
  line carries the standard reason phrase, never the upstream's.
* ``Redactor``: overwrites a secret in a stream of chunks, including one split between
  chunks, with asterisks of the same length (framing by length still holds).
* ``Decoder``: undoes gzip and deflate content codings, so that redaction sees the bytes the
  client would see after decoding.
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from dataclasses import dataclass
from enum import Enum
from http import HTTPStatus
from urllib.parse import unquote_to_bytes

from corral.errors import Refused

# Connection-specific and framing fields (RFC 9110 section 7.6.1, RFC 9112 section 6): the
# bridge frames every message it writes itself, so none of these is ever passed on.
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
        b"expect",
    }
)
# Request fields a sandbox could use to make an upstream believe something about the
# request's origin or path that the bridge did not decide (routing by X-Original-URL and the
# like would escape the connection's base path).
SPOOFABLE = frozenset(
    {
        b"forwarded",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-proto",
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"x-real-ip",
        b"x-original-url",
        b"x-rewrite-url",
    }
)
# Response fields that would hand the sandbox a credential the upstream derived from the one
# the bridge attached (a session cookie). Cookies cannot round-trip anyway: the bridge drops
# the sandbox's Cookie header.
CREDENTIAL_RESPONSE = frozenset({b"set-cookie", b"set-cookie2", b"authentication-info"})

MAX_LENGTH_DIGITS = 18  # 10^18 bytes: beyond any limit, and still an exact int64
_DIGITS = re.compile(rb"[0-9]+")
_DECODABLE = {b"gzip": "gzip", b"x-gzip": "gzip", b"deflate": "deflate"}


class Delimit(Enum):
    """How a message body ends (RFC 9112 section 6.3)."""

    NONE = "none"  # no body at all
    LENGTH = "length"  # exactly ``length`` bytes
    CHUNKED = "chunked"  # chunked transfer coding, ended by the last chunk
    CLOSE = "close"  # (responses only) the connection's end; never reusable after


@dataclass(frozen=True, slots=True)
class Framing:
    delimit: Delimit
    length: int = 0


NO_BODY = Framing(Delimit.NONE)
CHUNKED = Framing(Delimit.CHUNKED)
UNTIL_CLOSE = Framing(Delimit.CLOSE)


# The fields whose values the rules below read. The proxy collects them (by canonical name)
# while it parses, so each rule looks at a handful of fields, not at every header.
NOTABLE = frozenset(
    {b"content-length", b"transfer-encoding", b"expect", b"connection", b"content-encoding"}
)
# The fields that delimit a message are kept under the name they were sent with, not the
# canonical one: llhttp reads only the exact names, and a spelling it ignores (the aliases)
# makes the message ambiguous.
FRAMING = frozenset({b"content-length", b"transfer-encoding"})
_ALIASES = frozenset({b"content_length", b"transfer_encoding"})


def canonical(name: bytes) -> bytes:
    """A header name as the bridge compares it: lowercase, and ``_`` read as ``-``."""
    name = name.lower()
    return name.replace(b"_", b"-") if b"_" in name else name


def notable(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The fields of ``headers`` that the rules read, under their canonical names (framing
    fields under their lowercase names, see ``FRAMING``)."""
    out = []
    for name, value in headers:
        name = name.lower()
        c = canonical(name)
        if c in NOTABLE:
            out.append((name if c in FRAMING else c, value))
    return out


def _values(fields: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for k, v in fields if k == name]


def _framing(
    fields: list[tuple[bytes, bytes]], *, http10: bool, status: int, side: str
) -> Framing | None:
    """Content-Length or chunked, checked alike on both sides; None when neither is there."""
    if any(k in _ALIASES for k, _ in fields):
        raise Refused(
            status,
            "ambiguous_framing",
            f"the {side} has a framing field spelled with '_' (Content_Length or "
            "Transfer_Encoding), which one parser ignores and another believes",
            closes=True,
        )
    codings = _values(fields, b"transfer-encoding")
    lengths = _values(fields, b"content-length")
    if codings:
        if lengths:
            raise Refused(
                status,
                "ambiguous_framing",
                f"the {side} has both Transfer-Encoding and Content-Length",
                closes=True,
            )
        if http10:
            raise Refused(
                status,
                "ambiguous_framing",
                f"the {side} uses Transfer-Encoding in HTTP/1.0",
                closes=True,
            )
        if len(codings) != 1 or codings[0].strip().lower() != b"chunked":
            shown = b", ".join(codings).decode("latin-1")[:100]
            raise Refused(
                501 if side == "request" else status,
                "unsupported_transfer_coding",
                f"the {side}'s Transfer-Encoding {shown!r} is not exactly 'chunked'",
                closes=True,
            )
        return CHUNKED
    if lengths:
        value = lengths[0].strip()
        if len(lengths) != 1 or not _DIGITS.fullmatch(value) or len(value) > MAX_LENGTH_DIGITS:
            shown = b", ".join(lengths).decode("latin-1")[:100]
            raise Refused(
                status,
                "bad_content_length",
                f"the {side}'s Content-Length {shown!r} is not one decimal number",
                closes=True,
            )
        n = int(value)
        return Framing(Delimit.LENGTH, n) if n else NO_BODY
    return None


def request_body(fields: list[tuple[bytes, bytes]], http10: bool) -> Framing:
    """How the request's body is delimited; ``Refused`` (400/501) when it is ambiguous."""
    if not fields:
        return NO_BODY  # the common case: a request without a body says nothing about one
    return _framing(fields, http10=http10, status=400, side="request") or NO_BODY


def response_body(
    method: bytes, status: int, fields: list[tuple[bytes, bytes]], http10: bool
) -> Framing:
    """How a response's body is delimited, given the request's method; ``Refused`` (502)."""
    if method == b"HEAD" or status < 200 or status in (204, 304):
        return NO_BODY  # whatever its fields say (RFC 9112 section 6.3, rule 1)
    return _framing(fields, http10=http10, status=502, side="response") or UNTIL_CLOSE


def head_framing(status: int, fields: list[tuple[bytes, bytes]], version: str) -> Framing:
    """The framing a response to HEAD advertises (that of the GET it stands for); a malformed
    one is advertised as nothing rather than passed on."""
    try:
        return _framing(fields, http10=version == "1.0", status=502, side="response") or NO_BODY
    except Refused:
        return NO_BODY


def expects_continue(fields: list[tuple[bytes, bytes]]) -> bool:
    """True for ``Expect: 100-continue``; ``Refused`` (417) for any other expectation."""
    if not fields:
        return False
    values = _values(fields, b"expect")
    if not values:
        return False
    if len(values) == 1 and values[0].strip().lower() == b"100-continue":
        return True
    raise Refused(417, "expectation_failed", "the bridge meets only 'Expect: 100-continue'")


def listed_in_connection(fields: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Field names the sender declared connection-specific (RFC 9110 section 7.6.1)."""
    out: set[bytes] = set()
    for value in _values(fields, b"connection"):
        out.update(canonical(token.strip()) for token in value.split(b",") if token.strip())
    return frozenset(out)


# -- targets ---------------------------------------------------------------------------------


def route_target(url: bytes) -> tuple[str, bytes, bytes]:
    """``/<connection>/<rest>?<query>`` -> (connection, rest, query); ``Refused`` (400) for a
    target that is not origin-form or whose path could leave the connection's base path."""
    if not url.startswith(b"/") or url.startswith(b"//"):
        raise Refused(400, "bad_target", "the request target must be a path (origin form)")
    if b"#" in url:
        raise Refused(400, "bad_target", "a request target has no fragment")
    path, _, query = url.partition(b"?")
    _check_path(path)
    parts = path.split(b"/", 2)
    name = parts[1].decode("ascii", "replace")
    rest = parts[2] if len(parts) > 2 else b""
    return name, rest, query


# A segment of dots, maybe with blanks: Windows servers trim trailing dots and spaces, so
# ``...`` and ``.. `` are ``..`` there. ``%uXXXX`` is IIS's own escape.
_DOTS = re.compile(rb"[ \t]*\.[. \t]*")
_U_ESCAPE = re.compile(rb"%u[0-9a-f]{4}", re.IGNORECASE)


def _check_path(path: bytes) -> None:
    """Refuse dot segments and backslashes in every decoding of the path, until it is stable:
    whichever number of times a server behind the bridge decodes it, it cannot climb out.

    Decodings are percent-decoding and then, once that is stable, Unicode compatibility
    normalisation (NFKC: fullwidth U+FF0E is ``.``, U+2025 is ``..``, U+FF05 is ``%``), which
    some servers apply. A path that is not UTF-8 once decoded is refused: overlong forms
    (``%c0%ae``) are how older decoders were tricked into a dot or a slash. The part after
    the connection name may not begin with a slash either: sent upstream after an empty base
    path it would read as ``//host/...``, a reference to another host.
    """
    seen = path
    for _ in range(6):
        if b"\\" in seen or b"\x00" in seen or (b"%" in seen and _U_ESCAPE.search(seen)):
            raise Refused(
                400, "bad_path", "the path holds a backslash, a NUL or a %u escape (maybe encoded)"
            )
        segments = seen.split(b"/")
        for segment in segments:
            if b"." in segment and _DOTS.fullmatch(segment.split(b";", 1)[0]):
                raise Refused(400, "bad_path", "the path holds a dot segment (maybe encoded)")
        if len(segments) > 3 and segments[2] == b"":  # "/<name>//...", not "/<name>/"
            raise Refused(400, "bad_path", "the path after the connection name begins with '/'")
        decoded = unquote_to_bytes(seen)
        if decoded == seen:
            try:
                text = seen.decode("utf-8")
            except UnicodeDecodeError:
                raise Refused(400, "bad_path", "the decoded path is not UTF-8") from None
            decoded = unicodedata.normalize("NFKC", text).encode("utf-8")
            if decoded == seen:
                return
        seen = decoded
    raise Refused(400, "bad_path", "the path is encoded more than five times over")


# -- heads -----------------------------------------------------------------------------------


_REASONS = {int(s): s.phrase.encode() for s in HTTPStatus}


def reason(status: int) -> bytes:
    return _REASONS.get(status, b"")


def response_head(
    status: int,
    headers: list[tuple[bytes, bytes]],
    framing: Framing,
    *,
    keep_alive: bool,
) -> bytes:
    """A response head of the bridge's own: its status line, the fields it passes (already
    filtered and redacted), and its own framing (``CLOSE``: the connection ends the body)."""
    out = [b"HTTP/1.1 %d %s\r\n" % (status, reason(status))]
    out.extend(k + b": " + v + b"\r\n" for k, v in headers)
    if framing.delimit is Delimit.LENGTH:
        out.append(b"content-length: %d\r\n" % framing.length)
    elif framing.delimit is Delimit.CHUNKED:
        out.append(b"transfer-encoding: chunked\r\n")
    elif framing.delimit is Delimit.NONE and status >= 200 and status not in (204, 304):
        out.append(b"content-length: 0\r\n")
    if status >= 200:
        out.append(
            b"connection: keep-alive\r\n\r\n" if keep_alive else b"connection: close\r\n\r\n"
        )
    else:
        out.append(b"\r\n")
    return b"".join(out)


def request_head(
    method: bytes,
    target: bytes,
    host: bytes,
    headers: list[tuple[bytes, bytes]],
    framing: Framing,
) -> bytes:
    out = [b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (method, target, host)]
    out.extend(k + b": " + v + b"\r\n" for k, v in headers)
    if framing.delimit is Delimit.LENGTH:
        out.append(b"content-length: %d\r\n" % framing.length)
    elif framing.delimit is Delimit.CHUNKED:
        out.append(b"transfer-encoding: chunked\r\n")
    out.append(b"connection: keep-alive\r\n\r\n")
    return b"".join(out)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


# -- redaction and decoding --------------------------------------------------------------------


def redact(data: bytes, secrets: list[bytes]) -> bytes:
    for secret in secrets:
        if secret in data:
            data = data.replace(secret, b"*" * len(secret))
    return data


def redact_fields(
    fields: list[tuple[bytes, bytes]], secrets: list[bytes]
) -> list[tuple[bytes, bytes]]:
    """Header names and values with every secret overwritten (one search when there is none)."""
    if not secrets:
        return fields
    joined = b"\n".join(k + b":" + v for k, v in fields)
    if not any(secret in joined for secret in secrets):
        return fields
    return [(redact(k, secrets), redact(v, secrets)) for k, v in fields]


class Redactor:
    """Redacts a stream: a secret split between two chunks is caught too.

    After redacting what it has, it holds back the longest tail that could still be the
    start of a secret (usually nothing, so a server-sent event is not delayed), and emits it
    with the next chunk or at the end. Output length equals input length.
    """

    __slots__ = ("_secrets", "_tail")

    def __init__(self, secrets: list[bytes]) -> None:
        self._secrets = [s for s in secrets if s]
        self._tail = b""

    def feed(self, data: bytes) -> bytes:
        if not self._secrets:
            return data
        buf = (
            redact(self._tail + data, self._secrets) if self._tail else redact(data, self._secrets)
        )
        hold = self._hold(buf)
        self._tail = buf[len(buf) - hold :] if hold else b""
        return buf[: len(buf) - hold]

    def flush(self) -> bytes:
        tail, self._tail = self._tail, b""
        return tail

    def _hold(self, buf: bytes) -> int:
        best = 0
        for secret in self._secrets:
            first = secret[:1]
            # Only positions where the secret's first byte occurs can start a partial match.
            start = max(len(buf) - len(secret) + 1, 0)
            at = buf.find(first, start)
            while at != -1:
                if secret.startswith(buf[at:]):
                    best = max(best, len(buf) - at)
                    break
                at = buf.find(first, at + 1)
        return best


class Decoder:
    """Undoes one gzip or deflate content coding, streaming, with a ceiling on its output.

    ``push`` takes compressed bytes and ``pull(most)`` returns at most ``most`` decoded ones,
    so the proxy decodes only as fast as the sandbox reads (a few KiB can decode to the whole
    ceiling); ``feed`` is both at once, for everything pushed so far.
    """

    def __init__(self, coding: str, limit: int) -> None:
        self.coding = coding
        self.limit = limit
        self.produced = 0
        # gzip: 16 + MAX_WBITS; deflate: zlib-wrapped per RFC 9110, raw as sent by some servers.
        self._z = zlib.decompressobj(31 if coding == "gzip" else 15)
        self._first = True
        self._input = b""  # pushed, not yet decoded
        self._more = False  # the last pull was cut short: zlib may hold more output

    @property
    def pending(self) -> bool:
        return bool(self._input) or self._more

    def push(self, data: bytes) -> None:
        if data:
            self._input = self._input + data if self._input else data

    def pull(self, most: int) -> bytes:
        try:
            out = self._pull(max(most, 1))  # (0 would mean no limit to zlib)
        except zlib.error as exc:
            raise Refused(
                502,
                "undecodable_response",
                f"the upstream's {self.coding} body does not decode: {exc}",
            ) from None
        self.produced += len(out)
        if self.produced > self.limit:
            raise Refused(
                502, "response_too_large", f"the upstream's decoded body passed {self.limit} bytes"
            )
        return out

    def feed(self, data: bytes) -> bytes:
        self.push(data)
        out = []
        while self.pending:
            out.append(self.pull(self.limit - self.produced + 1))
        return b"".join(out)

    def _pull(self, most: int) -> bytes:
        data, self._input = self._input, b""
        if self._first and data:
            self._first = False
            if self.coding == "deflate" and (data[0] & 0x0F) != 8:
                self._z = zlib.decompressobj(-15)  # raw deflate, no zlib header
        out = self._z.decompress(data, most)
        self._more = len(out) == most
        self._input = self._z.unconsumed_tail
        if self.coding == "gzip" and self._z.eof and self._z.unused_data:
            # Concatenated gzip members decode one after another.
            self._input = self._z.unused_data
            self._z = zlib.decompressobj(31)
        return out

    def flush(self) -> bytes:
        return self._z.flush()


def content_decoder(fields: list[tuple[bytes, bytes]], limit: int) -> Decoder | None:
    """A decoder for the response's Content-Encoding, None for identity; ``Refused`` (502) for
    a coding the bridge cannot undo (it could not look for secrets inside)."""
    codings = [
        c.strip().lower()
        for value in _values(fields, b"content-encoding")
        for c in value.split(b",")
        if c.strip() and c.strip().lower() != b"identity"
    ]
    if not codings:
        return None
    if len(codings) == 1 and codings[0] in _DECODABLE:
        return Decoder(_DECODABLE[codings[0]], limit)
    shown = b", ".join(codings).decode("latin-1")[:100]
    raise Refused(
        502,
        "undecodable_response",
        f"the upstream answered with content coding {shown!r}, which the bridge "
        "cannot search for secrets",
    )
