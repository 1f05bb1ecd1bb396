"""What the two sides of the bridge's proxy share: the request head, the route the gate
decides, the record of one exchange, and the ``Gate`` and ``Downstream`` seams.

The proxy knows nothing of tokens or SQL: every question about who may call and where the
call goes is one method of ``Gate`` (``gate.py`` answers them). The upstream side knows of the
sandbox's connection only what ``Downstream`` says: where to write, and whether the sandbox
is reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

MAX_HEAD = 64 * 1024  # a request head; an upstream's response heads may be four times this
HIGH_WATER = 256 * 1024  # bytes buffered for a socket before its writer waits


@dataclass
class Head:
    method: bytes
    url: bytes
    headers: list[tuple[bytes, bytes]]  # names lowercase, in order, duplicates kept
    keep_alive: bool
    notable: list[tuple[bytes, bytes]] = field(default_factory=list)  # see http1.NOTABLE
    http10: bool = False
    run: str | None = None  # known once the token checks out: refused calls are still its own
    connection: str | None = None
    size: int = 0  # bytes of the head as received, for the inbox's bound

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


@dataclass
class Route:
    """Where an authorized request goes, decided by the gate."""

    scheme: str
    host: str
    port: int
    target: bytes  # path and query as sent upstream
    host_header: bytes
    drop: frozenset[bytes]  # request headers the sandbox may not pass on (``http1.canonical``)
    add: list[tuple[bytes, bytes]]  # credential headers
    secrets: list[bytes]  # values to redact from anything flowing back
    connection: str
    run: str
    timeout: float
    meter: Callable[[bytes, bytes], None] | None = None  # (content-type, body prefix) -> usage
    # OAuth: on a 401, refresh the credential and return the route to try once more with
    reauthorize: Callable[[], Awaitable[Route]] | None = None
    local: Callable[[Head, bytes], Awaitable[tuple[int, dict[str, Any]]]] | None = None


@dataclass
class Exchange:
    head: Head
    peer: str
    started: float = field(default_factory=time.perf_counter)
    route: Route | None = None
    status: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    error: str | None = None
    answered: bool = False  # a final response head went to the sandbox
    complete: bool = False  # ... and its body was sent to its end
    closing: bool = False  # the connection ends after this exchange, whatever else holds


class Gate(Protocol):
    def admit(self, peer: str) -> bool: ...

    async def authorize(self, head: Head, peer: str) -> Route: ...

    def record(self, exchange: Exchange) -> None: ...

    max_body: int


class Downstream(Protocol):
    """The sandbox's connection, as the upstream side writes to it."""

    def send(self, data: bytes) -> None: ...

    @property
    def writable(self) -> bool: ...


def no_delay(transport: asyncio.Transport) -> None:
    """Heads and bodies go out in separate writes: never let Nagle hold the second back."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
