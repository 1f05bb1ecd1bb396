"""A started sandbox's channels, fed hostile bytes through real pipes (no sandbox needed)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

import pytest

from corral.errors import ProtocolError, SessionEnded, SessionTimeout
from corral.sandbox.channels import MAX_LINE, Channels, Pipes


class Far:
    """The sandbox's ends of the three pipes."""

    def __init__(self, pipes: Pipes) -> None:
        ctl, events, log = pipes.child
        self.control = os.fdopen(os.dup(ctl), "rb")
        self.events = os.fdopen(os.dup(events), "wb")
        self.log = os.fdopen(os.dup(log), "wb")

    def event(self, raw: bytes) -> None:
        self.events.write(raw)
        self.events.flush()

    def close(self) -> None:
        for stream in (self.control, self.events, self.log):
            if not stream.closed:
                stream.close()


@pytest.fixture
def wired() -> Iterator[tuple[Channels, Far]]:
    pipes = Pipes()
    far = Far(pipes)
    pipes.handed_over()  # as a runtime does once its process holds them
    channels = pipes.channels()
    yield channels, far
    far.close()
    channels.close()


def soon(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


def test_events_and_log_lines_arrive_and_the_end_is_ended(wired: tuple[Channels, Far]) -> None:
    channels, far = wired
    far.event(b'{"type": "boot.ready", "python": [3, 11, 0]}\n')
    assert channels.next(soon()) == {"type": "boot.ready", "python": [3, 11, 0]}
    far.log.write(b"Traceback \xff\n")
    far.log.flush()
    line = channels.next(soon())
    assert line == {"type": "log", "stream": "sandbox", "message": "Traceback \ufffd"}
    far.events.close()
    far.log.close()
    with pytest.raises(SessionEnded):
        channels.next(soon())


def test_commands_reach_the_sandbox_one_json_line_each(wired: tuple[Channels, Far]) -> None:
    channels, far = wired
    channels.send({"op": "validate", "path": "/tmp/x"})
    channels.send({"op": "run", "spec": {}})
    assert json.loads(far.control.readline()) == {"op": "validate", "path": "/tmp/x"}
    assert json.loads(far.control.readline()) == {"op": "run", "spec": {}}


def test_a_sandbox_that_stopped_reading_ends_the_session(wired: tuple[Channels, Far]) -> None:
    channels, far = wired
    far.control.close()
    with pytest.raises(SessionEnded, match="stopped reading"):
        for _ in range(100):  # the pipe buffer takes a few writes before it breaks
            channels.send({"op": "run", "spec": {"padding": "x" * 65536}})


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"x" * (MAX_LINE + 1) + b"\n", f"longer than {MAX_LINE} bytes"),
        (b"Hello, host\n", "not JSON: 'Hello, host"),
        (b'{"type": "result", "output": 1\n', "not JSON"),
        (b'["type", "result"]\n', "without a type"),
        (b'{"output": "forged"}\n', "without a type"),
        (b'{"type": 7}\n', "without a type"),
    ],
)
def test_a_malformed_event_breaks_the_protocol(
    wired: tuple[Channels, Far], raw: bytes, why: str
) -> None:
    channels, far = wired
    far.event(raw)
    with pytest.raises(ProtocolError, match=why):
        channels.next(soon())


def test_nothing_said_by_the_deadline_is_a_timeout_not_a_hang(
    wired: tuple[Channels, Far],
) -> None:
    channels, _ = wired
    with pytest.raises(SessionTimeout):
        channels.next(time.monotonic() + 0.05)


def test_expect_passes_over_other_events_and_returns_them(wired: tuple[Channels, Far]) -> None:
    channels, far = wired
    far.event(b'{"type": "progress", "done": 1}\n{"type": "boot.validated"}\n')
    reply, passed = channels.expect(("boot.validated", "boot.invalid"), soon())
    assert reply == {"type": "boot.validated"}
    assert passed == [{"type": "progress", "done": 1}]
