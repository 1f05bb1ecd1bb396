"""The store against real databases: every test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import hashlib
import itertools
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import func, select, text

from corral.errors import (
    Conflict,
    EnvironmentExists,
    EnvironmentNotFound,
    InvalidInput,
    SnapshotNotFound,
    StoreError,
)
from corral.store import Environment, Snapshot, Store
from corral.store.engine import alembic_config, make_engine
from corral.store.schema import metadata, snapshots

T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)


def dg(label: str) -> str:
    return "sha256:" + hashlib.sha256(label.encode()).hexdigest()


def snap(
    label: str,
    parent: str | None = None,
    *,
    size: int = 1000,
    created_at: datetime = T0,
    message: str | None = None,
) -> Snapshot:
    return Snapshot(
        digest=dg(label),
        environment="",
        seq=0,
        parent=None if parent is None else dg(parent),
        layer=None if parent is None else dg(f"layer-{label}"),
        size=size,
        created_at=created_at,
        message=message,
    )


def grow(store: Store, name: str, labels: list[str]) -> list[Snapshot]:
    """Create ``name`` from ``labels[0]`` and add the rest, each on top of the previous."""
    store.environments.create(name, "base:bookworm", snap(labels[0]))
    added = []
    for parent, label in itertools.pairwise(labels):
        added.append(
            store.environments.add_snapshot(name, snap(label, parent), expected_head=dg(parent))
        )
    return added


def test_create_get_list(store: Store) -> None:
    assert store.environments.all() == []
    web = store.environments.create("web", "base:bookworm", snap("web-1", message="imported"))
    assert (web.name, web.base, web.head) == ("web", "base:bookworm", dg("web-1"))
    assert web.created_at == web.updated_at
    assert store.environments.get("web") == web
    api = store.environments.create("api", "oci-archive:/srv/api.tar", snap("api-1"))
    assert store.environments.all() == [api, web]
    assert store.environments.history("web") == [
        Snapshot(dg("web-1"), "web", 1, None, None, 1000, T0, "imported")
    ]


def test_duplicate_name_is_refused_and_changes_nothing(store: Store) -> None:
    first = store.environments.create("web", "base:bookworm", snap("one"))
    with pytest.raises(EnvironmentExists) as caught:
        store.environments.create("web", "oci-archive:/elsewhere.tar", snap("two"))
    assert caught.value.name == "web"
    assert store.environments.get("web") == first
    assert [s.digest for s in store.environments.history("web")] == [dg("one")]


def test_unknown_environment(store: Store) -> None:
    store.environments.create("known", "base:bookworm", snap("k"))
    calls: dict[str, Callable[[], object]] = {
        "get_environment": lambda: store.environments.get("ghost"),
        "history": lambda: store.environments.history("ghost"),
        "get_snapshot": lambda: store.environments.snapshot("ghost", dg("k")),
        "add_snapshot": lambda: store.environments.add_snapshot("ghost", snap("g2", "k"), dg("k")),
        "delete_environment": lambda: store.environments.delete("ghost"),
    }
    for what, call in calls.items():
        with pytest.raises(EnvironmentNotFound, match="ghost"):
            call()
            pytest.fail(f"{what} did not raise")
    assert [e.name for e in store.environments.all()] == ["known"]


def test_history_is_newest_first_and_seq_counts_up(store: Store) -> None:
    added = grow(store, "web", ["s1", "s2", "s3", "s4"])
    assert [s.seq for s in added] == [2, 3, 4]
    history = store.environments.history("web")
    assert [s.seq for s in history] == [4, 3, 2, 1]
    assert [s.digest for s in history] == [dg("s4"), dg("s3"), dg("s2"), dg("s1")]
    assert [s.parent for s in history] == [dg("s3"), dg("s2"), dg("s1"), None]
    assert history[:3] == added[::-1]
    env = store.environments.get("web")
    assert env.head == dg("s4")
    assert env.updated_at > env.created_at


def test_get_snapshot(store: Store) -> None:
    grow(store, "web", ["s1", "s2"])
    got = store.environments.snapshot("web", dg("s2"))
    assert got == store.environments.history("web")[0]
    assert (got.seq, got.layer, got.environment) == (2, dg("layer-s2"), "web")
    with pytest.raises(SnapshotNotFound, match=dg("nope")):
        store.environments.snapshot("web", dg("nope"))


def test_stale_expected_head_conflicts_and_changes_nothing(store: Store) -> None:
    grow(store, "web", ["s1", "s2"])
    before_env, before_history = store.environments.get("web"), store.environments.history("web")
    for stale in (dg("s1"), dg("never-was")):
        with pytest.raises(Conflict) as caught:
            store.environments.add_snapshot("web", snap("s3", "s1"), expected_head=stale)
        assert dg("s2") in str(caught.value) and stale in str(caught.value)
    assert store.environments.get("web") == before_env
    assert store.environments.history("web") == before_history


def test_same_digest_twice_in_one_history_conflicts(store: Store) -> None:
    grow(store, "web", ["s1", "s2"])
    with pytest.raises(Conflict, match="already in the history"):
        store.environments.add_snapshot("web", snap("s1", "s2"), expected_head=dg("s2"))
    assert store.environments.get("web").head == dg("s2")
    assert len(store.environments.history("web")) == 2


def test_one_digest_may_start_two_environments(store: Store) -> None:
    store.environments.create("a", "base:bookworm", snap("bookworm"))
    store.environments.create("b", "base:bookworm", snap("bookworm"))
    assert store.environments.snapshot("a", dg("bookworm")).environment == "a"
    assert store.environments.snapshot("b", dg("bookworm")).environment == "b"


def test_delete_cascades_to_snapshots(store: Store, store_url: str) -> None:
    grow(store, "doomed", ["d1", "d2", "d3"])
    store.environments.create("other", "base:bookworm", snap("d1"))
    store.environments.delete("doomed")
    with pytest.raises(EnvironmentNotFound):
        store.environments.get("doomed")
    assert [e.name for e in store.environments.all()] == ["other"]
    engine = make_engine(store_url)
    try:
        with engine.connect() as conn:
            left = conn.execute(
                select(snapshots.c.environment, func.count()).group_by(snapshots.c.environment)
            ).all()
    finally:
        engine.dispose()
    assert [tuple(row) for row in left] == [("other", 1)]
    store.environments.create("doomed", "base:bookworm", snap("fresh"))
    assert [(s.seq, s.digest) for s in store.environments.history("doomed")] == [(1, dg("fresh"))]
    store.environments.delete("doomed")
    with pytest.raises(EnvironmentNotFound):
        store.environments.delete("doomed")


BAD_NAMES = ["", "Web", "-web", ".web", "_web", "a" * 64, "we b", "we/b", "wéb", "web\n"]
GOOD_NAMES = ["a", "0", "a" * 63, "web.v2_test-1", "9lives"]


def test_environment_names_are_validated(store: Store) -> None:
    for bad in BAD_NAMES:
        with pytest.raises(InvalidInput) as caught:
            store.environments.create(bad, "base:bookworm", snap("x"))
        assert repr(bad) in str(caught.value) and "1-63 characters" in str(caught.value)
        with pytest.raises(InvalidInput):
            store.environments.get(bad)
    assert store.environments.all() == []
    for good in GOOD_NAMES:
        store.environments.create(good, "base:bookworm", snap("x"))
    assert [e.name for e in store.environments.all()] == sorted(GOOD_NAMES)


def test_snapshot_values_are_validated(store: Store) -> None:
    store.environments.create("web", "base:bookworm", snap("s1"))
    good = snap("s2", "s1")
    bad = {
        "digest": Snapshot("sha256:XYZ", "", 0, dg("s1"), None, 1, T0),
        "parent digest": Snapshot(dg("s2"), "", 0, "md5:abc", None, 1, T0),
        "size": Snapshot(dg("s2"), "", 0, dg("s1"), None, -1, T0),
        "timezone-aware": Snapshot(dg("s2"), "", 0, dg("s1"), None, 1, T0.replace(tzinfo=None)),
        "names environment": Snapshot(dg("s2"), "api", 0, dg("s1"), None, 1, T0),
    }
    for fragment, value in bad.items():
        with pytest.raises(InvalidInput, match=fragment):
            store.environments.add_snapshot("web", value, expected_head=dg("s1"))
    with pytest.raises(InvalidInput, match="expected head"):
        store.environments.add_snapshot("web", good, expected_head="s1")
    assert len(store.environments.history("web")) == 1
    assert store.environments.add_snapshot("web", good, expected_head=dg("s1")).seq == 2


def test_datetimes_come_back_aware_utc(store: Store) -> None:
    india = timezone(timedelta(hours=5, minutes=30))
    local = datetime(2024, 5, 1, 17, 30, 0, 123456, tzinfo=india)  # == T0
    before = datetime.now(UTC)
    store.environments.create("web", "base:bookworm", snap("s1", created_at=local))
    store.environments.add_snapshot(
        "web", snap("s2", "s1", created_at=T0 + timedelta(hours=1)), dg("s1")
    )
    after = datetime.now(UTC)
    env = store.environments.get("web")
    stamps = [
        env.created_at,
        env.updated_at,
        *(s.created_at for s in store.environments.history("web")),
    ]
    stamps += [e.created_at for e in store.environments.all()]
    stamps.append(store.environments.snapshot("web", dg("s1")).created_at)
    for stamp in stamps:
        assert stamp.tzinfo is UTC, stamp
    assert before <= env.created_at < env.updated_at <= after
    assert store.environments.snapshot("web", dg("s1")).created_at == T0
    assert [s.created_at for s in store.environments.history("web")] == [
        T0 + timedelta(hours=1),
        T0,
    ]


def test_open_twice_is_idempotent(store_url: str) -> None:
    with Store.open(store_url) as first:
        first.environments.create("web", "base:bookworm", snap("s1"))
        with Store.open(store_url) as second:
            assert [e.name for e in second.environments.all()] == ["web"]
    with Store.open(store_url) as third:
        assert third.environments.get("web").head == dg("s1")
    engine = make_engine(store_url)
    try:
        with engine.connect() as conn:
            versions = conn.execute(text("SELECT version_num FROM alembic_version")).all()
    finally:
        engine.dispose()
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert [tuple(row) for row in versions] == [(head,)]


def test_processes_racing_to_migrate_a_blank_database(blank_store_url: str) -> None:
    # Each racer imports first, then sleeps until the common start time, so the
    # migrations themselves overlap rather than the interpreter start-ups.
    code = (
        "import sys, time; from corral.store import Store; "
        "time.sleep(max(0.0, float(sys.argv[2]) - time.time())); "
        "Store.open(sys.argv[1]).close()"
    )
    start = time.time() + 3
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", code, blank_store_url, str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [racer.communicate(timeout=120)[0] for racer in racers]
    assert [racer.returncode for racer in racers] == [0] * 4, outputs
    with Store.open(blank_store_url) as store:
        store.environments.create("web", "base:bookworm", snap("s1"))
        assert len(store.environments.history("web")) == 1


def test_migrations_build_exactly_the_schema(store_url: str) -> None:
    engine = make_engine(store_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, metadata) == []
    finally:
        engine.dispose()


@pytest.mark.parametrize("racers", [2, 8])
def test_racing_add_snapshot_has_exactly_one_winner(store: Store, racers: int) -> None:
    store.environments.create("web", "base:bookworm", snap("r0"))
    head = "r0"
    for rnd in range(1, 6):
        labels = [f"r{rnd}-{i}" for i in range(racers)]
        barrier = threading.Barrier(racers)

        def race(label: str, parent: str, barrier: threading.Barrier) -> Snapshot:
            barrier.wait(timeout=30)
            return store.environments.add_snapshot("web", snap(label, parent), dg(parent))

        won: list[Snapshot] = []
        lost: list[Conflict] = []
        with ThreadPoolExecutor(max_workers=racers) as pool:
            futures = [pool.submit(race, label, head, barrier) for label in labels]
            for future in futures:
                try:
                    won.append(future.result(timeout=60))
                except Conflict as exc:  # anything else fails the test right here
                    lost.append(exc)
        assert len(won) == 1 and len(lost) == racers - 1
        assert won[0].seq == rnd + 1
        assert store.environments.get("web").head == won[0].digest
        head = next(label for label in labels if dg(label) == won[0].digest)
    history = store.environments.history("web")
    assert [s.seq for s in history] == [6, 5, 4, 3, 2, 1]
    assert all(s.parent == older.digest for s, older in itertools.pairwise(history))


def test_unreachable_database_is_a_store_error_without_the_password() -> None:
    with pytest.raises(StoreError) as caught:
        Store.open("postgresql://corral:s3cret-pw@127.0.0.1:1/corral")
    message = str(caught.value)
    assert "s3cret-pw" not in message
    assert "postgresql+psycopg://corral:***@127.0.0.1:1/corral" in message


def test_unsupported_url_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="mysql"):
        Store.open("mysql://root@localhost/corral")


def test_sqlite_connection_settings(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a' / 'b' / 'corral.db'}"
    Store.open(url).close()
    assert (tmp_path / "a" / "b" / "corral.db").exists()
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            got = {
                pragma: conn.exec_driver_sql(f"PRAGMA {pragma}").scalar()
                for pragma in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
            }
    finally:
        engine.dispose()
    assert got == {"journal_mode": "wal", "synchronous": 1, "foreign_keys": 1, "busy_timeout": 5000}


def test_rows_are_frozen() -> None:
    env = Environment("web", "base:bookworm", dg("x"), T0, T0)
    with pytest.raises(AttributeError):
        env.head = dg("y")  # type: ignore[misc]
