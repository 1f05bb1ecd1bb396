"""Running one agent: boot, make the runner current, run, record, fold in.

``Executor.run`` is the sandbox half of every agent run, whoever asked for it. For each
attempt it boots a fresh sandbox from the environment's snapshot with the bootstrap as its
first process, hot-swaps the current runner release in if the snapshot holds another one
(``corral.sandbox.hotswap``), sends the run spec, and records every event the sandbox sends.

Failures are sorted by whether a fresh sandbox could end differently:

* infrastructure (the sandbox died, a swap step failed, the sandbox did not boot in time):
  kill the sandbox, boot a fresh one, try again, up to ``max_attempts``;
* permanent (the release does not validate in this environment, no python3 in it, the
  agent's own error, a sandbox that breaks the event protocol, the deadline): the run ends
  with a clear error at once.

After a successful run in which the runner was swapped, the release is folded into the
environment as one new top layer, so the next run boots straight into it.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from corral.bridge import tokens
from corral.bridge.tokens import KeyRing, Verifier
from corral.config import Settings
from corral.envs.service import Environments, process_env
from corral.errors import CommandNotFound, DiskFull, InvalidInput, SandboxError
from corral.pipeline.leases import held, owner_name
from corral.pipeline.states import RunStatus
from corral.releases.service import ReleaseService
from corral.sandbox import hotswap
from corral.sandbox.hotswap import RunnerInvalid
from corral.sandbox.sandboxes import Sandboxes, SandboxRequest
from corral.sandbox.session import (
    AgentSession,
    ProtocolError,
    SessionEnded,
    SessionTimeout,
    agent_session,
)
from corral.snapshots.fsattr import Immutability
from corral.store import Release, Run, RunEvent, Store

BOOT_TIMEOUT_S = 20.0
SANDBOX_EVENTS = frozenset({"runner.started", "log", "progress", "metric", "result", "error"})
WORKDIR = "/home/user"


@dataclass(frozen=True)
class AgentRequest:
    environment: str
    entrypoint: str  # "agent.py:main"
    input: Any = None
    trigger: str = "cli"
    timeout: float | None = None  # seconds for the whole run; default settings.sandbox_timeout
    snapshot: str | None = None  # a digest from the history; default the head
    user: str = "local"
    app: str = ""
    session: str = ""
    connections: tuple[str, ...] = ()  # what the run's token may reach through the bridge


class Stopped(Exception):
    """The run was stopped from outside: cancelled, or its budget is spent."""

    def __init__(self, status: RunStatus, code: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.code, self.reason = status, code, reason


# Asked every 100 ms while an agent runs: None to go on, or why the run must stop now.
Stop = Callable[[], Stopped | None]


class TokenIssuer:
    """Mints a run's token once its sandbox's address is known; revokes it when the run ends."""

    def __init__(self, ring: KeyRing, verifier: Verifier | None = None) -> None:
        self.ring, self.verifier = ring, verifier

    def mint(self, run: Run, request: AgentRequest, address: str, lifetime: float) -> str:
        return tokens.mint(
            self.ring,
            user=request.user,
            app=request.app,
            session=request.session or run.id,
            run=run.id,
            connections=request.connections,
            address=address,
            lifetime=lifetime,
        )

    def revoke(self, run: Run) -> None:
        if self.verifier is not None:
            self.verifier.revoke_run(run.id)  # this process's bridge, at once; others poll


class Hooks(Protocol):
    """Test seam: called after every swap step, with the live session."""

    def on_step(self, attempt: int, step: str, session: AgentSession) -> None: ...


@dataclass
class _Outcome:
    status: RunStatus
    result: Any = None
    error_code: str | None = None
    error: str | None = None
    swapped: bool = False
    replaced: list[str] = field(default_factory=list)


class Executor:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        envs: Environments,
        releases: ReleaseService,
        sandboxes: Callable[[], Sandboxes],
        *,
        tokens: TokenIssuer | None = None,
        bridge: Callable[[], object] | None = None,
        attrs: Immutability | None = None,
        hooks: Hooks | None = None,
        max_attempts: int = 3,
    ) -> None:
        self.tokens = tokens or TokenIssuer(KeyRing())
        self._local = threading.local()  # per worker thread: the running run's stop check
        self.ensure_bridge = bridge
        self.settings = settings
        self.store = store
        self.envs = envs
        self.releases = releases
        self.sandboxes = sandboxes
        self.attrs = attrs or Immutability()
        self.hooks = hooks
        self.max_attempts = max_attempts

    def run(self, request: AgentRequest, on_event: Callable[[RunEvent], None] | None = None) -> Run:
        """Record a run and execute it here and now (``corral run``), holding its lease like a
        worker: if this process dies, the run is ended by whoever next finds the lease expired
        (``worker.recover_expired``) instead of reading ``running`` forever."""
        owner, lease = owner_name("run"), self.settings.run_lease
        run = self.prepare(request, lease_owner=owner,
                           lease_expires=datetime.now(UTC) + timedelta(seconds=lease))  # fmt: skip
        with held(self.store, run.id, owner, lease) as lost:

            def stop() -> Stopped | None:
                if lost.is_set():
                    return Stopped(RunStatus.FAILED, "lease_lost", "this process lost the run")
                return None

            return self.execute(run, request, on_event, stop=stop)

    def prepare(self, request: AgentRequest, status: RunStatus = RunStatus.RUNNING,
                **fields: Any) -> Run:  # fmt: skip
        """Check ``request`` and record its run; the pipeline records runs ``queued``."""
        env = self.envs.get(request.environment)
        digest = env.head
        if request.snapshot:
            digest = self.store.get_snapshot(env.name, request.snapshot).digest
        try:
            encoded_input = json.dumps(request.input)
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"the input is not JSON: {exc}") from exc
        now = datetime.now(UTC)
        return self.store.runs.create(
            Run(
                id=fields.pop("id", None) or f"run-{secrets.token_hex(8)}",
                environment=env.name,
                snapshot=digest,
                entrypoint=request.entrypoint,
                input=encoded_input,
                trigger=request.trigger,
                status=status,
                created_at=now,
                started_at=now if status is RunStatus.RUNNING else None,
                user=request.user,
                **fields,
            )
        )

    def execute(
        self,
        run: Run,
        request: AgentRequest,
        on_event: Callable[[RunEvent], None] | None = None,
        stop: Stop | None = None,
        bill: Callable[[Run], object] | None = None,
    ) -> Run:
        """Run a recorded run to its end: attempts, events, fold-in, usage, the final record."""
        env = self.envs.get(run.environment)
        digest = run.snapshot
        release = self.releases.current()
        run = self.store.runs.update(
            run.id,
            lease_owner=run.lease_owner,
            status=str(RunStatus.RUNNING),
            started_at=run.started_at or datetime.now(UTC),
            runner_version=release.version,
            runner_digest=release.digest,
        )

        def emit(kind: str, **data: Any) -> None:
            event = self.store.runs.append_event(
                run.id, datetime.now(UTC), kind, json.dumps(data, default=repr)
            )
            if on_event is not None:
                on_event(event)

        emit(
            "run.started",
            environment=env.name,
            snapshot=digest,
            trigger=run.trigger,
            runner=release.version,
        )
        if self.ensure_bridge is not None:
            self.ensure_bridge()  # the sandbox's only way out must be open before it boots
        started = time.monotonic()
        deadline = started + (request.timeout or self.settings.sandbox_timeout)
        try:
            self._local.stop = stop
            outcome, attempts = self._attempts(run, request, release, deadline, emit, on_event)
        finally:
            self.tokens.revoke(run)

        folded = None
        if outcome.status is RunStatus.SUCCEEDED and outcome.swapped and digest == env.head:
            folded = self._fold_in(env.name, digest, release, outcome.replaced, emit)
        self.store.bridge.add_usage(
            [
                {
                    "at": datetime.now(UTC),
                    "run": run.id,
                    "user": request.user,
                    "connection": None,
                    "kind": "sandbox_seconds",
                    "quantity": round(time.monotonic() - started, 3),
                }
            ]
        )
        if bill is not None:
            bill(run)  # before the run reads as finished: a waiter never sees it unbilled
        ended = self.store.runs.finish(
            run.id,
            str(outcome.status),
            datetime.now(UTC),
            lease_owner=run.lease_owner,  # fenced: only while this worker still holds the run
            detail={"attempts": attempts},
            result=None if outcome.result is None else json.dumps(outcome.result),
            error_code=outcome.error_code,
            error=outcome.error,
            swapped=outcome.swapped,
            attempts=attempts,
            folded_snapshot=folded,
        )
        if ended is None:  # another worker holds the run now, or has ended it
            return self.store.runs.get(run.id)
        if on_event is not None:
            on_event(ended[1])
        return ended[0]

    def _attempts(
        self,
        run: Run,
        request: AgentRequest,
        release: Release,
        deadline: float,
        emit: Callable[..., None],
        notify: Callable[[RunEvent], None] | None,
    ) -> tuple[_Outcome, int]:
        attempt = 0
        while True:
            attempt += 1
            try:
                outcome = self._attempt(run, request, release, attempt, deadline, emit, notify)
                return outcome, attempt
            except (RunnerInvalid, CommandNotFound, ProtocolError, DiskFull) as exc:
                # A fresh sandbox would meet the same interpreter, command, code or full disk.
                return _Outcome(RunStatus.FAILED, error_code=exc.code, error=exc.detail), attempt
            except SandboxError as exc:
                emit("attempt.failed", attempt=attempt, code=exc.code, detail=exc.detail)
                if time.monotonic() >= deadline:
                    return _Outcome(
                        RunStatus.TIMED_OUT,
                        error_code="timed_out",
                        error="the run's deadline passed",
                    ), attempt
                if attempt >= self.max_attempts:
                    return _Outcome(
                        RunStatus.FAILED,
                        error_code="sandbox_failed",
                        error=f"{attempt} sandboxes failed; the last: {exc.detail}",
                    ), attempt
            except OSError as exc:  # a swap step's file operation on the host (chattr, rename)
                emit("attempt.failed", attempt=attempt, code="swap_io", detail=str(exc))
                if attempt >= self.max_attempts:
                    return _Outcome(
                        RunStatus.FAILED, error_code="runner_swap_failed", error=str(exc)
                    ), attempt

    def _attempt(
        self,
        run: Run,
        request: AgentRequest,
        release: Release,
        attempt: int,
        deadline: float,
        emit: Callable[..., None],
        notify: Callable[[RunEvent], None] | None,
    ) -> _Outcome:
        image = self.envs.images.load(run.snapshot)
        sandboxes = self.sandboxes()
        boot = SandboxRequest(
            layers=tuple(self.envs.images.unpacked(image)),
            argv=(),
            env=process_env(image),
            label=run.environment,
        )
        with agent_session(sandboxes, boot) as session:
            emit(
                "sandbox.booted",
                attempt=attempt,
                sandbox=session.started.record.sandbox_id,
                address=session.started.address,
            )
            try:
                _, logs = session.expect(
                    ("boot.ready",), min(deadline, time.monotonic() + BOOT_TIMEOUT_S)
                )
            except SessionEnded:
                sandboxes.raise_start_failure(session.started, run.environment)
                raise
            self._forward(logs, attempt, emit)
            live, present = hotswap.installed(session.rootfs)
            swapped = live != release.short_id
            if swapped:
                emit("swap.started", attempt=attempt, replacing=live, release=release.short_id)

                def step(name: str, **details: Any) -> None:
                    emit(f"swap.{name}", attempt=attempt, **details)
                    if self.hooks is not None:
                        self.hooks.on_step(attempt, name, session)

                hotswap.swap(
                    session,
                    release,
                    self.releases.data(release),
                    self.releases.requires(release),
                    step,
                    self.attrs,
                )
            lifetime = max(1.0, deadline - time.monotonic()) + 30
            token = self.tokens.mint(run, request, session.started.address, lifetime)
            cursor = self._last_seq(run)
            session.send({"op": "run", "spec": self._spec(run, request, token, attempt)})
            try:
                final = self._follow(run, session, attempt, cursor, deadline, emit, notify)
            except Stopped as stopped:
                sandboxes.kill(session.started)
                emit("run.stopped", attempt=attempt, code=stopped.code, reason=stopped.reason)
                return _Outcome(
                    stopped.status, error_code=stopped.code, error=stopped.reason, swapped=swapped
                )
            except SessionTimeout:
                return _Outcome(
                    RunStatus.TIMED_OUT,
                    error_code="timed_out",
                    error="the run's deadline passed",
                    swapped=swapped,
                )
        if final["type"] == "result":
            return _Outcome(
                RunStatus.SUCCEEDED, result=final.get("output"), swapped=swapped, replaced=present
            )
        return _Outcome(
            RunStatus.FAILED,
            error_code=str(final.get("code", "agent_error")),
            error=str(final.get("message", "")),
            swapped=swapped,
        )

    def _follow(
        self,
        run: Run,
        session: AgentSession,
        attempt: int,
        cursor: int,
        deadline: float,
        emit: Callable[..., None],
        notify: Callable[[RunEvent], None] | None,
    ) -> dict[str, Any]:
        """Tail the run's event log (the runner writes it through the bridge) until this
        attempt's result or error, forwarding the sandbox's raw output meanwhile."""
        final: dict[str, Any] | None = None
        exited_at: float | None = None
        checked = 0.0
        while True:
            stop = getattr(self._local, "stop", None)
            if stop is not None and time.monotonic() - checked > 0.1:
                checked = time.monotonic()
                stopped = stop()
                if stopped is not None:
                    raise stopped
            for event in self.store.runs.events(run.id, after=cursor):
                cursor = event.seq
                data = json.loads(event.data)
                if notify is not None and event.kind in SANDBOX_EVENTS:
                    notify(event)
                if event.kind in ("result", "error") and data.get("attempt") == attempt:
                    final = {"type": event.kind, **data}
            if final is not None:
                return final
            self._drain_output(session, attempt, emit)
            now = time.monotonic()
            if session.started.process.poll() is not None:
                exited_at = exited_at or now
                if now - exited_at > 1.0:  # the bridge's last batch has had its time
                    raise SessionEnded("the sandbox ended without reporting a result")
            if now >= deadline:
                raise SessionTimeout("the run's deadline passed")
            time.sleep(0.01)

    def _drain_output(self, session: AgentSession, attempt: int, emit: Callable[..., None]) -> None:
        """What the sandbox wrote outside the runner (before it started, or if it crashed)."""
        while True:
            try:
                event = session.next(time.monotonic())
            except (SessionTimeout, SessionEnded):
                return
            if event.get("type") == "log":
                emit("sandbox.log", attempt=attempt, message=event.get("message", ""))

    def _last_seq(self, run: Run) -> int:
        events = self.store.runs.events(run.id)
        return events[-1].seq if events else 0

    @staticmethod
    def _forward(events: list[dict[str, Any]], attempt: int, emit: Callable[..., None]) -> None:
        for event in events:
            data = {k: v for k, v in event.items() if k not in ("type", "at", "attempt")}
            kind = str(event.get("type", ""))
            emit(kind if kind in SANDBOX_EVENTS else "sandbox.unknown", attempt=attempt, **data)

    def _spec(self, run: Run, request: AgentRequest, token: str, attempt: int) -> dict[str, Any]:
        net = self.settings.network
        return {
            "run_id": run.id,
            "environment": run.environment,
            "entrypoint": run.entrypoint,
            "input": json.loads(run.input),
            "workdir": WORKDIR,
            "bridge": f"http://{net.gateway}:{net.bridge_port}",
            "token": token,
            "attempt": attempt,
            "user": request.user,
        }

    def _fold_in(
        self,
        name: str,
        parent: str,
        release: Release,
        replaced: list[str],
        emit: Callable[..., None],
    ) -> str | None:
        def build(upper: Path) -> None:
            self.releases.fold_in_tree(release, replaced, upper)

        message = f"runner {release.version} ({release.short_id}) folded in"
        try:
            snapshot = self.envs.commit_platform_layer(name, parent, build, message)
        except DiskFull as exc:  # the run succeeded; the next one swaps again and folds in
            emit("fold_in.skipped", reason=exc.detail)
            return None
        if snapshot is None:
            emit("fold_in.skipped", reason="the environment's head moved during the run")
            return None
        emit("fold_in.done", snapshot=snapshot.digest, seq=snapshot.seq)
        return snapshot.digest
