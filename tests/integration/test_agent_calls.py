"""Agent-to-agent calls on real sandboxes: an agent starts another app's run through the bridge.

The caller holds only its run token; the bridge starts the callee as the caller's user, linked
to the calling run, through the pipeline's admission (depth and cycle guard, budgets, schema,
``callable_by_agents``).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest

from corral.context import Corral
from corral.pipeline import service
from corral.pipeline.apps import AppSpec
from corral.pipeline.service import Trigger
from corral.store import LedgerEntry, Run
from tests.integration.conftest import run

pytestmark = [pytest.mark.root, pytest.mark.runc]

AGENT = """
import base64, json
from corral_runner import sdk

def relay(input):
    # Call the first app of the chain with the rest of it; report what came back.
    me = sdk.context()["run_id"]
    chain = input.get("chain") or []
    if not chain:
        return {"run": me, "value": input.get("value")}
    try:
        called = sdk.call_agent(chain[0], {"chain": chain[1:], "value": input.get("value")},
                                wait=True, timeout=120)
    except sdk.AgentCallRefused as refused:
        return {"run": me, "refused": {"status": refused.status, "code": refused.code,
                                       "detail": refused.detail}}
    return {"run": me, "called": called}

def forger(input):
    # This run's own token with another user in it: its signature no longer matches.
    header, claims, signature = sdk.token().split(".")
    data = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
    data["sub"] = "someone-else"
    claims = base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")
    path = "/apps/" + input["app"] + "/runs"
    body = {"input": {}, "wait": False}
    token = ".".join([header, claims, signature])
    forged = sdk.request("_corral", "POST", path, body=body,
                         headers={"authorization": "Bearer " + token})
    bare = sdk.request("_corral", "POST", path, body=body, headers={"authorization": ""})
    return {"forged": [forged.status, forged.json()["error"]],
            "bare": [bare.status, bare.json()["error"]]}
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


@pytest.fixture(scope="module", autouse=True)
def workers(corral: Corral) -> Iterator[None]:
    corral.start_workers(2)
    yield
    corral.stop_workers()


@pytest.fixture
def user(corral: Corral) -> str:
    name = f"u-{secrets.token_hex(4)}"
    corral.ledger.grant(name, 100)
    return name


def new_app(corral: Corral, env: str, entry: str = "agent.py:relay", **settings: Any) -> str:
    name = f"a-{secrets.token_hex(4)}"
    corral.pipeline.apps.create(name, AppSpec(env, entry, **settings))
    return name


def execute(corral: Corral, app: str, input: Any, user: str) -> tuple[Run, dict[str, Any]]:
    done = corral.pipeline.execute_agent(
        app, input, Trigger("ui"), user=user, wait=True, wait_timeout=240
    )
    assert done.status == "succeeded", (done.error_code, done.error)
    return done, json.loads(done.result or "null")


def billed(corral: Corral, run_id: str) -> list[LedgerEntry]:
    """The run's ledger entries, once its worker has billed it (just after it ends)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        entries = corral.store.ledger.entries(run=run_id)
        if entries:
            return entries
        time.sleep(0.05)
    pytest.fail(f"run {run_id} was never billed")


def test_an_agent_calls_another_and_gets_its_result(
    corral: Corral, agents_env: str, user: str
) -> None:
    caller, callee = new_app(corral, agents_env), new_app(corral, agents_env)
    done, result = execute(corral, caller, {"chain": [callee], "value": 7}, user)

    called = result["called"]
    assert called["status"] == "succeeded" and called["result"]["value"] == 7
    assert called["app"] == callee and called["error_code"] is None
    child = corral.store.runs.get(called["id"])
    assert called["result"]["run"] == child.id
    assert (child.trigger, child.parent_run, child.depth) == ("agent", done.id, 1)
    assert (child.user, child.app, child.app_version) == (user, callee, 1)
    assert done.depth == 0 and done.parent_run is None

    charged = billed(corral, child.id)
    assert all(e.user == user and e.app == callee for e in charged)
    assert all(e.kind == "deduction" and e.micros < 0 for e in charged)
    assert corral.store.ledger.spent(user=user) >= corral.store.ledger.spent(run=child.id) > 0


def test_a_cycle_is_refused_naming_the_chain(corral: Corral, agents_env: str, user: str) -> None:
    a, b = new_app(corral, agents_env), new_app(corral, agents_env)
    done, result = execute(corral, a, {"chain": [b, a], "value": 1}, user)

    inner = result["called"]
    assert inner["app"] == b and inner["status"] == "succeeded"
    refused = inner["result"]["refused"]
    assert (refused["status"], refused["code"]) == (409, "agent_call_refused")
    assert f"{a} -> {b} -> {a}" in refused["detail"]
    assert [r.id for r in corral.store.runs.recent(app=a)] == [done.id]  # no second run of a


def test_calls_nested_deeper_than_the_limit_are_refused(
    corral: Corral, agents_env: str, user: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "MAX_DEPTH", 1)
    a, b, c = (new_app(corral, agents_env) for _ in range(3))
    _, result = execute(corral, a, {"chain": [b, c], "value": 1}, user)

    inner = result["called"]
    assert (inner["app"], inner["depth"], inner["status"]) == (b, 1, "succeeded")
    refused = inner["result"]["refused"]
    assert (refused["status"], refused["code"]) == (409, "agent_call_refused")
    assert "at most 1 deep" in refused["detail"]
    assert corral.store.runs.recent(app=c) == []


@pytest.mark.parametrize(
    ("callee", "status", "code"),
    [
        ({"callable_by_agents": False}, 403, "agent_call_forbidden"),
        (None, 404, "app_not_found"),
        ({"budget_per_run": 0}, 402, "budget_exhausted"),
        ({"input_schema": {"properties": {"value": {"type": "integer"}}}}, 400, "invalid_input"),
    ],
    ids=["not-callable", "unknown-app", "no-budget", "schema"],
)
def test_a_refused_call_raises_in_the_caller(
    corral: Corral,
    agents_env: str,
    user: str,
    callee: dict[str, Any] | None,
    status: int,
    code: str,
) -> None:
    target = "no-such-app" if callee is None else new_app(corral, agents_env, **callee)
    caller = new_app(corral, agents_env)
    _, result = execute(corral, caller, {"chain": [target], "value": "seven"}, user)

    refused = result["refused"]
    assert (refused["status"], refused["code"]) == (status, code), refused
    if callee is not None:
        assert corral.store.runs.recent(app=target) == []


def test_a_call_without_this_runs_token_is_unauthorized(
    corral: Corral, agents_env: str, user: str
) -> None:
    target = new_app(corral, agents_env)
    forger = new_app(corral, agents_env, "agent.py:forger")
    _, result = execute(corral, forger, {"app": target}, user)

    assert result == {"forged": [401, "token_forged"], "bare": [401, "token_missing"]}
    assert corral.store.runs.recent(app=target) == []
