"""What a run may send back, on real sandboxes: results and events over their limits fail the
run at once, by name, and are never retried on a fresh sandbox.

Before, an oversized result was refused by the bridge (413), the runner dropped it after three
tries, the sandbox ended "without reporting a result", and that was read as an infrastructure
failure: three sandboxes burnt, the run failed as ``sandbox_failed``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from corral.context import Corral
from corral.errors import InputTooLarge, InvalidInput
from corral.limits import MAX_EVENT, MAX_INPUT, MAX_LOG_LINE, MAX_RESULT
from corral.pipeline.apps import AdHoc, AppSpec
from corral.pipeline.service import Trigger
from corral.store import Run
from corral.triggers import schedules
from tests.integration.conftest import run

pytestmark = [pytest.mark.root, pytest.mark.runc]

AGENT = """
import json, os, sys, urllib.request
from corral_runner import sdk

def echo(input):
    return input

def sized(input):
    return "x" * int(input)

def loud(input):
    sdk.log("a log line with a large field", blob="y" * int(input))
    return "never"

def printer(input):
    print("z" * int(input))
    return "printed"

def nan(input):
    return {"ratio": float("nan")}

def _post(body):
    request = urllib.request.Request(
        sdk.bridge_url("_corral") + "/events", data=body, method="POST",
        headers={"authorization": "Bearer " + sdk.token(), "content-type": "application/json"})
    try:
        return urllib.request.urlopen(request).status
    except urllib.error.HTTPError as exc:
        return exc.code

def forged(input):
    # Around the runner: an oversized result straight to the bridge, then a small one.
    big = {"type": "result", "attempt": 1, "output": "q" * int(input)}
    _post(json.dumps({"events": [big]}).encode())
    return "small"

def caller(input):
    try:
        sdk.call_agent(input["app"], "x" * input["size"], wait=False)
    except sdk.AgentCallRefused as exc:
        return [exc.status, exc.code]
    return "admitted"

def refused(input):
    # Events the bridge refuses, then the sandbox ends without any result.
    _post(input.encode())
    sys.stdout.flush()
    os._exit(0)
"""


@pytest.fixture(scope="module")
def agent_env(corral: Corral) -> Any:
    name = "t-limits"
    corral.envs.create(name)
    code, _, err = run(
        corral, name, "sh", "-c", f"cat > /home/user/agent.py <<'EOF'\n{AGENT}\nEOF", edit=True
    )
    assert code == 0, err
    corral.envs.freeze(name, "the agent")
    yield name
    corral.envs.delete(name)


@pytest.fixture(scope="module")
def app(corral: Corral, agent_env: str) -> str:
    corral.pipeline.apps.create(
        "t-limits-app", AppSpec(environment=agent_env, entrypoint="agent.py:echo")
    )
    return "t-limits-app"


def execute(corral: Corral, env: str, entrypoint: str, input: Any) -> Run:
    spec = AdHoc(env, f"agent.py:{entrypoint}", timeout=120)
    return corral.run_here(spec, input, user="local")


def kinds(corral: Corral, finished: Run) -> list[str]:
    return [e.kind for e in corral.store.runs.events(finished.id)]


def test_a_result_over_its_limit_fails_the_run_once(corral: Corral, agent_env: str) -> None:
    ok = execute(corral, agent_env, "sized", MAX_RESULT - 2)  # exactly the limit, as JSON
    assert ok.status == "succeeded" and len(json.loads(ok.result or "")) == MAX_RESULT - 2
    done = execute(corral, agent_env, "sized", MAX_RESULT)
    assert (done.status, done.error_code, done.attempts) == ("failed", "result_too_large", 1)
    assert f"{MAX_RESULT + 2} bytes" in (done.error or "") and str(MAX_RESULT) in (done.error or "")
    assert "attempt.failed" not in kinds(corral, done)


def test_an_event_over_its_limit_fails_the_run_once(corral: Corral, agent_env: str) -> None:
    done = execute(corral, agent_env, "loud", MAX_EVENT)
    assert (done.status, done.error_code, done.attempts) == ("failed", "event_too_large", 1)
    assert "log event" in (done.error or "") and done.result is None


def test_a_long_printed_line_is_cut_and_the_run_goes_on(corral: Corral, agent_env: str) -> None:
    done = execute(corral, agent_env, "printer", 3 * MAX_LOG_LINE)
    assert done.status == "succeeded" and json.loads(done.result or "") == "printed"
    lines = [
        json.loads(e.data)["message"] for e in corral.store.runs.events(done.id) if e.kind == "log"
    ]
    assert lines and all(len(line) <= MAX_LOG_LINE + len(" [cut]") for line in lines)
    assert lines[0].endswith(" [cut]")


def test_a_non_finite_result_is_not_json(corral: Corral, agent_env: str) -> None:
    done = execute(corral, agent_env, "nan", None)
    assert (done.status, done.error_code, done.attempts) == ("failed", "result_not_json", 1)


def test_the_bridge_checks_what_the_runner_did_not(corral: Corral, agent_env: str) -> None:
    done = execute(corral, agent_env, "forged", 2 * MAX_RESULT)
    assert (done.status, done.error_code, done.attempts) == ("failed", "result_too_large", 1)


@pytest.mark.parametrize(
    "body",
    ["this is not json", '{"events": [{"type": "result", "attempt": 1, "output": NaN}]}'],
    ids=["garbage", "nan"],
)
def test_events_the_bridge_refused_are_not_retried(
    corral: Corral, agent_env: str, body: str
) -> None:
    """Before: garbage burnt three sandboxes (``sandbox_failed``); NaN was stored as a result."""
    done = execute(corral, agent_env, "refused", body)
    assert (done.status, done.error_code, done.attempts) == ("failed", "events_refused", 1)
    assert "400" in (done.error or "") and "attempt.failed" not in kinds(corral, done)


def test_an_input_over_its_limit_is_refused_at_admission(corral: Corral, app: str) -> None:
    corral.ledger.grant("limits", 10)
    with pytest.raises(InputTooLarge, match=f"{MAX_INPUT + 2} bytes"):
        corral.pipeline.execute_agent(app, "x" * MAX_INPUT, Trigger("cli"), user="limits")
    assert corral.store.runs.recent(app=app) == []


def test_a_schedule_refuses_an_input_no_tick_could_run(corral: Corral, app: str) -> None:
    now = datetime.now(UTC)
    with pytest.raises(InvalidInput, match=f"{MAX_INPUT + 2} bytes"):
        schedules.add(corral.store, app, "0 9 * * *", "UTC", "x" * MAX_INPUT, now=now)
    with pytest.raises(InvalidInput, match="not JSON"):
        schedules.add(corral.store, app, "0 9 * * *", "UTC", {"x": float("nan")}, now=now)
    assert corral.store.schedules.all(app) == []


def test_an_agent_calling_with_an_input_over_its_limit_gets_413(
    corral: Corral, agent_env: str, app: str
) -> None:
    corral.ledger.grant("local", 10)
    done = execute(corral, agent_env, "caller", {"app": app, "size": MAX_INPUT})
    assert json.loads(done.result or "") == [413, "input_too_large"], done.error
    assert corral.store.runs.recent(app=app) == []
