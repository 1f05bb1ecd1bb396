"""``corral worker``: lease runs from the shared queue and execute them (any number, anywhere)."""

from __future__ import annotations

import contextlib
import threading

import click

from corral.cli.main import handled
from corral.context import Corral


@click.command("worker")
@click.option("--workers", default=2, show_default=True, help="Worker threads in this process.")
@click.option(
    "--lease",
    type=float,
    help="Seconds a lease lasts unrenewed.  [default: CORRAL_RUN_LEASE or 10]",
)
@click.pass_obj
@handled
def worker(corral: Corral, workers: int, lease: float | None) -> None:
    """Run workers until interrupted; a killed worker's runs go to another after its lease."""
    started = corral.start_workers(workers, lease=lease or corral.settings.run_lease)
    click.echo(
        f"{len(started)} workers leasing runs ({', '.join(w.name for w in started)})", err=True
    )
    with contextlib.suppress(KeyboardInterrupt):
        threading.Event().wait()


def register(cli: click.Group) -> None:
    cli.add_command(worker)
