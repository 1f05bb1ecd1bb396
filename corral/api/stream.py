"""Following a run over HTTP: waiting for its end, and its event log as Server-Sent Events.

Both poll the store every ``POLL`` seconds and hold no thread while they wait: each poll is a
short read run in the threadpool (``anyio.to_thread``), and the pause between polls is an
``anyio.sleep`` on the event loop. So a thousand clients waiting on runs cost a thousand
coroutines, not a thousand threads, and a client that goes away is simply dropped.

The event stream (``text/event-stream``) sends each stored event as::

    id: <seq>
    event: <kind>
    data: <the event as one JSON object: its fields, then seq, kind and at>

from the event after ``Last-Event-ID`` (or the first) on, follows the log until the run is
terminal, then sends ``event: end`` with ``{"run": <the run>, "last_seq": <seq>, "kinds":
[<the kinds this stream sent>]}`` and closes. (EventSource has no listener for "any event":
``kinds`` tells a client which listeners it lacked.)
A comment line keeps a quiet stream's connection open through proxies.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import anyio
import anyio.to_thread

from corral.api.shapes import event_json
from corral.errors import InvalidInput
from corral.pipeline.shapes import run_json
from corral.states import RunStatus
from corral.store import Run, RunEvent, Store

POLL = 0.05  # seconds between reads of the store
KEEPALIVE = 15.0  # seconds of silence before a comment line keeps the connection open
DEFAULT_WAIT = 600.0  # how long ``wait`` waits when the client names no timeout
END = "end"
MEDIA_TYPE = "text/event-stream"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_KIND = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def _terminal(run: Run) -> bool:
    return RunStatus(run.status).terminal


async def get_run(store: Store, run_id: str) -> Run:
    """The run's current record, read in the threadpool (``RunNotFound`` if there is none)."""
    return await anyio.to_thread.run_sync(store.runs.get, run_id)


async def wait_for_end(store: Store, run_id: str, timeout: float | None) -> Run:
    """The run's record once it has ended, or as it is when ``timeout`` seconds have passed."""
    deadline = anyio.current_time() + (timeout or DEFAULT_WAIT)
    while True:
        run = await get_run(store, run_id)
        if _terminal(run) or anyio.current_time() >= deadline:
            return run
        await anyio.sleep(POLL)


LAST_EVENT_ID_PATTERN = r"[0-9]{0,18}"  # an event's seq; empty (or absent): from the start
_LAST_EVENT_ID_RE = re.compile(LAST_EVENT_ID_PATTERN)


def last_event_id(header: str | None) -> int:
    """The sequence number a resuming client saw last; 0 for a client starting afresh."""
    if header is None:
        return 0
    if _LAST_EVENT_ID_RE.fullmatch(header) is None:
        raise InvalidInput(
            f"Last-Event-ID must be an event's seq (up to 18 digits 0-9), not {header!r}"
        )
    return int(header or 0)


def frame(kind: str, data: Any, seq: int | None = None) -> str:
    """One SSE message. ``json.dumps`` escapes newlines, so the data is always one line."""
    lines = [] if seq is None else [f"id: {seq}"]
    safe_kind = kind if _KIND.fullmatch(kind) else "unknown"  # a kind cannot inject fields
    lines.append(f"event: {safe_kind}")
    lines.append(f"data: {json.dumps(data, default=_default, separators=(',', ':'))}")
    return "\n".join(lines) + "\n\n"


def _read(store: Store, run_id: str, after: int) -> tuple[Run, list[RunEvent]]:
    # The status first, then the log: the executor appends its last event before it records
    # the end, so once this status reads terminal, the events read next include all of them.
    run = store.runs.get(run_id)
    return run, store.runs.events(run_id, after=after)


async def run_events(store: Store, run_id: str, after: int = 0) -> AsyncIterator[str]:
    """The SSE messages of run ``run_id``'s log after ``after``, live, then ``end``."""
    cursor = after
    kinds: set[str] = set()
    quiet_since = anyio.current_time()
    while True:
        run, events = await anyio.to_thread.run_sync(_read, store, run_id, cursor)
        if _terminal(run):
            # One more read after a pause: the bridge flushes what a sandbox sent in batches,
            # and its last batch may land just after the worker recorded the end.
            await anyio.sleep(POLL)
            _, events = await anyio.to_thread.run_sync(_read, store, run_id, cursor)
        for event in events:
            yield frame(event.kind, event_json(event), event.seq)
            cursor = event.seq
            kinds.add(event.kind)
        if _terminal(run):
            yield frame(END, {"run": run_json(run), "last_seq": cursor, "kinds": sorted(kinds)})
            return
        now = anyio.current_time()
        if events:
            quiet_since = now
        elif now - quiet_since >= KEEPALIVE:
            yield ": keepalive\n\n"
            quiet_since = now
        await anyio.sleep(POLL)


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot serialise {type(value).__name__}")
