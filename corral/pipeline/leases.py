"""Holding a run's lease while it executes, whoever executes it (a worker, ``corral run``).

A run that is executing has an owner and a lease that runs out unless renewed: the owner's
thread renews it every third of its length. An owner that dies stops renewing, and whoever
next finds the lease expired (``worker.recover_expired``) requeues the run or ends it; an
owner that merely stalled learns at its next renewal that the run is no longer its own, and
must stop at once (its sandbox killed) without writing to the run again.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import threading
from collections.abc import Iterator

from corral.store import Store


def owner_name(kind: str) -> str:
    """A lease owner's name, unique across hosts and processes: ``<kind>-<host>-<random>``."""
    return f"{kind}-{socket.gethostname()}-{secrets.token_hex(4)}"


@contextlib.contextmanager
def held(store: Store, run_id: str, owner: str, lease: float) -> Iterator[threading.Event]:
    """Renew ``owner``'s lease on the run while the block runs. The event is set once a
    renewal finds the lease no longer ``owner``'s."""
    lost = threading.Event()
    done = threading.Event()

    def renew() -> None:
        while not done.wait(lease / 3):
            if not store.pipeline.heartbeat(run_id, owner, lease):
                lost.set()
                return

    beat = threading.Thread(target=renew, name=f"lease-{run_id}", daemon=True)
    beat.start()
    try:
        yield lost
    finally:
        done.set()
        beat.join(timeout=5)
