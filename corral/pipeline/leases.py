"""Holding a run's lease while it executes, whoever executes it (a worker, ``corral run``).

A run that is executing has an owner and a lease that runs out unless renewed: the owner's
thread renews it every third of its length. An owner that dies stops renewing, and whoever
next finds the lease expired (``worker.recover_expired``) requeues the run or ends it; an
owner that merely stalled learns at its next renewal that the run is no longer its own, and
must stop at once (its sandbox killed) without writing to the run again.

A database outage is not a lost lease: while the store is out of reach the renewal is retried
every half second. If the lease runs out by the owner's own clock before a renewal gets
through, it has *lapsed*: another process that can reach the store (this one may be cut off
from it alone) is now free to requeue the run, and the owner must hand it back, not go on.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from corral.errors import StoreUnavailable
from corral.store import Store

log = logging.getLogger("corral.worker")


def owner_name(kind: str) -> str:
    """A lease owner's name, unique across hosts and processes: ``<kind>-<host>-<random>``."""
    return f"{kind}-{socket.gethostname()}-{secrets.token_hex(4)}"


@dataclass
class Lease:
    """What the renewing thread has learnt about a lease held with ``held``."""

    lost: threading.Event = field(default_factory=threading.Event)  # the store: not yours
    lapsed: threading.Event = field(default_factory=threading.Event)  # ran out unrenewed


@contextlib.contextmanager
def held(
    store: Store, run_id: str, owner: str, lease: float, leased_at: float | None = None
) -> Iterator[Lease]:
    """Renew ``owner``'s lease on the run while the block runs. ``leased_at`` (monotonic) is
    when the lease was last granted, if earlier than now (a claim's time)."""
    state = Lease()
    done = threading.Event()

    def renew() -> None:
        renewed = time.monotonic() if leased_at is None else leased_at
        pause = lease / 3
        while not done.wait(pause):
            asked = time.monotonic()
            try:
                mine = store.runs.heartbeat(run_id, owner, lease)
            except Exception as exc:  # the store is out of reach: retry soon
                if not isinstance(exc, StoreUnavailable):
                    log.exception("run %s: a lease renewal failed", run_id)
                if time.monotonic() - renewed >= lease:
                    state.lapsed.set()
                    return
                pause = min(0.5, lease / 3)
                continue
            if not mine:
                state.lost.set()
                return
            renewed, pause = asked, lease / 3

    beat = threading.Thread(target=renew, name=f"lease-{run_id}", daemon=True)
    beat.start()
    try:
        yield state
    finally:
        done.set()
        beat.join(timeout=5)
