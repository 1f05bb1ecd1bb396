"""Call trees on real sandboxes: a caller cannot spend past its budget through its callees,
and a chain of waiting callers deeper than there are workers still completes."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from corral.config import BRIDGE_PORTS
from corral.context import Corral
from corral.errors import BudgetExhausted
from corral.pipeline.apps import AppSpec
from corral.pipeline.service import Trigger
from corral.pipeline.worker import Worker
from corral.store import Run
from tests.conftest import PostgresServer
from tests.fakes import FakeMarketData
from tests.integration.conftest import run

pytestmark = [pytest.mark.root, pytest.mark.runc]

AGENT = """
import time
from corral_runner import sdk

def relay(input):
    # Call the first app of the chain with the rest of it, and wait for it.
    chain = input.get("chain") or []
    if not chain:
        return {"run": sdk.context()["run_id"]}
    called = sdk.call_agent(chain[0], {"chain": chain[1:]}, wait=True, timeout=60)
    return {"run": sdk.context()["run_id"], "called": called}

def spender(input):
    # Every call through the bridge costs credits; keep calling until stopped.
    for _ in range(100000):
        sdk.request("prices", "GET", "/v1/prices/ACME")
        time.sleep(0.01)
    return "never"
"""


@pytest.fixture(scope="module")
def agents_env(corral: Corral) -> Iterator[str]:
    name = f"t-{secrets.token_hex(4)}"
    corral.envs.create(name)
    code, _, err = run(
        corral, name, "sh", "-c", f"cat > /home/user/agent.py <<'EOF'\n{AGENT}\nEOF", edit=True
    )
    assert code == 0, err
    corral.envs.freeze(name, "agents that call agents")
    yield name
    corral.envs.delete(name)


def start(corral: Corral, count: int) -> Iterator[list[Worker]]:
    started = corral.start_workers(count, lease=3.0)
    yield started
    for worker in started:
        worker.stop()
        corral._workers.remove(worker)


@pytest.fixture
def one_worker(corral: Corral) -> Iterator[list[Worker]]:
    yield from start(corral, 1)


@pytest.fixture
def two_workers(corral: Corral) -> Iterator[list[Worker]]:
    yield from start(corral, 2)


@pytest.fixture
def market() -> Iterator[FakeMarketData]:
    served = FakeMarketData(api_key="mk-trees").start()
    yield served
    served.stop()


def new_app(corral: Corral, env: str, entry: str, **settings: Any) -> str:
    name = f"a-{secrets.token_hex(4)}"
    corral.pipeline.apps.create(name, AppSpec(env, entry, **settings))
    return name


def new_user(corral: Corral) -> str:
    user = f"u-{secrets.token_hex(4)}"
    corral.ledger.grant(user, 100)
    return user


def only_run(corral: Corral, app: str) -> Run:
    (found,) = corral.store.runs.recent(app=app)
    return found


def test_a_chain_deeper_than_the_workers_completes(
    corral: Corral, agents_env: str, one_worker: list[Worker]
) -> None:
    a, b, c = (new_app(corral, agents_env, "agent.py:relay") for _ in range(3))
    user = new_user(corral)
    done = corral.pipeline.execute_agent(
        a, {"chain": [b, c]}, Trigger("http"), user=user, wait=True, wait_timeout=240
    )

    assert done.status == "succeeded", (done.error_code, done.error)
    called = json.loads(done.result or "null")["called"]
    assert called["status"] == "succeeded" and called["app"] == b
    assert called["result"]["called"]["status"] == "succeeded"
    assert called["result"]["called"]["app"] == c
    runs = [only_run(corral, app) for app in (a, b, c)]
    assert [r.depth for r in runs] == [0, 1, 2]
    assert {r.root for r in runs} == {done.id}
    assert [r.awaited for r in runs] == [False, True, True]
    # Each callee ran on the capacity its waiting caller lent: the one worker there is.
    assert {r.lease_owner for r in runs} == {one_worker[0].name}


@pytest.fixture
def pg_corral(
    corral: Corral, postgres_server: PostgresServer, postgres_template: str
) -> Iterator[Corral]:
    """A Corral on a fresh PostgreSQL database (sharing the session's data directory), with
    its own bridge port: the instance the worker processes below serve."""
    database = f"corral_test_{secrets.token_hex(6)}"
    url = postgres_server.create(database, template=postgres_template)
    ports = set(BRIDGE_PORTS) - {corral.settings.network.bridge_port}
    network = dataclasses.replace(
        corral.settings.network, bridge_port=secrets.choice(sorted(ports))
    )
    made = Corral(dataclasses.replace(corral.settings, database_url=url, network=network))
    try:
        yield made
    finally:
        made.close()
        postgres_server.drop(database)


@pytest.mark.postgres
def test_on_postgresql_a_chain_deeper_than_the_worker_processes_completes(
    pg_corral: Corral,
) -> None:
    env = f"t-{secrets.token_hex(4)}"
    pg_corral.envs.create(env)
    code, _, err = run(
        pg_corral, env, "sh", "-c", f"cat > /home/user/agent.py <<'EOF'\n{AGENT}\nEOF", edit=True
    )
    assert code == 0, err
    pg_corral.envs.freeze(env)
    apps = [new_app(pg_corral, env, "agent.py:relay") for _ in range(4)]
    settings = pg_corral.settings
    environ = {
        **os.environ,
        "CORRAL_DATA_DIR": str(settings.data_dir),
        "CORRAL_DATABASE_URL": settings.database_url,
        "CORRAL_BRIDGE_PORT": str(settings.network.bridge_port),
    }
    # Two processes of one worker each; the first to start serves the bridge for both.
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "corral.cli", "worker", "--workers", "1", "--lease", "3"],
            env=environ,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(2)
    ]
    try:
        done = pg_corral.pipeline.execute_agent(
            apps[0],
            {"chain": apps[1:]},
            Trigger("http"),
            user=new_user(pg_corral),
            wait=True,
            wait_timeout=240,
        )
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(timeout=60)
    statuses = [[r.status for r in pg_corral.store.runs.recent(app=app)] for app in apps]
    assert statuses == [["succeeded"]] * 4, (done.result, done.error)
    runs = [only_run(pg_corral, app) for app in apps]
    assert [r.depth for r in runs] == [0, 1, 2, 3]
    assert len({r.lease_owner for r in runs}) <= 2  # four runs nested, two workers
    pg_corral.envs.delete(env)


def test_a_caller_cannot_spend_past_its_budget_through_a_callee(
    corral: Corral, agents_env: str, two_workers: list[Worker], market: FakeMarketData
) -> None:
    user = new_user(corral)
    corral.store.connections.put("prices", market.url, "header:x-api-key", None)
    corral.vault.put(user, "prices", "api_key", {"key": "mk-trees"})
    # The callee has no budget of its own; only its caller's bounds what it may spend.
    callee = new_app(corral, agents_env, "agent.py:spender", connections=("prices",), timeout=60)
    caller = new_app(corral, agents_env, "agent.py:relay", budget_per_run=0.05, timeout=60)

    done = corral.pipeline.execute_agent(
        caller, {"chain": [callee]}, Trigger("http"), user=user, wait=True, wait_timeout=120
    )
    spent = corral.pipeline.wait(only_run(corral, callee).id, 60)

    assert (done.status, done.error_code) == ("failed", "budget_exhausted"), done.error
    assert (spent.status, spent.error_code) == ("failed", "budget_exhausted"), spent.error
    assert f"its caller {done.id}" in (spent.error or "")
    assert "token was revoked and its sandbox torn down" in (spent.error or "")
    assert spent.root_run == done.id and spent.parent_run == done.id
    assert corral.verifier.revoked(done.id) and corral.verifier.revoked(spent.id)
    tree = corral.store.ledger.spent(run=done.id) + corral.store.ledger.spent(run=spent.id)
    assert tree >= 50_000  # micro-credits: 0.05 credits
    calls = len(market.requests)
    time.sleep(0.5)
    assert len(market.requests) == calls  # the callee's sandbox is gone: nothing more arrives

    # The tree has spent its budget: no run of it may start another.
    other = new_app(corral, agents_env, "agent.py:relay")
    for parent in (done, spent):
        with pytest.raises(BudgetExhausted, match=f"run {done.id} and the runs it called"):
            corral.pipeline.execute_agent(
                other, {}, Trigger("agent", parent_run=parent.id), user=user
            )
    assert corral.store.runs.recent(app=other) == []
