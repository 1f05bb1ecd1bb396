"""The event channel: one JSON object per line, written to a descriptor the host reads.

Every event has ``type`` and ``at`` (seconds since the epoch); the host treats all of it as
untrusted input. Lines are capped so that no single event can exhaust the host's reader;
an over-long log message is cut and says so.
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
from typing import Any

MAX_LINE = 256 * 1024  # bytes; the host refuses longer lines
_MAX_MESSAGE = 64 * 1024


class Channel:
    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()

    def emit(self, kind: str, **data: Any) -> None:
        event = {"type": kind, "at": round(time.time(), 6)}
        event.update(data)
        line = json.dumps(event, default=repr, separators=(",", ":")).encode() + b"\n"
        if len(line) > MAX_LINE:
            line = (
                json.dumps(
                    {"type": kind, "at": event["at"], "truncated": True, "bytes": len(line)}
                ).encode()
                + b"\n"
            )
        with self._lock:
            view = memoryview(line)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]


class LogStream(io.TextIOBase):
    """A text stream that turns each line written to it into a ``log`` event."""

    def __init__(self, channel: Channel, stream: str) -> None:
        self._channel = channel
        self._stream = stream
        self._buffer = ""
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            self._buffer += text
            while "\n" in self._buffer:
                line, self._buffer = self._buffer.split("\n", 1)
                self._send(line)
            if len(self._buffer) > _MAX_MESSAGE:
                self._send(self._buffer)
                self._buffer = ""
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._buffer:
                self._send(self._buffer)
                self._buffer = ""

    def _send(self, line: str) -> None:
        if len(line) > _MAX_MESSAGE:
            line = line[:_MAX_MESSAGE] + " [cut]"
        self._channel.emit("log", stream=self._stream, message=line)
