"""Run states and the transitions between them: the one description every layer reads.

```mermaid
stateDiagram-v2
    [*] --> queued: admitted (execute_agent)
    [*] --> running: corral run (no queue)
    queued --> running: a worker leases it (claim)
    queued --> cancelled: cancelled before it started
    running --> queued: its worker died, is shutting down, or a limit said not yet
    running --> succeeded: result
    running --> failed: agent error, invalid runner, attempts, budget, disk full, worker lost
    running --> timed_out: deadline passed
    running --> cancelled: cancelled
```

The store writes each arrow with one function whose SQL moves a run only from a state this
module allows (``corral.store.runs``): ``claim``, ``requeue``, ``hand_back``, ``release`` and
``finish``. Every arrow into a terminal state is one transaction that also records the run's
``run.finished`` event (``Runs.finish``): a run ends exactly once, and never leaves its end.
``worker lost``: its lease ran out ``MAX_DELIVERIES`` times, or the ``corral run`` process
running it died.

This module is at the bottom of the layers: it imports nothing from Corral.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Final


class RunStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


# A run that has not ended, and one that has.
ACTIVE: Final = (RunStatus.QUEUED, RunStatus.RUNNING)
TERMINAL: Final = (
    RunStatus.SUCCEEDED,
    RunStatus.FAILED,
    RunStatus.TIMED_OUT,
    RunStatus.CANCELLED,
)
# The states a run is recorded in: queued by admission, running by ``corral run``.
INITIAL: Final = (RunStatus.QUEUED, RunStatus.RUNNING)

# Every allowed arrow, from -> to. A terminal state has none out: an ended run stays ended.
TRANSITIONS: Final[Mapping[RunStatus, frozenset[RunStatus]]] = {
    RunStatus.QUEUED: frozenset({RunStatus.RUNNING, RunStatus.CANCELLED}),
    RunStatus.RUNNING: frozenset({RunStatus.QUEUED, *TERMINAL}),
    **{status: frozenset() for status in TERMINAL},
}


def allowed(source: str, target: str) -> bool:
    """Whether a run may move from ``source`` to ``target``."""
    return RunStatus(target) in TRANSITIONS[RunStatus(source)]


def sources(target: str, among: Iterable[str] = tuple(RunStatus)) -> tuple[RunStatus, ...]:
    """The states (of ``among``) a run may move into ``target`` from, in declaration order.

    The store builds its ``WHERE status IN (...)`` from this, so a transition this module
    does not allow matches no row.
    """
    wanted = {RunStatus(s) for s in among}
    return tuple(s for s in RunStatus if s in wanted and RunStatus(target) in TRANSITIONS[s])
