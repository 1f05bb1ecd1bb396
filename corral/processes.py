"""Process identity: a pid and the kernel's start time for it, so a recycled pid is never
mistaken for the process that once had it.

Whatever names its owner on disk uses this: the sandbox slot registry
(``corral/sandbox/slots.py``) and the temporaries of the data directory
(``corral/snapshots/temporaries.py``). Whoever finds a record whose ``Owner`` is not
``alive()`` may clean up after it. Linux only: the start time is read from ``/proc``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Owner:
    """A process: its pid, and its start time in clock ticks since boot."""

    pid: int
    start: int

    @classmethod
    def me(cls) -> Owner:
        return cls.of(os.getpid())

    @classmethod
    def of(cls, pid: int) -> Owner:
        """The live process ``pid`` (FileNotFoundError if there is none)."""
        return cls(pid, start_time(pid))

    def alive(self) -> bool:
        """True while the very process this names runs (not another one given its pid)."""
        try:
            return start_time(self.pid) == self.start
        except (FileNotFoundError, ProcessLookupError, ValueError):
            return False


def start_time(pid: int) -> int:
    """When process ``pid`` started, in clock ticks since boot (``/proc/<pid>/stat`` field 22)."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name may hold spaces and parens: split after the last ')'.
        return int(f.read().rsplit(")", 1)[1].split()[19])
