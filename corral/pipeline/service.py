"""``execute_agent``: the one path from any trigger to a recorded, billed agent run.

A human clicking Run, a cron tick, a script calling the API and another agent all call
``Pipeline.execute_agent(app, input, trigger, ...)``. Nothing below branches on ``trigger``: it
is a field on the run, a label on the metrics, an attribute on the trace.

Admission (synchronous, in the caller): the app and its current version, the input against
the app's schema, the idempotency key, the user's credits and the app's budget, the
concurrency policy, the agent-to-agent depth and cycle guard. Then the run is recorded
``queued`` and a worker (``worker.py``) leases it, executes it in a sandbox, bills it and
fires its webhook. ``wait=True`` returns once the run has ended.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from corral.billing.amounts import to_micros
from corral.billing.ledger import BudgetExhausted, Ledger
from corral.errors import Conflict, InvalidInput
from corral.limits import MAX_INPUT, json_size
from corral.pipeline.apps import Apps, AppSpec
from corral.pipeline.executor import AgentRequest, Executor
from corral.pipeline.states import RunStatus
from corral.store import Run, Store
from corral.store.rows import check_user

TRIGGERS = ("ui", "schedule", "http", "agent", "cli")
IDEMPOTENCY_TTL = timedelta(hours=24)
_PARKED = datetime(9999, 1, 1, tzinfo=UTC)
MAX_DEPTH = 5


class ConcurrencyLimit(Conflict):
    code = "concurrency_limit"


class IdempotencyMismatch(Conflict):
    code = "idempotency_mismatch"


class InputTooLarge(InvalidInput):
    """The run's input is over ``corral.limits.MAX_INPUT``: refused before anything is stored."""

    code = "input_too_large"


class CallRefused(Conflict):
    """An agent-to-agent call the guard refuses: too deep, or a cycle."""

    code = "agent_call_refused"


@dataclass(frozen=True)
class Trigger:
    kind: str  # ui | schedule | http | agent | cli
    parent_run: str | None = None  # agent-to-agent: the calling run

    def __post_init__(self) -> None:
        if self.kind not in TRIGGERS:
            raise InvalidInput(f"unknown trigger {self.kind!r}")


class Pipeline:
    def __init__(self, store: Store, executor: Executor, ledger: Ledger) -> None:
        self.store = store
        self.executor = executor
        self.ledger = ledger
        self.apps = Apps(store)
        self.work_available = threading.Condition()
        self.run_finished = threading.Condition()
        self.on_admitted: list[Callable[[Run], None]] = []  # metrics hang off this

    def execute_agent(
        self,
        app: str,
        input: Any,
        trigger: Trigger,
        *,
        user: str,
        idempotency_key: str | None = None,
        wait: bool = False,
        wait_timeout: float | None = None,
    ) -> Run:
        began = time.perf_counter()
        check_user(user)
        size = json_size(input)
        if size > MAX_INPUT:
            raise InputTooLarge(
                f"the input is {size} bytes of JSON; a run's input may be at most {MAX_INPUT}"
            )
        version, spec = self.apps.get(app)
        digest = _request_hash(app, input)
        if idempotency_key:  # a replay returns the original run, whatever has changed since
            bound = self.store.pipeline.bound_run(user, app, idempotency_key, IDEMPOTENCY_TTL)
            if bound is not None:
                return self._replay(bound, digest, idempotency_key, wait, wait_timeout)
        spec.check_input(input)
        parent = self.store.runs.get(trigger.parent_run) if trigger.parent_run else None
        depth = self._guard(app, parent)
        if spec.budget_per_run == 0:
            raise BudgetExhausted(f"app {app!r} has a budget of zero credits per run")
        if self.ledger.balance(user) <= 0:
            raise BudgetExhausted(f"user {user!r} has no credits left")
        if (
            spec.budget_total is not None
            and self.store.pipeline.spent(app=app) >= to_micros(spec.budget_total)
        ):
            raise BudgetExhausted(
                f"app {app!r} has spent its budget of {spec.budget_total} credits"
            )
        self._apply_policy(app, spec, user)

        request = self.request(app, spec, input, trigger, user)
        run = self.executor.prepare(
            request,
            RunStatus.QUEUED,
            id=f"run-{secrets.token_hex(8)}",
            app=app,
            app_version=version,
            parent_run=parent.id if parent else None,
            depth=depth,
            options=json.dumps(
                {
                    "timeout": spec.timeout,
                    "connections": list(spec.connections),
                    "budget_per_run": spec.budget_per_run,
                }
            ),
            # Parked until its idempotency key is bound: a twin request must not run too.
            available_at=_PARKED if idempotency_key else None,
        )
        if idempotency_key:
            bound_hash, bound_run = self.store.pipeline.bind_key(
                user, app, idempotency_key, digest, run.id, IDEMPOTENCY_TTL
            )
            if bound_run != run.id:  # a concurrent twin won the key
                self.store.pipeline.discard_parked(run.id)
                return self._replay(
                    (bound_hash, bound_run), digest, idempotency_key, wait, wait_timeout
                )
            self.store.pipeline.release_parked(run.id)
        self.store.runs.append_event(
            run.id,
            datetime.now(UTC),
            "run.admitted",
            json.dumps(
                {
                    "trigger": trigger.kind,
                    "app_version": version,
                    "seconds": round(time.perf_counter() - began, 6),
                }
            ),
        )
        for hook in self.on_admitted:
            hook(run)
        with self.work_available:
            self.work_available.notify_all()
        return self.wait(run.id, wait_timeout) if wait else run

    @staticmethod
    def request(app: str, spec: AppSpec, input: Any, trigger: Trigger, user: str) -> AgentRequest:
        return AgentRequest(
            environment=spec.environment,
            entrypoint=spec.entrypoint,
            input=input,
            trigger=trigger.kind,
            timeout=spec.timeout,
            user=user,
            app=app,
            connections=spec.connections,
        )

    def _replay(
        self, bound: tuple[str, str], digest: str, key: str, wait: bool, wait_timeout: float | None
    ) -> Run:
        bound_hash, bound_run = bound
        if bound_hash != digest:
            raise IdempotencyMismatch(f"idempotency key {key!r} was used with a different request")
        return self.wait(bound_run, wait_timeout) if wait else self.store.runs.get(bound_run)

    def wait(self, run_id: str, timeout: float | None = None) -> Run:
        """Block until the run ends (or ``timeout`` passes); returns its latest record."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            run = self.store.runs.get(run_id)
            if RunStatus(run.status).terminal:
                return run
            if deadline is not None and time.monotonic() >= deadline:
                return run
            # Woken at once by a worker of this process; another process's: the next poll.
            with self.run_finished:
                self.run_finished.wait(0.25)

    def cancel(self, run_id: str) -> Run:
        self.store.runs.get(run_id)  # RunNotFound for an unknown id
        run = self.store.pipeline.cancel(run_id)
        assert run is not None
        return run

    def _guard(self, app: str, parent: Run | None) -> int:
        """Depth and cycle checks for an agent-to-agent call; 0 for every other trigger."""
        if parent is None:
            return 0
        depth = parent.depth + 1
        if depth > MAX_DEPTH:
            raise CallRefused(f"agent calls nest at most {MAX_DEPTH} deep; this would be {depth}")
        lineage: list[str | None] = []
        node: Run | None = parent
        while node is not None:
            lineage.append(node.app)
            node = self.store.runs.get(node.parent_run) if node.parent_run else None
        if app in lineage:
            chain = " -> ".join(str(a) for a in reversed([*lineage])) + f" -> {app}"
            raise CallRefused(f"agent call cycle refused: {chain}")
        return depth

    def _apply_policy(self, app: str, spec: AppSpec, user: str) -> None:
        active = self.store.pipeline.active(user, app)
        limit = spec.max_concurrent
        if spec.concurrency == "cancel_previous":
            for run in active:
                self.store.pipeline.cancel(run.id)
        elif spec.concurrency in ("reject", "allow") and limit and len(active) >= limit:
            raise ConcurrencyLimit(
                f"app {app!r} allows {limit} run(s) at a time per user; {len(active)} active"
            )
        elif spec.concurrency == "reject" and not limit and active:
            raise ConcurrencyLimit(f"app {app!r} is already running for {user!r}")
        # enqueue: always admitted; workers start it when fewer than the limit are running


def _request_hash(app: str, input: Any) -> str:
    return hashlib.sha256(json.dumps([app, input], sort_keys=True).encode()).hexdigest()
