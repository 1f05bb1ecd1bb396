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

Every run ends through ``Pipeline.finish`` (see ``service.py``), which bills it and fires the
completion hooks once; workers also announce runs that another process ended without hooks.

A worker told to stop (``stop``, ``Corral.stop_workers``; ``corral worker`` and ``corral serve``
on SIGTERM or SIGINT) drains: it takes no more runs, lets the run in hand finish for a grace
period, then hands it back to the queue (its sandbox torn down, its lease released at once so
another worker takes it without waiting for the lease to run out).

A worker announces itself in the store while it runs (``workers``: renewed every
``SEEN_EVERY_S``, deleted when it stops), so a caller about to wait for a run can tell that
no worker is alive to execute it (``live_workers``).

A database outage is not a lost lease: while the store is unavailable a worker keeps its run
going, retries its heartbeat every half second and its other store calls ``patiently``. It
stops the run when the store answers a heartbeat with "not yours" (another worker took it
over), or when its lease has run out by its own clock without a renewal: past that, another
worker that *can* reach the store (this one may be cut off from it alone) is free to requeue
the run, and the takeover backoff gives this worker the time to tear its sandbox down first.
Such a run is handed back (``hand_back``, once the store answers), not failed.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from corral.errors import StoreUnavailable
from corral.observability.logs import run_context
from corral.pipeline.apps import AppSpec
from corral.pipeline.executor import Stopped
from corral.pipeline.leases import Lease, held, owner_name
from corral.pipeline.service import Pipeline
from corral.sandbox.runtime import Runtime
from corral.states import RunStatus
from corral.store import Run, RunEvent, Store
from corral.store.engine import patiently

log = logging.getLogger("corral.worker")
MAX_DELIVERIES = 5
STOP_GRACE_S = 60.0  # how long ``stop`` lets a run in hand finish before handing it back
SEEN_EVERY_S = 2.0  # how often a worker renews its row in ``workers``
ALIVE_WITHIN_S = 15.0  # a worker unseen for longer is taken for dead
SWEEP_EVERY = 1.0  # seconds between a worker's sweeps for runs ended without hooks
LEND_POLL = 0.25  # seconds between looks for the awaited callees of a run being executed


def live_workers(store: Store) -> list[str]:
    """Names of the workers alive now, in any process on any host sharing ``store``."""
    return store.workers.live(ALIVE_WITHIN_S)


class HandedBack(Exception):
    """Raised into a run's execution when its worker gives it back: it is shutting down past
    its grace period, or its lease ran out while the store was out of reach."""

    def __init__(self, run: str, reason: str) -> None:
        super().__init__(f"run {run}: {reason}")
        self.reason = reason


class Worker:
    def __init__(
        self,
        pipeline: Pipeline,
        runtime: Callable[[], Runtime],
        *,
        name: str | None = None,
        lease: float = 10.0,
        poll: float = 0.05,
    ) -> None:
        self.pipeline = pipeline
        self.store = pipeline.store
        self.runtime = runtime  # the sandbox runtime, its host prepared on first use
        self.name = name or owner_name("worker")
        self.lease = lease
        self.poll = poll
        self._swept = 0.0
        self._stopping = threading.Event()  # take no more runs
        self._abandon = threading.Event()  # hand the run in hand back now
        self._thread: threading.Thread | None = None
        self._presence: threading.Thread | None = None
        self._gone = threading.Event()

    def start(self) -> Worker:
        started = datetime.now(UTC)
        self._seen(started)  # a started worker is visible at once, not one renewal later
        self._thread = threading.Thread(
            target=self.run_forever, name=f"worker-{self.name}", daemon=True
        )
        self._thread.start()
        self._presence = threading.Thread(
            target=self._announce,
            args=(started,),
            name=f"worker-{self.name}-presence",
            daemon=True,
        )
        self._presence.start()
        return self

    def _seen(self, started: datetime) -> None:
        try:
            self.store.workers.seen(self.name, socket.gethostname(), os.getpid(), started)
        except Exception:  # a supervisor: an outage only makes it look dead for a while
            log.debug("worker %s: could not announce itself", self.name, exc_info=True)

    def _announce(self, started: datetime) -> None:
        """Renew this worker's row in ``workers`` until it stops, then delete it."""
        while not self._gone.wait(SEEN_EVERY_S):
            self._seen(started)
        try:
            self.store.workers.gone(self.name)
        except Exception:  # it ages out instead
            log.debug("worker %s: could not sign off", self.name, exc_info=True)

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """Take no more runs; give the run in hand ``grace`` seconds to end, then hand it back."""
        self.drain()
        self.join(time.monotonic() + grace)

    def drain(self) -> None:
        """Take no more runs (the run in hand goes on)."""
        self._stopping.set()
        with self.pipeline.work_available:
            self.pipeline.work_available.notify_all()

    def join(self, deadline: float) -> None:
        """Wait for the run in hand until ``deadline`` (monotonic); then hand it back to the
        queue and wait for its sandbox to be torn down. Call ``drain`` first."""
        if self._thread is None:
            return
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            self._abandon.set()
            # A sandbox still booting (at most the boot timeout) hands back once it has booted.
            self._thread.join(timeout=60)
        self._gone.set()
        if self._presence is not None:
            self._presence.join(timeout=10)

    def run_forever(self) -> None:
        outage = 0.0  # backoff while the store is unavailable
        while not self._stopping.is_set():
            try:
                if not self.run_once():
                    with self.pipeline.work_available:
                        self.pipeline.work_available.wait(self.poll)
                outage = 0.0
            except StoreUnavailable as exc:  # no claim is lost: try again once it is back
                if not outage:
                    log.warning("worker %s: %s; waiting for it", self.name, exc.detail)
                outage = min(max(outage * 2, self.poll), 1.0)
                self._stopping.wait(outage)
            except Exception:  # a supervisor: record, pause, carry on
                log.exception("worker %s: an iteration failed", self.name)
                time.sleep(self.poll)

    def run_once(self) -> bool:
        """Requeue runs whose worker died, then take and execute one run. True if it did."""
        self.requeue_expired()
        if time.monotonic() - self._swept >= SWEEP_EVERY:
            self._swept = time.monotonic()
            self.pipeline.announce_pending()
        asked = time.monotonic()  # the lease runs from no later than this
        run = self.store.runs.claim(self.name, self.lease)
        if run is None:
            return False
        self.execute(run, leased_at=asked)
        return True

    def requeue_expired(self) -> None:
        recover_expired(self.pipeline, self.runtime, self.lease)

    def resume_from_log(self, run: Run) -> bool:
        """A redelivered run whose agent already reported its outcome (its worker died after
        the runner's last event reached the log) is finished from the log, not run again."""
        events = patiently(lambda: self.store.runs.events(run.id), f"run {run.id}: resuming")
        finals = [e for e in events if e.kind in ("result", "error")]
        if not finals:
            return False
        # The last attempt's first outcome, as the executor reads it: an error the bridge put
        # in place of an oversized event outranks a result after it.
        last = json.loads(finals[-1].data).get("attempt")
        final = next(e for e in finals if json.loads(e.data).get("attempt") == last)
        data = json.loads(final.data)
        ok = final.kind == "result"
        status = RunStatus.SUCCEEDED if ok else RunStatus.FAILED
        resumed = json.dumps({"worker": self.name, "from_seq": final.seq, "status": str(status)})
        patiently(
            lambda: self.store.runs.append_event(run.id, datetime.now(UTC), "run.resumed", resumed),
            f"run {run.id}",
        )
        patiently(
            lambda: self.pipeline.finish(
                run.id,
                lease_owner=self.name,
                detail={"attempts": data.get("attempt"), "resumed": True},
                status=str(status),
                result=json.dumps(data.get("output")) if ok else None,
                error_code=None if ok else str(data.get("code", "agent_error")),
                error=None if ok else str(data.get("message", "")),
            ),
            f"run {run.id}: its final record",
        )
        return True

    def execute(
        self,
        run: Run,
        leased_at: float | None = None,
        on_event: Callable[[RunEvent], None] | None = None,
    ) -> None:
        """Execute a run this worker has just claimed (its lease granted at ``leased_at``),
        telling ``on_event`` each event as it is recorded (``corral run`` shows them)."""
        leased_at = time.monotonic() if leased_at is None else leased_at
        spec: AppSpec | None = None  # an ad-hoc run has no app, and no concurrency policy
        if run.app is not None and run.app_version is not None:
            app, version = run.app, run.app_version
            _, spec = patiently(lambda: self.pipeline.apps.get(app, version), f"run {run.id}")
            limit = spec.max_concurrent if spec.concurrency == "enqueue" else 0
            if limit:
                running = patiently(
                    lambda: self.store.runs.running_count(run.user, app), f"run {run.id}"
                )
                if running > limit:
                    patiently(
                        lambda: self.store.runs.release(run.id, self.name, delay=0.2),
                        f"run {run.id}",
                    )
                    return
        if run.deliveries > 1:
            self.runtime().reap()  # a dead worker's sandbox of this run must be gone first
            if self.resume_from_log(run):
                return
        over = patiently(lambda: self.pipeline.budgets.overspent(run), f"run {run.id}")
        if over is not None:  # its tree spent its budget while it queued: never boot it
            patiently(
                lambda: self.pipeline.finish(
                    run.id,
                    lease_owner=self.name,
                    status=str(RunStatus.FAILED),
                    error_code="budget_exhausted",
                    error=over.reason("it was not started"),
                ),
                f"run {run.id}: its final record",
            )
            return
        request = self.pipeline.request_for(run, spec)
        lending = threading.Event()

        def lend() -> None:
            # While this run executes, its awaited callees run here, one at a time.
            while not lending.wait(LEND_POLL):
                try:
                    callee = self.store.runs.claim(self.name, self.lease, awaited_by=run.id)
                    if callee is not None:
                        self.execute(callee)
                except StoreUnavailable:
                    continue  # the callee waits in the queue until the store is back
                except Exception:  # a supervisor: record, carry on
                    log.exception("run %s: lending to a callee failed", run.id)

        lender = threading.Thread(target=lend, name=f"lender-{run.id}", daemon=True)
        holding: list[Lease] = []  # the lease ``held`` renews (below)
        checked = [0.0]

        def stop() -> Stopped | None:
            lease = holding[0] if holding else None
            if lease is not None and lease.lost.is_set():
                return Stopped(RunStatus.FAILED, "lease_lost", "this worker lost the run's lease")
            if lease is not None and lease.lapsed.is_set():
                raise HandedBack(run.id, "its lease ran out while the store was out of reach")
            if self._abandon.is_set():
                raise HandedBack(run.id, "its worker is shutting down")
            if time.monotonic() - checked[0] < 0.5:
                return None
            checked[0] = time.monotonic()
            try:
                return should_stop()
            except StoreUnavailable:
                return None  # asked again in half a second; the run goes on meanwhile

        def should_stop() -> Stopped | None:
            current = self.store.runs.get(run.id)
            if current.cancel_requested:
                return Stopped(RunStatus.CANCELLED, "cancelled", "the run was cancelled")
            # Its own cost and its callees', against its budget and every caller's above it.
            over = self.pipeline.budgets.overspent(current)
            if over is not None:
                return Stopped(RunStatus.FAILED, "budget_exhausted", over.reason())
            return None

        try:
            with (
                run_context(run.id),
                held(self.store, run.id, self.name, self.lease, leased_at) as lease,
            ):
                holding.append(lease)
                lender.start()
                self.pipeline.executor.execute(
                    run, request, on_event, stop=stop, finish=self.pipeline.finish
                )
        except HandedBack as back:
            self._hand_back(run, back.reason)
        except StoreUnavailable:
            pass  # still ``running``: its lease runs out and another delivery takes it
        except Exception:
            log.exception("run %s failed in worker %s", run.id, self.name)
        finally:
            lending.set()
            if lender.is_alive():
                lender.join()  # a callee it lent to runs to its end before this worker moves on

    def _hand_back(self, run: Run, reason: str) -> None:
        """The run goes back to the queue for another worker, now (if it is still this
        worker's: after a lapsed lease another may have taken it already)."""
        try:
            handed = patiently(
                lambda: self.store.runs.hand_back(run.id, self.name),
                f"run {run.id}: handing it back",
            )
        except StoreUnavailable:
            return  # its lease runs out and another worker requeues it
        if handed:
            note = json.dumps({"worker": self.name, "reason": reason})
            patiently(
                lambda: self.store.runs.append_event(
                    run.id, datetime.now(UTC), "run.handed_back", note
                ),
                f"run {run.id}",
            )
            log.warning("run %s: worker %s handed it back: %s", run.id, self.name, reason)


def execute_now(
    pipeline: Pipeline,
    runtime: Callable[[], Runtime],
    run: Run,
    *,
    lease: float,
    wait_timeout: float | None = None,
    on_event: Callable[[RunEvent], None] | None = None,
) -> Run:
    """Execute the queued ``run`` in this thread, now, as a worker of its own would (a lease,
    heartbeats, the same ending), telling ``on_event`` each event as it is recorded. If a
    worker elsewhere claimed it first, follow that one's execution instead. Returns the run's
    latest record (``corral app run --here``, ``corral run``)."""
    worker = Worker(pipeline, runtime, name=owner_name("run"), lease=lease)
    asked = time.monotonic()
    claimed = pipeline.store.runs.claim(worker.name, worker.lease, only=run.id)
    if claimed is None:
        return pipeline.wait(run.id, wait_timeout, on_event)
    worker.execute(claimed, leased_at=asked, on_event=on_event)
    return pipeline.store.runs.get(run.id)


def recover_expired(pipeline: Pipeline, runtime: Callable[[], Runtime], lease: float) -> None:
    """Runs whose owner stopped renewing its lease (it died, or hangs): reap the dead owners'
    sandboxes on this host, then put each run back in the queue, or end it if nobody can run
    it again: an app run delivered ``MAX_DELIVERIES`` times, or an ad-hoc run (``corral run``:
    its caller, a terminal, is gone with it). ``lease`` is the caller's own, for the requeue's
    backoff."""
    store = pipeline.store
    expired = store.runs.expired()
    if expired:
        runtime().reap()  # the dead owners' sandboxes on this host die first
    for run in expired:
        if run.app is None or run.deliveries >= MAX_DELIVERIES:
            why = (
                f"{run.deliveries} workers lost this run"
                if run.app is not None
                else f"the process running this ad-hoc run ({run.lease_owner}) died"
            )
            pipeline.finish(  # only while the dead owner's lease is still the one
                run.id,
                lease_owner=run.lease_owner,
                lease_expires=run.lease_expires,
                from_status=(str(RunStatus.RUNNING),),
                detail={"attempts": run.attempts},
                status=str(RunStatus.FAILED),
                error_code="worker_lost",
                error=why,
            )
            continue
        # Long enough for a stalled (not dead) owner to notice at its next heartbeat.
        backoff = lease / 3 + 1.0 + min(2.0**run.deliveries, 30.0)
        if store.runs.requeue(run, backoff):
            log.warning("run %s: worker %s lost it; requeued", run.id, run.lease_owner)
