"""Helpers for tests that attack a sandbox from the inside, and watch from the host.

Each probe is a ``python3 -c`` script (the base image has python3 and little else) that tries
something and prints one JSON object on its last line of stdout: what it observed, errno names
rather than bare failures, so a test can assert on the exact reason an attempt failed.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.context import Corral
from corral.sandbox.runtime import SandboxResult

# Shared by the probes: errno names, and TCP connects that say how they failed.
PRELUDE = r"""
import ctypes, errno, json, os, socket, sys, threading, time

def ename(exc):
    return errno.errorcode.get(exc.errno, str(exc.errno))

def attempt(fn, *args):
    try:
        fn(*args)
        return "ok"
    except OSError as exc:
        return ename(exc)

def connect(host, port, timeout=1.5, source=None):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        if source is not None:
            s.setsockopt(socket.IPPROTO_IP, 15, 1)  # IP_FREEBIND: no capability needed
            s.bind((source, 0))
        s.connect((host, int(port)))
        return "connected"
    except socket.timeout:
        return "timeout"
    except OSError as exc:
        return ename(exc)
    finally:
        s.close()

def connect_all(targets, timeout=1.5):
    # In parallel, so that several DROPs cost one timeout, not one each.
    out = {}
    def one(host, port):
        out[f"{host}:{port}"] = connect(host, port, timeout)
    threads = [threading.Thread(target=one, args=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out

def my_address(gateway):
    # A UDP connect sends nothing: it only makes the kernel pick the source address.
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.connect((gateway, 9))
    address = u.getsockname()[0]
    u.close()
    return address

def report(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()
"""


@dataclass
class Outcome:
    result: SandboxResult
    stdout: str
    stderr: str

    @property
    def exit_code(self) -> int:
        return self.result.exit_code

    @property
    def report(self) -> Any:
        """The JSON object on the probe's last line of stdout."""
        lines = [line for line in self.stdout.splitlines() if line.strip()]
        assert lines, f"the probe printed nothing (exit {self.exit_code}): {self.stderr[-2000:]}"
        return json.loads(lines[-1])


def boot(
    corral: Corral,
    env: str,
    *argv: str,
    edit: bool = False,
    stdin: int | None = None,
    timeout: float = 30,
) -> Outcome:
    """Like conftest's ``run``, but keeps the SandboxResult (the sandbox's id and address)."""
    start = corral.envs.exec if edit else corral.envs.run
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"corral-iso-{secrets.token_hex(4)}"
    with open(f"{out}.out", "w+b") as o, open(f"{out}.err", "w+b") as e:
        try:
            result = start(
                env,
                tuple(argv),
                stdin=subprocess.DEVNULL if stdin is None else stdin,
                stdout=o,
                stderr=e,
                timeout=timeout,
            )
            o.seek(0)
            e.seek(0)
            return Outcome(result, o.read().decode(), e.read().decode())
        finally:
            os.unlink(f"{out}.out")
            os.unlink(f"{out}.err")


def probe(
    corral: Corral, env: str, script: str, *args: object, edit: bool = False, timeout: float = 30
) -> Outcome:
    """Run ``PRELUDE + script`` with ``args`` as sys.argv[1:]; it must exit 0."""
    outcome = boot(
        corral, env, "python3", "-c", PRELUDE + script, *map(str, args), edit=edit, timeout=timeout
    )
    assert outcome.exit_code == 0 and not outcome.result.timed_out, (
        f"probe exited {outcome.exit_code} (timed out: {outcome.result.timed_out}): "
        f"{outcome.stdout[-1000:]} {outcome.stderr[-2000:]}"
    )
    print(f"observed in {outcome.result.address}: {outcome.stdout.strip()}")  # for -rP
    return outcome


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Listener:
    """A host TCP server that accepts and records every peer, until closed."""

    host: str
    port: int = 0
    peers: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((self.host, self.port))
        self._sock.listen(64)
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            self.peers.append(peer[0])
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def nft_counter(chain: str, rule: str) -> int:
    """Packets counted so far by the rule in ``inet corral <chain>`` that starts with ``rule``."""
    text = subprocess.run(
        ["nft", "-a", "list", "chain", "inet", "corral", chain],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for line in text.splitlines():
        if line.strip().startswith(rule) and "counter packets" in line:
            return int(line.split("counter packets", 1)[1].split()[0])
    raise AssertionError(f"no counted rule starting {rule!r} in chain {chain}:\n{text}")


def host_ipv4() -> tuple[str, str]:
    """(interface, its first IPv4 address) of the host's default route: its "eth0"."""
    route = subprocess.run(
        ["ip", "-4", "route", "show", "default"], capture_output=True, text=True
    ).stdout.split()
    assert "dev" in route, f"the host has no default IPv4 route: {route}"
    iface = route[route.index("dev") + 1]
    out = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "dev", iface], capture_output=True, text=True
    ).stdout
    for line in out.splitlines():
        fields = line.split()
        if "inet" in fields:
            return iface, fields[fields.index("inet") + 1].split("/")[0]
    raise AssertionError(f"the host has no IPv4 address on {iface}: {out!r}")


class Background:
    """A probe running in a sandbox on a thread: its stdout is read line by line as it comes,
    and closing its stdin (``finish``) tells it to stop."""

    def __init__(
        self, corral: Corral, env: str, script: str, *args: object, timeout: float = 40
    ) -> None:
        self._stdin_r, self._stdin_w = os.pipe()
        self._out_r, out_w = os.pipe()
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.result: SandboxResult | None = None
        self.error: BaseException | None = None
        argv = ("python3", "-c", PRELUDE + script, *map(str, args))

        def run() -> None:
            try:
                self.result = corral.envs.run(
                    env, argv, stdin=self._stdin_r, stdout=out_w, stderr=out_w, timeout=timeout
                )
            except BaseException as exc:
                self.error = exc
            finally:
                os.close(out_w)

        def read() -> None:
            with os.fdopen(self._out_r, "r") as out:
                for line in out:
                    self._lines.put(line)
            self._lines.put(None)

        self._runner = threading.Thread(target=run, daemon=True)
        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        self._runner.start()
        self.seen: list[str] = []

    def report(self, timeout: float = 20) -> Any:
        """The next JSON line the probe prints (other lines are kept in ``seen``)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no report from the sandbox in {timeout}s: {self.seen}"
                ) from None
            if line is None:
                raise AssertionError(f"the sandbox ended without a report: {self.seen}")
            self.seen.append(line)
            print(f"observed in the background sandbox: {line.strip()}")
            if line.startswith("{"):
                return json.loads(line)

    def send(self, line: str) -> None:
        """Write one line to the probe's stdin."""
        os.write(self._stdin_w, line.encode() + b"\n")

    def finish(self) -> SandboxResult:
        """Close the probe's stdin, wait for the sandbox to end and return its result."""
        os.close(self._stdin_w)
        self._runner.join(timeout=60)
        os.close(self._stdin_r)
        if self.error is not None:
            raise self.error
        assert self.result is not None, "the sandbox did not end within 60s"
        return self.result
