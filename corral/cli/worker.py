"""``corral worker``: lease runs from the shared queue and execute them (any number, anywhere)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import click

from corral.cli.output import handled
from corral.context import Corral

F = TypeVar("F", bound=Callable[..., Any])


GRACE_S = 20.0  # under what container runtimes and init systems wait before SIGKILL


def grace_option(func: F) -> F:
    return click.option(
        "--grace",
        default=GRACE_S,
        show_default=True,
        type=click.FloatRange(min=0),
        help="On SIGTERM or Ctrl-C: seconds the runs in hand have to finish before they are "
        "handed back to the queue (and their sandboxes torn down).",
    )(func)


@click.command("worker")
@click.option("--workers", default=2, show_default=True, help="Worker threads in this process.")
@click.option(
    "--lease",
    type=float,
    help="Seconds a lease lasts unrenewed.  [default: CORRAL_RUN_LEASE or 10]",
)
@grace_option
@click.pass_obj
@handled
def worker(corral: Corral, workers: int, lease: float | None, grace: float) -> None:
    """Run workers until SIGTERM or Ctrl-C, then drain: take no more runs, let those in hand
    finish for --grace seconds, hand the rest back to the queue. A killed worker's runs go to
    another once its lease runs out."""
    started = corral.start_workers(workers, lease=lease or corral.settings.run_lease)
    click.echo(
        f"{len(started)} workers leasing runs ({', '.join(w.name for w in started)})", err=True
    )
    try:
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
        click.echo(f"corral: draining (up to {grace:g} s for the runs in hand)", err=True)
    finally:
        corral.stop_workers(grace)


def register(cli: click.Group) -> None:
    cli.add_command(worker)
