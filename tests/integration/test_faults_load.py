"""200 runs from 50 HTTP clients against a real ``corral serve``: each ends exactly once.

The clients are impatient and repetitive, as real ones are: each starts four runs, sends
its first request twice with the same ``Idempotency-Key`` (a retry after a lost answer),
waits on some runs and polls others, and every tenth client cancels one of its runs as soon
as it has started it. ``corral serve`` runs in a process of its own (API and four workers) on a
data directory and database of the test's own, on SQLite and on PostgreSQL.

Afterwards: the app has exactly 200 runs (retries made none), each ended exactly once
(``faults.assert_ended_once``), and nothing is left on the host once serve has stopped.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from corral.config import Settings
from corral.context import Corral
from corral.pipeline.apps import AppSpec
from tests.integration.faults import (
    CorralProcess,
    assert_ended_once,
    free_bridge_port,
    free_port,
    wait_for,
)
from tests.integration.leftovers import Leftovers
from tests.integration.test_http_trigger import agent_environment

pytestmark = [pytest.mark.root, pytest.mark.runc]

CLIENTS, RUNS_EACH = 50, 4
TERMINAL = {"succeeded", "failed", "timed_out", "cancelled"}


@pytest.fixture
def world(store_url: str, tmp_path: Path) -> Iterator[Corral]:
    """A Corral of its own (data directory, database on either engine) with a greeting app."""
    environ = {
        **os.environ,
        "CORRAL_DATA_DIR": str(tmp_path / "data"),
        "CORRAL_DATABASE_URL": store_url,
    }
    port = free_bridge_port(Settings.from_env(environ))
    corral = Corral(Settings.from_env({**environ, "CORRAL_BRIDGE_PORT": str(port)}))
    try:
        env = agent_environment(corral)
        corral.pipeline.apps.create("greet", AppSpec(env, "agent.py:greet", timeout=300))
        corral.ledger.grant("warm", 10)
        yield corral
    finally:
        corral.close()


def client_session(
    url: str, number: int, ids: list[str], cancels: list[str], errors: list[str]
) -> None:
    """One client: four runs, one retried, some waited on, one cancelled by every tenth."""
    user = f"client-{number}"
    headers = {"X-Corral-User": user}
    with httpx.Client(base_url=url, timeout=300, headers=headers) as http:
        http.post(f"/v1/users/{user}/credits", json={"credits": 100}).raise_for_status()
        mine = []
        for i in range(RUNS_EACH):
            body: dict[str, Any] = {"input": {"who": f"{user}/{i}"}, "wait": i % 2 == 1}
            key = {"Idempotency-Key": f"{user}-{i}"}
            answer = http.post("/v1/apps/greet/runs", json=body, headers=key)
            if i == 0:  # the answer was "lost": the client sends the same request again
                again = http.post("/v1/apps/greet/runs", json=body, headers=key)
                if again.json().get("id") != answer.json().get("id"):
                    errors.append(f"{user}: a retried key made another run")
            if answer.status_code not in (200, 201):
                errors.append(f"{user}: {answer.status_code} {answer.text}")
                continue
            mine.append(answer.json()["id"])
            if number % 10 == 0 and i == RUNS_EACH - 2:  # not waited on: cancelled at once
                cancels.append(mine[-1])
                http.post(f"/v1/runs/{mine[-1]}/cancel").raise_for_status()
        for run_id in mine:  # poll the ones not waited on
            deadline = time.monotonic() + 300
            while http.get(f"/v1/runs/{run_id}").json()["status"] not in TERMINAL:
                if time.monotonic() > deadline:
                    errors.append(f"{run_id} did not end")
                    break
                time.sleep(0.5)
    ids.extend(mine)


def test_200_runs_from_50_clients_each_end_exactly_once(world: Corral, tmp_path: Path) -> None:
    leaks = Leftovers(world.settings)
    port = free_port()
    serve = CorralProcess(
        world.settings,
        "serve",
        "--port",
        str(port),
        "--workers",
        "4",
        "--no-schedules",
        log=tmp_path / "serve.log",
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def answering() -> bool:
            assert serve.proc.poll() is None, serve.output()
            try:
                return httpx.get(f"{url}/v1/apps", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(answering, 60, "corral serve to answer")
        # The first run swaps the runner in and folds it into the environment, once.
        warm = httpx.post(
            f"{url}/v1/apps/greet/runs",
            headers={"X-Corral-User": "warm"},
            json={"input": {"who": "warm"}, "wait": True},
            timeout=300,
        )
        assert warm.json()["status"] == "succeeded", warm.text

        ids: list[str] = []
        cancels: list[str] = []
        errors: list[str] = []
        began = time.monotonic()
        clients = [
            threading.Thread(target=client_session, args=(url, n, ids, cancels, errors))
            for n in range(CLIENTS)
        ]
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        elapsed = time.monotonic() - began
    finally:
        serve.stop()
    print(f"{len(ids)} runs from {CLIENTS} clients in {elapsed:.1f} s")  # for the record
    assert not errors, errors[:10]

    runs = [r for r in world.store.runs.recent(app="greet", limit=1000) if r.user != "warm"]
    assert sorted(r.id for r in runs) == sorted(ids) and len(ids) == CLIENTS * RUNS_EACH
    for run_id in ids:
        ended = assert_ended_once(world.store, run_id)
        # A cancel that came too late finds the run already succeeded.
        wanted = ("succeeded", "cancelled") if run_id in cancels else ("succeeded",)
        assert ended.status in wanted, (run_id, ended.status, ended.error_code, ended.error)
    leaks.assert_none()
