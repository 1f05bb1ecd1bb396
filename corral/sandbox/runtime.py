"""The sandbox runtime: everything the rest of Corral may ask of "a sandbox", and nothing more.

Two verbs boot a sandbox from a snapshot's unpacked layers:

* ``run(request, stdin=, stdout=, stderr=)``: run ``request.argv`` to its end with the
  caller's stdio, then tear down (edit sessions, ``corral sandbox run``);
* ``start(request)``: boot a sandbox whose first process is Corral's bootstrap
  (``boot/bootstrap.py``) and hand back a live ``Sandbox``: its channels, its address, its
  root as the host sees it, kill, wait, close. One sandbox takes any number of commands over
  its control channel, for as long as its owner keeps it (an agent run's swap and run today;
  a managed session's tool calls next).

``prepare()`` readies the host once per process (what it checks and installs depends on the
runtime); ``reap()`` tears down what dead owners left. Building a runtime touches nothing:
the wiring (``corral/context.py``) decides when the host is prepared.

The channels of a started sandbox (``channels.py``): control, host -> sandbox, one JSON
command per line; events, sandbox -> host, one JSON object per line, read with a deadline and
parsed defensively (everything a sandbox sends is hostile input); the raw log (its stderr),
delivered as ``log`` events on the same queue.

Implementations: ``runc_runtime.RuncRuntime`` (the real one) and ``testing.UnsandboxedRuntime``
(a test double that isolates nothing). See docs/design/runtime.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol

from corral.config import SandboxLimits
from corral.errors import InvalidInput
from corral.sandbox.spec import BindMount
from corral.snapshots.fsattr import Immutability

# The bootstrap, every started sandbox's first process (read-only wherever it is placed).
BOOT_DIR = Path(__file__).parent / "boot"
BOOTSTRAP = "bootstrap.py"

# The caller's end of a sandbox's stdio in ``run``: a file, a descriptor, or None (inherit).
Stream = IO[bytes] | int | None


class NetworkMode(StrEnum):
    """What a sandbox's network lets out (docs/design/sandbox-network.md)."""

    RUN = "run"  # the bridge ports on the gateway and nothing else
    EDIT = "edit"  # also the host's DNS resolvers and ports 80/443 outside private ranges


@dataclass(frozen=True)
class SandboxRequest:
    """What to boot. ``argv`` and ``timeout`` belong to ``run``; ``start`` refuses them (a
    started sandbox's first process is the bootstrap, and it lives until it is closed)."""

    layers: tuple[Path, ...]  # unpacked layer directories, topmost first
    argv: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    network: NetworkMode = NetworkMode.RUN
    upper: Path | None = None  # an edit session's draft (upper and work on one filesystem)
    work: Path | None = None
    uid: int = 1000
    gid: int = 1000
    cwd: str = "/home/user"
    timeout: float | None = None
    label: str = ""  # the environment's name, for messages
    mounts: tuple[BindMount, ...] = field(default=())
    limits: SandboxLimits | None = None  # None: the runtime's defaults (Settings.limits)


@dataclass(frozen=True)
class SandboxResult:
    """How a ``run`` ended."""

    sandbox_id: str
    address: str
    exit_code: int  # 128+N: killed by signal N
    timed_out: bool
    seconds: float


@dataclass(frozen=True)
class Exit:
    """How a started sandbox's first process ended."""

    code: int  # 128+N: killed by signal N
    timed_out: bool


class Sandbox(Protocol):
    """A booted sandbox whose first process is the bootstrap. Close it (or leave its ``with``
    block) on every path: whatever still runs is killed and every resource torn down."""

    @property
    def id(self) -> str: ...

    @property
    def address(self) -> str:
        """Its address on the sandbox network: the bridge binds its run token to it."""
        ...

    @property
    def rootfs(self) -> Path:
        """Its root as the host sees it. Hostile ground: host code checks every path it
        touches there with ``lstat`` and never follows a link (see ``hotswap.py``)."""
        ...

    def inside(self, path: str) -> str:
        """The absolute sandbox path ``path`` as the sandbox's own processes name it."""
        ...

    def send(self, command: Mapping[str, Any]) -> None:
        """One command on the control channel; SessionEnded if nothing reads it any more."""
        ...

    def next(self, deadline: float) -> dict[str, Any]:
        """The next event or log line (monotonic ``deadline``): SessionTimeout when it
        passes, SessionEnded after the last, ProtocolError on anything malformed."""
        ...

    def expect(
        self, kinds: tuple[str, ...], deadline: float
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Skip to the next event of one of ``kinds``; also return the events passed over."""
        ...

    def exited(self) -> bool:
        """Whether its first process has ended."""
        ...

    def kill(self) -> None:
        """Kill every process in it; it stays until closed (its root remains readable)."""
        ...

    def wait(self, timeout: float | None = None) -> Exit:
        """Wait for its first process; killed when ``timeout`` passes (``timed_out``). Raises
        the SandboxError that kept the runtime from starting it at all (CommandNotFound,
        SandboxDied, RuncError); a process that ran and failed is an ``Exit``."""
        ...

    def close(self) -> None:
        """Kill what still runs and tear everything down. Idempotent."""
        ...

    def __enter__(self) -> Sandbox: ...

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class Runtime(Protocol):
    """Boots sandboxes. Cheap to build; ``prepare`` once before the first boot."""

    @property
    def immutability(self) -> Immutability:
        """How the host locks files sandbox code must not change (the runner tree, in the
        layer cache and after a hot swap)."""
        ...

    def prepare(self) -> int:
        """Ready the host for sandboxes (idempotent); returns how many dead owners'
        sandboxes it reaped on the way."""
        ...

    def start(self, request: SandboxRequest) -> Sandbox:
        """Boot ``request`` with the bootstrap as its first process, its channels open."""
        ...

    def run(
        self,
        request: SandboxRequest,
        *,
        stdin: Stream = None,
        stdout: Stream = None,
        stderr: Stream = None,
    ) -> SandboxResult:
        """Boot ``request``, run its ``argv`` to the end (or its ``timeout``), tear down."""
        ...

    def reap(self) -> int:
        """Tear down every sandbox on this host whose owning process is gone; how many."""
        ...


def check_startable(request: SandboxRequest) -> None:
    """``start`` boots the bootstrap and keeps the sandbox as long as its owner does."""
    if request.argv:
        raise InvalidInput("a started sandbox's first process is the bootstrap: give no argv")
    if request.timeout is not None:
        raise InvalidInput("a started sandbox lives until it is closed: give no timeout")
