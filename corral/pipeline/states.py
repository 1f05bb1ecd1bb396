"""Run states, as stored in the database, and the transitions between them.

```mermaid
stateDiagram-v2
    [*] --> queued: admitted (execute_agent)
    [*] --> running: corral run (no queue)
    queued --> running: a worker leases it
    queued --> cancelled: cancelled before it started
    running --> queued: its worker died (lease expired): retried with backoff
    running --> succeeded: result
    running --> failed: agent error, invalid runner, attempts exhausted, budget spent
    running --> timed_out: deadline passed
    running --> cancelled: cancelled
```
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
