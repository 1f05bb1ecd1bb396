"""A whole Corral without root: SQLite in a temporary directory, the real bridge on 127.0.0.1,
and ``UnsandboxedRuntime`` (which isolates nothing) under the real executor and workers.

``unsandboxed_corral(tmp)`` makes one whose base image is a tiny tarball holding ``AGENT`` in
``/home/user/agent.py`` (and no runner: the first run of an environment swaps the bundled
one in and folds it into the environment, as on a real host). The bridge's gate admits
127.0.0.0/8, where every unsandboxed sandbox lives (``127.0.0.1``).
"""

from __future__ import annotations

import dataclasses
import io
import ipaddress
import os
import socket
import sys
import tarfile
from pathlib import Path

from corral.config import NetworkSettings, Settings
from corral.context import Corral
from corral.sandbox.testing import UnsandboxedRuntime

AGENT = """
import os, signal, time
from corral_runner import sdk

def main(input):
    sdk.log("working", n=input.get("n"))
    print("on stdout")
    return {"double": input.get("n", 0) * 2}

def boom(input):
    raise ValueError("no prices for " + str(input.get("n")))

def slow(input):
    for i in range(int(input.get("ticks", 400))):
        time.sleep(0.05)
    return {"slept": True}

def die(input):
    os.kill(os.getpid(), signal.SIGKILL)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_image(path: Path, agent: str = AGENT) -> Path:
    """A root filesystem tarball: ``/home/user/agent.py``, ``/tmp``, owned by this user."""
    with tarfile.open(path, "w") as tar:
        for name, mode in (("home", 0o755), ("home/user", 0o755), ("tmp", 0o1777)):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, mode
            info.uid, info.gid = os.getuid(), os.getgid()
            tar.addfile(info)
        data = agent.encode()
        info = tarfile.TarInfo("home/user/agent.py")
        info.size, info.mode = len(data), 0o644
        info.uid, info.gid = os.getuid(), os.getgid()
        tar.addfile(info, io.BytesIO(data))
    return path


def unsandboxed_corral(
    tmp: Path, agent: str = AGENT, *, python: str = sys.executable, **environ: str
) -> Corral:
    """A Corral under ``tmp`` on the unsandboxed runtime (its bootstrap run by ``python``);
    ``environ`` adds settings (``CORRAL_RUN_LEASE="2"``)."""
    env = {
        "CORRAL_DATA_DIR": str(tmp / "data"),
        "CORRAL_RUN_DIR": str(tmp / "run"),
        "CORRAL_BASE_IMAGE": str(base_image(tmp / "base.tar", agent)),
        **environ,
    }
    # A port of the kernel's choosing, not one of the range the real sandbox network opens:
    # two test processes on one host must never share a bridge (it binds with SO_REUSEPORT).
    network = NetworkSettings(ipaddress.IPv4Network("127.0.0.0/8"), free_port())
    config = dataclasses.replace(Settings.from_env(env), network=network)
    return Corral(config, UnsandboxedRuntime(tmp / "sandboxes", python=python))
