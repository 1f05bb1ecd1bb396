"""Agent-to-agent calls: ``POST /_corral/apps/{app}/runs`` on the bridge.

A running agent starts a run of another app with its own run token, and nothing else: the
callee runs as the caller's user (its cost is that user's), is linked to the calling run
(``parent_run``, ``depth``), and passes through the same admission as any other trigger
(``Pipeline.execute_agent``: schema, credits, budgets, concurrency, the depth and cycle
guard). Its cost counts against the budget of the caller and of every run above it
(``corral/pipeline/budgets.py``). Apps that set ``callable_by_agents=False`` are refused.

Body: ``{"input": <JSON>, "wait": <bool, default false>, "timeout": <seconds>}``. The answer
is the run as JSON: 200 once it has ended, 202 while it is still queued or running (no
``wait``, or ``timeout`` passed first). A wait never outlives the caller's token.

Admission runs off the event loop (it reads and writes the store); the wait does not hold a
thread: it polls the run's record from the loop, backing off, so any number of agents can
wait on callees without starving the pool the bridge's other lookups run on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from corral.billing.ledger import BudgetExhausted
from corral.bridge.http1 import Refused
from corral.bridge.tokens import Claims
from corral.errors import Conflict, CorralError, InvalidInput, NotFound, StoreUnavailable
from corral.limits import strict_loads
from corral.pipeline.service import ConcurrencyLimit, InputTooLarge, Pipeline, Trigger
from corral.pipeline.shapes import run_json
from corral.states import RunStatus
from corral.store import Run

log = logging.getLogger("corral.bridge")

DEFAULT_WAIT = 600.0  # seconds, when the body names no timeout
MAX_WAIT = 3600.0
_POLL_FIRST, _POLL_MAX = 0.05, 0.5

# Admission errors by family, most specific first (both of the first two are Conflicts); the
# same statuses as the HTTP API's table, without importing the API into the bridge.
_STATUS: tuple[tuple[type[CorralError], int], ...] = (
    (BudgetExhausted, 402),
    (ConcurrencyLimit, 429),  # admitted once one of the user's runs of the app ends
    (NotFound, 404),  # app_not_found
    (InputTooLarge, 413),  # over corral.limits.MAX_INPUT
    (InvalidInput, 400),  # the input fails the app's schema
    (Conflict, 409),  # agent_call_refused: too deep, or a cycle
    (StoreUnavailable, 503),  # the database is restarting: nothing was admitted, retry
)


async def call_agent(
    pipeline: Pipeline,
    claims: Claims,
    app: str,
    body: bytes,
    clock: Callable[[], float] = time.time,
) -> tuple[int, dict[str, Any]]:
    """Start (and with ``wait``, await) a run of ``app`` on behalf of the run ``claims`` name."""
    input, wait, timeout = _parse(body)
    loop = asyncio.get_running_loop()
    try:
        run = await loop.run_in_executor(None, _admit, pipeline, claims, app, input, wait)
    except CorralError as exc:
        status = next((s for cls, s in _STATUS if isinstance(exc, cls)), 500)
        if status >= 500:
            log.error("run %s calling app %r: %s", claims.run, app, exc.detail, exc_info=exc)
        raise Refused(status, exc.code, exc.detail) from None
    if wait:
        # Never past the caller's own token: it could not read the answer anyway.
        patience = min(timeout, max(0.0, claims.expires - clock()))
        run = await _until_ended(pipeline, run, loop.time() + patience)
    return (200 if RunStatus(run.status).terminal else 202), describe(run)


def describe(run: Run) -> dict[str, Any]:
    """What the calling agent is told about a run: a projection of the run's one JSON shape."""
    return {
        key: value.isoformat() if isinstance(value, datetime) else value
        for key, value in run_json(run).items()
        if key in _SHOWN_TO_AGENTS
    }


_SHOWN_TO_AGENTS = frozenset(
    {
        "id",
        "app",
        "app_version",
        "status",
        "result",
        "error_code",
        "error",
        "trigger",
        "parent_run",
        "depth",
        "created_at",
        "finished_at",
    }
)


def _parse(body: bytes) -> tuple[Any, bool, float]:
    try:
        request = strict_loads(body) if body.strip() else {}  # no NaN into a run's input
    except ValueError:
        request = None
    if not isinstance(request, dict):
        raise Refused(
            400, "bad_request", 'the body must be {"input": ..., "wait": ..., "timeout": ...}'
        )
    wait = request.get("wait", False)
    timeout = request.get("timeout", DEFAULT_WAIT)
    if not isinstance(wait, bool):
        raise Refused(400, "bad_request", "wait must be true or false")
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise Refused(400, "bad_request", "timeout must be a positive number of seconds")
    return request.get("input"), wait, min(float(timeout), MAX_WAIT)


def _admit(pipeline: Pipeline, claims: Claims, app: str, input: Any, wait: bool) -> Run:
    _, spec = pipeline.apps.get(app)  # AppNotFound: 404
    if not spec.callable_by_agents:
        raise Refused(403, "agent_call_forbidden", f"app {app!r} may not be called by agents")
    # ``awaited``: the caller's worker lends the callee its capacity while the caller waits.
    trigger = Trigger("agent", parent_run=claims.run, awaited=wait)
    return pipeline.execute_agent(app, input, trigger, user=claims.user, wait=False)


async def _until_ended(pipeline: Pipeline, run: Run, deadline: float) -> Run:
    loop = asyncio.get_running_loop()
    pause = _POLL_FIRST
    while not RunStatus(run.status).terminal:
        left = deadline - loop.time()
        if left <= 0:
            break
        await asyncio.sleep(min(pause, left))
        pause = min(pause * 1.5, _POLL_MAX)
        try:
            run = await loop.run_in_executor(None, pipeline.store.runs.get, run.id)
        except StoreUnavailable:  # a database blip: the callee runs on, and so does the wait
            continue
    return run
