"""The executor on the unsandboxed runtime: the real bootstrap, hot swap, runner, bridge and
store, without root. What a real sandbox adds (isolation, its network, its limits) is
tests/integration's; this is the executor's logic: outcomes, attempts, deadlines."""

from __future__ import annotations

import contextlib
import json
import secrets
from pathlib import Path
from typing import Any

import pytest

from corral.context import Corral
from corral.errors import SandboxError
from corral.pipeline import executor
from corral.pipeline.apps import AdHoc
from corral.pipeline.executor import Executor
from corral.pipeline.service import Pipeline, Trigger
from corral.pipeline.worker import execute_now
from corral.runner import __version__ as BUNDLED_VERSION
from corral.sandbox.runtime import Sandbox
from corral.store import Run
from tests.unit.unsandboxed import unsandboxed_corral


@pytest.fixture
def env(corral: Corral) -> str:
    """An environment of this test alone: its first run swaps the runner in."""
    name = f"e-{secrets.token_hex(4)}"
    corral.envs.create(name)
    return name


def events(corral: Corral, run: Run) -> list[tuple[str, dict[str, Any]]]:
    return [(e.kind, json.loads(e.data)) for e in corral.store.runs.events(run.id)]


def kinds(corral: Corral, run: Run) -> list[str]:
    return [kind for kind, _ in events(corral, run)]


def agent(
    corral: Corral,
    env: str,
    entry: str,
    executor: Executor | None = None,
    input: Any = None,
    timeout: float | None = None,
) -> Run:
    """An ad-hoc run of ``entry`` in ``env``, admitted and executed here, now (``corral
    run``), through a pipeline of ``executor`` (with test seams) if given."""
    pipeline = corral.pipeline
    if executor is not None:
        pipeline = Pipeline(corral.store, executor, corral.ledger)
    spec = AdHoc(env, entry, timeout=timeout)
    value = {"n": 21} if input is None else input
    queued = pipeline.execute_agent(spec, value, Trigger("cli"), user="local", operator=True)
    return execute_now(pipeline, corral.sandboxes, queued, lease=corral.settings.run_lease)


def executor_with(corral: Corral, **kw: Any) -> Executor:
    return Executor(
        corral.settings,
        corral.store,
        corral.envs,
        corral.releases,
        corral.sandboxes,
        tokens=corral.executor.tokens,
        bridge=corral.bridge,
        **kw,
    )


def test_a_run_reports_its_result_and_events_and_folds_the_runner_in(
    corral: Corral, env: str
) -> None:
    first = agent(corral, env, "agent.py:main")
    assert (first.status, first.error) == ("succeeded", None)
    assert json.loads(first.result or "") == {"double": 42}
    assert first.attempts == 1 and first.runner_version == BUNDLED_VERSION
    seen = events(corral, first)
    assert [k for k, _ in seen if k.startswith("swap.")] == [
        "swap.started",
        "swap.staged",
        "swap.validated",
        "swap.swapped",
        "swap.purged",
        "swap.locked",
    ]
    logs = [(d["stream"], d["message"], d.get("fields")) for k, d in seen if k == "log"]
    assert logs == [("sdk", "working", {"n": 21}), ("stdout", "on stdout", None)]
    assert kinds(corral, first)[-3:] == ["result", "fold_in.done", "run.finished"]
    assert first.swapped and first.folded_snapshot == corral.envs.get(env).head

    again = agent(corral, env, "agent.py:main", input={"n": 2})
    assert again.status == "succeeded" and json.loads(again.result or "") == {"double": 4}
    assert not again.swapped and "swap.started" not in kinds(corral, again)


def test_an_agent_error_fails_the_run_once(corral: Corral, env: str) -> None:
    failed = agent(corral, env, "agent.py:boom")
    assert failed.status == "failed" and failed.attempts == 1
    assert failed.error_code == "agent_raised"
    assert failed.error == "ValueError: no prices for 21"
    assert kinds(corral, failed).count("sandbox.booted") == 1
    assert "attempt.failed" not in kinds(corral, failed)
    assert failed.folded_snapshot is None  # nothing is folded in after a failure


class KillAt:
    """Kills the first attempt's sandbox after one swap step: a sandbox death, mid-swap."""

    def __init__(self, step: str) -> None:
        self.step = step

    def on_step(self, attempt: int, step: str, sandbox: Sandbox) -> None:
        if attempt == 1 and step == self.step:
            sandbox.kill()
            with contextlib.suppress(SandboxError):
                sandbox.wait(timeout=30)


def test_a_dead_sandbox_is_replaced_by_a_fresh_one(corral: Corral, env: str) -> None:
    done = agent(corral, env, "agent.py:main", executor_with(corral, hooks=KillAt("staged")))
    assert (done.status, done.attempts) == ("succeeded", 2)
    seen = events(corral, done)
    booted = [d["sandbox"] for k, d in seen if k == "sandbox.booted"]
    assert len(set(booted)) == 2  # a fresh sandbox, not the dead one again
    failed = [d for k, d in seen if k == "attempt.failed"]
    assert [(d["attempt"], d["code"]) for d in failed] == [(1, "sandbox_ended")]
    assert ("runner.started", 1) not in [(k, d.get("attempt")) for k, d in seen]


def test_a_sandbox_that_dies_every_time_fails_the_run_after_its_attempts(
    corral: Corral, env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(executor, "EXIT_GRACE_S", 0.3)  # no events are in flight: it died
    failed = agent(corral, env, "agent.py:die")
    assert (failed.status, failed.error_code, failed.attempts) == ("failed", "sandbox_failed", 3)
    assert failed.error == (
        "3 sandboxes failed; the last: the sandbox ended without reporting a result"
    )
    assert kinds(corral, failed).count("attempt.failed") == 3


def test_the_deadline_ends_a_run_that_runs_on(corral: Corral, env: str) -> None:
    late = agent(corral, env, "agent.py:slow", timeout=0.5)
    assert (late.status, late.error_code) == ("timed_out", "timed_out")
    assert late.attempts == 1


def test_a_runtime_that_cannot_start_the_bootstrap_fails_at_once(tmp_path: Path) -> None:
    corral = unsandboxed_corral(tmp_path, python="/no/such/python3")
    try:
        corral.envs.create("analyst")
        failed = agent(corral, "analyst", "agent.py:main")
    finally:
        corral.close()
    assert (failed.status, failed.error_code, failed.attempts) == (
        "failed",
        "command_not_found",
        1,
    )
    assert "/no/such/python3" in (failed.error or "")
