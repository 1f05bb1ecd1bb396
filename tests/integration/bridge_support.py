"""Host-side helpers of ``test_bridge``: a control service agents call through the bridge, the
official SDKs' wheels, an outside network namespace, and the nftables drop counter.
"""

from __future__ import annotations

import io
import json
import re
import secrets
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from tests.fakes import FakeService, RecordedRequest, Response
from tests.hosts import outside_namespace


class Control(FakeService):
    """``POST /hook/{name}``: runs a host-side function registered with ``on``.

    Agents reach it through the bridge like any upstream (connection ``ctl``), which lets a
    test act at an exact point of a run: expire a token between two calls, shorten a timeout
    for one call, hand a token over while its run is still alive.
    """

    server_name = "corral-test-control"

    def __init__(self) -> None:
        super().__init__()
        self.hooks: dict[str, Callable[[dict[str, Any]], Any]] = {}
        self.add_route("POST", "/hook/{name}", self._hook)

    def on(self, name: str, fn: Callable[[dict[str, Any]], Any]) -> None:
        self.hooks[name] = fn

    def _hook(self, request: RecordedRequest, name: str) -> Response:
        fn = self.hooks.get(name)
        if fn is None:
            return Response.json({"error": f"no hook {name!r}"}, 404)
        args = request.json() if request.body else {}
        return Response.json({"answer": fn(args)})


def wait_for(predicate: Callable[[], Any], timeout: float = 5.0, what: str = "it") -> Any:
    """Poll until ``predicate()`` is truthy (the bridge writes its records in batches)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout}s for {what}; last saw {value!r}")
        time.sleep(0.05)


# -- the official SDKs, for the sandbox --------------------------------------------------------

SDKS = ("openai", "anthropic")


def sdk_requirements() -> list[str]:
    """The versions the project's dev dependencies installed on the host: the same in sandboxes."""
    return [f"{name}=={version(name)}" for name in SDKS]


def download_wheels(dest: Path) -> list[Path]:
    """Wheels of the SDKs and everything they need, for this host's Python and platform (the
    base image's Python is the same 3.11, on the same machine)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--disable-pip-version-check",
            "--only-binary=:all:",
            "-d",
            str(dest),
            *sdk_requirements(),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return sorted(dest.glob("*.whl"))


def tar_of(files: list[Path]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for path in files:
            tar.add(path, arcname=path.name)
    return out.getvalue()


# Run in an edit session: unpack the wheels from stdin, install them offline, leave no litter.
INSTALL_WHEELS = (
    "set -e; mkdir -p /tmp/wheels; "
    "python3 -c 'import sys, tarfile; "
    'tarfile.open(fileobj=sys.stdin.buffer, mode="r|").extractall("/tmp/wheels")\'; '
    "pip install -q --no-index --no-cache-dir --disable-pip-version-check "
    "--root-user-action=ignore --find-links /tmp/wheels {names}; rm -rf /tmp/wheels"
)


# -- outside the sandbox network -----------------------------------------------------------------

NFT_DROP = re.compile(r"ip daddr (\S+) tcp dport \S+ counter packets (\d+) bytes \d+ drop")


def bridge_drops() -> int:
    """Packets the ``input`` chain dropped for the bridge ports (non-sandbox interfaces)."""
    listing = subprocess.run(
        ["nft", "list", "chain", "inet", "corral", "input"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    found = NFT_DROP.search(listing)
    assert found is not None, listing
    return int(found.group(2))


# Connects to the bridge, and if that works sends a request; prints what happened as JSON.
KNOCK = r"""
import json, socket, sys
host, port, source = sys.argv[1], int(sys.argv[2]), sys.argv[3] or None
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(float(sys.argv[4]))
out = {}
try:
    if source:
        s.bind((source, 0))
    s.connect((host, port))
    out["connect"] = "connected"
    s.sendall(b"GET /openai/v1/models HTTP/1.1\r\nhost: bridge\r\nauthorization: Bearer x\r\n\r\n")
    out["answer"] = s.recv(65536).decode("latin-1")
except socket.timeout:
    out.setdefault("connect", "timeout")
except OSError as exc:
    out.setdefault("connect", type(exc).__name__)
    out["errno"] = exc.errno
finally:
    s.close()
print(json.dumps(out))
"""


def knock(
    host: str, port: int, source: str = "", timeout: float = 1.5, netns: str | None = None
) -> dict[str, Any]:
    """Try the bridge from the host (or from ``netns``) in a child process."""
    argv = [sys.executable, "-c", KNOCK, host, str(port), source, str(timeout)]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


@contextmanager
def syn_counters(
    gateway: str, port: int, interfaces: list[str]
) -> Iterator[Callable[[], dict[str, int]]]:
    """Count the SYNs to the bridge port arriving on each of ``interfaces``, in a table of our
    own that runs before Corral's and only counts (Corral's counters reset whenever any Corral
    process reinstalls its table, as it does when the host's addresses change)."""
    table = f"corral_bridge_test_{secrets.token_hex(3)}"
    rules = "\n".join(
        f'iifname "{name}" ip daddr {gateway} tcp dport {port} tcp flags & (syn | ack) == syn '
        f'counter comment "{name}"'
        for name in interfaces
    )
    ruleset = (
        f"table inet {table} {{\n chain input {{\n"
        f"  type filter hook input priority filter - 20; policy accept;\n{rules}\n }}\n}}\n"
    )
    subprocess.run(["nft", "-f", "-"], input=ruleset, text=True, check=True, capture_output=True)

    def read() -> dict[str, int]:
        listing = subprocess.run(
            ["nft", "list", "table", "inet", table], check=True, capture_output=True, text=True
        ).stdout
        return {
            m.group(2): int(m.group(1))
            for m in re.finditer(r'counter packets (\d+) bytes \d+ comment "([^"]+)"', listing)
        }

    try:
        yield read
    finally:
        subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True)


@dataclass(frozen=True)
class Outside:
    """A host in a network namespace of its own, linked to this host by a veth pair."""

    netns: str
    host_if: str  # this host's end of the link: no sandbox's (not cr*/ce*)
    address: str  # the namespace's address: outside the sandbox subnet
    near: str  # this host's address on the link


@contextmanager
def outside_host(gateway: str) -> Iterator[Outside]:
    """A namespace whose route to the sandbox gateway goes through a veth that is no sandbox's
    (not ``cr*``/``ce*``), from an address outside the sandbox subnet (TEST-NET-3)."""
    near, address = "203.0.113.1", "203.0.113.77"
    with outside_namespace("br", near, address) as (netns, host_if):
        yield Outside(netns, host_if, address, near)


class Listener:
    """A TCP listener on the host that records who connected (the control for a drop)."""

    def __init__(self, host: str) -> None:
        self.sock = socket.create_server((host, 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.peers: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.peers.append(peer[0])
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()
