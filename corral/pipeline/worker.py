"""Workers: lease queued runs from the store, execute them, bill them, announce them.

Any number of workers, in any number of processes on any number of hosts sharing the store,
take runs from one queue. A worker holds a run by a lease it renews every third of the lease
time; if it dies, the lease runs out and another worker puts the run back in the queue, after
a backoff long enough that a worker which merely stalled has noticed the loss of its lease and
killed its sandbox. A run is therefore never executed twice at the same time, and a worker's
death costs the run one more delivery, up to ``MAX_DELIVERIES``.

A waiting caller lends its capacity. A run blocked in ``sdk.call_agent(..., wait=True)``
holds its worker while its callee sits in the queue; with fewer workers than the call chain
is deep, nobody would be left to run the callee. So while a worker executes a run, it also
claims that run's *awaited* callees (``claim(awaited_by=...)``), one at a time, and executes
them itself; each callee lends to its own callees the same way, so any chain completes on a
single worker. Each lent run is an ordinary lease (heartbeats, takeover, resume from the log);
the worker takes nothing new from the queue until what it lent has ended.

Every run ends through ``Pipeline.finish`` (see ``service.py``), which fires the completion
hooks once; workers also announce runs that another process ended without hooks.
"""

from __future__ import annotations

import json
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from corral.observability.logs import run_context
from corral.pipeline.executor import Stopped
from corral.pipeline.service import Pipeline, Trigger
from corral.pipeline.states import RunStatus
from corral.sandbox.sandboxes import Sandboxes
from corral.store import Run

log = logging.getLogger("corral.worker")
MAX_DELIVERIES = 5
SWEEP_EVERY = 1.0  # seconds between a worker's sweeps for runs ended without hooks
LEND_POLL = 0.25  # seconds between looks for the awaited callees of a run being executed


class Worker:
    def __init__(
        self,
        pipeline: Pipeline,
        sandboxes: Callable[[], Sandboxes],
        *,
        name: str | None = None,
        lease: float = 10.0,
        poll: float = 0.05,
    ) -> None:
        self.pipeline = pipeline
        self.store = pipeline.store
        self.sandboxes = sandboxes
        self.name = name or f"{socket.gethostname()}-{secrets.token_hex(4)}"
        self.lease = lease
        self.poll = poll
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._swept = 0.0

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
        if time.monotonic() - self._swept >= SWEEP_EVERY:
            self._swept = time.monotonic()
            self.pipeline.announce_pending()
        run = self.store.pipeline.claim(self.name, self.lease)
        if run is None:
            return False
        self.execute(run)
        return True

    def requeue_expired(self) -> None:
        expired = self.store.pipeline.expired()
        if expired:
            self.sandboxes().reap()  # the dead workers' sandboxes on this host die first
        for run in expired:
            if run.deliveries >= MAX_DELIVERIES:
                self.pipeline.finish(  # only while the dead worker's lease is still the one
                    run.id,
                    lease_owner=run.lease_owner,
                    lease_expires=run.lease_expires,
                    from_status=(str(RunStatus.RUNNING),),
                    status=str(RunStatus.FAILED),
                    error_code="worker_lost",
                    error=f"{run.deliveries} workers lost this run",
                )
                continue
            # Long enough for a stalled (not dead) owner to notice at its next heartbeat.
            backoff = self.lease / 3 + 1.0 + min(2.0**run.deliveries, 30.0)
            if self.store.pipeline.requeue(run, backoff):
                log.warning("run %s: worker %s lost it; requeued", run.id, run.lease_owner)

    def resume_from_log(self, run: Run) -> bool:
        """A redelivered run whose agent already reported its outcome (its worker died after
        the runner's last event reached the log) is finished from the log, not run again."""
        finals = [e for e in self.store.runs.events(run.id) if e.kind in ("result", "error")]
        if not finals:
            return False
        # The last attempt's first outcome, as the executor reads it: an error the bridge put
        # in place of an oversized event outranks a result after it.
        last = json.loads(finals[-1].data).get("attempt")
        final = next(e for e in finals if json.loads(e.data).get("attempt") == last)
        data = json.loads(final.data)
        ok = final.kind == "result"
        status = RunStatus.SUCCEEDED if ok else RunStatus.FAILED
        self.store.runs.append_event(
            run.id,
            datetime.now(UTC),
            "run.resumed",
            json.dumps({"worker": self.name, "from_seq": final.seq, "status": str(status)}),
        )
        self.pipeline.executor.tokens.revoke(run)
        self.pipeline.finish(
            run.id,
            lease_owner=self.name,
            status=str(status),
            result=json.dumps(data.get("output")) if ok else None,
            error_code=None if ok else str(data.get("code", "agent_error")),
            error=None if ok else str(data.get("message", "")),
        )
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
        over = self.pipeline.budgets.overspent(run)
        if over is not None:  # its tree spent its budget while it queued: never boot it
            self.pipeline.finish(
                run.id,
                lease_owner=self.name,
                status=str(RunStatus.FAILED),
                error_code="budget_exhausted",
                error=over.reason("it was not started"),
            )
            return
        request = self.pipeline.request(
            run.app, spec, json.loads(run.input), Trigger(run.trigger), run.user
        )
        lost = threading.Event()
        beating = threading.Event()

        def heartbeat() -> None:
            while not beating.wait(self.lease / 3):
                if not self.store.pipeline.heartbeat(run.id, self.name, self.lease):
                    lost.set()
                    return

        def lend() -> None:
            # While this run executes, its awaited callees run here, one at a time.
            while not beating.wait(LEND_POLL):
                try:
                    callee = self.store.pipeline.claim(self.name, self.lease, awaited_by=run.id)
                    if callee is not None:
                        self.execute(callee)
                except Exception:  # a supervisor: record, carry on
                    log.exception("run %s: lending to a callee failed", run.id)

        pulse = threading.Thread(target=heartbeat, daemon=True)
        pulse.start()
        lender = threading.Thread(target=lend, name=f"lender-{run.id}", daemon=True)
        lender.start()
        checked = [0.0]

        def stop() -> Stopped | None:
            if lost.is_set():
                return Stopped(RunStatus.FAILED, "lease_lost", "this worker lost the run's lease")
            if time.monotonic() - checked[0] < 0.5:
                return None
            checked[0] = time.monotonic()
            current = self.store.runs.get(run.id)
            if current.cancel_requested:
                return Stopped(RunStatus.CANCELLED, "cancelled", "the run was cancelled")
            # Its own cost and its callees', against its budget and every caller's above it.
            over = self.pipeline.budgets.overspent(current)
            if over is not None:
                return Stopped(RunStatus.FAILED, "budget_exhausted", over.reason())
            return None

        try:
            with run_context(run.id):
                self.pipeline.executor.execute(run, request, stop=stop,
                                               finish=self.pipeline.finish)  # fmt: skip
        except Exception:
            log.exception("run %s failed in worker %s", run.id, self.name)
        finally:
            beating.set()
            pulse.join(timeout=5)
            lender.join()  # a callee it lent to runs to its end before this worker moves on
