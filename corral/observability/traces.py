"""OpenTelemetry traces: one trace per run, built when the run ends.

Spans: ``run`` (the root) with children ``admission``, ``queue``, ``boot`` (per attempt),
``swap`` (when the runner was swapped), ``agent`` (runner start to result), and one
``bridge.call`` per call the bridge forwarded for the run (from its audit rows, which carry
their own timing). They go through the real OpenTelemetry SDK to a ``SpanExporter``; the one
used by default writes them to the store's ``spans`` table, where the API and the tests read
them. Another exporter (OTLP, say) can be added to the same provider.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timedelta

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from corral.store import Run, RunEvent, Span, Store


class StoreSpanExporter(SpanExporter):
    def __init__(self, store: Store) -> None:
        self.store = store

    def export(self, batch: Sequence[ReadableSpan]) -> SpanExportResult:
        rows = []
        for span in batch:
            ctx = span.get_span_context()
            assert ctx is not None and span.start_time is not None and span.end_time is not None
            attributes = dict(span.attributes or {})
            rows.append(
                Span(
                    span_id=format(ctx.span_id, "016x"),
                    trace_id=format(ctx.trace_id, "032x"),
                    parent_id=format(span.parent.span_id, "016x") if span.parent else None,
                    run_id=str(attributes.get("corral.run_id", "")) or None,
                    name=span.name,
                    start=_from_ns(span.start_time),
                    end=_from_ns(span.end_time),
                    attributes=json.dumps(attributes, default=str),
                    status=span.status.status_code.name.lower(),
                )
            )
        self.store.spans.add(rows)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


class Tracing:
    def __init__(self, store: Store, exporter: SpanExporter | None = None) -> None:
        self.store = store
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(exporter or StoreSpanExporter(store)))
        self.tracer = self.provider.get_tracer("corral")

    def finished_run(self, run: Run) -> None:
        events = self.store.runs.events(run.id)
        end = run.finished_at or (events[-1].at if events else run.created_at)
        common = {
            "corral.run_id": run.id,
            "corral.app": run.app or "",
            "corral.trigger": run.trigger,
            "corral.user": run.user,
        }
        root = self.tracer.start_span(
            "run",
            start_time=_ns(run.created_at),
            attributes={**common, "corral.status": run.status},
        )
        parent = trace.set_span_in_context(root)

        def child(name: str, start: datetime, stop: datetime, **attrs: str | int) -> None:
            span = self.tracer.start_span(
                name, context=parent, start_time=_ns(start), attributes={**common, **attrs}
            )
            span.end(end_time=_ns(max(start, stop)))

        admitted = next((e for e in events if e.kind == "run.admitted"), None)
        admission_s = json.loads(admitted.data).get("seconds", 0.0) if admitted else 0.0
        child("admission", run.created_at - timedelta(seconds=admission_s), run.created_at)
        queued_until = run.started_at or run.finished_at  # a run cancelled while queued
        if queued_until:
            child("queue", run.created_at, queued_until)
        booted: dict[int, datetime] = {}
        for event in events:
            data = json.loads(event.data)
            attempt = int(data.get("attempt", 0) or 0)
            if event.kind == "sandbox.booted":
                booted[attempt] = event.at
            elif event.kind == "runner.started" and attempt in booted:
                child("boot", booted[attempt], event.at, **{"corral.attempt": attempt})
            elif event.kind == "swap.started":
                booted.setdefault(-attempt - 1, event.at)
            elif event.kind == "swap.locked":
                begun = booted.get(-attempt - 1, event.at)
                child("swap", begun, event.at, **{"corral.attempt": attempt})
        started = next((_when(e) for e in events if e.kind == "runner.started"), None)
        ended = next((_when(e) for e in reversed(events) if e.kind in ("result", "error")), None)
        if started and ended:
            child("agent", started, ended)
        for call in self.store.usage.calls(run.id):
            if call.connection == "_corral":
                continue
            stop = call.at
            begin = stop - timedelta(milliseconds=float(call.latency_ms))
            attributes: dict[str, str | int] = {
                "http.method": call.method,
                "http.route": call.path,
                "http.status_code": int(call.status),
                "corral.connection": call.connection or "",
            }
            child("bridge.call", begin, stop, **attributes)
        root.end(end_time=_ns(max(end, run.created_at)))

    def spans(self, run_id: str) -> list[Span]:
        """The stored spans of ``run_id``'s trace, by start time."""
        return self.store.spans.for_run(run_id)


def _when(event: RunEvent) -> datetime:
    """When a runner event happened: the runner's own stamp (the sandbox shares the host's
    clock) rather than its arrival, which batching through the bridge blurs."""
    from datetime import UTC

    stamp = json.loads(event.data).get("sandbox_at")
    if isinstance(stamp, (int, float)):
        happened = datetime.fromtimestamp(stamp, UTC)
        if abs((happened - event.at).total_seconds()) < 60:  # an absurd stamp is ignored
            return happened
    return event.at


def _ns(at: datetime) -> int:
    return int(at.timestamp() * 1_000_000_000)


def _from_ns(ns: int) -> datetime:
    from datetime import UTC

    return datetime.fromtimestamp(ns / 1_000_000_000, UTC)
