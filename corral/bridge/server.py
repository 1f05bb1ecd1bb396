"""Running the bridge: a uvloop event loop serving the proxy on the sandbox gateway's address.

``Bridge.start()`` serves from a thread of the calling process (``corral run``, ``corral
serve``, ``corral worker``, ``corral bridge serve`` and the tests all use it). Any number of
bridge processes may serve one host: the socket is opened with SO_REUSEPORT, and everything
they decide comes from the shared store.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import threading

import uvloop

from corral.bridge.gate import BridgeGate
from corral.bridge.proxy import ClientProtocol, Connections
from corral.bridge.upstream import Pool
from corral.errors import BridgeUnavailable

log = logging.getLogger("corral.bridge")
REVOCATION_POLL_S = 0.05


class Bridge:
    def __init__(self, gate: BridgeGate, host: str, port: int) -> None:
        self.gate = gate
        self.host, self.port = host, port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._pool = Pool()
        self._conns = Connections()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="bridge-revocations", daemon=True)

    def _socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise BridgeUnavailable(
                f"cannot listen on {self.host}:{self.port} ({exc.strerror}); the sandbox "
                "network must be set up first (any sandbox command does it)"
            ) from exc
        sock.listen(1024)
        sock.setblocking(False)
        return sock

    async def _serve(self, sock: socket.socket, ready: threading.Event) -> None:
        # Everything alive at start-up is long-lived: keep it out of the collector's full
        # passes, whose pauses were most of the bridge's p99 under load (bench/bridge.py).
        gc.freeze()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ClientProtocol(self.gate, self._pool, self._conns), sock=sock, backlog=1024
        )
        ready.set()
        while not self._stopping.is_set():
            await asyncio.sleep(0.1)
        self._server.close()
        await self._conns.close()  # every exchange's task ends before the loop does
        await self._server.wait_closed()
        self._pool.close()

    def start(self) -> Bridge:
        """Serve from a background thread; returns once the socket is listening."""
        sock = self._socket()
        ready = threading.Event()

        def run() -> None:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                self._loop = runner.get_loop()
                runner.run(self._serve(sock, ready))

        self._thread = threading.Thread(target=run, name="bridge", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise BridgeUnavailable("the bridge did not start listening in 10 s")
        self._poller.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.gate.sink.close()

    def _poll(self) -> None:
        failing = False  # log the first failure of a run of them (a database outage) only
        while not self._stopping.wait(REVOCATION_POLL_S):
            try:
                ended = self.gate.revoke_ended()
                failing = False
            except Exception:  # a supervisor: the next poll tries again
                if not failing:
                    log.exception("could not poll for ended runs; retrying")
                failing = True
                continue
            loop = self._loop
            if ended and loop is not None and not loop.is_closed():
                for run in ended:  # their upstream connections close with them
                    with contextlib.suppress(RuntimeError):
                        loop.call_soon_threadsafe(self._pool.forget, run)
