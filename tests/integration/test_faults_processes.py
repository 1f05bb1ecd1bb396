"""Killed mid-run: a worker, a sandbox, ``corral serve``, a run in the middle of a hot swap.

Every death here is a real SIGKILL of a real process (the moment is chosen for some, through
``tests/integration/killpoint.py``). What each test asserts is the same: the run ends exactly
once (``faults.assert_ended_once``), its webhook is delivered once where it has one, and
nothing is left on the host (``leftovers.Leftovers``) once the reaper has had the chance the
design gives it (the worker that takes the run over, the next Corral process to start).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from corral.context import Corral
from corral.pipeline.apps import AppSpec
from corral.pipeline.service import Trigger
from corral.pipeline.worker import Worker
from corral.sandbox.runc_runtime import CGROUP_PARENT
from corral.sandbox.slots import Record
from corral.snapshots.fsattr import Immutability
from tests.integration.conftest import run, runc_runtime
from tests.integration.faults import (
    CorralProcess,
    assert_ended_once,
    free_bridge_port,
    free_port,
    kinds,
    until_ended,
    wait_for,
)
from tests.integration.leftovers import Leftovers
from tests.integration.test_http_trigger import agent_environment
from tests.integration.test_resilience import wait_for_record
from tests.integration.test_webhooks import Receiver

pytestmark = [pytest.mark.root, pytest.mark.runc]


@pytest.fixture(scope="module")
def agent_env(corral: Corral) -> Iterator[str]:
    name = agent_environment(corral)  # greet(input), sleepy(input): seconds
    yield name
    corral.envs.delete(name)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    made = Receiver()
    made.thread.start()
    yield made
    made.server.shutdown()
    made.server.server_close()


def hooked_app(corral: Corral, env: str, receiver: Receiver) -> tuple[str, str]:
    """An app running ``sleepy`` whose webhook goes to a path of its own on ``receiver``."""
    name = f"f-{secrets.token_hex(4)}"
    path = f"/ok/{name}"
    corral.pipeline.apps.create(
        name, AppSpec(env, "agent.py:sleepy", webhook_url=receiver.base + path, timeout=120)
    )
    return name, path


def user_with_credits(corral: Corral) -> str:
    user = f"u-{secrets.token_hex(4)}"
    corral.ledger.grant(user, 100)
    return user


def assert_webhook_once(corral: Corral, receiver: Receiver, run_id: str, path: str) -> None:
    delivered = wait_for(
        lambda: (d := corral.store.webhooks.for_run(run_id)) and d.status == "delivered",
        30,
        f"the webhook of {run_id} to be delivered",
    )
    assert delivered
    hits = receiver.at(path)
    assert len(hits) == 1, f"{len(hits)} webhook POSTs for one run"
    assert json.loads(hits[0].body)["run_id"] == run_id


# -- the leak check itself ---------------------------------------------------------------


def test_the_leak_check_names_what_a_killed_corral_leaves(
    corral: Corral, env: str, tmp_path: Path
) -> None:
    leaks = Leftovers(corral.settings)
    sandbox = CorralProcess(
        corral.settings, "sandbox", "run", env, "--", "sleep", "60", log=tmp_path / "sandbox.log"
    )
    try:
        wait_for_record(corral, sandbox.pid, set())
    finally:
        sandbox.kill()  # its sandbox outlives it until someone reaps it
    with pytest.raises(AssertionError) as found:
        leaks.assert_none(settle=0)
    named = str(found.value)
    for kind in ("container", "runc", "slot", "netns", "veth", "mount", "cgroup", "bundle"):
        assert f"  {kind}: " in named, f"the leak check missed the {kind}:\n{named}"
    leaks.assert_none(reap=True)


# -- a worker killed ---------------------------------------------------------------------

# Where worker A dies. "running": the test kills it once the agent runs. The others are
# points in the worker's code: right after it saw the agent's result in the run's log (the
# run is not yet recorded as ended); folding the runner into the environment (the layer is
# written, the head not moved: the first run of an environment swaps and folds in); and
# after the run was recorded as ended, before its completion hooks (webhook, metrics,
# traces) ran.
WORKER_DEATHS = {
    "running": None,
    "after the result": "corral.pipeline.executor:Executor._follow",
    "folding in": "corral.snapshots.images:Images.commit",
    "before the hooks": "corral.pipeline.service:Pipeline.announce@before",
}


@pytest.mark.parametrize("death", WORKER_DEATHS)
def test_a_killed_worker_s_run_ends_exactly_once(
    corral: Corral, agent_env: str, receiver: Receiver, tmp_path: Path, death: str
) -> None:
    fresh = death == "folding in"
    env = agent_environment(corral) if fresh else agent_env  # fresh: never swapped into
    head = corral.envs.get(env).head
    leaks = Leftovers(corral.settings)
    app, path = hooked_app(corral, env, receiver)
    user = user_with_credits(corral)
    seconds = 4 if death == "running" else 0.2
    queued = corral.pipeline.execute_agent(app, {"seconds": seconds}, Trigger("http"), user=user)
    lease = ("--workers", "1", "--lease", "3")
    worker_a = CorralProcess(
        corral.settings, "worker", *lease, log=tmp_path / "a.log", point=WORKER_DEATHS[death]
    )
    try:
        if death == "running":
            wait_for(
                lambda: "runner.started" in kinds(corral.store, queued.id),
                60,
                "the agent to start in worker A",
            )
            worker_a.kill()
        else:
            worker_a.wait(90)
            assert worker_a.killed_at_point(), worker_a.output()
    finally:
        if worker_a.proc.poll() is None:
            worker_a.kill()

    worker_b = CorralProcess(corral.settings, "worker", *lease, log=tmp_path / "b.log")
    try:
        done = until_ended(corral.store, queued.id, 90)
        assert_webhook_once(corral, receiver, queued.id, path)
    finally:
        worker_b.stop()
    assert done.status == "succeeded", (done.error_code, done.error, worker_b.output())
    assert_ended_once(corral.store, queued.id)
    results = [e for e in corral.store.runs.events(queued.id) if e.kind == "result"]
    assert len(results) == 1, "the agent completed more than once"
    if fresh:  # the fold-in died with A: the next run swaps again
        assert corral.envs.get(env).head == head and done.folded_snapshot is None
    leaks.assert_none()


# -- a sandbox killed --------------------------------------------------------------------


@pytest.fixture
def worker(corral: Corral) -> Iterator[Worker]:
    (started,) = corral.start_workers(1, lease=3.0)
    yield started
    started.stop()
    corral._workers.remove(started)


def sandbox_of(corral: Corral, run_id: str) -> Record:
    """The slot record of the sandbox the run's latest attempt booted."""
    booted = [
        json.loads(e.data) for e in corral.store.runs.events(run_id) if e.kind == "sandbox.booted"
    ]
    sid = booted[-1]["sandbox"]
    return next(r for r in runc_runtime(corral).slots.records() if r.sandbox_id == sid)


def kill_container(record: Record) -> None:
    """SIGKILL every process in the sandbox (its cgroup), from the host, until none is left."""
    procs = Path(f"/sys/fs/cgroup/pids/{CGROUP_PARENT}/{record.container}/cgroup.procs")

    def killed_all() -> bool:
        try:
            pids = [int(p) for p in procs.read_text().split()]
        except FileNotFoundError:
            return True  # runc has removed the cgroup: the sandbox is gone
        for pid in pids:
            with _gone():
                os.kill(pid, signal.SIGKILL)
        return not pids

    wait_for(killed_all, 10, "every process of the sandbox to die")


def kill_runc(record: Record) -> None:
    """SIGKILL the host's ``runc run`` for the sandbox: its container runs on, unsupervised."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with _gone():
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if b"run" in argv and record.container.encode() in argv:
                os.kill(int(proc.name), signal.SIGKILL)
                return
    raise AssertionError(f"no runc process for {record.container}")


def _gone() -> contextlib.suppress:
    """Ignore a process (or its /proc entry) that ended meanwhile."""
    return contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError)


@pytest.mark.parametrize("victim", ["its processes", "its runc"])
def test_a_killed_sandbox_is_replaced_and_the_run_ends_once(
    corral: Corral, agent_env: str, receiver: Receiver, worker: Worker, victim: str
) -> None:
    leaks = Leftovers(corral.settings)
    app, path = hooked_app(corral, agent_env, receiver)
    queued = corral.pipeline.execute_agent(
        app, {"seconds": 3}, Trigger("http"), user=user_with_credits(corral)
    )
    wait_for(lambda: "runner.started" in kinds(corral.store, queued.id), 60, "the agent to start")
    first = sandbox_of(corral, queued.id)
    (kill_container if victim == "its processes" else kill_runc)(first)

    done = until_ended(corral.store, queued.id, 90)
    assert done.status == "succeeded", (done.error_code, done.error)
    assert done.attempts == 2, kinds(corral.store, queued.id)
    failed = [
        json.loads(e.data)
        for e in corral.store.runs.events(queued.id)
        if e.kind == "attempt.failed"
    ]
    assert [f["attempt"] for f in failed] == [1]
    assert_ended_once(corral.store, queued.id)
    assert_webhook_once(corral, receiver, queued.id, path)
    leaks.assert_none()


# -- corral serve killed -----------------------------------------------------------------


def serve(corral: Corral, tmp_path: Path, name: str, bridge: int) -> tuple[CorralProcess, str]:
    port = free_port()
    environ = {"CORRAL_BRIDGE_PORT": str(bridge), "CORRAL_RUN_LEASE": "3"}
    proc = CorralProcess(
        corral.settings,
        "serve",
        "--port",
        str(port),
        "--workers",
        "1",
        "--no-schedules",
        log=tmp_path / f"{name}.log",
        env=environ,
    )
    url = f"http://127.0.0.1:{port}"

    def answering() -> bool:
        assert proc.proc.poll() is None, proc.output()
        try:
            return httpx.get(f"{url}/v1/apps", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(answering, 60, f"corral serve ({name}) to answer")
    return proc, url


def test_a_killed_serve_s_run_ends_exactly_once(
    corral: Corral, agent_env: str, receiver: Receiver, tmp_path: Path
) -> None:
    leaks = Leftovers(corral.settings)
    app, path = hooked_app(corral, agent_env, receiver)
    user = user_with_credits(corral)
    # Its own bridge port: serve A holds the sandbox's bridge, and it dies with A.
    bridge = free_bridge_port(corral.settings)
    serve_a, url_a = serve(corral, tmp_path, "a", bridge)
    try:
        started = httpx.post(
            f"{url_a}/v1/apps/{app}/runs",
            headers={"X-Corral-User": user},
            json={"input": {"seconds": 4}},
            timeout=30,
        )
        assert started.status_code == 201, started.text
        run_id = started.json()["id"]
        wait_for(
            lambda: "runner.started" in kinds(corral.store, run_id),
            60,
            "the agent to start in serve A",
        )
    finally:
        serve_a.kill()

    serve_b, url_b = serve(corral, tmp_path, "b", bridge)
    try:
        done = until_ended(corral.store, run_id, 120)
        shown = httpx.get(f"{url_b}/v1/runs/{run_id}", timeout=30).json()
        assert_webhook_once(corral, receiver, run_id, path)
    finally:
        serve_b.stop()
    assert done.status == "succeeded", (done.error_code, done.error, serve_b.output())
    assert shown["status"] == "succeeded" and done.deliveries == 2
    assert_ended_once(corral.store, run_id)
    leaks.assert_none()


# -- a hot swap killed -------------------------------------------------------------------


def locked_runner_trees(corral: Corral, env: str) -> list[bool]:
    """For each of the head's unpacked layers holding /opt/corral: is every entry of that
    tree still immutable in the shared layer cache?"""
    attrs = Immutability()
    image = corral.envs.images.load(corral.envs.get(env).head)
    trees = [layer / "opt/corral" for layer in corral.envs.images.unpacked(image)]
    return [
        all(attrs.is_set(p) for p in (tree, *tree.rglob("*")) if not p.is_symlink())
        for tree in trees
        if tree.is_dir()
    ]


def runner_view(corral: Corral, env: str) -> str:
    """/opt/corral as a fresh sandbox of the environment's head sees it."""
    script = "ls -lan --time-style=+ /opt/corral; readlink /opt/corral/runner; true"
    code, out, err = run(corral, env, "sh", "-c", script)
    assert code == 0, err
    return out


@pytest.mark.parametrize("step", ["staged", "validated", "swapped", "purged", "locked"])
def test_a_run_killed_mid_swap_leaves_the_runner_whole(
    corral: Corral, tmp_path: Path, step: str
) -> None:
    env = agent_environment(corral)  # its own: the runner was never swapped into it
    try:
        leaks = Leftovers(corral.settings)
        head, seen = corral.envs.get(env).head, runner_view(corral, env)
        locked = locked_runner_trees(corral, env)
        assert locked and all(locked)
        args = ("run", env, "agent.py:greet", "--input", '{"who": "ada"}', "--json")
        lease = {"CORRAL_RUN_LEASE": "1.5"}
        killed = CorralProcess(
            corral.settings, *args, log=tmp_path / "killed.log", point=f"swap:{step}", env=lease
        )
        killed.wait(120)
        assert killed.killed_at_point(), killed.output()
        (victim,) = corral.store.runs.for_environment(env)
        assert f"swap.{step}" in kinds(corral.store, victim.id)

        # Never half-upgraded: the snapshot, the shared layers' locked runner trees and what
        # a fresh sandbox sees are untouched.
        assert corral.envs.get(env).head == head
        assert locked_runner_trees(corral, env) == locked
        assert runner_view(corral, env) == seen

        # The next run, in a process of its own, once the dead one's lease has run out: it
        # ends the dead one's run and reaps its sandbox as it starts, then runs its own.
        wait_for(lambda: corral.store.runs.expired(), 30, "the dead run's lease to run out")
        nxt = CorralProcess(corral.settings, *args, log=tmp_path / "next.log", env=lease)
        assert nxt.wait(120) == 0, nxt.output()
        latest = corral.store.runs.for_environment(env)[0]
        assert latest.id != victim.id
        assert (latest.status, latest.swapped) == ("succeeded", True)
        assert latest.folded_snapshot == corral.envs.get(env).head
        assert f"releases/{corral.releases.current().short_id}" in runner_view(corral, env)
        assert all(locked_runner_trees(corral, env))

        ended = assert_ended_once(corral.store, victim.id)
        assert (ended.status, ended.error_code) == ("failed", "worker_lost")
        leaks.assert_none()
    finally:
        corral.envs.delete(env)
