"""``corral sandbox run``: boot an environment's frozen snapshot, run one command, tear down."""

from __future__ import annotations

import click

from corral.cli.env import run_command
from corral.cli.output import handled, json_option
from corral.context import Corral


@click.group("sandbox")
def sandbox_group() -> None:
    """Sandboxes: short-lived, isolated, booted from a frozen snapshot."""


@sandbox_group.command("run", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--snapshot", "digest", help="Boot this snapshot of the history, not the head.")
@click.option("--timeout", type=float, help="Kill the command after this many seconds.")
@json_option
@click.pass_obj
@handled
def run(
    corral: Corral,
    name: str,
    argv: tuple[str, ...],
    digest: str | None,
    timeout: float | None,
    as_json: bool,
) -> None:
    """Run a command in a fresh sandbox booted from NAME's frozen snapshot."""
    run_command(
        as_json, lambda **io: corral.envs.run(name, argv, digest=digest, timeout=timeout, **io)
    )


@sandbox_group.command("reap")
@json_option
@click.pass_obj
@handled
def reap(corral: Corral, as_json: bool) -> None:
    """Tear down sandboxes whose owning process died (every start does this too)."""
    runtime = corral.sandboxes()
    count = (corral.reaped_at_start or 0) + runtime.reap()
    click.echo(f'{{"reaped": {count}}}' if as_json else f"reaped {count} sandboxes")


def register(cli: click.Group) -> None:
    cli.add_command(sandbox_group)
