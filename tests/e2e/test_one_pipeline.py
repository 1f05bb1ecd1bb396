"""One pipeline for every trigger: the same app run by a click, a cron tick, an HTTP call and
another agent leaves records of the same shape (events, ledger entries, metric increments,
trace spans), differing only in the trigger.

Real parts throughout: Debian's headless Chromium clicks Run on the web UI served by uvicorn;
a cron scheduler ticks at the schedule's fire time; httpx calls the HTTP API; an agent in a
sandbox calls the app through the bridge; workers execute every run in a real sandbox, and the
agent fetches prices through the bridge from a local market-data service with the user's key.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypedDict

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from corral.api.app import create_app
from corral.context import Corral
from corral.pipeline.apps import AppSpec
from corral.pipeline.service import Trigger
from corral.store import Run
from tests.conftest import require
from tests.fakes import FakeMarketData
from tests.hosts import serving
from tests.integration.conftest import run

pytestmark = [pytest.mark.root, pytest.mark.runc]

AGENT = """
from corral_runner import sdk

def quote(input):
    prices = sdk.request("quotes", "GET", "/v1/prices/" + input["ticker"] + "?days=5").json()
    sdk.log("quoted", ticker=input["ticker"])
    sdk.metric("closes", len(prices["closes"]))
    return {"ticker": input["ticker"], "last": prices["closes"][-1]}

def delegate(input):
    return sdk.call_agent(input["app"], {"ticker": input["ticker"]}, wait=True)
"""
USER = "dana"
KEY = "mk-one-pipeline"


@pytest.fixture(scope="module")
def world(corral: Corral) -> Iterator[dict[str, str]]:
    market = FakeMarketData(api_key=KEY).start()
    corral.store.connections.put("quotes", market.url, "header:x-api-key", None)
    corral.vault.put(USER, "quotes", "api_key", {"key": KEY})
    corral.ledger.grant(USER, 1000)
    env = f"t-{secrets.token_hex(4)}"
    corral.envs.create(env)
    code, _, err = run(
        corral, env, "sh", "-c", f"cat > /home/user/agent.py <<'EOF'\n{AGENT}\nEOF", edit=True
    )
    assert code == 0, err
    corral.envs.freeze(env)
    target = f"quote-{secrets.token_hex(3)}"
    caller = f"caller-{secrets.token_hex(3)}"
    corral.pipeline.apps.create(target, AppSpec(env, "agent.py:quote", connections=("quotes",)))
    corral.pipeline.apps.create(caller, AppSpec(env, "agent.py:delegate"))
    workers = corral.start_workers(3)
    try:
        with serving(create_app(corral)) as url:
            # A first run folds the runner in, so every compared run boots the same snapshot.
            warm = corral.pipeline.execute_agent(
                target, {"ticker": "WARM"}, Trigger("cli"), user=USER, wait=True, wait_timeout=120
            )
            assert warm.status == "succeeded", warm.error
            yield {"url": url, "app": target, "caller": caller}
    finally:
        for worker in workers:
            worker.stop()
            corral._workers.remove(worker)
        market.stop()
        corral.envs.delete(env)


def by_click(world: dict[str, str], corral: Corral, tmp_path: Path) -> Run:
    if shutil.which("chromedriver") is None or shutil.which("chromium") is None:
        require("chromium", "apt-get install chromium chromium-driver (scripts/install-deps.sh)")
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(f"{world['url']}/ui/apps/{world['app']}")
        box = driver.find_element(By.CSS_SELECTOR, "textarea")
        box.clear()
        box.send_keys('{"ticker": "ACME"}')
        user = driver.find_elements(By.CSS_SELECTOR, "input[name=user]")
        if user:
            user[0].clear()
            user[0].send_keys(USER)
        driver.find_element(By.XPATH, "//button[normalize-space()='Run']").click()
        WebDriverWait(driver, 120).until(lambda d: "/ui/runs/" in d.current_url)
        opened = re.search(r"/ui/runs/([\w-]+)", driver.current_url)
        assert opened, f"the Run button led to {driver.current_url}, not a run's page"
        run_id = opened.group(1)
        WebDriverWait(driver, 120).until(lambda d: "succeeded" in d.page_source)
        driver.save_screenshot(str(tmp_path / "run.png"))
    finally:
        driver.quit()
    return corral.pipeline.wait(run_id, 120)


def by_cron(world: dict[str, str], corral: Corral) -> Run:
    from datetime import UTC, datetime

    from corral.triggers import schedules

    schedule = schedules.add(
        corral.store,
        world["app"],
        "* * * * *",
        "UTC",
        {"ticker": "ACME"},
        USER,
        now=datetime.now(UTC),
    )
    fired = corral.scheduler("e2e").tick(schedule.next_fire)
    corral.store.schedules.remove(schedule.id)
    run_ids = [f.run_id for f in fired if f.run_id]
    assert len(run_ids) == 1, fired
    return corral.pipeline.wait(run_ids[0], 120)


def by_http(world: dict[str, str], corral: Corral) -> Run:
    response = httpx.post(
        f"{world['url']}/v1/apps/{world['app']}/runs",
        timeout=150,
        headers={"X-Corral-User": USER},
        json={"input": {"ticker": "ACME"}, "wait": True, "timeout": 120},
    )
    assert response.status_code == 200, response.text
    return corral.store.runs.get(response.json()["id"])


def by_agent(world: dict[str, str], corral: Corral) -> Run:
    caller = corral.pipeline.execute_agent(
        world["caller"],
        {"app": world["app"], "ticker": "ACME"},
        Trigger("http"),
        user=USER,
        wait=True,
        wait_timeout=150,
    )
    assert caller.status == "succeeded", (caller.error_code, caller.error)
    callee = json.loads(caller.result or "{}")["id"]
    return corral.pipeline.wait(callee, 60)


class Shape(TypedDict):
    """What a run left behind (``shape``): the same for every trigger."""

    status: str
    result: Any  # the agent's JSON result
    events: list[str]
    ledger: list[str]
    spans: list[str]
    bridge_calls: list[tuple[str | None, str, int]]
    user: str
    app: str | None
    app_version: int | None
    swapped: bool


def shape(corral: Corral, run: Run) -> Shape:
    """What a run left behind, with everything that names this run or this moment removed."""
    time.sleep(0.3)  # the bridge's last batch, and the traces written on completion
    events = [e.kind for e in corral.store.runs.events(run.id)]
    ledger: list[str] = sorted(
        json.loads(e.detail or "{}").get("usage", "")
        for e in corral.store.ledger.entries(run=run.id)
    )
    spans = sorted({s.name for s in corral.tracing.spans(run.id)})
    calls = sorted(
        (c.connection, c.method, c.status)
        for c in corral.store.usage.calls(run.id)
        if c.connection != "_corral"
    )
    return {
        "status": run.status,
        "result": json.loads(run.result or "null"),
        "events": events,
        "ledger": ledger,
        "spans": spans,
        "bridge_calls": calls,
        "user": run.user,
        "app": run.app,
        "app_version": run.app_version,
        "swapped": run.swapped,
    }


def runs_total(corral: Corral, trigger: str, app: str) -> float:
    line = f'corral_runs_total{{app="{app}",status="succeeded",trigger="{trigger}"}}'
    for text in corral.metrics.render().decode().splitlines():
        if text.startswith(line):
            return float(text.split()[-1])
    return 0.0


def test_every_trigger_leaves_the_same_records(
    world: dict[str, str], corral: Corral, tmp_path: Path
) -> None:
    fire: dict[str, Callable[[], Run]] = {
        "ui": lambda: by_click(world, corral, tmp_path),
        "schedule": lambda: by_cron(world, corral),
        "http": lambda: by_http(world, corral),
        "agent": lambda: by_agent(world, corral),
    }
    shapes: dict[str, Shape] = {}
    metric_increments: dict[str, float] = {}
    for trigger, pull in fire.items():
        before = runs_total(corral, trigger, world["app"])
        done = pull()
        assert done.trigger == trigger
        assert done.status == "succeeded", (trigger, done.error_code, done.error)
        time.sleep(0.3)
        metric_increments[trigger] = runs_total(corral, trigger, world["app"]) - before
        shapes[trigger] = shape(corral, done)
        agent_span = next(s for s in corral.tracing.spans(done.id) if s.name == "agent")
        # The agent made a bridge call: its span has a real duration (runner's own stamps).
        assert agent_span.end > agent_span.start, trigger

    assert metric_increments == {"ui": 1.0, "schedule": 1.0, "http": 1.0, "agent": 1.0}
    reference = shapes["http"]
    assert reference["result"] == {"ticker": "ACME", "last": reference["result"]["last"]}
    events, spans = set(reference["events"]), set(reference["spans"])
    assert {"runner.started", "log", "metric", "result", "run.finished"} <= events
    assert {"run", "admission", "queue", "boot", "agent", "bridge.call"} <= spans
    assert "bridge_call" in reference["ledger"] and "sandbox_seconds" in reference["ledger"]
    for trigger, recorded in shapes.items():
        assert recorded == reference, f"the {trigger} run left different records"
