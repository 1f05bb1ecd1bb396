"""The shared machinery of the fake upstream services: a stdlib HTTP/1.1 server in a thread.

``FakeService`` binds a ``ThreadingHTTPServer`` (127.0.0.1 and a free port unless told
otherwise), keeps connections alive, reads request bodies sent with ``Content-Length`` or
``Transfer-Encoding: chunked``, records every request, checks the credential the service
demands (``expect_auth``) and routes the call to a handler of the subclass. A handler returns
a ``Response`` whose body is either bytes (sent with ``Content-Length``) or an iterable of
byte strings (sent chunked, one chunk per item, flushed as it goes: server-sent events).

Faults, for the bridge's error paths: ``delay`` (seconds to wait before answering),
``reset_next()`` (drop the connection without an answer, with a TCP reset) and
``respond_next()`` (a canned answer instead of the real one: a 500, a 429, a huge body).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, ClassVar, Self
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger("tests.fakes")

MAX_BODY = 64 * 1024 * 1024  # no test sends more; a bigger request body is answered 400


class Headers(Mapping[str, str]):
    """A case-insensitive, read-only copy of HTTP headers that keeps the names as sent.

    A header sent more than once reads as its values joined by ``", "``; ``get_all`` gives
    them one by one.
    """

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items: list[tuple[str, str]] = [(str(k), str(v)) for k, v in items]
        self._joined: dict[str, str] = {}
        self._names: dict[str, str] = {}
        for name, value in self._items:
            key = name.lower()
            self._names.setdefault(key, name)
            self._joined[key] = f"{self._joined[key]}, {value}" if key in self._joined else value

    def __getitem__(self, name: str) -> str:
        return self._joined[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._joined

    def __iter__(self) -> Iterator[str]:
        return iter(self._names.values())

    def __len__(self) -> int:
        return len(self._joined)

    def get_all(self, name: str) -> list[str]:
        """Every value sent under ``name``, in order."""
        return [value for key, value in self._items if key.lower() == name.lower()]

    def raw_items(self) -> list[tuple[str, str]]:
        """The headers exactly as received, duplicates included."""
        return list(self._items)

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the fake received it."""

    method: str
    target: str  # the request target as sent: path plus query string
    headers: Headers
    body: bytes
    client_address: tuple[str, int]
    received_at: float = field(default_factory=time.time)

    @property
    def path(self) -> str:
        """The path without the query string."""
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, list[str]]:
        """The query string, parsed."""
        return parse_qs(urlsplit(self.target).query, keep_blank_values=True)

    def query_value(self, name: str, default: str | None = None) -> str | None:
        """The first value of query parameter ``name``."""
        values = self.query.get(name)
        return values[0] if values else default

    def json(self) -> Any:
        """The body parsed as JSON (raises ``ValueError`` if it is not JSON)."""
        return json.loads(self.body)

    def form(self) -> dict[str, str]:
        """The body parsed as ``application/x-www-form-urlencoded`` (last value wins)."""
        parsed = parse_qs(self.body.decode("utf-8", "replace"), keep_blank_values=True)
        return {key: values[-1] for key, values in parsed.items()}


class RequestLog:
    """A thread-safe, append-only list of ``RecordedRequest`` (the server appends to it)."""

    def __init__(self) -> None:
        self._items: list[RecordedRequest] = []
        self._changed = threading.Condition()

    def append(self, request: RecordedRequest) -> None:
        with self._changed:
            self._items.append(request)
            self._changed.notify_all()

    def clear(self) -> None:
        with self._changed:
            self._items.clear()

    def snapshot(self) -> list[RecordedRequest]:
        with self._changed:
            return list(self._items)

    def __len__(self) -> int:
        with self._changed:
            return len(self._items)

    def __iter__(self) -> Iterator[RecordedRequest]:
        return iter(self.snapshot())

    def __getitem__(self, index: int) -> RecordedRequest:
        with self._changed:
            return self._items[index]

    def __bool__(self) -> bool:
        return len(self) > 0

    @property
    def last(self) -> RecordedRequest:
        """The most recent request (``IndexError`` if there is none)."""
        return self[-1]

    def matching(self, method: str | None = None, path: str | None = None) -> list[RecordedRequest]:
        """The requests with this method and/or path (without query string)."""
        return [
            r
            for r in self.snapshot()
            if (method is None or r.method == method.upper()) and (path is None or r.path == path)
        ]

    def wait_for(self, count: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """Block until at least ``count`` requests arrived; ``TimeoutError`` after ``timeout``."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._items) >= count, timeout):
                raise TimeoutError(f"{len(self._items)} requests arrived, not {count}")
            return list(self._items)


@dataclass
class Response:
    """What a handler answers. ``body`` bytes go out with Content-Length, an iterable chunked
    (or raw, if ``headers`` set a Content-Length: a body can then promise more than it sends).
    """

    status: int = 200
    body: bytes | Iterable[bytes] = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(
        cls, payload: Any, status: int = 200, headers: Mapping[str, str] | None = None
    ) -> Self:
        """A JSON answer (``application/json``)."""
        return cls(
            status,
            json.dumps(payload).encode(),
            {"Content-Type": "application/json", **(headers or {})},
        )

    @classmethod
    def event_stream(
        cls, events: Iterable[bytes], headers: Mapping[str, str] | None = None
    ) -> Self:
        """A chunked ``text/event-stream`` answer, one chunk per already-encoded event."""
        return cls(
            200,
            events,
            {
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                **(headers or {}),
            },
        )


class Abort(Exception):
    """Raised by a handler (or a body generator) to drop the connection with a TCP reset."""


Handler = Callable[..., Response]


@dataclass(frozen=True)
class Route:
    """One endpoint: ``pattern`` may hold ``{name}`` segments, passed as keyword arguments."""

    method: str
    pattern: str
    handler: Handler
    auth: bool
    regex: re.Pattern[str]


def _compile(pattern: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", pattern)
    regex = "".join(
        re.escape(part) if i % 2 == 0 else f"(?P<{part}>[^/]+)" for i, part in enumerate(parts)
    )
    return re.compile(f"^{regex}$")


class _ClientGone(Exception):
    """The client closed the connection, or the fake is stopping."""


class _Server(ThreadingHTTPServer):
    """The HTTP server; it knows its ``FakeService``, which tracks the open connections."""

    daemon_threads = True
    block_on_close = False  # stop() closes the connections and joins the threads itself

    def __init__(self, address: tuple[str, int], fake: FakeService) -> None:
        self.fake = fake
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _RequestHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-answer is routine in these tests, not worth a traceback.
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


class _RequestHandler(BaseHTTPRequestHandler):
    """Reads one request, hands it to the ``FakeService``, writes the answer."""

    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        if self.connection.family in (socket.AF_INET, socket.AF_INET6):
            # Headers and body are separate writes: without this, Nagle's algorithm and the
            # client's delayed ACK cost ~40 ms per answer on a kept-alive connection.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.fake._track(self.connection, threading.current_thread())

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.fake._untrack(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def version_string(self) -> str:
        return self.server.fake.server_name

    def _dispatch(self) -> None:
        self.server.fake._serve(self)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _dispatch

    # Reading the body ----------------------------------------------------------------------

    def read_body(self) -> bytes:
        """The request body, from Content-Length or chunked transfer coding."""
        encoding = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in encoding:
            return self._read_chunked()
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        size = int(length)
        if size < 0 or size > MAX_BODY:
            raise ValueError(f"bad Content-Length {size}")
        body = self.rfile.read(size)
        if len(body) != size:
            raise _ClientGone()
        return body

    def _read_chunked(self) -> bytes:
        body = bytearray()
        while True:
            line = self.rfile.readline(1024)
            if not line:
                raise _ClientGone()
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                break
            if len(body) + size > MAX_BODY:
                raise ValueError("chunked body too large")
            chunk = self.rfile.read(size)
            if len(chunk) != size or self.rfile.read(2) != b"\r\n":
                raise _ClientGone()
            body += chunk
        while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
            pass  # trailer fields, ignored
        return bytes(body)

    # Writing the answer --------------------------------------------------------------------

    def write_response(self, response: Response) -> None:
        """Send ``response``; an iterable body goes out chunked, each item flushed at once."""
        self.send_response(response.status)
        names = {name.lower() for name in response.headers}
        for name, value in response.headers.items():
            self.send_header(name, value)
        if response.status in (204, 304) or response.status < 200:
            self.end_headers()  # these statuses carry no body (RFC 9110)
            return
        if isinstance(response.body, bytes | bytearray):
            if "content-length" not in names:
                self.send_header("Content-Length", str(len(response.body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(response.body)
            return
        # An iterable body with a Content-Length of its own goes out raw, else chunked.
        chunked = "content-length" not in names
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if self.command == "HEAD":
            return
        for chunk in response.body:
            if self.server.fake._stopping.is_set():
                raise _ClientGone()
            if chunk and chunked:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            elif chunk:
                self.wfile.write(chunk)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    def reset_connection(self) -> None:
        """Drop the connection with a TCP RST (SO_LINGER 0), answering nothing."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.wfile.flush()
        except OSError:
            pass
        self.connection.close()  # the descriptor really closes when finish() closes rfile


class FakeService:
    """Base of the fakes: a local HTTP/1.1 server with routes, recording and a credential check.

    ``FakeService(host="127.0.0.1", port=0, delay=0.0)``; ``start()`` (or ``with``) binds and
    serves in daemon threads, ``url`` is ``http://HOST:PORT`` (no trailing slash), ``stop()``
    closes every connection. Subclasses call ``add_route`` and override ``auth_error`` /
    ``not_found`` / ``method_not_allowed`` to answer in their service's error shapes.
    """

    server_name = "fake-service"
    # Authorization schemes that count as another (GitHub takes "token X" for "Bearer X").
    auth_scheme_aliases: ClassVar[Mapping[str, str]] = {}

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, delay: float = 0.0) -> None:
        self.host = host
        self.port = port
        self.delay = delay
        self.requests = RequestLog()
        self.errors: list[BaseException] = []  # exceptions raised by handlers (answered 500)
        self._routes: list[Route] = []
        self._accepted: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._resets = 0
        self._canned: list[Response] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._connections: dict[socket.socket, threading.Thread] = {}

    # Lifecycle -----------------------------------------------------------------------------

    def start(self) -> Self:
        """Bind and serve in a daemon thread; returns ``self``."""
        if self._server is not None:
            raise RuntimeError(f"{type(self).__name__} is already started")
        self._stopping.clear()
        self._server = _Server((self.host, self.port), self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"{type(self).__name__}:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, reset the open connections and wait for the handler threads."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        with self._lock:
            connections = dict(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for thread in connections.values():
            thread.join(max(0.0, deadline - time.monotonic()))
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> Self:
        return self if self._server is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` of the running server."""
        if self._server is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def __repr__(self) -> str:
        where = self.url if self._server is not None else "stopped"
        return f"<{type(self).__name__} {where}>"

    def _track(self, conn: socket.socket, thread: threading.Thread) -> None:
        with self._lock:
            self._connections[conn] = thread

    def _untrack(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.pop(conn, None)

    # Configuration -------------------------------------------------------------------------

    def add_route(self, method: str, pattern: str, handler: Handler, *, auth: bool = True) -> None:
        """Serve ``method pattern`` with ``handler(request, **segments) -> Response``.

        ``pattern`` is a path such as ``/repos/{owner}/{repo}``; ``auth=False`` skips the
        credential check (a token endpoint, a health check).
        """
        self._routes.append(Route(method.upper(), pattern, handler, auth, _compile(pattern)))

    def expect_auth(self, header_name: str, value: str) -> Self:
        """Demand exactly this credential (replacing any demanded before)."""
        with self._lock:
            self._accepted = [(header_name, value)]
        return self

    def also_accept(self, header_name: str, value: str) -> Self:
        """Accept this credential as well as those already demanded."""
        with self._lock:
            self._accepted.append((header_name, value))
        return self

    def disable_auth(self) -> Self:
        """Demand no credential at all."""
        with self._lock:
            self._accepted = []
        return self

    @property
    def accepted_credentials(self) -> list[tuple[str, str]]:
        """The ``(header, value)`` pairs any one of which authorizes a request."""
        with self._lock:
            return list(self._accepted)

    def reset_next(self, count: int = 1) -> Self:
        """Drop the next ``count`` connections with a TCP reset instead of answering."""
        with self._lock:
            self._resets += count
        return self

    def respond_next(
        self,
        status: int,
        body: bytes | Iterable[bytes] | Any = b"",
        headers: Mapping[str, str] | None = None,
        count: int = 1,
    ) -> Self:
        """Answer the next ``count`` authorized requests with this instead of the real thing.

        A ``dict`` or ``list`` body is sent as JSON.
        """
        if isinstance(body, dict | list):
            response = Response.json(body, status, headers)
        else:
            response = Response(status, body, dict(headers or {}))
        with self._lock:
            self._canned.extend([response] * count)
        return self

    # Hooks for subclasses ------------------------------------------------------------------

    def authorize(self, request: RecordedRequest) -> bool:
        """Whether ``request`` carries a demanded credential (always, if none is demanded)."""
        accepted = self.accepted_credentials
        if not accepted:
            return True
        return any(
            self._credential_matches(name, expected, sent)
            for name, expected in accepted
            for sent in request.headers.get_all(name)
        )

    def _credential_matches(self, name: str, expected: str, sent: str) -> bool:
        if name.lower() != "authorization":
            return sent == expected
        # RFC 9110: the scheme is case-insensitive, the credentials are not.
        exp_scheme, _, exp_cred = expected.strip().partition(" ")
        sent_scheme, _, sent_cred = sent.strip().partition(" ")
        exp_scheme, sent_scheme = exp_scheme.lower(), sent_scheme.lower()
        exp_scheme = self.auth_scheme_aliases.get(exp_scheme, exp_scheme)
        sent_scheme = self.auth_scheme_aliases.get(sent_scheme, sent_scheme)
        return exp_scheme == sent_scheme and exp_cred.strip() == sent_cred.strip()

    def auth_error(self, request: RecordedRequest) -> Response:
        """The answer to a request without the demanded credential."""
        return Response.json({"error": "unauthorized"}, 401)

    def not_found(self, request: RecordedRequest) -> Response:
        """The answer to a path no route serves."""
        return Response.json({"error": "not found", "path": request.path}, 404)

    def method_not_allowed(self, request: RecordedRequest) -> Response:
        """The answer to a known path asked with the wrong method."""
        return Response.json({"error": "method not allowed", "method": request.method}, 405)

    def bad_request(self, message: str) -> Response:
        """The answer to an unreadable request."""
        return Response.json({"error": message}, 400)

    def internal_error(self, request: RecordedRequest, exc: BaseException) -> Response:
        """The answer when a handler raised (the exception is kept in ``errors``)."""
        return Response.json({"error": f"fake {type(self).__name__} failed: {exc!r}"}, 500)

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds``, cut short (with ``Abort``) if the fake is stopping."""
        if seconds > 0 and self._stopping.wait(seconds):
            raise Abort("stopping")

    # Serving -------------------------------------------------------------------------------

    def _serve(self, handler: _RequestHandler) -> None:
        try:
            try:
                body = handler.read_body()
            except ValueError as exc:
                handler.close_connection = True
                handler.write_response(self.bad_request(f"unreadable body: {exc}"))
                return
            request = RecordedRequest(
                method=handler.command,
                target=handler.path,
                headers=Headers(handler.headers.items()),
                body=body,
                client_address=(str(handler.client_address[0]), int(handler.client_address[1])),
            )
            self.requests.append(request)
            with self._lock:
                reset = self._resets > 0
                if reset:
                    self._resets -= 1
            if reset:
                handler.reset_connection()
                return
            self.sleep(self.delay)
            handler.write_response(self._answer(request))
        except Abort:
            handler.reset_connection()
        except (_ClientGone, ConnectionError, TimeoutError):
            handler.close_connection = True

    def _answer(self, request: RecordedRequest) -> Response:
        path = request.path
        matches = [(route, found) for route in self._routes if (found := route.regex.match(path))]
        if not matches:
            return self.not_found(request)
        method = "GET" if request.method == "HEAD" else request.method
        chosen = next(((r, m) for r, m in matches if r.method in (method, "*")), None)
        if chosen is None:
            return self.method_not_allowed(request)
        route, match = chosen
        if route.auth and not self.authorize(request):
            return self.auth_error(request)
        with self._lock:
            canned = self._canned.pop(0) if self._canned else None
        if canned is not None:
            return canned
        try:
            return route.handler(request, **match.groupdict())
        except Abort:
            raise
        except Exception as exc:
            log.exception("%s handler failed", type(self).__name__)
            self.errors.append(exc)
            return self.internal_error(request, exc)


def sse(data: Any, event: str | None = None) -> bytes:
    """One server-sent event: optional ``event:`` line, a ``data:`` line, a blank line."""
    text = data if isinstance(data, str) else json.dumps(data)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {text}\n\n".encode()


def words(text: str) -> int:
    """The fakes' deterministic token count: whitespace-separated words."""
    return len(text.split())


def word_pieces(text: str) -> list[str]:
    """``text`` cut into streaming deltas, one word with its trailing space each."""
    return re.findall(r"\s*\S+\s*", text) or ([text] if text else [])


def parse_json_object(request: RecordedRequest) -> dict[str, Any] | None:
    """The body as a JSON object, or None if it is not one."""
    try:
        payload = request.json()
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None
