"""The event channel: run events go to the bridge, the sandbox's one way out.

Events are JSON objects with ``type`` and ``at``; they are batched and POSTed to
``<bridge>/_corral/events`` with the run token, from a background thread, every
``FLUSH_S`` or as soon as a batch fills. ``close()`` sends what is left and waits for it: the
result and error events are always delivered before the runner exits. A batch the bridge
cannot take yet (unreachable, or a 5xx while its database restarts) is retried for
``RETRY_S``. The host treats all of it as untrusted input.

Sizes have limits, which the host states in the run spec (``LIMITS`` holds the same numbers
for a host that does not): a result or any other event over its limit is never sent; an
``error`` event naming it (``result_too_large``, ``event_too_large``) takes its place, and the
run fails for good. A batch the bridge refuses (any 4xx) would be refused again, so it is not
sent again either: an ``error`` event ``events_refused`` says so. Only a bridge that did not
answer (or answered 5xx) is tried again.
"""

from __future__ import annotations

import io
import json
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: never imported at run time, so the runner loads fast
    from typing import Any, Dict, List, Optional, Tuple

FLUSH_S = 0.05
BATCH = 200
# Bytes of compact UTF-8 JSON, measured as corral/limits.py measures them on the host;
# log_line counts characters.
LIMITS = {"result": 1 << 20, "event": 64 << 10, "log_line": 8 << 10, "batch": 4 << 20}


def json_size(value: Any) -> int:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=repr)
    return len(text.encode("utf-8", "surrogatepass"))


RETRY_S = 25.0  # how long a batch is retried while the bridge is unreachable or answers 5xx


class Channel:
    def __init__(
        self, bridge: str, token: str, attempt: int = 0, limits: Optional[Dict[str, int]] = None
    ) -> None:
        self._url = bridge.rstrip("/") + "/_corral/events"
        self._token = token
        self._attempt = attempt
        self.limits = dict(LIMITS)
        self.limits.update({k: int(v) for k, v in (limits or {}).items() if k in LIMITS})
        self.failure: Optional[Tuple[str, str]] = None  # (code, message): failed for good
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
        if kind == "result":
            size, limit, code = json_size(data.get("output")), self.limits["result"], "result"
        else:
            size, limit, code = json_size(event), self.limits["event"], "event"
        if size > limit:
            self.fail(
                code + "_too_large",
                "the agent's %s event is %d bytes of JSON; the limit is %d" % (kind, size, limit),
            )
            return
        with self._lock:
            self._pending.append(event)
            full = len(self._pending) >= BATCH
        if full:
            self._wake.set()

    def fail(self, code: str, message: str) -> None:
        """The run has failed for good: an ``error`` event says why (the first reason wins)."""
        with self._lock:
            if self.failure is not None:
                return
            self.failure = (code, message)
            self._pending.append(self._error(code, message))
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
        with self._lock:
            batch, self._pending = self._pending, []
        while batch:
            chunk: List[Dict[str, Any]] = []
            size = 0
            while batch and len(chunk) < BATCH:
                size += json_size(batch[0]) + 1
                if chunk and size > self.limits["batch"]:
                    break
                chunk.append(batch.pop(0))
            refused = self._post(chunk)
            if refused is not None:
                # What is left would fare no better: only the reason the run failed goes on.
                self.fail("events_refused", "the bridge refused the run's events: " + refused)
                with self._lock:
                    self._pending = []
                code, message = self.failure or ("events_refused", refused)
                self._post([self._error(code, message[:4096])])
                return

    def _error(self, code: str, message: str) -> Dict[str, Any]:
        return {
            "type": "error",
            "at": round(time.time(), 6),
            "attempt": self._attempt,
            "code": code,
            "message": message,
        }

    def _post(self, chunk: List[Dict[str, Any]]) -> Optional[str]:
        """Deliver ``chunk``: None once delivered (or given up on), else why it was refused."""
        import urllib.error  # here, not at the top: importing the runner stays cheap (its
        import urllib.request  # validation during a hot swap imports every module)

        body = json.dumps({"events": chunk}, default=repr).encode()
        request = urllib.request.Request(
            self._url,
            data=body,
            method="POST",
            headers={"authorization": "Bearer " + self._token, "content-type": "application/json"},
        )
        # The bridge answers 5xx while it cannot reach its database (a restart): keep the
        # batch and try again, for as long as an outage may last. A 4xx will not change.
        give_up = time.monotonic() + RETRY_S
        pause = 0.05
        while True:
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    response.read()
                return None
            except urllib.error.HTTPError as exc:
                if 400 <= exc.code < 500:  # the same bytes would be refused again
                    return "%d %s" % (exc.code, exc.read(300).decode("utf-8", "replace"))
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() + pause > give_up:
                return None
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
            if len(self._buffer) > self._channel.limits["log_line"]:
                self._send(self._buffer)
                self._buffer = ""
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._buffer:
                self._send(self._buffer)
                self._buffer = ""

    def _send(self, line: str) -> None:
        limit = self._channel.limits["log_line"]
        if len(line) > limit:
            line = line[:limit] + " [cut]"
        self._channel.emit("log", stream=self._stream, message=line)
