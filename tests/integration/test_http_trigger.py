"""The HTTP trigger: apps, runs, their event streams and credits over the API, on real sandboxes.

uvicorn serves ``create_app(corral)`` on 127.0.0.1 (``serving`` below, also used by the web
UI's test); two workers of this module execute what the API admits. Every run goes through
``Pipeline.execute_agent``, so each test asserts what a client sees and, where it matters,
what the store recorded.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from corral.api.app import create_app
from corral.context import Corral
from corral.pipeline.worker import Worker
from tests.hosts import serving
from tests.integration.conftest import run

pytestmark = [pytest.mark.root, pytest.mark.runc]

AGENT = """
import time
from corral_runner import sdk

def greet(input):
    sdk.log("greeting", who=input["who"])
    return {"greeting": "hello " + input["who"], "twice": 2 * input.get("n", 0)}

def sleepy(input):
    sdk.log("sleeping")
    time.sleep(float(input.get("seconds", 30)))
    return {"slept": True}
"""
GREET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"who": {"type": "string"}, "n": {"type": "integer"}},
    "required": ["who"],
    "examples": [{"who": "ada", "n": 2}],
}
TERMINAL = {"succeeded", "failed", "timed_out", "cancelled"}


def agent_environment(corral: Corral) -> str:
    """A fresh environment with ``AGENT`` frozen in as /home/user/agent.py."""
    name = f"t-{secrets.token_hex(4)}"
    corral.envs.create(name)
    code, _, err = run(
        corral, name, "sh", "-c", f"cat > /home/user/agent.py <<'EOF'\n{AGENT}\nEOF", edit=True
    )
    assert code == 0, err
    corral.envs.freeze(name, "the agent")
    return name


@pytest.fixture(scope="module")
def workers(corral: Corral) -> Iterator[list[Worker]]:
    started = corral.start_workers(2)
    yield started
    for worker in started:
        worker.stop()


@pytest.fixture(scope="module")
def agent_env(corral: Corral) -> Iterator[str]:
    name = agent_environment(corral)
    yield name
    corral.envs.delete(name)


@pytest.fixture(scope="module")
def base_url(corral: Corral, workers: list[Worker]) -> Iterator[str]:
    with serving(create_app(corral)) as url:
        yield url


@pytest.fixture
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def user(corral: Corral) -> str:
    name = f"u-{secrets.token_hex(4)}"
    corral.ledger.grant(name, 100)
    return name


def make_app(client: httpx.Client, env: str, entrypoint: str, **settings: Any) -> str:
    name = f"a-{secrets.token_hex(4)}"
    created = client.post(
        "/v1/apps", json={"name": name, "environment": env, "entrypoint": entrypoint, **settings}
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["name"] == name and body["version"] == 1
    assert body["spec"]["environment"] == env and body["spec"]["entrypoint"] == entrypoint
    return name


@pytest.fixture(scope="module")
def greet(base_url: str, agent_env: str) -> str:
    with httpx.Client(base_url=base_url) as c:
        return make_app(c, agent_env, "agent.py:greet", input_schema=GREET_SCHEMA, timeout=120)


@pytest.fixture(scope="module")
def sleepy(base_url: str, agent_env: str) -> str:
    with httpx.Client(base_url=base_url) as c:
        return make_app(c, agent_env, "agent.py:sleepy", timeout=120)


def start(
    client: httpx.Client, app: str, user: str, body: dict[str, Any], key: str | None = None
) -> httpx.Response:
    headers = {"X-Corral-User": user}
    if key is not None:
        headers["Idempotency-Key"] = key
    return client.post(f"/v1/apps/{app}/runs", json=body, headers=headers)


def error_of(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"} and body["error"] == code
    return str(body["detail"])


def until(client: httpx.Client, run_id: str, statuses: set[str], within: float) -> dict[str, Any]:
    """Poll the run until its status is one of ``statuses``."""
    deadline = time.monotonic() + within
    while True:
        found: dict[str, Any] = client.get(f"/v1/runs/{run_id}").json()
        if found["status"] in statuses:
            return found
        assert time.monotonic() < deadline, f"still {found['status']} after {within} s: {found}"
        time.sleep(0.1)


def stream(
    client: httpx.Client, run_id: str, last_event_id: int | None = None
) -> list[tuple[int | None, str, dict[str, Any]]]:
    """The run's SSE stream to its ``end``: (id, event, data) for each message."""
    headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
    messages: list[tuple[int | None, str, dict[str, Any]]] = []
    with client.stream("GET", f"/v1/runs/{run_id}/events", headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        for line in response.iter_lines():
            if line.startswith(":"):
                continue
            if line:
                name, _, value = line.partition(": ")
                fields[name] = value
                continue
            seq = int(fields["id"]) if "id" in fields else None
            messages.append((seq, fields["event"], json.loads(fields["data"])))
            fields = {}
            if messages[-1][1] == "end":
                break
    return messages


def event_ids(messages: list[tuple[int | None, str, dict[str, Any]]]) -> list[int]:
    """The ids of the run's events: every message but the closing ``end`` has one."""
    ids = []
    for seq, kind, _ in messages:
        if kind != "end":
            assert seq is not None, f"a {kind} message without an id"
            ids.append(seq)
    return ids


# -- running -----------------------------------------------------------------------------


def test_run_and_wait(client: httpx.Client, greet: str, user: str) -> None:
    response = start(
        client, greet, user, {"input": {"who": "ada", "n": 21}, "wait": True, "timeout": 120}
    )
    assert response.status_code == 200, response.text
    ran = response.json()
    assert ran["status"] == "succeeded", ran
    assert ran["result"] == {"greeting": "hello ada", "twice": 42}
    assert ran["trigger"] == "http" and ran["user"] == user
    assert ran["app"] == greet and ran["app_version"] == 1 and ran["depth"] == 0
    assert ran["attempts"] == 1 and ran["error_code"] is None
    assert ran["started_at"] and ran["finished_at"] and ran["runner_version"]


def test_run_without_waiting_is_queued(client: httpx.Client, greet: str, user: str) -> None:
    response = start(client, greet, user, {"input": {"who": "bo"}})
    assert response.status_code == 201, response.text
    queued = response.json()
    assert queued["status"] == "queued" and queued["result"] is None
    done = until(client, queued["id"], TERMINAL, 120)
    assert done["status"] == "succeeded", done
    assert done["result"] == {"greeting": "hello bo", "twice": 0}
    listed = client.get(f"/v1/apps/{greet}/runs").json()
    assert queued["id"] in [r["id"] for r in listed]
    created = [r["created_at"] for r in listed]
    assert created == sorted(created, reverse=True)


def test_event_stream_follows_the_run_and_resumes(
    client: httpx.Client, greet: str, user: str
) -> None:
    queued = start(client, greet, user, {"input": {"who": "cy"}}).json()
    messages = stream(client, queued["id"])
    kinds = [kind for _, kind, _ in messages]
    assert kinds.index("runner.started") < kinds.index("result") < kinds.index("end")
    assert kinds[-1] == "end" and kinds.count("end") == 1
    seqs = event_ids(messages)
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    log = next(data for _, kind, data in messages if kind == "log")
    assert log["message"] == "greeting" and log["kind"] == "log" and log["seq"] > 0
    end = messages[-1][2]
    assert end["run"]["status"] == "succeeded" and end["run"]["result"]["greeting"] == "hello cy"
    assert end["last_seq"] == seqs[-1] and "result" in end["kinds"]

    started = next(seq for seq, kind, _ in messages if kind == "runner.started")
    assert started is not None
    resumed = stream(client, queued["id"], last_event_id=started)
    assert event_ids(resumed) == [s for s in seqs if s > started]
    assert resumed[-1][1] == "end"

    error_of(client.get("/v1/runs/run-absent/events"), 404, "run_not_found")
    bad = client.get(f"/v1/runs/{queued['id']}/events", headers={"Last-Event-ID": "x"})
    error_of(bad, 400, "invalid_input")


def test_an_idempotency_key_gives_one_run(
    client: httpx.Client, corral: Corral, greet: str, user: str
) -> None:
    key = f"k-{secrets.token_hex(6)}"
    who = f"idem-{secrets.token_hex(4)}"
    first = start(client, greet, user, {"input": {"who": who}}, key=key)
    again = start(client, greet, user, {"input": {"who": who}}, key=key)
    assert first.status_code == again.status_code == 201, (first.text, again.text)
    assert first.json()["id"] == again.json()["id"]
    recorded = [
        r
        for r in corral.store.runs.recent(app=greet, limit=500)
        if json.loads(r.input) == {"who": who}
    ]
    assert [r.id for r in recorded] == [first.json()["id"]]
    waited = start(client, greet, user, {"input": {"who": who}, "wait": True}, key=key)
    assert waited.status_code == 200 and waited.json()["id"] == first.json()["id"]
    assert waited.json()["status"] == "succeeded"

    other = start(client, greet, user, {"input": {"who": "someone else"}}, key=key)
    assert "different request" in error_of(other, 409, "idempotency_mismatch")


# -- refusals ----------------------------------------------------------------------------


def test_refusals(client: httpx.Client, agent_env: str, greet: str, user: str) -> None:
    error_of(start(client, "no-such-app", user, {"input": {}}), 404, "app_not_found")
    error_of(client.get("/v1/apps/no-such-app"), 404, "app_not_found")
    error_of(client.get("/v1/runs/run-absent"), 404, "run_not_found")

    missing = error_of(start(client, greet, user, {"input": {"n": 1}}), 400, "invalid_input")
    assert "who" in missing
    wrong = error_of(start(client, greet, user, {"input": {"who": 7}}), 400, "invalid_input")
    assert "at who" in wrong

    broke = make_app(client, agent_env, "agent.py:greet", budget_per_run=0)
    error_of(start(client, broke, user, {"input": {"who": "x"}}), 402, "budget_exhausted")
    poor = f"u-{secrets.token_hex(4)}"
    detail = error_of(start(client, greet, poor, {"input": {"who": "x"}}), 402, "budget_exhausted")
    assert poor in detail

    error_of(start(client, greet, "Not A User!", {"input": {"who": "x"}}), 400, "invalid_input")
    error_of(start(client, greet, user, {"input": {}, "surprise": 1}), 422, "invalid_request")


def test_a_taken_app_name_is_a_conflict(client: httpx.Client, agent_env: str, greet: str) -> None:
    same = {"name": greet, "environment": agent_env, "entrypoint": "agent.py:greet"}
    error_of(client.post("/v1/apps", json=same), 409, "app_exists")


def test_cancel_a_running_run(client: httpx.Client, corral: Corral, sleepy: str, user: str) -> None:
    queued = start(client, sleepy, user, {"input": {"seconds": 30}}).json()
    deadline = time.monotonic() + 60
    while "runner.started" not in [e.kind for e in corral.store.runs.events(queued["id"])]:
        assert time.monotonic() < deadline, "the agent did not start within 60 s"
        time.sleep(0.1)
    asked = time.monotonic()
    cancelled = client.post(f"/v1/runs/{queued['id']}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["cancel_requested"] is True
    ended = until(client, queued["id"], TERMINAL, 10)
    assert ended["status"] == "cancelled" and ended["error_code"] == "cancelled"
    assert time.monotonic() - asked < 10
    again = client.post(f"/v1/runs/{queued['id']}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    error_of(client.post("/v1/runs/run-absent/cancel"), 404, "run_not_found")


def test_cancel_a_queued_run(client: httpx.Client, agent_env: str, user: str) -> None:
    # An app whose runs wait for one another: the second stays queued behind the first.
    app = make_app(client, agent_env, "agent.py:sleepy", concurrency="enqueue", max_concurrent=1)
    first = start(client, app, user, {"input": {"seconds": 30}}).json()
    second = start(client, app, user, {"input": {"seconds": 30}}).json()
    cancelled = client.post(f"/v1/runs/{second['id']}/cancel").json()
    # Queued: cancelled outright. (A worker that has just leased it, to find the limit
    # reached and give it back, sees the cancel request when it finally runs it instead.)
    assert cancelled["status"] == "cancelled" or cancelled["cancel_requested"], cancelled
    client.post(f"/v1/runs/{first['id']}/cancel")
    assert until(client, first["id"], TERMINAL, 30)["status"] == "cancelled"
    assert until(client, second["id"], TERMINAL, 60)["status"] == "cancelled"
    assert client.get(f"/v1/runs/{second['id']}").json()["finished_at"] is not None


def test_a_concurrency_refusal_is_429(client: httpx.Client, agent_env: str, user: str) -> None:
    app = make_app(client, agent_env, "agent.py:sleepy", concurrency="reject")
    first = start(client, app, user, {"input": {"seconds": 30}}).json()
    try:
        refused = start(client, app, user, {"input": {"seconds": 1}})
        assert "already running" in error_of(refused, 429, "concurrency_limit")
    finally:
        client.post(f"/v1/runs/{first['id']}/cancel")
    until(client, first["id"], TERMINAL, 30)


def test_a_refused_request_can_be_retried_with_its_key(
    client: httpx.Client, agent_env: str, user: str
) -> None:
    app = make_app(client, agent_env, "agent.py:sleepy", concurrency="reject")
    first = start(client, app, user, {"input": {"seconds": 30}}).json()
    key = f"k-{secrets.token_hex(6)}"
    try:
        error_of(
            start(client, app, user, {"input": {"seconds": 1}}, key=key), 429, "concurrency_limit"
        )
    finally:
        client.post(f"/v1/runs/{first['id']}/cancel")
    until(client, first["id"], TERMINAL, 30)
    retried = start(client, app, user, {"input": {"seconds": 1}}, key=key)
    assert retried.status_code == 201, retried.text


# -- apps and credits --------------------------------------------------------------------


def test_patch_makes_a_version_that_later_runs_record(
    client: httpx.Client, agent_env: str, user: str
) -> None:
    app = make_app(client, agent_env, "agent.py:greet", webhook_secret="s3cret")
    shown = client.get(f"/v1/apps/{app}").json()
    assert shown["version"] == 1 and shown["webhook_secret_set"] is True
    assert "webhook_secret" not in shown["spec"] and "s3cret" not in json.dumps(shown)

    patched = client.patch(f"/v1/apps/{app}", json={"timeout": 90, "input_schema": GREET_SCHEMA})
    assert patched.status_code == 200, patched.text
    assert patched.json()["version"] == 2 and patched.json()["spec"]["timeout"] == 90
    assert patched.json()["spec"]["entrypoint"] == "agent.py:greet"  # unchanged: not sent
    versions = client.get(f"/v1/apps/{app}/versions").json()
    assert [v["version"] for v in versions] == [2, 1]
    assert versions[1]["spec"]["timeout"] == 600 and versions[1]["spec"]["input_schema"] is None
    assert app in [a["name"] for a in client.get("/v1/apps").json()]

    ran = start(client, app, user, {"input": {"who": "di"}, "wait": True}).json()
    assert ran["status"] == "succeeded" and ran["app_version"] == 2

    error_of(
        client.patch(f"/v1/apps/{app}", json={"concurrency": "sometimes"}), 422, "invalid_request"
    )
    error_of(client.patch(f"/v1/apps/{app}", json={"entrypoint": "nocolon"}), 400, "invalid_input")
    error_of(client.patch("/v1/apps/no-such-app", json={"timeout": 5}), 404, "app_not_found")
    assert client.get(f"/v1/apps/{app}").json()["version"] == 2  # refusals made no version


def test_credits(client: httpx.Client) -> None:
    someone = f"u-{secrets.token_hex(4)}"
    assert client.get(f"/v1/users/{someone}/credits").json() == {"user": someone, "balance": 0}
    granted = client.post(f"/v1/users/{someone}/credits", json={"credits": 12.5})
    assert granted.status_code == 201 and granted.json() == {"user": someone, "balance": 12.5}
    client.post(f"/v1/users/{someone}/credits", json={"credits": 1, "note": "top-up"})
    assert client.get(f"/v1/users/{someone}/credits").json()["balance"] == 13.5
    error_of(
        client.post(f"/v1/users/{someone}/credits", json={"credits": -1}), 422, "invalid_request"
    )


def test_openapi_lists_the_routes(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths["/v1/apps"]) == {"get", "post"}
    assert set(paths["/v1/apps/{app}"]) == {"get", "patch"}
    assert set(paths["/v1/apps/{app}/runs"]) == {"get", "post"}
    for path in ("/v1/apps/{app}/versions", "/v1/runs/{run_id}", "/v1/runs/{run_id}/events"):
        assert set(paths[path]) == {"get"}, path
    assert set(paths["/v1/runs/{run_id}/cancel"]) == {"post"}
    assert set(paths["/v1/users/{user}/credits"]) == {"get", "post"}
    events = paths["/v1/runs/{run_id}/events"]["get"]["responses"]["200"]["content"]
    assert "text/event-stream" in events
    assert not [p for p in paths if p.startswith("/ui")]


def test_metrics_are_served_for_prometheus(client: httpx.Client, corral: Corral) -> None:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for family in (
        "corral_runs_total",
        "corral_run_duration_seconds",
        "corral_queue_depth",
        "corral_sandbox_boot_seconds",
        "corral_runner_swap_seconds",
        "corral_bridge_calls_total",
        "corral_runs_admitted_total",
    ):
        assert family in text, family
