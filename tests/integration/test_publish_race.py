"""Idempotent records under races: many workers meeting a fresh store at once, on both engines.

Every worker that meets a store its Corral version has not seen publishes the runner bundled
with it; a connection profile or a signing key may likewise be put by two processes at once.
Each must be one atomic statement: a unique violation aborts the whole transaction on
PostgreSQL, so a "fall back to an update" after one never runs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from corral.releases.service import BUNDLED, ReleaseService
from corral.snapshots.layout import Layout
from corral.store import Store

T = TypeVar("T")
RACERS = 6


def race(store_url: str, act: Callable[[Store], T]) -> list[T]:
    """``act`` in ``RACERS`` threads, each with a Store of its own (as separate workers have),
    released together; every thread's exception is re-raised here."""
    stores = [Store.open(store_url) for _ in range(RACERS)]
    start = threading.Barrier(RACERS)
    results: list[T] = []
    errors: list[BaseException] = []

    def one(store: Store) -> None:
        try:
            start.wait()
            results.append(act(store))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for s in stores:
        s.close()
    if errors:
        raise errors[0]
    return results


def test_workers_meeting_a_fresh_store_all_get_the_bundled_runner(
    store_url: str, tmp_path: Path
) -> None:
    layout = Layout(tmp_path / "oci").init()
    current = race(store_url, lambda store: ReleaseService(store, layout).current())
    assert len({r.digest for r in current}) == 1
    with Store.open(store_url) as store:
        assert [r.digest for r in store.releases.all()] == [current[0].digest]


def test_publishing_the_same_release_again_reactivates_it(store_url: str, tmp_path: Path) -> None:
    layout = Layout(tmp_path / "oci").init()
    with Store.open(store_url) as store:
        releases = ReleaseService(store, layout)
        first = releases.publish(BUNDLED, version="1.0")
        other = releases.publish(BUNDLED, version="1.0+other", origin="elsewhere")
        assert other.digest != first.digest and store.releases.current() == other
        again = releases.publish(BUNDLED, version="1.0")
        assert again.digest == first.digest and again.activated_at > first.activated_at
        assert store.releases.current() == again and len(store.releases.all()) == 2


def test_racing_puts_of_one_connection_profile(store_url: str) -> None:
    def put(store: Store) -> None:
        store.connections.put("market", "http://127.0.0.1:9/", "header:X-Api-Key", None)

    race(store_url, put)
    with Store.open(store_url) as store:
        assert store.connections.get("market") is not None
        assert [c.name for c in store.connections.all()] == ["market"]


def test_storing_a_signing_key_twice_is_a_no_op(store_url: str) -> None:
    def add(store: Store) -> None:
        store.signing_keys.add("k-shared", b"sealed", datetime.now(UTC))

    race(store_url, add)
    with Store.open(store_url) as store:
        stored = store.signing_keys.since(datetime(2000, 1, 1, tzinfo=UTC))
        assert [(k.kid, k.sealed) for k in stored] == [("k-shared", b"sealed")]
