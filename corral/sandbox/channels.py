"""The host's side of a started sandbox's channels, whatever runtime started it.

The host writes commands to the first process's stdin (control) and reads events, one JSON
object per line, from its stdout; its stderr is the sandbox's raw log. Everything read is
untrusted: a line that is too long or not a JSON object ends the session with
ProtocolError, and nothing the sandbox sends can make the host block forever (every read has
a deadline).

``Pipes`` makes the three pipes and hands their far ends to the process a runtime starts;
``Channels`` reads and writes the near ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
import time
from collections.abc import Iterator, Mapping
from typing import IO, Any

from corral.errors import ProtocolError, SessionEnded, SessionTimeout

MAX_LINE = 512 * 1024


class Pipes:
    """Control, events and log pipes: ``child`` are the descriptors the sandbox's first
    process gets as stdin, stdout and stderr; ``handed_over`` closes them on the host once
    it has them (a copy kept here would hide the sandbox's exit), ``channels`` opens the
    host's ends. Close on every path: whatever was not handed on is closed."""

    def __init__(self) -> None:
        ctl_r, ctl_w = os.pipe()
        ev_r, ev_w = os.pipe()
        log_r, log_w = os.pipe()
        self.child: tuple[int, int, int] = (ctl_r, ev_w, log_w)
        self._host = [ctl_w, ev_r, log_r]
        self._child_open = True

    def handed_over(self) -> None:
        if self._child_open:
            self._child_open = False
            for fd in self.child:
                os.close(fd)

    def channels(self) -> Channels:
        ctl_w, ev_r, log_r = self._host
        self._host = []
        return Channels(os.fdopen(ctl_w, "wb"), os.fdopen(ev_r, "rb"), os.fdopen(log_r, "rb"))

    def close(self) -> None:
        self.handed_over()
        for fd in self._host:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._host = []


class Channels:
    def __init__(self, control: IO[bytes], events: IO[bytes], log: IO[bytes]) -> None:
        self._control = control
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._open_streams = 2
        self._readers = [
            threading.Thread(target=self._read_events, args=(events,), daemon=True),
            threading.Thread(target=self._read_log, args=(log,), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def send(self, command: Mapping[str, Any]) -> None:
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

    def close(self) -> None:
        """Close the control channel; the readers close theirs at the sandbox's end."""
        with contextlib.suppress(OSError):
            self._control.close()

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
