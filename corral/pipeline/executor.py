"""Running one agent: boot, make the runner current, run, record, fold in.

``Executor.execute`` is the sandbox half of every agent run, whoever asked for it (a worker
leases the run first; ``corral run`` too, through the pipeline like every trigger). For each
attempt it boots a fresh sandbox from the environment's snapshot with the bootstrap as its
first process, hot-swaps the current runner release in if the snapshot holds another one
(``corral.sandbox.hotswap``), sends the run spec, and records every event the sandbox sends.

Failures are sorted by whether a fresh sandbox could end differently:

* infrastructure (the sandbox died, a swap step failed, the sandbox did not boot in time):
  kill the sandbox, boot a fresh one, try again, up to ``max_attempts``;
* permanent (the release does not validate in this environment, no python3 in it, the
  agent's own error, a sandbox that breaks the event protocol, a result or event over its
  limit in ``corral.limits``, events the bridge refused, the deadline): the run ends with a
  clear error at once. A sandbox that ends without reporting a result is an infrastructure
  failure only if the bridge refused none of its events: one it refused (a 4xx, say an
  oversized batch) would be refused from a fresh sandbox too.

After a successful run in which the runner was swapped, the release is folded into the
environment as one new top layer, so the next run boots straight into it.

The database may blink while a run is under way (a restart, a failover). Every store call on
a run's path is made ``patiently`` (``corral.store.engine``): the run waits the outage out, up
to ``engine.OUTAGE_BUDGET_S``, and goes on. A longer outage ends the execution with
``StoreUnavailable`` and leaves the run to its lease: another delivery picks it up. So nothing
an interrupted execution does may outlast it: each attempt's token is revoked when the attempt
ends, and the run's tokens as a whole only once the run's final status is stored.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from corral.bridge.tokens import SigningKeyRing, TokenIssuer
from corral.config import Settings
from corral.envs.service import Environments, process_env
from corral.errors import (
    CommandNotFound,
    DiskFull,
    InvalidInput,
    ProtocolError,
    RunnerInvalid,
    SandboxError,
    SessionEnded,
    SessionTimeout,
    StoreUnavailable,
)
from corral.limits import RUNNER_LIMITS
from corral.releases.service import ReleaseService
from corral.sandbox import hotswap
from corral.sandbox.runtime import Runtime, Sandbox, SandboxRequest
from corral.snapshots.fsattr import Immutability
from corral.states import RunStatus
from corral.store import Release, Run, RunEvent, Store, engine
from corral.store.engine import patiently

BOOT_TIMEOUT_S = 20.0
# After the sandbox exits, how long its last events (in flight through the bridge) have to reach
# the log; counted from the end of any database outage, which holds them up in the bridge.
EXIT_GRACE_S = 1.0
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


class Finish(Protocol):
    """Writes a run's end (``Pipeline.finish`` for the pipeline's runs): the terminal status
    and outcome ``fields``, fenced on ``lease_owner``; returns the run's record."""

    def __call__(self, run_id: str, *, lease_owner: str | None, **fields: Any) -> Run: ...


class Hooks(Protocol):
    """Test seam: called after every swap step, with the live sandbox."""

    def on_step(self, attempt: int, step: str, sandbox: Sandbox) -> None: ...


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
        runtime: Callable[[], Runtime],
        *,
        tokens: TokenIssuer | None = None,
        bridge: Callable[[], object] | None = None,
        attrs: Immutability | None = None,
        hooks: Hooks | None = None,
        max_attempts: int = 3,
    ) -> None:
        self.tokens = tokens or TokenIssuer(SigningKeyRing())
        self._local = threading.local()  # per worker thread: the running run's stop check
        self.ensure_bridge = bridge
        self.settings = settings
        self.store = store
        self.envs = envs
        self.releases = releases
        self.runtime = runtime  # the sandbox runtime, its host prepared on first use
        self.attrs = attrs  # None: the runtime's own (a test hands in a failing one)
        self.hooks = hooks
        self.max_attempts = max_attempts

    def prepare(
        self, request: AgentRequest, status: RunStatus = RunStatus.QUEUED, **fields: Any
    ) -> Run:
        """Check ``request`` and record its run (``queued``: admission calls this)."""
        env = self.envs.get(request.environment)
        digest = env.head
        if request.snapshot:
            digest = self.store.environments.snapshot(env.name, request.snapshot).digest
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
        *,
        stop: Stop | None = None,
        finish: Finish,
    ) -> Run:
        """Run a recorded run to its end: attempts, events, fold-in, usage, the final record
        (written by ``finish``: ``Pipeline.finish``).

        ``StoreUnavailable`` leaves only after the database stayed out of reach longer than
        ``engine.OUTAGE_BUDGET_S``; the run is then still ``running`` under its lease."""
        env = patiently(lambda: self.envs.get(run.environment), f"run {run.id}")
        digest = run.snapshot
        release = patiently(self.releases.current, f"run {run.id}")
        started_at = run.started_at or datetime.now(UTC)
        run = patiently(
            lambda: self.store.runs.record_start(
                run.id,
                lease_owner=run.lease_owner,
                started_at=started_at,
                runner_version=release.version,
                runner_digest=release.digest,
            ),
            f"run {run.id}",
        )

        self._local.stop = stop

        def emit(kind: str, **data: Any) -> None:
            encoded = json.dumps(data, default=repr)
            event = patiently(
                lambda: self.store.runs.append_event(run.id, datetime.now(UTC), kind, encoded),
                f"run {run.id}: recording {kind}",
                check=self._interrupt,
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
        outcome, attempts = self._attempts(run, request, release, deadline, emit, on_event)

        folded = None
        if outcome.status is RunStatus.SUCCEEDED and outcome.swapped and digest == env.head:
            try:
                folded = self._fold_in(env.name, digest, release, outcome.replaced, emit)
            except StoreUnavailable as exc:  # an optimisation: a later run folds it in
                emit("fold_in.skipped", reason=exc.detail)
        usage = {
            "at": datetime.now(UTC),
            "run": run.id,
            "user": request.user,
            "connection": None,
            "kind": "sandbox_seconds",
            "quantity": round(time.monotonic() - started, 3),
        }
        patiently(
            lambda: self.store.usage.add_events([usage]),
            f"run {run.id}: usage",
            check=self._interrupt,
        )
        finished_at = datetime.now(UTC)
        finished = patiently(
            lambda: finish(
                run.id,
                lease_owner=run.lease_owner,  # fenced: only while this worker still holds it
                detail={"attempts": attempts},  # for its run.finished event
                status=str(outcome.status),
                result=None if outcome.result is None else json.dumps(outcome.result),
                error_code=outcome.error_code,
                error=outcome.error,
                swapped=outcome.swapped,
                attempts=attempts,
                folded_snapshot=folded,
                finished_at=finished_at,
            ),
            f"run {run.id}: its final record",
            check=self._interrupt,
        )
        if RunStatus(finished.status).terminal:
            self.tokens.ended(finished)
            if on_event is not None:
                last = self.store.runs.events(run.id, after=self._last_seq(run) - 1)
                for event in last:
                    if event.kind == "run.finished":
                        on_event(event)
        return finished

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
        image = self.envs.images.load(run.snapshot)  # the layout on disk: no database
        runtime = self.runtime()
        boot = SandboxRequest(
            layers=tuple(self.envs.images.unpacked(image)),
            env=process_env(image),
            label=run.environment,
        )
        with runtime.start(boot) as sandbox:
            emit("sandbox.booted", attempt=attempt, sandbox=sandbox.id, address=sandbox.address)
            try:
                _, logs = sandbox.expect(
                    ("boot.ready",), min(deadline, time.monotonic() + BOOT_TIMEOUT_S)
                )
            except SessionEnded:
                sandbox.wait(timeout=30)  # raises if the runtime never started the bootstrap
                raise
            self._forward(logs, attempt, emit)
            live, present = hotswap.installed(sandbox.rootfs)
            swapped = live != release.short_id
            if swapped:
                emit("swap.started", attempt=attempt, replacing=live, release=release.short_id)

                def step(name: str, **details: Any) -> None:
                    emit(f"swap.{name}", attempt=attempt, **details)
                    if self.hooks is not None:
                        self.hooks.on_step(attempt, name, sandbox)

                hotswap.swap(
                    sandbox,
                    release,
                    self.releases.data(release),
                    self.releases.requires(release),
                    step,
                    self.attrs or runtime.immutability,
                )
            lifetime = max(1.0, deadline - time.monotonic()) + 30
            address = sandbox.address
            issued = patiently(  # a new signing key is stored before it signs
                lambda: self.tokens.mint(
                    run,
                    connections=request.connections,
                    address=address,
                    lifetime=lifetime,
                    attempt=attempt,
                    session=request.session,
                ),
                f"run {run.id}: its token",
                check=self._interrupt,
            )
            try:
                cursor = self._last_seq(run)
                sent = datetime.now(UTC)
                spec = self._spec(run, request, sandbox, issued.token, attempt)
                sandbox.send({"op": "run", "spec": spec})
                final = self._follow(run, sandbox, attempt, cursor, sent, deadline, emit, notify)
            except Stopped as stopped:
                sandbox.kill()
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
            finally:
                self.tokens.revoke(issued)  # however the attempt ended, its token is done
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
        sandbox: Sandbox,
        attempt: int,
        cursor: int,
        sent: datetime,
        deadline: float,
        emit: Callable[..., None],
        notify: Callable[[RunEvent], None] | None,
    ) -> dict[str, Any]:
        """Tail the run's event log (the runner writes it through the bridge) until this
        attempt's result or error (the first: an error the bridge put in place of an
        oversized event outranks anything after it), forwarding the sandbox's raw output."""
        final: dict[str, Any] | None = None
        exited_at: float | None = None
        unreachable_since: float | None = None  # the store's, while it is out of reach
        checked = 0.0
        while True:
            stop = getattr(self._local, "stop", None)
            if stop is not None and time.monotonic() - checked > 0.1:
                checked = time.monotonic()
                stopped = stop()
                if stopped is not None:
                    raise stopped
            try:
                events = self.store.runs.events(run.id, after=cursor)
            except StoreUnavailable:
                # The sandbox runs on; the bridge keeps its events until the store is back.
                now = time.monotonic()
                unreachable_since = unreachable_since or now
                if now - unreachable_since > engine.OUTAGE_BUDGET_S:
                    raise
                events = []
                if exited_at is not None:
                    exited_at = now  # its last events are held up: the grace starts later
            else:
                unreachable_since = None
            for event in events:
                cursor = event.seq
                data = json.loads(event.data)
                if notify is not None and event.kind in SANDBOX_EVENTS:
                    notify(event)
                if (
                    final is None
                    and event.kind in ("result", "error")
                    and data.get("attempt") == attempt
                ):
                    final = {"type": event.kind, **data}
            if final is not None:
                return final
            self._drain_output(sandbox, attempt, emit)
            now = time.monotonic()
            if sandbox.exited():
                exited_at = exited_at or now
                if now - exited_at > EXIT_GRACE_S:  # the bridge's last batch has had its time
                    refused = self._refused(run, sent)
                    if refused is not None:
                        return refused
                    raise SessionEnded("the sandbox ended without reporting a result")
            if now >= deadline:
                raise SessionTimeout("the run's deadline passed")
            time.sleep(0.01 if unreachable_since is None else 0.1)

    def _drain_output(self, sandbox: Sandbox, attempt: int, emit: Callable[..., None]) -> None:
        """What the sandbox wrote outside the runner (before it started, or if it crashed)."""
        while True:
            try:
                event = sandbox.next(time.monotonic())
            except (SessionTimeout, SessionEnded):
                return
            if event.get("type") == "log":
                emit("sandbox.log", attempt=attempt, message=event.get("message", ""))

    def _last_seq(self, run: Run) -> int:
        events = patiently(
            lambda: self.store.runs.events(run.id), f"run {run.id}", check=self._interrupt
        )
        return events[-1].seq if events else 0

    def _refused(self, run: Run, since: datetime) -> dict[str, Any] | None:
        """An error for the attempt if the bridge refused the events it sent since ``since``:
        the same events from a fresh sandbox would be refused the same way."""
        for call in self.store.usage.calls(run.id):
            status, path = call.status, call.path
            if path == "/_corral/events" and 400 <= status < 500 and call.at >= since:
                return {
                    "type": "error",
                    "code": "events_refused",
                    "message": "the bridge refused the sandbox's events "
                    f"({status} {call.error or ''}) and it ended without a result",
                }
        return None

    def _interrupt(self) -> None:
        """While a store call waits out an outage: the run's stop check, for what it raises
        (a worker whose lease ran out, or that is shutting down, must not wait on)."""
        stop = getattr(self._local, "stop", None)
        if stop is not None:
            stop()

    @staticmethod
    def _forward(events: list[dict[str, Any]], attempt: int, emit: Callable[..., None]) -> None:
        for event in events:
            data = {k: v for k, v in event.items() if k not in ("type", "at", "attempt")}
            kind = str(event.get("type", ""))
            emit(kind if kind in SANDBOX_EVENTS else "sandbox.unknown", attempt=attempt, **data)

    def _spec(
        self, run: Run, request: AgentRequest, sandbox: Sandbox, token: str, attempt: int
    ) -> dict[str, Any]:
        net = self.settings.network
        return {
            "run_id": run.id,
            "environment": run.environment,
            "entrypoint": run.entrypoint,
            "input": json.loads(run.input),
            "workdir": sandbox.inside(WORKDIR),
            "bridge": f"http://{net.gateway}:{net.bridge_port}",
            "token": token,
            "attempt": attempt,
            "user": request.user,
            "limits": dict(RUNNER_LIMITS),
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
