"""Test hosts the suite stands up on this machine: the API on uvicorn, and a network namespace
of our own that plays a host outside the sandbox network."""

from __future__ import annotations

import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """``app`` on uvicorn in a thread, on a socket bound to a free port; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive(), "uvicorn exited during start-up"
        assert time.monotonic() < deadline, "uvicorn did not start within 30 s"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@contextmanager
def outside_namespace(prefix: str, near: str, address: str) -> Iterator[tuple[str, str]]:
    """A namespace at ``address`` linked to this host (at ``near``) by a veth that is no
    sandbox's (not ``cr*``/``ce*``); everything it sends goes via this host. Yields
    (namespace, this host's end of the link)."""
    tag = secrets.token_hex(3)
    netns, host_if = f"{prefix}test-{tag}", f"{prefix[:3]}{tag}"
    steps = [
        ["ip", "netns", "add", netns],
        ["ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", netns],
        ["ip", "addr", "add", f"{near}/32", "dev", host_if],
        ["ip", "link", "set", host_if, "up"],
        ["ip", "route", "add", f"{address}/32", "dev", host_if, "src", near],
        ["ip", "-n", netns, "link", "set", "lo", "up"],
        ["ip", "-n", netns, "addr", "add", f"{address}/32", "dev", "eth0"],
        ["ip", "-n", netns, "link", "set", "eth0", "up"],
        ["ip", "-n", netns, "route", "add", f"{near}/32", "dev", "eth0"],
        ["ip", "-n", netns, "route", "add", "default", "via", near, "dev", "eth0"],
    ]
    try:
        for argv in steps:
            subprocess.run(argv, check=True, capture_output=True, timeout=30)
        yield netns, host_if
    finally:
        subprocess.run(["ip", "link", "delete", host_if], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "delete", netns], capture_output=True, timeout=30)
