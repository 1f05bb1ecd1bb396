"""Raw HTTP/1.1 on both sides of the bridge, for its framing tests.

* ``RawUpstream``: a server on loopback that logs every byte it receives, per connection, and
  parses them with h11, a strict reference parser written independently of the bridge's. A
  request the bridge frames wrongly shows up as an h11 error or as a request nobody sent.
  Its handler answers with raw bytes, so a test can make it misbehave (interim responses, a
  reason phrase holding a secret, bytes after the response, a compressed body ...).
* ``MemoryBackend`` (``tests/gate_backend.py``): the gate's ``Backend`` over dictionaries. The
  bridge under test is the real one (``Bridge``, ``BridgeGate``, ``Verifier``): only the store
  is replaced.
* ``ProxyWorld``: the bridge on 127.0.0.1 (the tests' "sandbox subnet" is 127.0.0.0/8), two
  users with their own credentials for connection ``up``, and a run token for each.
* ``Client``: a raw socket to the bridge; ``read_response`` parses what comes back with h11.
"""

from __future__ import annotations

import contextlib
import ipaddress
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import h11

from corral.bridge import tokens
from corral.bridge.connections import Connection
from corral.bridge.gate import BridgeGate, Sink
from corral.bridge.server import Bridge
from corral.bridge.tokens import SigningKeyRing, Verifier
from corral.vault.kinds import Credential
from tests.gate_backend import MemoryBackend

# -- the upstream ------------------------------------------------------------------------------


@dataclass
class Received:
    """One request as the upstream parsed it."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    connection: int  # index of the connection it came on

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name.lower()]


@dataclass
class UpstreamConnection:
    index: int
    raw: bytearray = field(default_factory=bytearray)
    requests: list[Received] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    closed: bool = False  # the upstream saw the connection end (EOF, reset or its own close)


Handler = Callable[[Received], bytes]
OnHead = Callable[[Received], bytes]


def respond(
    status: int, body: bytes = b"", headers: dict[str, str] | None = None, reason: str = "OK"
) -> bytes:
    head = [f"HTTP/1.1 {status} {reason}"]
    for k, v in (headers or {}).items():
        head.append(f"{k}: {v}")
    if "content-length" not in {k.lower() for k in headers or {}}:
        head.append(f"content-length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def echo(request: Received) -> bytes:
    """The default handler: what arrived, as JSON-ish text (path, credential, body length)."""
    auth = ",".join(request.header("authorization"))
    body = f"{request.method} {request.target} auth={auth} len={len(request.body)}".encode()
    return respond(200, body, {"content-type": "text/plain"})


class RawUpstream:
    def __init__(self, handler: Handler = echo, on_head: OnHead | None = None) -> None:
        self.handler = handler
        self.on_head = on_head
        self.connections: list[UpstreamConnection] = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._open: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def requests(self) -> list[Received]:
        with self._lock:
            return [r for c in self.connections for r in c.requests]

    @property
    def errors(self) -> list[str]:
        return [e for c in self.connections for e in c.errors]

    def raw(self) -> bytes:
        return b"".join(bytes(c.raw) for c in self.connections)

    def close(self) -> None:
        self._stop = True
        self._sock.close()
        for s in list(self._open):
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            if self._stop:
                conn.close()
                return
            with self._lock:
                record = UpstreamConnection(len(self.connections))
                self.connections.append(record)
            self._open.append(conn)
            threading.Thread(target=self._serve, args=(conn, record), daemon=True).start()

    def _serve(self, sock: socket.socket, record: UpstreamConnection) -> None:
        pending = b""
        try:
            while True:
                parser = h11.Connection(h11.SERVER)
                if pending:  # (receive_data(b"") would mean the connection closed)
                    parser.receive_data(pending)
                request: Received | None = None
                body = bytearray()
                while True:
                    event = parser.next_event()
                    if event is h11.NEED_DATA:
                        data = sock.recv(65536)
                        record.raw += data
                        parser.receive_data(data)  # b"" marks the end
                        if not data and request is None:
                            return
                        continue
                    if isinstance(event, h11.Request):
                        request = Received(
                            event.method.decode(),
                            event.target.decode("latin-1"),
                            [(k.decode().lower(), v.decode("latin-1")) for k, v in event.headers],
                            b"",
                            record.index,
                        )
                        if self.on_head is not None:
                            interim = self.on_head(request)
                            if interim:
                                sock.sendall(interim)
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        return
                assert request is not None
                request.body = bytes(body)
                with self._lock:
                    record.requests.append(request)
                answer = self.handler(request)
                sock.sendall(answer)
                if (
                    b"\r\nconnection: close\r\n"
                    in answer.split(b"\r\n\r\n", 1)[0].lower() + b"\r\n"
                ):
                    return
                pending = bytes(parser.trailing_data[0])
        except h11.RemoteProtocolError as exc:
            record.errors.append(f"h11: {exc}")
        except OSError:
            pass
        finally:
            record.closed = True
            with contextlib.suppress(OSError):
                sock.close()


# -- the bridge, with its store in memory ---------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ProxyWorld:
    bridge: Bridge
    gate: BridgeGate
    backend: MemoryBackend
    upstream: RawUpstream
    ring: SigningKeyRing
    keys: dict[str, str]  # user -> the real credential for connection "up"
    clients: list[Client] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.bridge.port

    def token(
        self, user: str, run: str | None = None, connections: tuple[str, ...] = ("up",)
    ) -> str:
        run = run or f"run-{user}-{secrets.token_hex(3)}"
        self.backend.live.add(run)
        return tokens.mint(
            self.ring,
            user=user,
            app="app",
            session=run,
            run=run,
            connections=connections,
            address="127.0.0.1",
            lifetime=300,
        )

    def client(self) -> Client:
        client = Client(self.port)
        self.clients.append(client)  # closed with the world
        return client

    def calls(self) -> list[dict[str, Any]]:
        self.gate.sink.flush()
        return self.backend.calls


@contextlib.contextmanager
def proxy_world(
    handler: Handler = echo, on_head: OnHead | None = None, auth: str = "bearer", base: str = ""
) -> Iterator[ProxyWorld]:
    upstream = RawUpstream(handler, on_head)
    backend = MemoryBackend()
    backend.connections["up"] = Connection("up", f"http://127.0.0.1:{upstream.port}{base}", auth)
    keys = {}
    for user in ("alice", "bob"):
        keys[user] = f"sk-{user}-" + secrets.token_hex(16)
        field_name = "key" if auth.startswith("header:") else "token"
        kind = "api_key" if field_name == "key" else "bearer"
        backend.credentials[(user, "up")] = Credential.build(
            user, "up", kind, {field_name: keys[user]}, datetime.now(UTC)
        )
    ring = SigningKeyRing()
    gate = BridgeGate(
        ipaddress.IPv4Network("127.0.0.0/8"),
        Verifier(ring),
        backend,
        Sink(backend),
        upstream_timeout=10.0,
    )
    bridge = Bridge(gate, "127.0.0.1", free_port()).start()
    world = ProxyWorld(bridge, gate, backend, upstream, ring, keys)
    try:
        yield world
    finally:
        for client in world.clients:
            client.close()
        bridge.stop()
        upstream.close()


# -- the sandbox's side ---------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    reason: bytes
    headers: list[tuple[str, str]]
    body: bytes
    interim: list[int]

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name.lower()]

    def json(self) -> Any:
        import json

        return json.loads(self.body)


class Client:
    """A raw connection to the bridge, as a hostile sandbox would hold it."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()

    def closed_by_peer(self, within: float = 5.0) -> bool:
        """True once the bridge has closed the connection (EOF or reset)."""
        self.sock.settimeout(within)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.buffer += data
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def read_response(self, method: str = "GET") -> Response:
        """One response (after any interim ones), parsed strictly with h11."""
        parser = h11.Connection(h11.CLIENT)
        parser.send(h11.Request(method=method, target="/", headers=[("host", "bridge")]))
        parser.send(h11.EndOfMessage())
        if self.buffer:
            parser.receive_data(self.buffer)
        interim: list[int] = []
        head: h11.Response | None = None
        body = bytearray()
        while True:
            event = parser.next_event()
            if event is h11.NEED_DATA:
                data = self.sock.recv(65536)
                parser.receive_data(data)
                continue
            if isinstance(event, h11.InformationalResponse):
                interim.append(event.status_code)
            elif isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
        assert head is not None
        self.buffer = bytes(parser.trailing_data[0])
        return Response(
            head.status_code,
            head.reason,
            [(k.decode().lower(), v.decode("latin-1")) for k, v in head.headers],
            bytes(body),
            interim,
        )

    def request(
        self,
        method: str,
        path: str,
        token: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        lines = [f"{method} {path} HTTP/1.1", "host: bridge", f"authorization: Bearer {token}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body is not None:
            lines.append(f"content-length: {len(body)}")
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b""))
        return self.read_response(method)


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.02)
