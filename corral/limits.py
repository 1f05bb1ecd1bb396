"""What may cross into and out of a run, or into the API: sizes, defined here once and enforced
where they cross, and strict JSON (``strict_loads``: no NaN, no Infinity, no number that
overflows a float).

Sizes are bytes of compact JSON in UTF-8 (``json_size``), so a value measures the same
whoever measures it: the API and the pipeline at admission, the runner in the sandbox, the
bridge when the runner's events arrive. The sandbox is hostile, so the host checks what the
runner already checked.

==================  =========  ==============================================================
limit               value      what happens beyond it
==================  =========  ==============================================================
MAX_INPUT           1 MiB      a run's input: refused at admission, 413 ``input_too_large``,
                               whatever the trigger; no run is recorded
MAX_RESULT          1 MiB      an agent's result: the run fails ``result_too_large``, at once,
                               never retried on a fresh sandbox
MAX_EVENT           64 KiB     any other event (log, progress, metric): the run fails
                               ``event_too_large``, at once, never retried
MAX_LOG_LINE        8 KiB      characters of one line the agent prints: the rest is cut and
                               the line ends with `` [cut]`` (the run goes on)
MAX_REQUEST_BODY    2 MiB      an HTTP request body to the API: 413 before it is parsed
==================  =========  ==============================================================

The runner receives the first four in its run spec (``spec["limits"]``); the bridge accepts
event batches of up to ``corral.bridge.gate``'s ``max_body`` (10 MiB), which the runner keeps
below by sending at most ``MAX_BATCH`` bytes at a time.
"""

from __future__ import annotations

import json
import math
from typing import Any

KiB = 1024
MiB = 1024 * KiB

MAX_INPUT = 1 * MiB
MAX_RESULT = 1 * MiB
MAX_EVENT = 64 * KiB
MAX_LOG_LINE = 8 * KiB  # characters: at most 4 bytes each, so a log event fits MAX_EVENT
MAX_BATCH = 4 * MiB
MAX_REQUEST_BODY = 2 * MiB

# What the runner is told; its own defaults are the same numbers, for a host that says nothing.
RUNNER_LIMITS = {
    "result": MAX_RESULT,
    "event": MAX_EVENT,
    "log_line": MAX_LOG_LINE,
    "batch": MAX_BATCH,
}


def json_size(value: Any) -> int:
    """Bytes of ``value`` as compact JSON in UTF-8: the measure of every limit above."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=repr)
    return len(text.encode("utf-8", "surrogatepass"))


class _NotJSON(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _NotJSON(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotJSON(f"{text} is too large for a number")
    return value


def strict_loads(body: bytes | str) -> Any:
    """``json.loads`` without the extensions: NaN, Infinity and overflowing numbers refused."""
    try:
        return json.loads(body, parse_constant=_refuse_constant, parse_float=_finite)
    except _NotJSON as exc:
        doc = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
        token = str(exc).split(" ", 1)[0]
        raise json.JSONDecodeError(str(exc), doc, max(doc.find(token), 0)) from None
