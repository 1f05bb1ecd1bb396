"""``corral serve``: the HTTP API (and its OpenAPI document), the web UI, the sandbox bridge,
and worker threads that execute the runs the API and the UI admit."""

from __future__ import annotations

import click

from corral.cli.worker import grace_option
from corral.context import Corral


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8700, show_default=True, type=int)
@click.option(
    "--workers",
    default=2,
    show_default=True,
    type=click.IntRange(min=0),
    help="Threads executing queued runs; 0 leaves them to `corral worker`.",
)
@click.option(
    "--schedules/--no-schedules",
    default=True,
    show_default=True,
    help="Fire cron schedules from this process (any number of schedulers may run).",
)
@grace_option
@click.pass_obj
def serve(
    corral: Corral, host: str, port: int, workers: int, schedules: bool, grace: float
) -> None:
    """Serve the HTTP API (OpenAPI document at /openapi.json), the web UI (/ui/), the sandbox
    bridge, and workers that execute queued runs. SIGTERM or Ctrl-C drains: the server stops,
    the workers take no more runs and hand back what is unfinished after --grace seconds."""
    import uvicorn

    from corral.api.app import create_app

    if corral.bridge() is None:
        click.echo("corral: another Corral process serves the bridge on this host", err=True)
    if workers:
        started = corral.start_workers(workers)  # stopped by corral.close() when serve ends
        click.echo(f"corral: {len(started)} workers executing runs", err=True)
    scheduler = corral.scheduler().start() if schedules else None
    try:
        # uvicorn stops on SIGTERM/SIGINT itself, then raises the signal again (KeyboardInterrupt).
        uvicorn.run(create_app(corral), host=host, port=port, log_level="info")
    finally:
        if scheduler is not None:
            scheduler.stop()
        corral.stop_workers(grace)


def register(cli: click.Group) -> None:
    cli.add_command(serve)
