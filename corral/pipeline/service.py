"""``execute_agent``: the one path from any trigger to a recorded, billed agent run.

A human clicking Run, a cron tick, a script calling the API, another agent and the CLI all
call ``Pipeline.execute_agent(app, input, trigger, ...)``. Nothing below branches on
``trigger``: it is a field on the run, a label on the metrics, an attribute on the trace.

``app`` is an app's name, or an ``AdHoc`` spec (``corral run ENV FILE:FN``: an environment
and an entrypoint, no app): the same admission minus what only an app has (a version, a
schema, an idempotency key, budgets, a concurrency policy), recorded on the run in place of
the version (``app`` is null, ``options`` holds the spec). It is recorded parked, so no
worker takes it: its caller executes it at once (``Corral.run_here``: ``corral run`` streams
it to the terminal). The local operator (the embedded CLI, ``operator=True``) is never
refused for want of credits: a fresh install runs at once, and its runs' deductions still
post, so its balance says what they cost.

Admission (synchronous, in the caller): the app and its current version, the input against
the app's schema, the idempotency key, the user's credits and the app's budget, the
concurrency policy, the agent-to-agent depth and cycle guard. Then the run is recorded
``queued`` and a worker (``worker.py``) leases it, executes it in a sandbox and bills it.
``wait=True`` returns once the run has ended.

Ending. Every path that ends a run (its worker, a cancel while it is queued, a worker lost
too often, a run finished from its log) goes through ``Pipeline.finish``: one conditional
write moves the run into its terminal state, so exactly one path wins, and the winner
announces it: the completion hooks (traces, webhooks; metrics are read from the store) fire
once per run. A process without hooks (a cancel from the CLI) leaves the announcement to the
next worker process's sweep (``announce_pending``).

Agent-to-agent calls reach the pipeline from the bridge through ``bridge.agents.AgentCalls``,
which ``Pipeline`` satisfies (``callable_by_agents``, ``admit_call``, ``called``): the
bridge, below the pipeline, never imports it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from corral.billing.amounts import to_micros
from corral.billing.ledger import Ledger
from corral.bridge.agents import CalledRun
from corral.errors import (
    BudgetExhausted,
    CallRefused,
    ConcurrencyLimit,
    IdempotencyMismatch,
    InputTooLarge,
    InvalidInput,
)
from corral.limits import MAX_INPUT, json_size
from corral.pipeline.apps import AdHoc, Apps, AppSpec
from corral.pipeline.budgets import Budgets
from corral.pipeline.executor import AgentRequest, Executor
from corral.pipeline.shapes import run_json
from corral.states import ACTIVE, RunStatus
from corral.store import KeyBinding, Run, RunEvent, Store
from corral.store.rows import check_user

log = logging.getLogger("corral.pipeline")

TRIGGERS = ("ui", "schedule", "http", "agent", "cli")
IDEMPOTENCY_TTL = timedelta(hours=24)
_PARKED = datetime(9999, 1, 1, tzinfo=UTC)
MAX_DEPTH = 5
ANNOUNCE_GRACE = timedelta(seconds=2)  # the process that ended a run announces it first

# Called once with every run that has ended, whatever ended it: metrics, traces, webhooks.
OnFinished = Callable[[Run], None]


@dataclass(frozen=True)
class Trigger:
    kind: str  # ui | schedule | http | agent | cli
    parent_run: str | None = None  # agent-to-agent: the calling run
    awaited: bool = False  # agent-to-agent: the caller blocks until this run ends

    def __post_init__(self) -> None:
        if self.kind not in TRIGGERS:
            raise InvalidInput(f"unknown trigger {self.kind!r}")


class Pipeline:
    def __init__(self, store: Store, executor: Executor, ledger: Ledger) -> None:
        self.store = store
        self.executor = executor
        self.ledger = ledger
        self.apps = Apps(store)
        self.budgets = Budgets(store, ledger)
        self.work_available = threading.Condition()
        self.run_finished = threading.Condition()
        self.on_admitted: list[Callable[[Run], None]] = []  # metrics hang off this
        self.on_finished: list[OnFinished] = []  # wired in processes that run workers

    def execute_agent(
        self,
        app: str | AdHoc,
        input: Any,
        trigger: Trigger,
        *,
        user: str,
        idempotency_key: str | None = None,
        wait: bool = False,
        wait_timeout: float | None = None,
        operator: bool = False,
    ) -> Run:
        """Admit a run of ``app`` (an app's name, or an ``AdHoc`` spec) and record it queued.

        ``operator``: the caller is the local operator (the embedded CLI on this machine),
        who is never refused for want of credits; what the run uses is still deducted.
        """
        began = time.perf_counter()
        check_user(user)
        size = json_size(input)
        if size > MAX_INPUT:
            raise InputTooLarge(
                f"the input is {size} bytes of JSON; a run's input may be at most {MAX_INPUT}"
            )
        name: str | None
        spec: AppSpec | None
        digest = ""  # of the request, for an app's idempotency key
        if isinstance(app, AdHoc):
            if idempotency_key or trigger.parent_run or wait:
                # No app to key, call or queue: its caller executes it now (``run_here``).
                raise InvalidInput(
                    "an ad-hoc run takes no idempotency key, has no calling run and is not "
                    "waited for: its caller executes it"
                )
            name, version, spec = None, None, None
            request = self.ad_hoc_request(app, input, trigger, user)
            options: dict[str, Any] = {**app.options(), "budget_per_run": None}
        else:
            name = app
            version, spec = self.apps.get(app)
            digest = _request_hash(app, input)
            if idempotency_key:  # a replay returns the original run, whatever has changed since
                bound = self.store.runs.key_binding(user, app, idempotency_key, IDEMPOTENCY_TTL)
                if bound is not None:
                    return self._replay(bound, digest, idempotency_key, wait, wait_timeout)
            spec.check_input(input)
            request = self.request(app, spec, input, trigger, user)
            options = {
                "timeout": spec.timeout,
                "connections": list(spec.connections),
                "budget_per_run": spec.budget_per_run,
            }
        parent = self.store.runs.get(trigger.parent_run) if trigger.parent_run else None
        depth = self._guard(name, parent)
        if spec is not None and spec.budget_per_run == 0:
            raise BudgetExhausted(f"app {name!r} has a budget of zero credits per run")
        if parent is not None:  # a callee spends from its callers' budgets too
            over = self.budgets.overspent(parent)
            if over is not None:
                raise BudgetExhausted(
                    f"run {over.owner} and the runs it called have spent {over.spent:.4f} of "
                    f"its budget of {over.budget} credits; it may start no more runs"
                )
        if not operator and self.ledger.balance(user) <= 0:
            raise BudgetExhausted(f"user {user!r} has no credits left")
        if (
            spec is not None
            and spec.budget_total is not None
            and self.store.ledger.spent(app=name) >= to_micros(spec.budget_total)
        ):
            raise BudgetExhausted(
                f"app {name!r} has spent its budget of {spec.budget_total} credits"
            )
        if name is not None and spec is not None:
            self._apply_policy(name, spec, user)

        run_id = f"run-{secrets.token_hex(8)}"
        run = self.executor.prepare(
            request,
            RunStatus.QUEUED,
            id=run_id,
            app=name,
            app_version=version,
            parent_run=parent.id if parent else None,
            root_run=parent.root if parent else run_id,
            awaited=bool(parent and trigger.awaited),
            depth=depth,
            options=json.dumps(options),
            # Parked until its idempotency key is bound: a twin request must not run too. An
            # ad-hoc run stays parked: no worker takes it, its caller executes it (run_here).
            available_at=_PARKED if idempotency_key or name is None else None,
        )
        if idempotency_key and name is not None:
            bound = self.store.runs.bind_key(
                user, name, idempotency_key, digest, run.id, IDEMPOTENCY_TTL
            )
            if bound.run_id != run.id:  # a concurrent twin won the key
                self.store.runs.discard_parked(run.id)
                return self._replay(bound, digest, idempotency_key, wait, wait_timeout)
            self.store.runs.release_parked(run.id)
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

    @staticmethod
    def ad_hoc_request(spec: AdHoc, input: Any, trigger: Trigger, user: str) -> AgentRequest:
        return AgentRequest(
            environment=spec.environment,
            entrypoint=spec.entrypoint,
            input=input,
            trigger=trigger.kind,
            timeout=spec.timeout,
            snapshot=spec.snapshot,
            user=user,
            connections=spec.connections,
        )

    def request_for(self, run: Run, spec: AppSpec | None) -> AgentRequest:
        """What executing the recorded ``run`` asks of the executor: from its app version's
        ``spec``, or for an ad-hoc run (no app) from what it recorded at admission."""
        input, trigger = json.loads(run.input), Trigger(run.trigger)
        if run.app is not None and spec is not None:
            return self.request(run.app, spec, input, trigger, run.user)
        recorded = json.loads(run.options or "{}")
        ad_hoc = AdHoc(
            run.environment,
            run.entrypoint,
            timeout=recorded.get("timeout"),
            connections=tuple(recorded.get("connections", ())),
        )
        return self.ad_hoc_request(ad_hoc, input, trigger, run.user)

    def _replay(
        self, bound: KeyBinding, digest: str, key: str, wait: bool, wait_timeout: float | None
    ) -> Run:
        if bound.request_hash != digest:
            raise IdempotencyMismatch(f"idempotency key {key!r} was used with a different request")
        return self.wait(bound.run_id, wait_timeout) if wait else self.store.runs.get(bound.run_id)

    def wait(
        self,
        run_id: str,
        timeout: float | None = None,
        on_event: Callable[[RunEvent], None] | None = None,
    ) -> Run:
        """Block until the run ends (or ``timeout`` passes); returns its latest record.
        ``on_event`` is told every event of the run's log, in order, as it is read."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen = 0
        while True:
            run = self.store.runs.get(run_id)
            if on_event is not None:  # read after the status: a run's end and its last event
                for event in self.store.runs.events(run_id, after=seen):  # are one write
                    seen = event.seq
                    on_event(event)
            if RunStatus(run.status).terminal:
                return run
            if deadline is not None and time.monotonic() >= deadline:
                return run
            # Woken at once by a worker of this process; another process's: the next poll.
            with self.run_finished:
                self.run_finished.wait(0.25)

    def cancel(self, run_id: str) -> Run:
        """End a queued run now; flag a running one, which its worker stops within a second."""
        self.store.runs.get(run_id)  # RunNotFound for an unknown id
        run = self.finish(
            run_id,
            from_status=("queued",),
            status=str(RunStatus.CANCELLED),
            error_code="cancelled",
            error="cancelled before it started",
        )
        if run.status == RunStatus.RUNNING and self.store.runs.request_cancel(run_id):
            run = self.store.runs.get(run_id)
        return run

    def finish(
        self,
        run_id: str,
        *,
        lease_owner: str | None = None,
        lease_expires: datetime | None = None,
        from_status: tuple[str, ...] = ACTIVE,
        detail: dict[str, Any] | None = None,
        **fields: Any,
    ) -> Run:
        """End a run and announce it: the one way any run reaches a terminal state.

        The write is conditional (``Runs.finish``): only while the run is in ``from_status``
        and, when given, leased by ``lease_owner``; it records the run's ``run.finished``
        event (with ``detail``) in the same transaction. The path that wins bills the run and
        fires the completion hooks; a loser changes nothing. Returns the run's record.
        """
        fields.setdefault("finished_at", datetime.now(UTC))
        run = self.store.runs.get(run_id)
        self.ledger.bill(run.id, run.user, run.app)  # before it reads as ended: see wait()
        done = self.store.runs.finish(
            run_id,
            lease_owner=lease_owner,
            lease_expires=lease_expires,
            from_status=from_status,
            detail=detail,
            **fields,
        )
        if done is None:
            return self.store.runs.get(run_id)
        ended = done[0]
        self.executor.tokens.ended(ended)  # none of its tokens works any more, on any bridge
        # Again, for the bridge's last batch of usage (billing is idempotent per usage event).
        self.ledger.bill(ended.id, ended.user, ended.app)
        with self.run_finished:
            self.run_finished.notify_all()
        self.announce(ended)
        return ended

    def announce(self, run: Run) -> bool:
        """Fire the completion hooks for an ended run, once across every process: only the
        caller that marks it announced fires them. False if this process has no hooks (it
        leaves the run to a process that has) or another caller announced it first."""
        if not self.on_finished:
            return False
        if not self.store.runs.claim_announcement(run.id, datetime.now(UTC)):
            return False
        for hook in self.on_finished:
            try:
                hook(run)
            except Exception:  # one failing hook must not keep the others from running
                log.exception("run %s: a completion hook failed", run.id)
        return True

    def announce_pending(self, grace: timedelta = ANNOUNCE_GRACE) -> int:
        """Announce runs that ended in a process without hooks (a cancel from the CLI, a
        ``corral run``) more than ``grace`` ago. Returns how many this call announced."""
        if not self.on_finished:
            return 0
        pending = self.store.runs.unannounced(datetime.now(UTC) - grace)
        return sum(1 for run in pending if self.announce(run))

    # -- agent-to-agent calls: the bridge's ``AgentCalls`` ----------------------------------

    def callable_by_agents(self, app: str) -> bool:
        return self.apps.get(app)[1].callable_by_agents

    def admit_call(
        self, app: str, input: Any, *, caller: str, user: str, awaited: bool
    ) -> CalledRun:
        trigger = Trigger("agent", parent_run=caller, awaited=awaited)
        return called_run(self.execute_agent(app, input, trigger, user=user))

    def called(self, run_id: str) -> CalledRun:
        return called_run(self.store.runs.get(run_id))

    def _guard(self, app: str | None, parent: Run | None) -> int:
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
        active = self.store.runs.active(user, app)
        limit = spec.max_concurrent
        if spec.concurrency == "cancel_previous":
            for run in active:
                self.cancel(run.id)
        elif spec.concurrency in ("reject", "allow") and limit and len(active) >= limit:
            raise ConcurrencyLimit(
                f"app {app!r} allows {limit} run(s) at a time per user; {len(active)} active"
            )
        elif spec.concurrency == "reject" and not limit and active:
            raise ConcurrencyLimit(f"app {app!r} is already running for {user!r}")
        # enqueue: always admitted; workers start it when fewer than the limit are running


def called_run(run: Run) -> CalledRun:
    return CalledRun(run.id, RunStatus(run.status).terminal, run_json(run))


def _request_hash(app: str, input: Any) -> str:
    return hashlib.sha256(json.dumps([app, input], sort_keys=True).encode()).hexdigest()
