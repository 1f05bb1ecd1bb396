"""Prometheus metrics, one registry per Corral, served at ``/metrics``.

The run metrics are read from the store at scrape time (``RunCollector`` over
``Store.stats``), not counted by the process that executed the run: a run executed by a
worker of another process or host, or by ``corral run``, is in the ``/metrics`` of every
``corral serve`` sharing the store, and a restarted server loses nothing. The figures are
cached for ``ttl`` seconds, so a burst of scrapes (many Prometheus replicas, a dashboard
refreshing) costs the database one set of grouped queries; a run this process admits or
ends drops the cache, so its own next scrape sees it at once.

What stays per process is what belongs to the process: its CPU, memory and file
descriptors (``process_*``) and how often it has queried the store for the figures.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from corral.billing.amounts import as_number
from corral.store import Run, Store
from corral.store.stats import Figures, Histogram

_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
CACHE_TTL_S = 1.0  # how long a scrape's figures serve the next scrapes


class RunCollector(Collector):
    """The run metrics, computed from the store's figures (cached ``ttl`` seconds)."""

    def __init__(self, store: Store, queries: Counter, ttl: float = CACHE_TTL_S) -> None:
        self.store, self.queries, self.ttl = store, queries, ttl
        self._lock = threading.Lock()  # one scrape queries; those arriving meanwhile reuse it
        self._figures: Figures | None = None
        self._taken = 0.0

    def forget(self) -> None:
        """The next scrape reads the store again."""
        with self._lock:
            self._figures = None

    def figures(self) -> Figures:
        with self._lock:
            if self._figures is None or time.monotonic() - self._taken >= self.ttl:
                self._figures = self.store.stats.figures(_SECONDS)
                self._taken = time.monotonic()
                self.queries.inc()
            return self._figures

    def describe(self) -> Iterator[Metric]:
        return iter(())  # nothing is read at registration: the store may not be reachable yet

    def collect(self) -> Iterator[Metric]:
        f = self.figures()
        runs = CounterMetricFamily("corral_runs", "Ended runs", labels=["app", "trigger", "status"])
        for (app, trigger, status), n in sorted(f.ended.items(), key=_key):
            runs.add_metric([app or "", trigger, status], n)
        yield runs
        admitted = CounterMetricFamily(
            "corral_runs_admitted", "Runs admitted", labels=["app", "trigger"]
        )
        for (app, trigger), n in sorted(f.admitted.items(), key=_key):
            admitted.add_metric([app or "", trigger], n)
        yield admitted
        duration = HistogramMetricFamily(
            "corral_run_duration_seconds", "Run wall time, start to end", labels=["trigger"]
        )
        for trigger, wall in sorted(f.durations.items()):
            duration.add_metric([trigger], *_buckets(wall))
        yield duration
        for name, doc, histogram in (
            ("corral_sandbox_boot_seconds", "Sandbox boot to runner ready", f.boots),
            ("corral_runner_swap_seconds", "Runner hot swap, stage to lock", f.swaps),
        ):
            family = HistogramMetricFamily(name, doc)
            if histogram is not None:
                family.add_metric([], *_buckets(histogram))
            yield family
        calls = CounterMetricFamily(
            "corral_bridge_calls", "Calls through the bridge", labels=["connection", "status"]
        )
        for (connection, code), n in sorted(f.bridge_calls.items(), key=_key):
            calls.add_metric([connection or "", str(code)], n)
        yield calls
        credits = CounterMetricFamily("corral_credits_charged", "Credits deducted", labels=["app"])
        for app, micros in sorted(f.charged.items(), key=_key):
            credits.add_metric([app or ""], float(as_number(micros)))
        yield credits
        yield GaugeMetricFamily("corral_queue_depth", "Runs waiting for a worker", value=f.queued)


class Metrics:
    def __init__(self, store: Store, ttl: float = CACHE_TTL_S) -> None:
        self.store = store
        self.registry = CollectorRegistry()
        queries = Counter(
            "corral_metrics_queries",
            "Times this process read the run figures from the store",
            registry=None,
        )
        self.runs = RunCollector(store, queries, ttl)
        self.registry.register(self.runs)
        self.registry.register(queries)  # after the figures: a scrape counts its own read
        ProcessCollector(registry=self.registry)

    def changed(self, run: Run) -> None:
        """Hook for a run this process admitted or ended: its next scrape reads the store."""
        self.runs.forget()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _buckets(histogram: Histogram) -> tuple[list[tuple[str, float]], float]:
    """Prometheus buckets (cumulative, up to ``+Inf``) and the sum."""
    buckets = [
        (_bound(b), float(n)) for b, n in zip(histogram.bounds, histogram.buckets, strict=True)
    ]
    buckets.append(("+Inf", float(histogram.count)))
    return buckets, histogram.total


def _bound(bound: float) -> str:
    return repr(float(bound))


def _key(item: tuple[object, int]) -> str:
    return repr(item[0])
