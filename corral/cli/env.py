"""``corral env``: create, exec, freeze, history, verify, list, show, discard, rm."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import NoReturn

import click

from corral.cli.output import emit, handled, human_size, json_option
from corral.context import Corral
from corral.envs.service import EditResult
from corral.envs.shapes import environment, snapshot
from corral.sandbox.runtime import SandboxResult


@click.group("env")
def env_group() -> None:
    """Environments: what a user installs and writes, frozen into snapshots."""


@env_group.command("create")
@click.argument("name")
@click.option("--from", "source", help="oci:PATH[:TAG] or oci-archive:PATH[:TAG]; default: base")
@json_option
@click.pass_obj
@handled
def create(corral: Corral, name: str, source: str | None, as_json: bool) -> None:
    """Create NAME from the base image (or --from an OCI image)."""
    env = corral.envs.create(name, source)
    emit(as_json, environment(env), lambda: click.echo(f"created {env.name} at {env.head}"))


@env_group.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--timeout", type=float, help="Kill the command after this many seconds.")
@json_option
@click.pass_obj
@handled
def exec_(
    corral: Corral, name: str, argv: tuple[str, ...], timeout: float | None, as_json: bool
) -> None:
    """Run a command in an edit session of NAME; its changes wait in the draft for freeze."""
    run_command(as_json, lambda **io: corral.envs.exec(name, argv, timeout=timeout, **io))


@env_group.command("freeze")
@click.argument("name")
@click.option("-m", "--message", help="A note kept with the snapshot.")
@json_option
@click.pass_obj
@handled
def freeze(corral: Corral, name: str, message: str | None, as_json: bool) -> None:
    """Freeze NAME's draft into a new snapshot; prints its digest."""
    snap = corral.envs.freeze(name, message)
    emit(as_json, snapshot(snap), lambda: click.echo(snap.digest))


@env_group.command("history")
@click.argument("name")
@json_option
@click.pass_obj
@handled
def history(corral: Corral, name: str, as_json: bool) -> None:
    """Snapshots of NAME, newest first: digest, size, created."""
    snaps = corral.envs.history(name)

    def human() -> None:
        click.echo(f"{'SEQ':>4}  {'DIGEST':<71}  {'SIZE':>10}  CREATED")
        for s in snaps:
            created = s.created_at.strftime("%Y-%m-%d %H:%M:%S")
            click.echo(f"{s.seq:>4}  {s.digest:<71}  {human_size(s.size):>10}  {created}")

    emit(as_json, [snapshot(s) for s in snaps], human)


@env_group.command("verify")
@click.argument("name")
@json_option
@click.pass_obj
@handled
def verify(corral: Corral, name: str, as_json: bool) -> None:
    """Re-hash every blob of NAME's snapshots; fails naming any changed byte's blob."""
    report = corral.envs.verify(name)
    emit(
        as_json,
        report.to_dict(),
        lambda: click.echo(
            f"ok: {len(report.blobs)} blobs of {report.snapshots} snapshots match their digests"
        ),
    )


@env_group.command("list")
@json_option
@click.pass_obj
@handled
def list_(corral: Corral, as_json: bool) -> None:
    """Every environment and its head snapshot."""
    envs = corral.envs.all()

    def human() -> None:
        for e in envs:
            click.echo(f"{e.name:<24} {e.head}")

    emit(as_json, [environment(e) for e in envs], human)


@env_group.command("show")
@click.argument("name")
@json_option
@click.pass_obj
@handled
def show(corral: Corral, name: str, as_json: bool) -> None:
    """One environment: base, head, and whether its draft holds unfrozen changes."""
    env = corral.envs.get(name)
    usage = corral.envs.draft_usage(name)
    payload = {
        **environment(env),
        "draft_changed": corral.envs.has_draft(name),
        "draft": None if usage is None else usage.to_dict(),
    }

    def human() -> None:
        for key, value in payload.items():
            click.echo(f"{key}: {value}")

    emit(as_json, payload, human)


@env_group.command("discard")
@click.argument("name")
@json_option
@click.pass_obj
@handled
def discard(corral: Corral, name: str, as_json: bool) -> None:
    """Throw away NAME's unfrozen changes."""
    corral.envs.discard(name)
    emit(
        as_json, {"name": name, "discarded": True}, lambda: click.echo(f"discarded {name}'s draft")
    )


@env_group.command("rm")
@click.argument("name")
@json_option
@click.pass_obj
@handled
def rm(corral: Corral, name: str, as_json: bool) -> None:
    """Forget NAME and its draft (blobs shared with other environments stay)."""
    corral.envs.delete(name)
    emit(as_json, {"name": name, "deleted": True}, lambda: click.echo(f"deleted {name}"))


def run_command(as_json: bool, start: Callable[..., SandboxResult]) -> NoReturn:
    """Run a sandboxed command: stream its output, or capture it into JSON; exit with its code.
    After an edit session that filled its draft, say so (on stderr, and in the JSON)."""
    if as_json:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            result = start(stdin=subprocess.DEVNULL, stdout=out, stderr=err)
            out.seek(0)
            err.seek(0)
            payload = {
                "sandbox_id": result.sandbox_id,
                "exit_code": result.exit_code,
                "timed_out": result.timed_out,
                "seconds": round(result.seconds, 4),
                "stdout": out.read().decode("utf-8", "replace"),
                "stderr": err.read().decode("utf-8", "replace"),
            }
            if isinstance(result, EditResult) and result.draft is not None:
                payload["draft"] = result.draft.to_dict()
        click.echo(json.dumps(payload, indent=2))
    else:
        result = start()
        if result.timed_out:
            click.echo(
                f"corral: timed out after {result.seconds:.1f}s; sandbox torn down", err=True
            )
    if isinstance(result, EditResult) and result.draft is not None and result.draft.full:
        click.echo(f"corral: {result.draft.notice}", err=True)
    sys.exit(result.exit_code)


def register(cli: click.Group) -> None:
    cli.add_command(env_group)
