"""Outbound HTTP from the host: the one client for the requests Corral itself sends out.

Two kinds of request leave the host on Corral's own account: the OAuth refresh-token grant to
a credential's token URL (``bridge/backend.py``) and a webhook to an app owner's receiver
(``pipeline/webhooks.py``). Both go through a ``Client``, and every request gets the same
treatment:

* a timeout: to connect, and for each read of the answer;
* a bounded answer: at most ``limit`` bytes of body are read (``Response.truncated`` says
  whether there was more), so a receiver cannot make Corral read without end;
* TLS verified against the system's certificate authorities for ``https``, never switched
  off;
* redirects not followed unless the caller asks (``follow``), and then only to the same
  origin (scheme, host, port) unless it also asks for ``other_hosts``. A followed redirect is
  fetched with GET and no body, as 303 says (and as browsers do for 301 and 302 after a
  POST); 307 and 308, which would send the body again, are never followed;
* foreign exceptions (sockets, TLS, ``http.client``) become ``OutboundError``, and a URL that
  is not ``http(s)://host/...`` is ``UnusableURL``, once, here.

The transport is the seam: ``Client(transport=...)``. ``HTTPTransport`` sends over the
network; ``MockTransport`` answers from a function and records what was sent, for tests that
need no server. Where a request may go (private addresses, the metadata service) is not
checked yet: a future policy belongs here, in front of the transport.

Not through here: the bridge's proxy (``bridge/proxy.py``, ``bridge/upstream.py``). It is the
data plane between sandboxes and upstream services: it frames HTTP/1.1 itself, streams bodies
both ways, and keeps its own connection pools.
"""

from __future__ import annotations

import http.client
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol
from urllib.parse import urljoin, urlsplit

from corral.errors import OutboundError, UnusableURL

DEFAULT_TIMEOUT: Final = 10.0  # seconds to connect, and for each read
DEFAULT_LIMIT: Final = 1 << 20  # bytes of an answer's body read at most
MAX_FOLLOW: Final = 10


@dataclass(frozen=True)
class Request:
    method: str
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str]  # names in lowercase; a repeated field's values joined by ", "
    body: bytes  # at most the client's limit
    truncated: bool = False  # the answer had more body than the limit
    url: str = ""  # where the answer came from (after any redirect followed)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class Transport(Protocol):
    """Sends one request and reads its answer; ``OutboundError`` if there is no answer."""

    def send(self, request: Request, *, timeout: float, limit: int) -> Response: ...


class HTTPTransport:
    """Over the network with ``http.client``: one connection per request, closed after it."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        # The default context verifies the certificate chain and the host name.
        self._tls = tls or ssl.create_default_context()

    def send(self, request: Request, *, timeout: float, limit: int) -> Response:
        parts = urlsplit(request.url)
        host, port = parts.hostname or "", parts.port
        connection: http.client.HTTPConnection
        if parts.scheme == "https":
            connection = http.client.HTTPSConnection(host, port, timeout=timeout, context=self._tls)
        else:
            connection = http.client.HTTPConnection(host, port, timeout=timeout)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            connection.request(
                request.method, target, body=request.body or None, headers=dict(request.headers)
            )
            answer = connection.getresponse()
            body = answer.read(limit + 1)
            headers: dict[str, str] = {}
            for name, value in answer.getheaders():
                name = name.lower()
                headers[name] = f"{headers[name]}, {value}" if name in headers else value
            status = answer.status
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, TLS
            raise OutboundError(f"{type(exc).__name__}: {exc}".rstrip(": ")) from None
        finally:
            connection.close()
        return Response(status, headers, body[:limit], len(body) > limit, request.url)


class MockTransport:
    """A transport for tests: ``handler`` answers each request; every request is kept."""

    def __init__(self, handler: Callable[[Request], Response]) -> None:
        self._handler = handler
        self._lock = threading.Lock()
        self.requests: list[Request] = []

    def send(self, request: Request, *, timeout: float, limit: int) -> Response:
        with self._lock:
            self.requests.append(request)
        answer = self._handler(request)
        return Response(
            answer.status,
            {k.lower(): v for k, v in answer.headers.items()},
            answer.body[:limit],
            len(answer.body) > limit,
            answer.url or request.url,
        )


class Client:
    """Sends requests through ``transport`` (the network if None), with the rules above."""

    def __init__(
        self,
        transport: Transport | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        limit: int = DEFAULT_LIMIT,
    ) -> None:
        self.transport: Transport = transport or HTTPTransport()
        self.timeout = timeout
        self.limit = limit

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
        timeout: float | None = None,
        limit: int | None = None,
        follow: int = 0,
        other_hosts: bool = False,
    ) -> Response:
        """Send one request; the answer, whatever its status.

        ``follow``: how many redirects to follow (0: a 3xx is the answer); ``other_hosts``:
        whether a redirect may lead to another origin. ``UnusableURL`` for a URL that is not
        ``http(s)://host/...``; ``OutboundError`` when no answer came.
        """
        if not 0 <= follow <= MAX_FOLLOW:
            raise ValueError(f"follow at most {MAX_FOLLOW} redirects, not {follow}")
        current = Request(method, url, dict(headers or {}), body)
        origin = _origin(url)
        hops = 0
        while True:
            answer = self.transport.send(
                current,
                timeout=self.timeout if timeout is None else timeout,
                limit=self.limit if limit is None else limit,
            )
            location = answer.headers.get("location")
            if answer.status not in (301, 302, 303) or not location or hops == follow:
                return answer
            target = urljoin(current.url, location)
            try:
                elsewhere = _origin(target) != origin
            except UnusableURL:
                return answer  # a redirect out of http(s) is never followed
            if elsewhere and not other_hosts:
                return answer  # nor one to another host, unless asked for
            drop = {"content-type", "content-length"} | (_CREDENTIALS if elsewhere else set())
            kept = {k: v for k, v in current.headers.items() if k.lower() not in drop}
            current = Request("GET", target, kept)
            hops += 1


_CREDENTIALS: Final = frozenset({"authorization", "cookie", "proxy-authorization"})


def _origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL; ``UnusableURL`` for anything else."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnusableURL(f"invalid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        # Not echoed: a URL may carry a password in its user part.
        raise UnusableURL(f"a {parts.scheme or 'schemeless'} URL is not http(s)://host/...")
    return parts.scheme, parts.hostname.lower(), port or (443 if parts.scheme == "https" else 80)
