"""The event channel: run events go to the bridge, the sandbox's one way out.

Events are JSON objects with ``type`` and ``at``; they are batched and POSTed to
``<bridge>/_corral/events`` with the run token, from a background thread, every
``FLUSH_S`` or as soon as a batch fills. ``close()`` sends what is left and waits for it: the
result and error events are always delivered before the runner exits. A batch the bridge
cannot take yet (unreachable, or a 5xx while its database restarts) is retried for
``RETRY_S``. The host treats all of it as untrusted input.
"""

from __future__ import annotations

import io
import json
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: never imported at run time, so the runner loads fast
    from typing import Any, Dict, List

FLUSH_S = 0.05
BATCH = 200
RETRY_S = 25.0  # how long a batch is retried while the bridge is unreachable or answers 5xx
_MAX_MESSAGE = 64 * 1024


class Channel:
    def __init__(self, bridge: str, token: str, attempt: int = 0) -> None:
        self._url = bridge.rstrip("/") + "/_corral/events"
        self._token = token
        self._attempt = attempt
        self._pending: List[Dict[str, Any]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="corral-events", daemon=True)
        self._thread.start()

    def emit(self, kind: str, **data: Any) -> None:
        event: Dict[str, Any] = {
            "type": kind,
            "at": round(time.time(), 6),
            "attempt": self._attempt,
        }
        event.update(data)
        with self._lock:
            self._pending.append(event)
            full = len(self._pending) >= BATCH
        if full:
            self._wake.set()

    def close(self) -> None:
        """Deliver everything emitted so far, then stop."""
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=30)
        self._send_pending()

    def _loop(self) -> None:
        while not self._closed:
            self._wake.wait(FLUSH_S)
            self._wake.clear()
            self._send_pending()

    def _send_pending(self) -> None:
        import urllib.error  # here, not at the top: importing the runner stays cheap (its
        import urllib.request  # validation during a hot swap imports every module)

        with self._lock:
            batch, self._pending = self._pending, []
        while batch:
            chunk, batch = batch[:BATCH], batch[BATCH:]
            body = json.dumps({"events": chunk}, default=repr).encode()
            request = urllib.request.Request(
                self._url,
                data=body,
                method="POST",
                headers={"authorization": "Bearer " + self._token,
                         "content-type": "application/json"},
            )  # fmt: skip
            # The bridge answers 5xx while it cannot reach its database (a restart): keep the
            # batch and try again, for as long as an outage may last. A 4xx will not change.
            give_up = time.monotonic() + RETRY_S
            pause = 0.05
            while True:
                try:
                    with urllib.request.urlopen(request, timeout=10) as response:
                        response.read()
                    break
                except urllib.error.HTTPError as exc:
                    if exc.code < 500 or time.monotonic() + pause > give_up:
                        break
                except (urllib.error.URLError, OSError):
                    if time.monotonic() + pause > give_up:
                        break
                time.sleep(pause)
                pause = min(pause * 2, 1.0)


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
