"""An agent sandbox: the bootstrap running, with its control and event channels.

The host writes commands to the bootstrap's stdin and reads events, one JSON object per
line, from its stdout; its stderr is the sandbox's raw log. Everything read is untrusted:
a line that is too long or not a JSON object ends the session with ProtocolError, and
nothing the sandbox sends can make the host block forever (every read has a deadline).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

from corral.errors import ProtocolError, SessionEnded, SessionTimeout
from corral.sandbox.sandboxes import Sandboxes, SandboxRequest, Started
from corral.sandbox.spec import BindMount

BOOT_DIR = Path(__file__).parent / "boot"
BOOT_MOUNT = "/run/corral-boot"
BOOT_ARGV = ("python3", "-E", f"{BOOT_MOUNT}/bootstrap.py")
MAX_LINE = 512 * 1024


class AgentSession:
    def __init__(self, started: Started, control: IO[bytes], events: IO[bytes], log: IO[bytes]):
        self.started = started
        self._control = control
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._open_streams = 2
        self._readers = [
            threading.Thread(target=self._read_events, args=(events,), daemon=True),
            threading.Thread(target=self._read_log, args=(log,), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @property
    def rootfs(self) -> Path:
        return self.started.rootfs

    def send(self, command: dict[str, Any]) -> None:
        try:
            self._control.write(json.dumps(command).encode() + b"\n")
            self._control.flush()
        except (BrokenPipeError, ValueError) as exc:
            raise SessionEnded("the sandbox stopped reading commands") from exc

    def next(self, deadline: float) -> dict[str, Any]:
        """The next event (a log line or a channel event); SessionEnded after the last."""
        while True:
            if self._open_streams == 0:
                raise SessionEnded()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SessionTimeout("the sandbox did not answer in time")
            try:
                kind, item = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if kind == "eof":
                self._open_streams -= 1
                continue
            if kind == "bad":
                raise ProtocolError(item)
            return dict(item)

    def expect(
        self, kinds: tuple[str, ...], deadline: float
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Skip to the next event of one of ``kinds``; also return the log events passed over."""
        passed: list[dict[str, Any]] = []
        while True:
            event = self.next(deadline)
            if event.get("type") in kinds:
                return event, passed
            passed.append(event)

    def _read_events(self, stream: IO[bytes]) -> None:
        try:
            for line in _lines(stream):
                if line is None:
                    self._queue.put(
                        ("bad", f"the sandbox sent a line longer than {MAX_LINE} bytes")
                    )
                    break
                try:
                    event = json.loads(line)
                except ValueError:
                    shown = line[:200].decode("utf-8", "replace")
                    self._queue.put(("bad", f"the sandbox sent output that is not JSON: {shown!r}"))
                    break
                if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                    self._queue.put(("bad", "the sandbox sent an event without a type"))
                    break
                self._queue.put(("event", event))
        finally:
            self._queue.put(("eof", None))

    def _read_log(self, stream: IO[bytes]) -> None:
        try:
            for line in _lines(stream):
                text = (line or b"[line too long]").decode("utf-8", "replace").rstrip("\n")
                self._queue.put(("event", {"type": "log", "stream": "sandbox", "message": text}))
        finally:
            self._queue.put(("eof", None))


def _lines(stream: IO[bytes]) -> Iterator[bytes | None]:
    """Lines of ``stream``; None for one longer than MAX_LINE (and then stop)."""
    with stream:
        while True:
            line = stream.readline(MAX_LINE + 1)
            if not line:
                return
            if len(line) > MAX_LINE:
                yield None
                return
            yield line


@contextlib.contextmanager
def agent_session(sandboxes: Sandboxes, request: SandboxRequest) -> Iterator[AgentSession]:
    """Boot ``request``'s layers with the bootstrap as the sandbox's first process."""
    request = replace(
        request,
        argv=BOOT_ARGV,
        mounts=(*request.mounts, BindMount(BOOT_DIR, BOOT_MOUNT, readonly=True)),
    )
    ctl_r, ctl_w = os.pipe()
    ev_r, ev_w = os.pipe()
    log_r, log_w = os.pipe()
    control, events, log = os.fdopen(ctl_w, "wb"), os.fdopen(ev_r, "rb"), os.fdopen(log_r, "rb")
    child_ends = [ctl_r, ev_w, log_w]
    readers_own_streams = False
    try:
        with sandboxes.started(request, stdin=ctl_r, stdout=ev_w, stderr=log_w) as started:
            for fd in child_ends:  # the sandbox holds these now; ours would hide its exit
                os.close(fd)
            child_ends.clear()
            session = AgentSession(started, control, events, log)
            readers_own_streams = True
            yield session
    finally:
        for fd in child_ends:
            os.close(fd)
        with contextlib.suppress(OSError):
            control.close()
        if not readers_own_streams:
            events.close()
            log.close()
