"""Metrics that every run reaches, whichever process executed it; ``corral run`` in the pipeline.

The first two tests hold the figures (``Store.stats``) and their exposition against runs
written to the store directly, on SQLite and PostgreSQL (the durations are bucketed in SQL,
spelt per engine). The others start real processes on the session's store: a ``corral serve``
with no workers, a ``corral worker`` and a ``corral run``; the serve's ``/metrics``, scraped
over HTTP and parsed as Prometheus parses it, counts the runs the other two executed, and the
``corral run`` run is billed, traced and announced like an app's.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from corral.context import Corral
from corral.observability.metrics import Metrics
from corral.pipeline.apps import AppSpec
from corral.store import LedgerEntry, Run, Store
from tests.integration.faults import CorralProcess, free_port, until_ended, wait_for
from tests.integration.leftovers import environ_for
from tests.integration.test_http_trigger import agent_environment

T0 = datetime(2030, 1, 1, 9, 0, tzinfo=UTC)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus exposition, by name and labels."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, frozenset(labels.items())), 0.0)


# -- the figures, from the store -------------------------------------------------------------


def add_run(
    store: Store,
    app: str | None,
    trigger: str,
    status: str,
    *,
    seconds: float | None = None,
    admitted: bool = True,
    boot: float | None = None,
    swap: float | None = None,
) -> Run:
    run_id = f"run-{secrets.token_hex(4)}"
    ended = status not in ("queued", "running")
    run = store.runs.create(
        Run(
            id=run_id,
            environment="env",
            snapshot="sha256:" + "0" * 64,
            entrypoint="a.py:main",
            input="{}",
            trigger=trigger,
            status="queued" if status == "queued" else "running",
            created_at=T0,
            started_at=T0 if status != "queued" else None,
            app=app,
            app_version=1 if app else None,
        )
    )
    if ended:  # a run is recorded queued or running and ends through its one transition
        done = store.runs.finish(
            run_id,
            status=status,
            finished_at=T0 + timedelta(seconds=seconds if seconds is not None else 0),
        )
        assert done is not None
        run = done[0]
    if admitted:
        store.runs.append_event(run_id, T0, "run.admitted", json.dumps({"trigger": trigger}))
    if boot is not None:
        at = T0 + timedelta(seconds=1)
        store.runs.append_event(run_id, at, "sandbox.booted", json.dumps({"attempt": 1}))
        later = at + timedelta(seconds=boot)
        store.runs.append_event(run_id, later, "runner.started", json.dumps({"attempt": 1}))
    if swap is not None:
        store.runs.append_event(run_id, T0, "swap.locked", json.dumps({"seconds": swap}))
    return run


def call(run: str | None, connection: str | None, status: int) -> dict[str, object]:
    return {
        "at": T0,
        "run": run,
        "connection": connection,
        "method": "GET",
        "path": "/x",
        "status": status,
        "bytes_in": 0,
        "bytes_out": 0,
        "latency_ms": 1.0,
        "error": None,
        "peer": "10.0.0.2",
    }


def deduction(run: Run, micros: int, kind: str = "deduction") -> LedgerEntry:
    return LedgerEntry(
        user="ann",
        run=run.id,
        app=run.app,
        source=f"usage:{secrets.token_hex(4)}",
        kind=kind,
        micros=-micros,
        detail=None,
        at=T0,
    )


def test_the_metrics_are_the_store_s_figures(store: Store) -> None:
    app = add_run(store, "a", "http", "succeeded", seconds=2.0, boot=0.3, swap=0.02)
    adhoc = add_run(store, None, "cli", "failed", seconds=40.0, boot=0.04)
    add_run(store, "a", "http", "queued")  # admitted, waiting
    add_run(store, "a", "http", "queued", admitted=False)  # parked for its idempotency key
    add_run(store, "a", "http", "running", boot=9.0, swap=9.0)  # not ended: no boot, no swap
    store.usage.add_calls(
        [
            call(app.id, "market", 200),
            call(app.id, "market", 200),
            call(app.id, None, 401),  # refused before any connection: counted, no label
            call(app.id, "_corral", 202),  # the bridge's own endpoints: not a call out
            call(None, "market", 401),  # no valid token: no run to count it against
        ]
    )
    store.ledger.post([deduction(app, 1_500_000), deduction(adhoc, 250_000)])
    store.ledger.post([deduction(app, -5_000_000, kind="grant")])

    text = Metrics(store).render().decode()

    assert value(text, "corral_runs_total", app="a", trigger="http", status="succeeded") == 1
    assert value(text, "corral_runs_total", app="", trigger="cli", status="failed") == 1
    assert value(text, "corral_runs_admitted_total", app="a", trigger="http") == 3
    assert value(text, "corral_runs_admitted_total", app="", trigger="cli") == 1
    assert value(text, "corral_queue_depth") == 2
    wall = "corral_run_duration_seconds"
    assert value(text, f"{wall}_count", trigger="http") == 1
    assert value(text, f"{wall}_sum", trigger="http") == pytest.approx(2.0, abs=1e-3)
    assert value(text, f"{wall}_bucket", trigger="http", le="1.0") == 0
    assert value(text, f"{wall}_bucket", trigger="http", le="2.5") == 1
    assert value(text, f"{wall}_bucket", trigger="cli", le="30.0") == 0
    assert value(text, f"{wall}_bucket", trigger="cli", le="60.0") == 1
    assert value(text, f"{wall}_bucket", trigger="cli", le="+Inf") == 1
    boot = "corral_sandbox_boot_seconds"
    assert value(text, f"{boot}_count") == 2
    assert value(text, f"{boot}_sum") == pytest.approx(0.34, abs=1e-3)
    assert value(text, f"{boot}_bucket", le="0.025") == 0
    assert value(text, f"{boot}_bucket", le="0.05") == 1
    assert value(text, f"{boot}_bucket", le="0.5") == 2
    swap = "corral_runner_swap_seconds"
    assert (value(text, f"{swap}_count"), value(text, f"{swap}_bucket", le="0.025")) == (1, 1)
    assert value(text, f"{swap}_sum") == pytest.approx(0.02)
    calls = "corral_bridge_calls_total"
    assert value(text, calls, connection="market", status="200") == 2
    assert value(text, calls, connection="", status="401") == 1
    assert value(text, calls, connection="_corral", status="202") == 0
    assert value(text, calls, connection="market", status="401") == 0
    assert value(text, "corral_credits_charged_total", app="a") == 1.5
    assert value(text, "corral_credits_charged_total", app="") == 0.25


def test_scrapes_share_one_read_until_this_process_changes_a_run(store: Store) -> None:
    metrics = Metrics(store, ttl=3600)  # only ``changed`` refreshes it within this test
    ended = {"app": "b", "trigger": "http", "status": "succeeded"}
    first = [metrics.render().decode() for _ in range(20)]
    assert value(first[-1], "corral_metrics_queries_total") == 1
    assert value(first[-1], "corral_runs_total", **ended) == 0

    run = add_run(store, "b", "http", "succeeded", seconds=1.0)
    assert value(metrics.render().decode(), "corral_runs_total", **ended) == 0  # cached
    metrics.changed(run)  # the hook of a run this process admitted or ended
    text = metrics.render().decode()
    assert value(text, "corral_runs_total", **ended) == 1
    assert value(text, "corral_metrics_queries_total") == 2
    assert value(text, "process_open_fds") > 0  # what belongs to this process stays its own


# -- every process's runs, in one serve's /metrics --------------------------------------------


@dataclass
class Ran:
    serve: str  # the serve's URL
    app: str
    by_worker: Run  # executed by a `corral worker` process
    by_cli: Run  # executed by a `corral run` process
    cli_user: str
    before: str  # the serve's /metrics before either ran
    worker_log: str


def corral_cli(corral: Corral, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "corral.cli", *args],
        env=environ_for(corral.settings),
        capture_output=True,
        text=True,
        timeout=300,
    )


def scrape(url: str) -> str:
    response = httpx.get(f"{url}/metrics", timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return response.text


@pytest.fixture(scope="module")
def ran(corral: Corral, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ran]:
    logs = tmp_path_factory.mktemp("metrics-processes")
    env = agent_environment(corral)
    app = f"m-{secrets.token_hex(4)}"
    corral.pipeline.apps.create(app, AppSpec(env, "agent.py:greet"))
    user = f"u-{secrets.token_hex(4)}"
    corral.ledger.grant(user, 100)
    port = free_port()
    serve = CorralProcess(
        corral.settings,
        *("serve", "--port", str(port), "--workers", "0", "--no-schedules"),
        log=logs / "serve.log",
    )
    worker = CorralProcess(corral.settings, "worker", "--workers", "1", log=logs / "worker.log")
    url = f"http://127.0.0.1:{port}"
    try:

        def answering() -> bool:
            assert serve.proc.poll() is None, serve.output()
            try:
                return httpx.get(f"{url}/v1/apps", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(answering, 60, "corral serve to answer")
        before = scrape(url)
        started = httpx.post(
            f"{url}/v1/apps/{app}/runs",
            headers={"X-Corral-User": user},
            json={"input": {"who": "ada"}},
            timeout=30,
        )
        assert started.status_code == 201, started.text
        by_worker = until_ended(corral.store, started.json()["id"], 120)
        # A fresh user: no credits granted, as on a fresh install.
        cli_user = f"cli-{secrets.token_hex(4)}"
        args = ("run", env, "agent.py:greet", "--input", '{"who": "bo"}', "--user", cli_user)
        cli = corral_cli(corral, *args, "--json")
        assert cli.returncode == 0, cli.stderr
        by_cli = corral.store.runs.get(json.loads(cli.stdout)["id"])
        yield Ran(url, app, by_worker, by_cli, cli_user, before, worker.output())
    finally:
        serve.stop()
        worker.stop()
        corral.envs.delete(env)


@pytest.mark.root
@pytest.mark.runc
def test_runs_executed_elsewhere_are_in_the_serve_s_metrics(ran: Ran) -> None:
    # Neither run was executed by the serve (it has no workers): the worker process took one,
    # the `corral run` process executed the other itself.
    assert ran.by_worker.status == ran.by_cli.status == "succeeded"
    assert ran.by_worker.lease_owner and ran.by_worker.lease_owner in ran.worker_log
    assert (ran.by_cli.lease_owner or "").startswith("run-")

    def counted() -> str | None:
        text = scrape(ran.serve)
        done = value(text, "corral_runs_total", app=ran.app, trigger="http", status="succeeded")
        return text if done == 1 else None

    after = wait_for(counted, 30, "the worker's run in the serve's metrics")
    before = ran.before
    cli = {"app": "", "trigger": "cli"}
    assert value(after, "corral_runs_admitted_total", app=ran.app, trigger="http") == 1
    assert value(after, "corral_credits_charged_total", app=ran.app) > 0
    assert (
        value(after, "corral_runs_total", **cli, status="succeeded")
        - value(before, "corral_runs_total", **cli, status="succeeded")
        == 1
    )
    assert (
        value(after, "corral_runs_admitted_total", **cli)
        - value(before, "corral_runs_admitted_total", **cli)
        == 1
    )
    wall = "corral_run_duration_seconds_count"
    assert value(after, wall, trigger="cli") - value(before, wall, trigger="cli") == 1
    assert value(after, wall, trigger="http") - value(before, wall, trigger="http") >= 1
    boots = "corral_sandbox_boot_seconds_count"
    assert value(after, boots) - value(before, boots) >= 2
    assert value(after, "corral_credits_charged_total", app="") > value(
        before, "corral_credits_charged_total", app=""
    )


@pytest.mark.root
@pytest.mark.runc
def test_a_corral_run_is_billed_traced_and_announced(corral: Corral, ran: Ran) -> None:
    run = ran.by_cli
    assert (run.trigger, run.app, run.app_version, run.user) == ("cli", None, None, ran.cli_user)
    kinds = [e.kind for e in corral.store.runs.events(run.id)]
    assert kinds[0] == "run.admitted" and kinds[-1] == "run.finished"
    # Billed: every usage event is a ledger deduction; the operator was not refused for want
    # of credits, and what the run used is on the user's balance.
    entries = corral.store.ledger.entries(run=run.id)
    usage = {f"usage:{u.id}" for u in corral.store.usage.events(run.id)}
    assert usage and usage <= {e.source for e in entries}
    assert {json.loads(e.detail or "{}")["usage"] for e in entries} >= {"sandbox_seconds"}
    assert corral.ledger.balance(ran.cli_user) < 0
    # Traced and announced, by the process that ended it.
    spans = {str(s["name"]) for s in corral.tracing.spans(run.id)}
    assert {"run", "admission", "queue", "boot", "agent"} <= spans
    assert run.announced_at is not None
