"""Prometheus metrics, one registry per Corral, served at ``/metrics``.

Counters and histograms are updated when a run finishes, from its record and event log
(so every trigger yields the same increments), plus a gauge of the queue read at scrape time.
"""

from __future__ import annotations

import json
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from corral.billing.amounts import as_number
from corral.store import Run, Store

_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class Metrics:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.registry = CollectorRegistry()
        r = self.registry
        self.runs = Counter(
            "corral_runs", "Finished runs", ["app", "trigger", "status"], registry=r
        )
        self.admitted = Counter(
            "corral_runs_admitted", "Runs admitted", ["app", "trigger"], registry=r
        )
        self.duration = Histogram(
            "corral_run_duration_seconds",
            "Run wall time",
            ["trigger"],
            buckets=_SECONDS,
            registry=r,
        )
        self.boot = Histogram(
            "corral_sandbox_boot_seconds",
            "Sandbox boot to runner ready",
            buckets=_SECONDS,
            registry=r,
        )
        self.swap = Histogram(
            "corral_runner_swap_seconds",
            "Runner hot swap, stage to lock",
            buckets=_SECONDS,
            registry=r,
        )
        self.bridge_calls = Counter(
            "corral_bridge_calls", "Calls through the bridge", ["connection", "status"], registry=r
        )
        self.credits = Counter("corral_credits_charged", "Credits deducted", ["app"], registry=r)
        queue = Gauge("corral_queue_depth", "Runs waiting for a worker", registry=r)
        queue.set_function(
            lambda: float(len([x for x in store.runs.recent(limit=10_000) if x.status == "queued"]))
        )

    def admitted_run(self, run: Run) -> None:
        self.admitted.labels(run.app or "", run.trigger).inc()

    def finished_run(self, run: Run) -> None:
        self.runs.labels(run.app or "", run.trigger, run.status).inc()
        if run.started_at and run.finished_at:
            self.duration.labels(run.trigger).observe(_seconds(run.started_at, run.finished_at))
        events = self.store.runs.events(run.id)
        starts = {e.kind: e.at for e in events}
        if "sandbox.booted" in starts and "runner.started" in starts:
            self.boot.observe(
                max(0.0, _seconds(starts["sandbox.booted"], starts["runner.started"]))
            )
        for event in events:
            if event.kind == "swap.locked":
                self.swap.observe(float(json.loads(event.data).get("seconds", 0.0)))
        for call in self.store.usage.calls(run.id):
            if call.connection != "_corral":
                self.bridge_calls.labels(call.connection or "", str(call.status)).inc()
        spent = self.store.ledger.spent(run=run.id)
        if spent:
            self.credits.labels(run.app or "").inc(as_number(spent))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _seconds(a: datetime, b: datetime) -> float:
    return (b - a).total_seconds()
