"""Call trees in the store, on SQLite and on PostgreSQL: what a tree costs, which callee a
waiting caller's worker may take, and that a run ends (and is announced) exactly once."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from alembic import command
from sqlalchemy import insert, select, text

from corral.billing.ledger import Ledger
from corral.pipeline.budgets import Budgets
from corral.states import RunStatus
from corral.store import Run, Store
from corral.store.engine import alembic_config, make_engine
from corral.store.schema import runs

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def add_run(
    store: Store,
    id: str,
    *,
    parent: Run | None = None,
    budget: float | None = None,
    status: str = "succeeded",
    started: datetime | None = NOW,
    awaited: bool = False,
    created: datetime = NOW,
    owner: str | None = None,
) -> Run:
    """A run of the tree; one in a terminal ``status`` is recorded running, then ended."""
    ended = RunStatus(status).terminal
    run = store.runs.create(
        Run(
            id=id,
            environment="env",
            snapshot="sha256:" + "0" * 64,
            entrypoint="a.py:main",
            input="{}",
            trigger="agent" if parent else "http",
            status=RunStatus.RUNNING if ended else status,
            created_at=created,
            started_at=started,
            user="ann",
            app=f"app-{id}",
            app_version=1,
            parent_run=parent.id if parent else None,
            depth=parent.depth + 1 if parent else 0,
            root_run=parent.root if parent else id,
            awaited=awaited,
            options=json.dumps({"budget_per_run": budget}),
            lease_owner=owner,
        )
    )
    if not ended:
        return run
    done = store.runs.finish(id, status=status, finished_at=NOW)
    assert done is not None
    return done[0]


def use(
    store: Store,
    run: str,
    *,
    tokens: tuple[int, int] = (0, 0),
    seconds: float = 0.0,
    calls: tuple[str | None, ...] = (),
    errors: int = 0,
) -> None:
    """Usage as the bridge and the executor record it for ``run``."""
    rows: list[dict[str, Any]] = []
    if tokens != (0, 0):
        rows.append(
            {
                "at": NOW,
                "run": run,
                "user": "ann",
                "connection": "openai",
                "kind": "model_tokens",
                "input_tokens": tokens[0],
                "output_tokens": tokens[1],
            }
        )
    if seconds:
        rows.append(
            {"at": NOW, "run": run, "user": "ann", "kind": "sandbox_seconds", "quantity": seconds}
        )
    store.usage.add_events(rows)
    call = {
        "at": NOW,
        "run": run,
        "method": "GET",
        "path": "/",
        "status": 200,
        "bytes_in": 0,
        "bytes_out": 0,
        "latency_ms": 1.0,
        "error": None,
        "peer": "10.213.0.2",
    }
    store.usage.add_calls(
        [{**call, "connection": c} for c in calls]
        + [{**call, "connection": "market", "status": 502, "error": "refused"}] * errors
    )


def test_a_tree_costs_what_its_runs_cost_each_priced_as_the_ledger_prices_them(
    store: Store,
) -> None:
    ledger = Ledger(store)
    root = add_run(store, "run-root", budget=100.0)
    mid = add_run(store, "run-mid", parent=root, budget=1.0)
    leaf = add_run(store, "run-leaf", parent=mid)
    twin = add_run(store, "run-twin", parent=root)
    other = add_run(store, "run-other", budget=0.01)  # another tree: never counted
    use(store, root.id, tokens=(100, 10), seconds=2.5, calls=("market", "_corral", None))
    use(store, mid.id, seconds=1.0, calls=("market",) * 3, errors=2)
    use(store, leaf.id, tokens=(1000, 300), calls=("openai",))
    use(store, twin.id, seconds=4.0)
    use(store, other.id, tokens=(10**6, 10**6), seconds=100.0, calls=("market",) * 50)

    tree = Budgets(store, ledger).tree(leaf, NOW)
    assert set(tree.own) == {root.id, mid.id, leaf.id, twin.id}
    for run in (root, mid, leaf, twin):  # the grouped queries agree with the per-run reference
        assert tree.own[run.id] == pytest.approx(ledger.cost(run.id))
    assert tree.subtree(leaf.id) == pytest.approx(ledger.cost(leaf.id))
    assert tree.subtree(mid.id) == pytest.approx(ledger.cost(mid.id) + ledger.cost(leaf.id))
    whole = sum(ledger.cost(r.id) for r in (root, mid, leaf, twin))
    assert tree.subtree(root.id) == pytest.approx(whole)
    # The leaf has no budget of its own; its caller's subtree (mid's 0.0115 credits and the
    # leaf's 1.9005) is past mid's budget of 1.0: the leaf is stopped on mid's account.
    over = tree.overspent(leaf.id)
    assert over is not None and (over.run, over.owner, over.budget) == (leaf.id, mid.id, Decimal(1))
    assert over.spent == pytest.approx(tree.subtree(mid.id))
    assert tree.overspent(twin.id) is None  # the root's 100 credits are not spent
    assert Budgets(store, ledger).overspent(other) is not None  # its own tree, its own budget


def test_a_running_run_costs_its_sandbox_time_so_far(store: Store) -> None:
    ledger = Ledger(store)
    root = add_run(store, "run-root", budget=0.5, status="running", started=NOW)
    child = add_run(
        store, "run-child", parent=root, status="running", started=NOW + timedelta(seconds=10)
    )
    budgets = Budgets(store, ledger)
    # 20 s of root and 10 s of its callee: 30 sandbox seconds so far.
    tree = budgets.tree(child, NOW + timedelta(seconds=20))
    assert tree.subtree(root.id) == pytest.approx(30 * ledger.prices.sandbox_second)
    assert tree.overspent(child.id) is None  # 0.3 of 0.5 credits
    # 30 s later: 50 + 40 seconds, 0.9 credits; both runs are past the root's budget.
    later = budgets.tree(child, NOW + timedelta(seconds=50))
    for run in (root, child):
        over = later.overspent(run.id)
        assert over is not None and over.owner == root.id
        assert over.spent == pytest.approx(90 * ledger.prices.sandbox_second)
    assert "its caller run-root" in (later.overspent(child.id) or pytest.fail()).reason()


def test_a_waiting_callers_worker_claims_only_that_callers_awaited_callees(
    store: Store,
) -> None:
    caller = add_run(store, "run-caller", status="running")
    stranger = add_run(store, "run-stranger", status="running")
    add_run(store, "run-fire-and-forget", parent=caller, status="queued", started=None)
    add_run(
        store,
        "run-theirs",
        parent=stranger,
        status="queued",
        started=None,
        awaited=True,
        created=NOW + timedelta(seconds=30),
    )
    awaited = [
        add_run(
            store,
            f"run-awaited-{i}",
            parent=caller,
            status="queued",
            started=None,
            awaited=True,
            created=NOW + timedelta(seconds=i),
        )
        for i in range(4)
    ]
    later = NOW + timedelta(minutes=1)
    taken: list[Run | None] = []
    lock = threading.Lock()

    def claim() -> None:
        got = store.runs.claim("w", 10, later, awaited_by=caller.id)
        with lock:
            taken.append(got)

    racers = [threading.Thread(target=claim) for _ in range(6)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join()
    won = sorted(r.id for r in taken if r is not None)
    assert won == sorted(r.id for r in awaited)  # each exactly once; nothing else
    assert all(store.runs.get(r).lease_owner == "w" for r in won)
    assert store.runs.get("run-fire-and-forget").status == "queued"  # left to the queue
    assert store.runs.get("run-theirs").status == "queued"
    last = store.runs.claim("x", 10, later)
    assert last is not None and last.id == "run-fire-and-forget"


def test_a_run_ends_once_and_is_announced_once(store: Store) -> None:
    run = add_run(store, "run-1", status="running", started=NOW, owner="w1")
    ended: list[tuple[Run, object] | None] = []
    barrier = threading.Barrier(8)

    def end(status: str) -> Callable[[], None]:
        def go() -> None:
            barrier.wait()
            ended.append(
                store.runs.finish(run.id, lease_owner="w1", status=status, finished_at=NOW)
            )

        return go

    threads = [threading.Thread(target=end(s)) for s in ["failed", "cancelled"] * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r[0] for r in ended if r is not None]
    assert len(winners) == 1 and winners[0].status == store.runs.get(run.id).status
    finished = [e for e in store.runs.events(run.id) if e.kind == "run.finished"]
    assert len(finished) == 1  # its event, once, with the status that won
    assert json.loads(finished[0].data)["status"] == winners[0].status
    assert store.runs.finish(run.id, status="succeeded", finished_at=NOW) is None  # ended

    lost = add_run(store, "run-2", status="running", owner="w2")
    not_w1 = store.runs.finish(lost.id, lease_owner="w1", status="failed", finished_at=NOW)
    assert not_w1 is None  # not w1's
    assert store.runs.get(lost.id).status == "running"

    assert store.runs.unannounced(NOW + timedelta(seconds=1)) == [store.runs.get(run.id)]
    claims = [store.runs.claim_announcement(run.id, NOW) for _ in range(3)]
    assert claims == [True, False, False]
    assert store.runs.unannounced(NOW + timedelta(seconds=1)) == []
    assert not store.runs.claim_announcement(lost.id, NOW)  # not ended: nothing to announce


def test_the_migration_roots_every_existing_tree(blank_store_url: str) -> None:
    engine = make_engine(blank_store_url)
    config = alembic_config()
    try:
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, "0006_triggers")
        row = {
            "environment": "e",
            "snapshot": "s",
            "entrypoint": "a:b",
            "input": "{}",
            "trigger": "agent",
            "swapped": False,
            "attempts": 1,
            "created_at": NOW,
        }
        chain = [
            ("r0", None, "succeeded"),
            ("r1", "r0", "failed"),
            ("r2", "r1", "succeeded"),
            ("r3", "r2", "running"),
            ("x0", None, "queued"),
            ("orphan", "gone", "cancelled"),  # its parent is not in the database
        ]
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO runs (id, parent_run, status, environment, snapshot, entrypoint,"
                    " input, trigger, swapped, attempts, created_at, finished_at) VALUES (:id,"
                    " :parent_run, :status, :environment, :snapshot, :entrypoint, :input,"
                    " :trigger, :swapped, :attempts, :created_at, :finished_at)"
                ),
                [
                    {
                        **row,
                        "id": i,
                        "parent_run": p,
                        "status": s,
                        "finished_at": None if s in ("queued", "running") else NOW,
                    }
                    for i, p, s in chain
                ],
            )
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, "head")
        with engine.connect() as conn:
            rows = conn.execute(select(runs.c.id, runs.c.root_run, runs.c.announced_at))
            got = {r.id: (r.root_run, r.announced_at is not None) for r in rows}
        assert got == {
            "r0": ("r0", True),
            "r1": ("r0", True),
            "r2": ("r0", True),
            "r3": ("r0", False),
            "x0": ("x0", False),
            "orphan": (None, True),
        }
        # A row the new code writes goes in as before: the new columns have defaults.
        with engine.begin() as conn:
            conn.execute(insert(runs).values(id="new", **row, status="queued"))
            assert conn.scalar(select(runs.c.awaited).where(runs.c.id == "new")) is False
    finally:
        engine.dispose()
