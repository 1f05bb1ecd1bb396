"""The SDK an agent imports: ``from corral_runner import sdk``.

    sdk.log("fetched prices", rows=120)
    sdk.progress(0.5, "charting")
    sdk.metric("rows", 120)
    sdk.context()["run_id"]

Everything here reports through the runner's event channel; nothing in it holds a secret.
"""

from __future__ import annotations

from typing import Any

from .events import Channel

_channel: Channel | None = None
_context: dict[str, Any] = {}


def _bind(channel: Channel, context: dict[str, Any]) -> None:
    global _channel, _context
    _channel = channel
    _context = dict(context)


def _emit(kind: str, **data: Any) -> None:
    if _channel is None:
        raise RuntimeError("corral_runner.sdk is only usable inside a Corral run")
    _channel.emit(kind, **data)


def log(message: str, **fields: Any) -> None:
    """A structured log line, kept in the run's event log."""
    _emit("log", stream="sdk", message=str(message), fields=fields)


def progress(fraction: float, message: str = "") -> None:
    """How far the agent is, from 0.0 to 1.0."""
    value = float(fraction)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"progress must be between 0 and 1, got {value}")
    _emit("progress", fraction=value, message=str(message))


def metric(name: str, value: float, **labels: str) -> None:
    """A numeric observation, aggregated by the host."""
    _emit("metric", name=str(name), value=float(value), labels=labels)


def context() -> dict[str, Any]:
    """Who and what this run is: run id, environment, entrypoint."""
    return dict(_context)
