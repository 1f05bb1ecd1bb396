"""A misbehaving upstream for the bridge's timeout, reset and big-body paths.

Every route is an ordinary path, so a test chooses the misbehaviour by the URL it asks for:

* ``ANY /echo[/...]``: answers the request back as JSON (method, path, headers, body).
* ``ANY /delay/{seconds}``: waits, then answers ``{"delayed": seconds}``.
* ``GET /bytes/{n}``: ``n`` bytes of ``pattern_bytes(n)``; ``?chunked=1`` sends them chunked.
* ``GET /drip?chunks=N&interval=S&size=B``: N chunks of B bytes, S seconds apart.
* ``ANY /reset``: drops the connection with a TCP reset, answering nothing.
* ``GET /truncate?declared=N&sent=M``: declares ``Content-Length: N``, sends M bytes, resets.
* ``ANY /status/{code}``: answers that status with ``{"status": code}``.

The base class's ``delay``, ``reset_next`` and ``respond_next`` work here as everywhere.
"""

from __future__ import annotations

from collections.abc import Iterator

from tests.fakes.base import Abort, FakeService, RecordedRequest, Response

_PATTERN = bytes(range(256))


def pattern_bytes(n: int) -> bytes:
    """The body of ``GET /bytes/{n}``: 0x00..0xff repeated, cut to ``n`` bytes."""
    return (_PATTERN * (n // 256 + 1))[:n]


class FakeSlowUpstream(FakeService):
    """The routes listed in the module docstring.

    ``FakeSlowUpstream(*, token=None, host, port, delay)``: with ``token`` every route
    demands ``Authorization: Bearer <token>``.
    """

    server_name = "fake-slow-upstream"

    def __init__(
        self,
        *,
        token: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        delay: float = 0.0,
    ) -> None:
        super().__init__(host, port, delay=delay)
        if token is not None:
            self.expect_auth("Authorization", f"Bearer {token}")
        self.add_route("*", "/echo", self.echo)
        self.add_route("*", "/echo/{rest}", self.echo)
        self.add_route("*", "/delay/{seconds}", self.delayed)
        self.add_route("GET", "/bytes/{n}", self.some_bytes)
        self.add_route("GET", "/drip", self.drip)
        self.add_route("*", "/reset", self.reset)
        self.add_route("GET", "/truncate", self.truncate)
        self.add_route("*", "/status/{code}", self.status)

    def echo(self, request: RecordedRequest, rest: str = "") -> Response:
        return Response.json(
            {
                "method": request.method,
                "path": request.path,
                "query": request.query,
                "headers": request.headers.raw_items(),
                "body": request.body.decode("utf-8", "replace"),
                "body_length": len(request.body),
            }
        )

    def delayed(self, request: RecordedRequest, seconds: str) -> Response:
        try:
            wait = float(seconds)
        except ValueError:
            return self.bad_request(f"not a number of seconds: {seconds!r}")
        self.sleep(wait)
        return Response.json({"delayed": wait})

    def some_bytes(self, request: RecordedRequest, n: str) -> Response:
        if not n.isdigit():
            return self.bad_request(f"not a byte count: {n!r}")
        body = pattern_bytes(int(n))
        headers = {"Content-Type": "application/octet-stream"}
        if request.query_value("chunked") in ("1", "true", "yes"):
            size = 64 * 1024
            return Response(200, (body[i : i + size] for i in range(0, len(body), size)), headers)
        return Response(200, body, headers)

    def drip(self, request: RecordedRequest) -> Response:
        try:
            chunks = int(request.query_value("chunks", "5") or 5)
            interval = float(request.query_value("interval", "0.1") or 0.1)
            size = int(request.query_value("size", "1") or 1)
        except ValueError:
            return self.bad_request("chunks, interval and size must be numbers")

        def body() -> Iterator[bytes]:
            for i in range(chunks):
                if i:
                    self.sleep(interval)
                yield bytes([0x61 + i % 26]) * size

        return Response(200, body(), {"Content-Type": "application/octet-stream"})

    def reset(self, request: RecordedRequest) -> Response:
        raise Abort("reset requested")

    def truncate(self, request: RecordedRequest) -> Response:
        try:
            declared = int(request.query_value("declared", "1000") or 1000)
            sent = int(request.query_value("sent", "10") or 10)
        except ValueError:
            return self.bad_request("declared and sent must be integers")

        def body() -> Iterator[bytes]:
            yield pattern_bytes(sent)
            raise Abort("truncated on purpose")

        # An iterable body with its own Content-Length goes out raw, not chunked.
        return Response(
            200,
            body(),
            {"Content-Type": "application/octet-stream", "Content-Length": str(declared)},
        )

    def status(self, request: RecordedRequest, code: str) -> Response:
        if not code.isdigit() or not 200 <= int(code) <= 599:
            return self.bad_request(f"not a status: {code!r}")
        return Response.json({"status": int(code)}, int(code))
