"""A database blip costs latency, never a run: PostgreSQL restarted in the middle of a run."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from corral.config import BRIDGE_PORTS
from corral.context import Corral
from corral.errors import StoreError
from corral.pipeline.apps import AppSpec
from corral.pipeline.service import Trigger
from corral.sandbox.slots import Record
from corral.store import Run, RunEvent, engine
from tests.fakes import FakeMarketData
from tests.integration.conftest import run, runc_runtime
from tests.integration.test_resilience import leftovers
from tests.pgcluster import Cuttable, PrivateCluster

pytestmark = [pytest.mark.root, pytest.mark.runc, pytest.mark.postgres]

AGENT = """
import time
from corral_runner import sdk

def main(input):
    # Logs all through the outage: the bridge must keep them until the database is back.
    for i in range(int(input["ticks"])):
        sdk.log(f"tick {i}")
        time.sleep(0.2)
    return {"ticks": input["ticks"]}

def caller(input):
    sdk.log("started")
    time.sleep(1.0)  # the database goes down meanwhile
    # The bridge has never looked this connection or credential up: it must ask the store.
    answer = sdk.request("prices", "GET", "/v1/prices/ACME")
    return {"status": answer.status}
"""


@pytest.fixture
def cluster() -> Iterator[PrivateCluster]:
    made = PrivateCluster()
    try:
        yield made
    finally:
        made.destroy()


@pytest.fixture
def on_cluster(corral: Corral, cluster: PrivateCluster) -> Iterator[Corral]:
    """A Corral sharing the session's data directory (its images, its layer cache) but keeping
    its records on the private cluster, with a bridge of its own."""
    port = next(
        p
        for p in BRIDGE_PORTS
        if p != corral.settings.network.bridge_port and p % 7 == os.getpid() % 7
    )
    settings = dataclasses.replace(
        corral.settings,
        database_url=cluster.url(),
        network=dataclasses.replace(corral.settings.network, bridge_port=port),
    )
    mine = Corral(settings)
    try:
        yield mine
    finally:
        mine.close()


def patiently_get(corral: Corral, run_id: str) -> str:
    """The run's status, waiting out the outage (this is the test's reader, not Corral's)."""
    while True:
        try:
            return corral.store.runs.get(run_id).status
        except StoreError:
            time.sleep(0.1)


@pytest.fixture
def agent_env(on_cluster: Corral) -> str:
    corral = on_cluster
    env = f"t-{secrets.token_hex(4)}"
    corral.envs.create(env)
    code, _, err = run(
        corral, env, "sh", "-c", f"cat > /home/user/agent.py <<'EOF'\n{AGENT}\nEOF", edit=True
    )
    assert code == 0, err
    corral.envs.freeze(env)
    corral.ledger.grant("alice", 100)
    return env


@pytest.fixture
def agent_app(on_cluster: Corral, agent_env: str) -> str:
    app = f"a-{secrets.token_hex(4)}"
    on_cluster.pipeline.apps.create(app, AppSpec(agent_env, "agent.py:main"))
    return app


class Watched:
    """A run admitted now, and every sandbox this process booted for it until it ended."""

    def __init__(self, corral: Corral, app: str, input: dict[str, Any]) -> None:
        self.corral = corral
        self.run = corral.pipeline.execute_agent(app, input, Trigger("http"), user="alice")
        self.sandboxes: dict[str, Record] = {}
        self.seen: dict[str, tuple[float, float]] = {}  # sandbox -> first and last seen
        self._thread = threading.Thread(target=self._watch)
        self._thread.start()

    def _watch(self) -> None:
        while patiently_get(self.corral, self.run.id) in ("queued", "running"):
            now = time.monotonic()
            for record in runc_runtime(self.corral).slots.records():
                if record.owner.pid == os.getpid():
                    self.sandboxes.setdefault(record.sandbox_id, record)
                    first, _ = self.seen.get(record.sandbox_id, (now, now))
                    self.seen[record.sandbox_id] = (first, now)
            time.sleep(0.05)

    def logging(self) -> None:
        """Wait until the agent is under way (it has logged)."""
        deadline = time.monotonic() + 120
        while not any(e.kind == "log" for e in self.corral.store.runs.events(self.run.id)):
            run = self.corral.store.runs.get(self.run.id)
            assert run.status in ("queued", "running"), f"{run.status}: {run.error}"
            assert time.monotonic() < deadline, f"the agent never started logging ({run})"
            time.sleep(0.05)

    def ended(self) -> tuple[Run, list[RunEvent]]:
        self._thread.join(timeout=180)
        assert not self._thread.is_alive(), "the run never ended"
        return self.corral.store.runs.get(self.run.id), self.corral.store.runs.events(self.run.id)

    def nothing_left(self) -> None:
        self.corral.stop_workers()
        assert self.sandboxes
        for record in self.sandboxes.values():
            assert leftovers(self.corral, record) == []


def test_postgres_restarted_mid_run_costs_latency_not_the_run(
    on_cluster: Corral, cluster: PrivateCluster, agent_app: str
) -> None:
    on_cluster.start_workers(2, lease=10.0)
    watched = Watched(on_cluster, agent_app, {"ticks": 40})
    watched.logging()

    cluster.restart(down=2.5)  # the agent goes on logging meanwhile

    done, events = watched.ended()
    kinds = [e.kind for e in events]
    assert (done.status, done.error) == ("succeeded", None)
    assert json.loads(done.result or "null") == {"ticks": 40}
    assert done.deliveries == 1 and done.attempts == 1  # latency only: no second sandbox
    assert kinds.count("run.finished") == 1 and kinds.count("result") == 1
    assert "attempt.failed" not in kinds
    # Not one of the agent's lines was lost, though the bridge could not store them for a while.
    logs = [json.loads(e.data) for e in events if e.kind == "log"]
    assert [d["message"] for d in logs if d["stream"] == "sdk"] == [f"tick {i}" for i in range(40)]
    assert len(watched.sandboxes) == 1
    watched.nothing_left()


def test_an_outage_past_the_budget_costs_a_delivery_and_the_redelivery_is_served(
    on_cluster: Corral, cluster: PrivateCluster, agent_app: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker gives the run up; its lease runs out and it is delivered again, to a worker of
    the same process, whose bridge must serve it: what the first execution revoked on its way
    out was its own attempt's token, not the run."""
    monkeypatch.setattr(engine, "OUTAGE_BUDGET_S", 1.0, raising=False)
    on_cluster.start_workers(2, lease=3.0)
    watched = Watched(on_cluster, agent_app, {"ticks": 15})
    watched.logging()

    cluster.restart(down=4.0)

    done, events = watched.ended()
    kinds = [e.kind for e in events]
    assert (done.status, done.error) == ("succeeded", None)
    assert json.loads(done.result or "null") == {"ticks": 15}
    assert done.deliveries == 2 and kinds.count("run.finished") == 1
    assert len(watched.sandboxes) == 2
    watched.nothing_left()


def test_a_bridge_lookup_during_the_outage_waits_for_the_store(
    on_cluster: Corral, cluster: PrivateCluster, agent_env: str
) -> None:
    """An agent's call through the bridge that needs the store (the connection profile and the
    credential, never looked up before) waits out the outage instead of failing."""
    market = FakeMarketData(api_key="mk-outage").start()
    try:
        on_cluster.store.connections.put("prices", market.url, "header:x-api-key", None)
        on_cluster.vault.put("alice", "prices", "api_key", {"key": "mk-outage"})
        app = f"a-{secrets.token_hex(4)}"
        on_cluster.pipeline.apps.create(
            app, AppSpec(agent_env, "agent.py:caller", connections=("prices",))
        )
        on_cluster.start_workers(1, lease=10.0)
        watched = Watched(on_cluster, app, {})
        watched.logging()

        cluster.restart(down=2.5)

        done, _ = watched.ended()
    finally:
        market.stop()
    assert (done.status, done.error) == ("succeeded", None)
    assert json.loads(done.result or "null") == {"status": 200}
    assert done.deliveries == 1 and len(market.requests) == 1
    watched.nothing_left()


def test_a_worker_cut_off_from_the_store_stops_before_another_takes_its_run(
    corral: Corral, on_cluster: Corral, cluster: PrivateCluster, agent_app: str
) -> None:
    """Only one worker loses the database (a partition): the others can still requeue its run
    once its lease has run out. It must have torn its sandbox down by then, never two sandboxes
    of one run at once; and the run still succeeds, on another worker."""
    link = Cuttable(cluster.port)
    taken = {corral.settings.network.bridge_port, on_cluster.settings.network.bridge_port}
    # As on another host: a bridge of its own, which reaches the store through the same link.
    cut_off = Corral(
        dataclasses.replace(
            on_cluster.settings,
            database_url=f"postgresql://postgres@127.0.0.1:{link.port}/corral",
            network=dataclasses.replace(
                on_cluster.settings.network,
                bridge_port=next(
                    p for p in BRIDGE_PORTS if p not in taken and p % 7 == (os.getpid() + 1) % 7
                ),
            ),
        )
    )
    try:
        cut_off.start_workers(1, lease=3.0)
        watched = Watched(on_cluster, agent_app, {"ticks": 60})
        watched.logging()
        assert on_cluster.store.runs.get(watched.run.id).lease_owner == cut_off._workers[0].name
        on_cluster.start_workers(1, lease=3.0)

        link.cut()

        done, events = watched.ended()
        link.heal()  # the cut-off worker may still be trying to hand the run back
        cut_off.stop_workers()
    finally:
        cut_off.close()
        link.close()
    assert (done.status, done.error) == ("succeeded", None)
    assert done.deliveries == 2 and [e.kind for e in events].count("run.finished") == 1
    first, second = sorted(watched.seen.values())  # (first seen, last seen) of each sandbox
    assert first[1] < second[0], "two sandboxes of one run were alive at once"
    watched.nothing_left()
