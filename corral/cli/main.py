"""The ``corral`` command: one group per noun, every command with ``--json``."""

from __future__ import annotations

import signal

import click

from corral.cli.output import fail
from corral.context import Corral
from corral.errors import CorralError


@click.group()
@click.version_option(package_name="corral")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Corral: frozen environments and isolated sandboxes for cloud agents."""
    try:
        corral = Corral.from_env()
    except CorralError as exc:
        fail(exc, False)
    ctx.obj = corral
    ctx.call_on_close(corral.close)


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM ends a command the way Ctrl-C does: the sandbox it holds is torn down, a worker
    drains. A second SIGTERM during that teardown is ignored, so it cannot cut it short."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def main() -> None:
    from corral.cli import app, bridge, env, run, sandbox, schedule, secret, serve, worker

    signal.signal(signal.SIGTERM, _terminated)

    env.register(cli)
    run.register(cli)
    bridge.register(cli)
    sandbox.register(cli)
    secret.register(cli)
    serve.register(cli)
    worker.register(cli)
    schedule.register(cli)
    app.register(cli)
    cli()
