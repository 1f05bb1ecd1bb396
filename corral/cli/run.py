"""``corral run`` (an agent in a sandbox) and ``corral runner`` (releases of the runner)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from corral.cli.main import handled, json_option
from corral.cli.output import emit
from corral.context import Corral
from corral.errors import InvalidInput
from corral.pipeline import shapes
from corral.pipeline.apps import AdHoc
from corral.store import Release, Run, RunEvent


@click.command("run")
@click.argument("env")
@click.argument("entrypoint")
@click.option("--input", "input_", default="null", help="The agent's input, as JSON.")
@click.option("--timeout", type=float, help="Seconds for the whole run.")
@click.option("--snapshot", help="Boot this snapshot of the history, not the head.")
@click.option(
    "--user",
    default="local",
    show_default=True,
    help="Whose credentials it uses and whose credits pay for it.",
)
@click.option(
    "--connection",
    "connections",
    multiple=True,
    help="A connection the run's token may use (repeat for more).",
)
@json_option
@click.pass_obj
@handled
def run(
    corral: Corral,
    env: str,
    entrypoint: str,
    input_: str,
    timeout: float | None,
    snapshot: str | None,
    user: str,
    connections: tuple[str, ...],
    as_json: bool,
) -> None:
    """Run ENTRYPOINT (file.py:function) of environment ENV through the runner, here and now.

    An ad-hoc run (trigger cli, no app) admitted through the pipeline like every other run,
    so it is billed, metered, traced and announced; as the local operator, never refused for
    want of credits (its deductions still post)."""
    try:
        value = json.loads(input_)
    except ValueError as exc:
        raise InvalidInput(f"--input is not JSON: {exc}") from exc
    spec = AdHoc(env, entrypoint, snapshot=snapshot, timeout=timeout, connections=connections)
    finished = corral.run_here(spec, value, user=user, on_event=None if as_json else _show)
    emit(
        as_json,
        run_json(finished, corral.store.runs.events(finished.id)),
        lambda: _summary(finished),
    )
    sys.exit(0 if finished.status == "succeeded" else 1)


def _show(event: RunEvent) -> None:
    data = json.loads(event.data)
    data.pop("attempt", None)
    if event.kind == "log":
        click.echo(f"  | {data.get('message', '')}", err=True)
    elif event.kind not in ("result",):
        details = " ".join(f"{k}={v}" for k, v in data.items() if k != "traceback")
        click.echo(f"{event.kind:<16} {details}", err=True)
        if "traceback" in data:
            click.echo(str(data["traceback"]).rstrip(), err=True)


def _summary(run: Run) -> None:
    if run.status == "succeeded":
        click.echo(run.result)
    else:
        click.echo(f"corral: run {run.id} {run.status}: [{run.error_code}] {run.error}", err=True)


def run_json(run: Run, events: list[RunEvent]) -> dict[str, object]:
    return {
        **shapes.run_json(run),
        "folded_snapshot": run.folded_snapshot,
        "events": [{"seq": e.seq, "kind": e.kind, **json.loads(e.data)} for e in events],
    }


@click.group("runner")
def runner_group() -> None:
    """Releases of the runner: Corral's code inside every sandbox."""


@runner_group.command("publish")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--version", help="Override the package's __version__.")
@json_option
@click.pass_obj
@handled
def publish(corral: Corral, path: Path, version: str | None, as_json: bool) -> None:
    """Publish the runner package at PATH as the current release."""
    release = corral.releases.publish(path.resolve(), version)
    emit(
        as_json,
        release_json(release),
        lambda: click.echo(f"published runner {release.version} {release.digest}"),
    )


@runner_group.command("list")
@json_option
@click.pass_obj
@handled
def list_(corral: Corral, as_json: bool) -> None:
    """Every release, newest first; the current one is marked."""
    current = corral.releases.current()
    releases = corral.releases.all()

    def human() -> None:
        for r in releases:
            mark = "*" if r.digest == current.digest else " "
            click.echo(
                f"{mark} {r.version:<10} {r.digest}  {r.published_at:%Y-%m-%d %H:%M:%S}  "
                f"python>={r.requires_python}  {r.source}"
            )

    emit(
        as_json,
        [{**release_json(r), "current": r.digest == current.digest} for r in releases],
        human,
    )


@runner_group.command("use")
@click.argument("ref")
@json_option
@click.pass_obj
@handled
def use(corral: Corral, ref: str, as_json: bool) -> None:
    """Make the release REF (a version or digest) current again."""
    release = corral.releases.activate(ref)
    emit(
        as_json,
        release_json(release),
        lambda: click.echo(f"current runner: {release.version} {release.digest}"),
    )


def release_json(release: Release) -> dict[str, object]:
    return {
        "digest": release.digest,
        "version": release.version,
        "requires_python": release.requires_python,
        "source": release.source,
        "published_at": release.published_at,
    }


def register(cli: click.Group) -> None:
    cli.add_command(run)
    cli.add_command(runner_group)
