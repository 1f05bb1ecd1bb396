"""Run states, as stored in the database, and the transitions between them.

```mermaid
stateDiagram-v2
    [*] --> queued: admitted (execute_agent; corral run's parked for its own process)
    queued --> running: a worker (or corral run) leases it
    queued --> cancelled: cancelled before it started
    running --> queued: its worker died (lease expired): retried with backoff
    running --> succeeded: result
    running --> failed: agent error, invalid runner, attempts, budget, disk full, worker lost
    running --> timed_out: deadline passed
    running --> cancelled: cancelled
```

Every arrow into a terminal state is one transaction that also records the run's
``run.finished`` event (``Runs.finish``): a run ends exactly once. ``worker lost``: its lease
ran out ``MAX_DELIVERIES`` times, or the ``corral run`` process running it died.
"""

from __future__ import annotations

from enum import StrEnum


class RunStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self not in (RunStatus.QUEUED, RunStatus.RUNNING)
