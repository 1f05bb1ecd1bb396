"""Workers: lease queued runs from the store, execute them, bill them, announce them.

Any number of workers, in any number of processes on any number of hosts sharing the store,
take runs from one queue. A worker holds a run by a lease it renews every third of the lease
time; if it dies, the lease runs out and another worker puts the run back in the queue, after
a backoff long enough that a worker which merely stalled has noticed the loss of its lease and
killed its sandbox. A run is therefore never executed twice at the same time, and a worker's
death costs the run one more delivery, up to ``MAX_DELIVERIES``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from corral.observability.logs import run_context
from corral.pipeline.executor import Stopped
from corral.pipeline.leases import held, owner_name
from corral.pipeline.service import Pipeline, Trigger
from corral.pipeline.states import RunStatus
from corral.sandbox.sandboxes import Sandboxes
from corral.store import Run, Store

log = logging.getLogger("corral.worker")
MAX_DELIVERIES = 5

# Called with every finished run: webhooks, metrics, traces hang off this.
OnFinished = Callable[[Run], None]


class Worker:
    def __init__(
        self,
        pipeline: Pipeline,
        sandboxes: Callable[[], Sandboxes],
        *,
        name: str | None = None,
        lease: float = 10.0,
        poll: float = 0.05,
        on_finished: list[OnFinished] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.store = pipeline.store
        self.sandboxes = sandboxes
        self.name = name or owner_name("worker")
        self.lease = lease
        self.poll = poll
        self.on_finished = on_finished or []
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Worker:
        self._thread = threading.Thread(
            target=self.run_forever, name=f"worker-{self.name}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        with self.pipeline.work_available:
            self.pipeline.work_available.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def run_forever(self) -> None:
        while not self._stopping.is_set():
            try:
                if not self.run_once():
                    with self.pipeline.work_available:
                        self.pipeline.work_available.wait(self.poll)
            except Exception:  # a supervisor: record, pause, carry on
                log.exception("worker %s: an iteration failed", self.name)
                time.sleep(self.poll)

    def run_once(self) -> bool:
        """Requeue runs whose worker died, then take and execute one run. True if it did."""
        self.requeue_expired()
        run = self.store.pipeline.claim(self.name, self.lease)
        if run is None:
            return False
        self.execute(run)
        return True

    def requeue_expired(self) -> None:
        recover_expired(self.store, self.sandboxes, self.lease)

    def resume_from_log(self, run: Run) -> bool:
        """A redelivered run whose agent already reported its outcome (its worker died after
        the runner's last event reached the log) is finished from the log, not run again."""
        final = next(
            (e for e in reversed(self.store.runs.events(run.id)) if e.kind in ("result", "error")),
            None,
        )
        if final is None:
            return False
        data = json.loads(final.data)
        ok = final.kind == "result"
        status = str(RunStatus.SUCCEEDED if ok else RunStatus.FAILED)
        self.store.runs.append_event(
            run.id,
            datetime.now(UTC),
            "run.resumed",
            json.dumps({"worker": self.name, "from_seq": final.seq, "status": status}),
        )
        ended = self.store.runs.finish(
            run.id,
            status,
            datetime.now(UTC),
            lease_owner=self.name,
            detail={"attempts": data.get("attempt"), "resumed": True},
            result=json.dumps(data.get("output")) if ok else None,
            error_code=None if ok else str(data.get("code", "agent_error")),
            error=None if ok else str(data.get("message", "")),
        )
        self.pipeline.executor.tokens.revoke(run)
        if ended is not None:
            self._finish(ended[0])
        return True

    def execute(self, run: Run) -> None:
        assert run.app is not None and run.app_version is not None
        _, spec = self.pipeline.apps.get(run.app, run.app_version)
        limited = spec.concurrency == "enqueue" and spec.max_concurrent
        if limited and self.store.pipeline.running_count(run.user, run.app) > spec.max_concurrent:
            self.store.pipeline.release(run.id, self.name, delay=0.2)
            return
        if run.deliveries > 1:
            self.sandboxes().reap()  # a dead worker's sandbox of this run must be gone first
            if self.resume_from_log(run):
                return
        request = self.pipeline.request(
            run.app, spec, json.loads(run.input), Trigger(run.trigger), run.user
        )
        checked = [0.0]

        def stop() -> Stopped | None:
            if lost.is_set():  # set by `held` (below) once the lease is no longer this worker's
                return Stopped(RunStatus.FAILED, "lease_lost", "this worker lost the run's lease")
            if time.monotonic() - checked[0] < 0.5:
                return None
            checked[0] = time.monotonic()
            current = self.store.runs.get(run.id)
            if current.cancel_requested:
                return Stopped(RunStatus.CANCELLED, "cancelled", "the run was cancelled")
            if spec.budget_per_run is not None:
                cost = self.pipeline.ledger.cost(run.id)
                if cost >= spec.budget_per_run:
                    return Stopped(
                        RunStatus.FAILED,
                        "budget_exhausted",
                        f"the run spent {cost:.4f} of its {spec.budget_per_run} "
                        "credits; its token was revoked and its sandbox torn down",
                    )
            return None

        try:
            with run_context(run.id), held(self.store, run.id, self.name, self.lease) as lost:
                finished = self.pipeline.executor.execute(
                    run,
                    request,
                    stop=stop,
                    bill=lambda r: self.pipeline.ledger.bill(r.id, r.user, r.app),
                )
        except Exception:
            log.exception("run %s failed in worker %s", run.id, self.name)
            finished = self.store.runs.get(run.id)
        if finished.lease_owner != self.name or not RunStatus(finished.status).terminal:
            return  # another worker owns it now
        self._finish(finished)

    def _finish(self, finished: Run) -> None:
        # Billed once before it finished; again now for the bridge's last batch (idempotent).
        self.pipeline.ledger.bill(finished.id, finished.user, finished.app)
        with self.pipeline.run_finished:
            self.pipeline.run_finished.notify_all()
        for hook in self.on_finished:
            try:
                hook(finished)
            except Exception:  # one failing hook must not keep the others from running
                log.exception("run %s: a completion hook failed", finished.id)


def recover_expired(store: Store, sandboxes: Callable[[], Sandboxes], lease: float) -> None:
    """Runs whose owner stopped renewing its lease (it died, or hangs): reap the dead owners'
    sandboxes on this host, then put each run back in the queue, or end it if nobody can run
    it again: an app run delivered ``MAX_DELIVERIES`` times, or a ``corral run`` (its caller,
    a terminal, is gone with it). ``lease`` is the caller's own, for the requeue's backoff."""
    expired = store.pipeline.expired()
    if expired:
        sandboxes().reap()  # the dead owners' sandboxes on this host die first
    for run in expired:
        if run.app is None or run.deliveries >= MAX_DELIVERIES:
            why = (
                f"{run.deliveries} workers lost this run"
                if run.app is not None
                else f"the `corral run` process running it ({run.lease_owner}) died"
            )
            store.runs.finish(
                run.id,
                str(RunStatus.FAILED),
                datetime.now(UTC),
                lease_owner=run.lease_owner,
                lease_expires=run.lease_expires,  # not if the owner has just renewed it
                detail={"attempts": run.attempts},
                error_code="worker_lost",
                error=why,
            )
            continue
        # Long enough for a stalled (not dead) owner to notice at its next heartbeat.
        backoff = lease / 3 + 1.0 + min(2.0**run.deliveries, 30.0)
        if store.pipeline.requeue(run, backoff):
            log.warning("run %s: worker %s lost it; requeued", run.id, run.lease_owner)
