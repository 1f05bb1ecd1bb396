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

The bridge sits below the pipeline and never imports it: what it needs of it is
``AgentCalls`` (admit a call, look a called run up), which the pipeline satisfies and
``context.py`` passes to the gate at construction.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from corral.bridge.tokens import Claims
from corral.errors import CorralError, Refused, StoreUnavailable
from corral.limits import strict_loads
from corral.statuses import status_for

log = logging.getLogger("corral.bridge")

DEFAULT_WAIT = 600.0  # seconds, when the body names no timeout
MAX_WAIT = 3600.0
_POLL_FIRST, _POLL_MAX = 0.05, 0.5


@dataclass(frozen=True)
class CalledRun:
    """A run an agent started, as the bridge needs it: whether it has ended, and its record
    in the one JSON shape every surface shows (``corral.pipeline.shapes.run_json``)."""

    id: str
    ended: bool
    shape: dict[str, Any]


class AgentCalls(Protocol):
    """What agent-to-agent calls need of the pipeline (``Pipeline`` satisfies it). Each
    method blocks on the store; the bridge calls them off its event loop."""

    def callable_by_agents(self, app: str) -> bool:
        """Whether ``app``'s current version accepts agent callers (``AppNotFound`` if none)."""
        ...

    def admit_call(
        self, app: str, input: Any, *, caller: str, user: str, awaited: bool
    ) -> CalledRun:
        """Admit a run of ``app`` called by the run ``caller``, as ``user``, through the same
        admission as any trigger (trigger ``agent``); ``awaited``: the caller waits for it.
        Raises the admission's ``CorralError`` when it refuses."""
        ...

    def called(self, run_id: str) -> CalledRun:
        """The run's latest record."""
        ...


async def call_agent(
    calls: AgentCalls,
    claims: Claims,
    app: str,
    body: bytes,
    clock: Callable[[], float] = time.time,
) -> tuple[int, dict[str, Any]]:
    """Start (and with ``wait``, await) a run of ``app`` on behalf of the run ``claims`` name."""
    input, wait, timeout = _parse(body)
    loop = asyncio.get_running_loop()
    try:
        run = await loop.run_in_executor(None, _admit, calls, claims, app, input, wait)
    except Refused:
        raise  # the bridge's own answer (an app that agents may not call)
    except CorralError as exc:  # admission said no: the API's status for the same refusal
        status = status_for(exc)
        if status >= 500:
            log.error("run %s calling app %r: %s", claims.run, app, exc.detail, exc_info=exc)
        raise Refused(status, exc.code, exc.detail) from None
    if wait:
        # Never past the caller's own token: it could not read the answer anyway.
        patience = min(timeout, max(0.0, claims.expires - clock()))
        run = await _until_ended(calls, run, loop.time() + patience)
    return (200 if run.ended else 202), describe(run.shape)


def describe(shape: dict[str, Any]) -> dict[str, Any]:
    """What the calling agent is told about a run: a projection of the run's one JSON shape."""
    return {
        key: value.isoformat() if isinstance(value, datetime) else value
        for key, value in shape.items()
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


def _admit(calls: AgentCalls, claims: Claims, app: str, input: Any, wait: bool) -> CalledRun:
    if not calls.callable_by_agents(app):  # AppNotFound: 404
        raise Refused(403, "agent_call_forbidden", f"app {app!r} may not be called by agents")
    # ``awaited``: the caller's worker lends the callee its capacity while the caller waits.
    return calls.admit_call(app, input, caller=claims.run, user=claims.user, awaited=wait)


async def _until_ended(calls: AgentCalls, run: CalledRun, deadline: float) -> CalledRun:
    loop = asyncio.get_running_loop()
    pause = _POLL_FIRST
    while not run.ended:
        left = deadline - loop.time()
        if left <= 0:
            break
        await asyncio.sleep(min(pause, left))
        pause = min(pause * 1.5, _POLL_MAX)
        try:
            run = await loop.run_in_executor(None, calls.called, run.id)
        except StoreUnavailable:  # a database blip: the callee runs on, and so does the wait
            continue
    return run
