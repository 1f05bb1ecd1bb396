"""Run states, as stored in the database, and the transitions between them.

```mermaid
stateDiagram-v2
    [*] --> running: admitted
    running --> succeeded: result
    running --> failed: agent error, invalid runner, attempts exhausted
    running --> timed_out: deadline passed
```
"""

from __future__ import annotations

from enum import StrEnum


class RunStatus(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"

    @property
    def terminal(self) -> bool:
        return self is not RunStatus.RUNNING


TRANSITIONS: dict[RunStatus, frozenset[RunStatus]] = {
    RunStatus.RUNNING: frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.TIMED_OUT}),
    RunStatus.SUCCEEDED: frozenset(),
    RunStatus.FAILED: frozenset(),
    RunStatus.TIMED_OUT: frozenset(),
}


def check_transition(old: RunStatus, new: RunStatus) -> None:
    if new not in TRANSITIONS[old]:
        raise ValueError(f"a run cannot go from {old} to {new}")
