"""The limits on what crosses into and out of a run, checked on each side without a sandbox.

The runner's channel talks to a real HTTP server on loopback that plays the bridge's events
endpoint; the bridge's own check is a plain function.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from corral import limits
from corral.bridge.gate import within_limits
from corral.runner import events as runner_events
from corral.runner.events import Channel, LogStream


def test_the_runner_holds_the_same_limits_as_the_host() -> None:
    assert runner_events.LIMITS == limits.RUNNER_LIMITS
    for value in ("ascii", "é" * 10, {"k": ["\U0001f600", 1.5, None]}, "\ud800"):
        assert runner_events.json_size(value) == limits.json_size(value)


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity", "1e999", '{"a": [1, -1e400]}'])
def test_strict_json_refuses_what_is_not_a_finite_number(raw: str) -> None:
    with pytest.raises(json.JSONDecodeError, match=r"not a JSON number|too large"):
        limits.strict_loads(raw)
    assert limits.strict_loads('{"a": [1.5, -2, 1e300]}') == {"a": [1.5, -2, 1e300]}


def test_the_bridge_puts_an_error_in_place_of_an_oversized_event() -> None:
    result = {"attempt": 2, "output": "x" * (limits.MAX_RESULT - 2)}
    assert within_limits("result", result) == ("result", result)
    kind, data = within_limits("result", {**result, "output": "x" * limits.MAX_RESULT})
    assert (kind, data["code"], data["attempt"]) == ("error", "result_too_large", 2)
    assert f"{limits.MAX_RESULT + 2} bytes" in data["message"]
    kind, data = within_limits("progress", {"attempt": 1, "message": "y" * limits.MAX_EVENT})
    assert (kind, data["code"], data["attempt"]) == ("error", "event_too_large", 1)


class FakeBridge:
    """``POST /_corral/events`` on loopback: records each batch, answers ``status``."""

    def __init__(self) -> None:
        self.batches: list[list[dict[str, Any]]] = []
        self.status = 202
        bridge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                bridge.batches.append(json.loads(body)["events"])
                self.send_response(bridge.status)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()

    def events(self) -> list[dict[str, Any]]:
        return [event for batch in self.batches for event in batch]


@pytest.fixture
def bridge() -> Iterator[FakeBridge]:
    fake = FakeBridge()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def test_the_channel_never_sends_an_oversized_result(bridge: FakeBridge) -> None:
    channel = Channel(bridge.url, "token", attempt=1, limits={"result": 100})
    channel.emit("result", output="x" * 101)
    channel.close()
    assert channel.failure is not None and channel.failure[0] == "result_too_large"
    sent = bridge.events()
    assert [(e["type"], e.get("code")) for e in sent] == [("error", "result_too_large")]
    assert sent[0]["attempt"] == 1 and "103 bytes" in sent[0]["message"]


def test_batches_stay_below_the_batch_limit(bridge: FakeBridge) -> None:
    channel = Channel(bridge.url, "token", limits={"batch": 10_000, "event": 5_000})
    for i in range(20):
        channel.emit("log", message=f"{i:04d}" * 1000)
    channel.close()
    assert len(bridge.events()) == 20 and channel.failure is None
    assert all(sum(runner_events.json_size(e) for e in b) <= 10_000 for b in bridge.batches)


def test_a_refused_batch_is_reported_not_retried(bridge: FakeBridge) -> None:
    bridge.status = 413
    channel = Channel(bridge.url, "token", attempt=3)
    channel.emit("log", message="one")
    channel.emit("result", output="two")
    channel.close()
    assert channel.failure is not None and channel.failure[0] == "events_refused"
    assert "413" in channel.failure[1]
    # the batch once, then the reason alone; never the batch again
    assert [[e["type"] for e in b] for b in bridge.batches] == [["log", "result"], ["error"]]
    assert bridge.batches[1][0]["code"] == "events_refused" and bridge.batches[1][0]["attempt"] == 3


def test_a_long_line_is_cut_at_the_log_line_limit(bridge: FakeBridge) -> None:
    channel = Channel(bridge.url, "token", limits={"log_line": 10})
    stream = LogStream(channel, "stdout")
    stream.write("a" * 25 + "\nshort\n")
    channel.close()
    assert [e["message"] for e in bridge.events()] == ["a" * 10 + " [cut]", "short"]
