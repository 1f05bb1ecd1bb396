"""The runner on real sandboxes: hot swap, its failures, its lock, and fold-in."""

from __future__ import annotations

import contextlib
import json
import os
import py_compile
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.context import Corral
from corral.errors import SandboxError
from corral.pipeline.apps import AdHoc
from corral.pipeline.executor import Executor
from corral.pipeline.service import Pipeline, Trigger
from corral.pipeline.worker import execute_now
from corral.releases import bundle
from corral.releases.service import BUNDLED
from corral.runner import __version__ as BUNDLED_VERSION
from corral.sandbox.runtime import Sandbox, SandboxRequest
from corral.snapshots.fsattr import Immutability
from corral.store import Release, Run
from tests.integration.conftest import run
from tests.integration.test_environments import _wheel

pytestmark = [pytest.mark.root, pytest.mark.runc]

AGENT = """
import os, sys
from corral_runner import sdk
import corral_runner

def main(input):
    sdk.log("working", ticker=input.get("ticker"))
    return {"ticker": input.get("ticker"), "runner": corral_runner.__version__}

def boom(input):
    raise ValueError("no prices for " + str(input.get("ticker")))

def not_json(input):
    return {1, 2, 3}

def garbage(input):
    sent = sdk.request("_corral", "POST", "/events", body=b"this is not json")
    fake = {"events": [{"type": "result", "output": "forged"}]}
    forged = sdk.request("_corral", "POST", "/events", body=fake,
                         headers={"authorization": "Bearer not-a-token"})
    return {"garbage": [sent.status, sent.json()["error"]],
            "forged": [forged.status, forged.json()["error"]]}

def analyst(input):
    import corralprobe
    with open("/home/user/notes.txt") as f:
        notes = f.read().strip()
    return {"package": corralprobe.VALUE, "notes": notes, "runner": corral_runner.__version__}
"""


def events(corral: Corral, finished: Run) -> list[tuple[str, dict[str, Any]]]:
    return [(e.kind, json.loads(e.data)) for e in corral.store.runs.events(finished.id)]


def kinds(corral: Corral, finished: Run) -> list[str]:
    return [k for k, _ in events(corral, finished)]


@pytest.fixture
def agent_env(corral: Corral, env: str) -> str:
    code, _, err = run(
        corral, env, "sh", "-c", f"cat > /home/user/agent.py <<'EOF'\n{AGENT}\nEOF", edit=True
    )
    assert code == 0, err
    corral.envs.freeze(env, "the agent")
    return env


@pytest.fixture
def releases(corral: Corral, tmp_path: Path) -> Iterator[Callable[..., Release]]:
    """Publish edited copies of the bundled runner; the bundled one is current again after."""
    bundled = corral.releases.current()
    made = []

    def publish(version: str, edit: Callable[[Path], None] = lambda _: None) -> Release:
        source = tmp_path / f"runner-{version}"
        shutil.copytree(BUNDLED, source, ignore=shutil.ignore_patterns("__pycache__"))
        init = source / "__init__.py"
        init.write_text(
            init.read_text().replace(
                f'__version__ = "{BUNDLED_VERSION}"', f'__version__ = "{version}"'
            )
        )
        edit(source)
        release = corral.releases.publish(source)
        made.append(release)
        return release

    yield publish
    corral.releases.activate(bundled.digest)


def agent(
    corral: Corral,
    env: str,
    entry: str = "agent.py:main",
    executor: Executor | None = None,
    trigger: str = "cli",
) -> Run:
    """An ad-hoc run of ``entry``, admitted and executed here, now, as ``corral run`` does;
    through a pipeline of ``executor`` (with test seams) if given."""
    pipeline = (
        corral.pipeline if executor is None else Pipeline(corral.store, executor, corral.ledger)
    )
    spec = AdHoc(env, entry)
    queued = pipeline.execute_agent(
        spec, {"ticker": "ACME"}, Trigger(trigger), user="local", operator=True
    )
    return execute_now(pipeline, corral.sandboxes, queued, lease=corral.settings.run_lease)


def executor_with(corral: Corral, **kw: Any) -> Executor:
    """An executor with test seams, sharing the session's bridge and signing keys."""
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


def test_first_run_swaps_and_folds_in_and_the_next_run_does_not(
    corral: Corral, agent_env: str
) -> None:
    before = corral.envs.images.load(corral.envs.get(agent_env).head)
    first = agent(corral, agent_env)
    assert first.status == "succeeded", first.error
    assert json.loads(first.result or "") == {"ticker": "ACME", "runner": BUNDLED_VERSION}
    assert first.swapped and first.folded_snapshot and first.runner_version == BUNDLED_VERSION
    steps = [k for k in kinds(corral, first) if k.startswith("swap.")]
    assert steps == [
        "swap.started",
        "swap.staged",
        "swap.validated",
        "swap.swapped",
        "swap.purged",
        "swap.locked",
    ]
    assert kinds(corral, first).index("swap.locked") < kinds(corral, first).index("runner.started")

    head = corral.envs.get(agent_env).head
    assert head == first.folded_snapshot
    after = corral.envs.images.load(head)
    assert [d.digest for d in after.layers[:-1]] == [d.digest for d in before.layers]
    folded = corral.envs.history(agent_env)[0]
    assert folded.message is not None and folded.message.startswith(f"runner {BUNDLED_VERSION}")

    second = agent(corral, agent_env)
    assert second.status == "succeeded" and not second.swapped and second.folded_snapshot is None
    assert not any(k.startswith("swap.") for k in kinds(corral, second))
    assert corral.envs.get(agent_env).head == head


@pytest.mark.parametrize(
    ("entry", "code", "words"),
    [
        ("agent.py:boom", "agent_raised", "ValueError: no prices for ACME"),
        ("agent.py:not_json", "result_not_json", "not JSON"),
        ("missing.py:main", "entrypoint_not_found", "no file /home/user/missing.py"),
        ("agent.py:nope", "entrypoint_not_found", "has no function 'nope'"),
        ("agent.py", "bad_entrypoint", "file.py:function"),
    ],
)
def test_agent_failures_end_clearly_and_fold_nothing(
    corral: Corral, agent_env: str, entry: str, code: str, words: str
) -> None:
    head = corral.envs.get(agent_env).head
    failed = agent(corral, agent_env, entry)
    assert (failed.status, failed.error_code) == ("failed", code)
    assert words in (failed.error or "")
    assert failed.attempts == 1 and failed.folded_snapshot is None
    assert corral.envs.get(agent_env).head == head  # a failed run folds nothing
    if code == "agent_raised":
        tracebacks = [d for k, d in events(corral, failed) if k == "error"]
        assert "raise ValueError" in tracebacks[0]["traceback"]


def test_output_that_is_not_json_is_refused_by_the_bridge(corral: Corral, agent_env: str) -> None:
    done = agent(corral, agent_env, "agent.py:garbage")
    assert done.status == "succeeded", done.error
    assert json.loads(done.result or "") == {
        "garbage": [400, "bad_events"],
        "forged": [401, "token_malformed"],
    }
    assert not any(d.get("output") == "forged" for k, d in events(corral, done) if k == "result")


def test_a_release_with_a_syntax_error_never_runs_an_agent(
    corral: Corral, agent_env: str, releases: Callable[..., Release]
) -> None:
    releases("2.0.0", lambda src: (src / "sdk.py").write_text("def broken(:\n"))
    head = corral.envs.get(agent_env).head
    failed = agent(corral, agent_env)
    assert (failed.status, failed.error_code) == ("failed", "runner_invalid")
    assert "sdk.py does not compile" in (failed.error or "")
    seen = kinds(corral, failed)
    assert "swap.staged" in seen and "swap.swapped" not in seen and "runner.started" not in seen
    assert corral.envs.get(agent_env).head == head


def test_a_release_that_needs_a_newer_python_is_refused(
    corral: Corral, agent_env: str, releases: Callable[..., Release]
) -> None:
    def needs_399(src: Path) -> None:
        init = src / "__init__.py"
        init.write_text(
            init.read_text().replace("REQUIRES_PYTHON = (3, 8)", "REQUIRES_PYTHON = (3, 99)")
        )

    release = releases("2.1.0", needs_399)
    assert release.requires_python == "3.99"
    head = corral.envs.get(agent_env).head
    failed = agent(corral, agent_env)
    assert failed.error_code == "runner_invalid"
    assert "needs Python >= 3.99; this environment has 3.11" in (failed.error or "")
    assert "runner.started" not in kinds(corral, failed)
    assert corral.envs.get(agent_env).head == head


class FailingLockOnce(Immutability):
    """chattr +i fails the first time it is asked for: as on a filesystem that refuses it."""

    def __init__(self) -> None:
        self.failed = False

    def set(self, path: Path, immutable: bool) -> None:
        if immutable and not self.failed:
            self.failed = True
            raise PermissionError(1, "Operation not permitted (injected)", str(path))
        super().set(path, immutable)


def test_a_chattr_failure_retries_on_a_fresh_sandbox(corral: Corral, agent_env: str) -> None:
    done = agent(corral, agent_env, executor=executor_with(corral, attrs=FailingLockOnce()))
    assert done.status == "succeeded" and done.attempts == 2
    by_attempt = [(k, d.get("attempt")) for k, d in events(corral, done)]
    assert ("attempt.failed", 1) in by_attempt
    assert ("runner.started", 1) not in by_attempt and ("runner.started", 2) in by_attempt
    boots = [d["sandbox"] for k, d in events(corral, done) if k == "sandbox.booted"]
    assert len(set(boots)) == 2  # a fresh sandbox, not the failed one again


class KillAt:
    def __init__(self, step: str) -> None:
        self.step = step

    def on_step(self, attempt: int, step: str, sandbox: Sandbox) -> None:
        if attempt == 1 and step == self.step:
            sandbox.kill()
            with contextlib.suppress(SandboxError):  # killed before or after it started: dead
                sandbox.wait(timeout=30)


@pytest.mark.parametrize("step", ["validated", "swapped"])
def test_a_sandbox_killed_mid_swap_is_replaced(corral: Corral, agent_env: str, step: str) -> None:
    done = agent(corral, agent_env, executor=executor_with(corral, hooks=KillAt(step)))
    assert done.status == "succeeded", done.error
    assert done.attempts == 2
    by_attempt = [(k, d.get("attempt")) for k, d in events(corral, done)]
    assert ("runner.started", 1) not in by_attempt and ("attempt.failed", 1) in by_attempt


def test_stale_bytecode_is_never_used(
    corral: Corral, agent_env: str, releases: Callable[..., Release], tmp_path: Path
) -> None:
    """The snapshot holds a stale copy of the new release's directory whose __init__ bytecode
    was compiled from the old sources, with the same size and mtime as the new sources."""
    assert agent(corral, agent_env).status == "succeeded"  # the bundled 1.1.0 is folded in
    new = releases("1.1.1")  # same length as "1.1.0": the sizes match, every mtime is 0
    old_init = BUNDLED / "__init__.py"
    stale_src = tmp_path / "__init__.py"
    stale_src.write_bytes(old_init.read_bytes())
    os.utime(stale_src, (0, 0))
    pyc = tmp_path / "stale.pyc"
    py_compile.compile(str(stale_src), cfile=str(pyc), doraise=True)

    def plant(upper: Path) -> None:
        package = upper / "opt/corral/releases" / new.short_id / bundle.PACKAGE
        (package / "__pycache__").mkdir(parents=True)
        shutil.copy(pyc, package / "__pycache__" / "__init__.cpython-311.pyc")

    head = corral.envs.get(agent_env).head
    assert corral.envs.commit_platform_layer(agent_env, head, plant, "a stale runner copy")
    done = agent(corral, agent_env)
    assert done.status == "succeeded", done.error
    assert (
        json.loads(done.result or "")["runner"] == "1.1.1"
    )  # the stale 1.0.0 bytecode was not used
    started = [d for k, d in events(corral, done) if k == "runner.started"]
    assert started[0]["version"] == "1.1.1"


PROBE = r"""
import ctypes, errno, fcntl, json, os, struct
R = "/opt/corral/runner/corral_runner/main.py"
out = {}
def attempt(name, fn):
    try:
        fn(); out[name] = "ok"
    except OSError as e:
        out[name] = errno.errorcode[e.errno]
attempt("write", lambda: open(R, "a").write("pwned"))
attempt("unlink", lambda: os.unlink(R))
attempt("rename_dir", lambda: os.rename("/opt/corral/releases", "/opt/corral/gone"))
def relink():
    os.symlink("/tmp", "/opt/corral/evil")
    os.rename("/opt/corral/evil", "/opt/corral/runner")
attempt("relink", relink)
attempt("chmod", lambda: os.chmod(R, 0o777))
attempt("chown", lambda: os.chown(R, os.getuid(), os.getgid()))
attempt("create", lambda: open("/opt/corral/runner/corral_runner/evil.py", "w"))
def unlock():
    fd = os.open(R, os.O_RDONLY)
    fcntl.ioctl(fd, 0x40086602, struct.pack("l", 0))
attempt("unlock", unlock)
def mount_over():
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"tmpfs", b"/opt/corral", b"tmpfs", 0, None) != 0:
        raise OSError(ctypes.get_errno(), "mount")
attempt("mount", mount_over)
attempt("rm_opt_corral", lambda: os.rmdir("/opt/corral"))
print(json.dumps(out))
"""


@pytest.mark.parametrize("uid", [1000, 0])
def test_sandbox_code_cannot_change_replace_or_unlock_the_runner(
    corral: Corral, agent_env: str, uid: int
) -> None:
    """Even as root inside the sandbox, with every capability its bounding set allows."""
    assert agent(corral, agent_env).status == "succeeded"
    image = corral.envs.images.load(corral.envs.get(agent_env).head)
    layers = tuple(corral.envs.images.unpacked(image))
    out_file = Path(corral.settings.data_dir) / f"probe-{uid}.out"
    with open(out_file, "w+b") as out:
        result = corral.sandboxes().run(
            SandboxRequest(
                layers,
                ("python3", "-c", PROBE),
                (("PATH", "/usr/bin:/bin"),),
                uid=uid,
                gid=uid,
                cwd="/",
            ),
            stdin=subprocess.DEVNULL,
            stdout=out,
        )
        out.seek(0)
        seen = json.loads(out.read())
    out_file.unlink()
    assert result.exit_code == 0
    assert "ok" not in seen.values(), seen
    assert seen["unlock"] == "EPERM" and seen["mount"] == "EPERM"
    if uid == 0:  # root passes permission checks: only the immutable flag stops it
        assert seen["write"] == "EPERM" and seen["chmod"] == "EPERM"
    again = agent(corral, agent_env)  # and the runner is intact for the next agent
    assert again.status == "succeeded" and not again.swapped


def test_unattended_run_after_a_release_keeps_every_user_file_and_package(
    corral: Corral, agent_env: str, releases: Callable[..., Release], tmp_path: Path
) -> None:
    wheel = _wheel(tmp_path)
    with open(wheel, "rb") as f:
        corral.envs.exec(
            agent_env,
            ("sh", "-c", f"cat > /tmp/{wheel.name} && pip install -q --no-index /tmp/{wheel.name}"),
            stdin=f,
            stdout=subprocess.DEVNULL,
        )
    run(corral, agent_env, "sh", "-c", "echo 'buy low' > /home/user/notes.txt", edit=True)
    corral.envs.freeze(agent_env, "package and notes")
    friday = agent(corral, agent_env, "agent.py:analyst")  # folds in the bundled runner
    assert json.loads(friday.result or "") == {
        "package": 7,
        "notes": "buy low",
        "runner": BUNDLED_VERSION,
    }
    user_layers = [
        d.digest for d in corral.envs.images.load(corral.envs.get(agent_env).head).layers
    ]

    releases("1.2.0")  # the platform deploys at 8:55 ...
    monday = agent(corral, agent_env, "agent.py:analyst", trigger="schedule")  # ... cron at 9:00
    assert monday.status == "succeeded" and monday.swapped and monday.trigger == "schedule"
    assert json.loads(monday.result or "") == {"package": 7, "notes": "buy low", "runner": "1.2.0"}
    folded = corral.envs.images.load(corral.envs.get(agent_env).head)
    assert [d.digest for d in folded.layers[:-1]] == user_layers  # every user layer untouched
    assert not agent(corral, agent_env, "agent.py:analyst").swapped
