"""``corral app`` (apps, their versions, running them) and ``corral credits`` (users' balances).

``corral app run`` is the CLI trigger: it admits the run through ``Pipeline.execute_agent``
with trigger ``cli`` like every other trigger, and a worker executes it: a ``corral serve`` or
``corral worker`` process sharing this store. ``--json`` prints what the API answers
(``corral/api/shapes.py``), field for field.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from corral.api.shapes import app_json, version_json
from corral.billing import amounts
from corral.cli.main import handled, json_option
from corral.cli.output import emit
from corral.context import Corral
from corral.errors import InvalidInput, NoWorker
from corral.limits import strict_loads
from corral.pipeline.apps import POLICIES, AppSpec
from corral.pipeline.service import Trigger
from corral.pipeline.shapes import run_json
from corral.pipeline.worker import live_workers
from corral.states import RunStatus
from corral.store import Run
from corral.store.rows import check_user

F = TypeVar("F", bound=Callable[..., Any])


def settings_options(func: F) -> F:
    """The options ``create`` and ``update`` share; ``update`` changes only those given."""
    options = [
        click.option("--timeout", type=float, help="Seconds a run may take."),
        click.option("--budget-per-run", type=float, help="Credits one run may spend."),
        click.option("--budget-total", type=float, help="Credits all its runs may spend."),
        click.option(
            "--concurrency",
            type=click.Choice(POLICIES),
            help="What a user's run does while another of theirs is active.",
        ),
        click.option("--max-concurrent", type=int, help="Active runs per user; 0: no maximum."),
        click.option(
            "--connection",
            "connections",
            multiple=True,
            help="A connection its runs' tokens may reach (repeat for more).",
        ),
        click.option("--input-schema", help="A JSON Schema for the input, or @FILE holding one."),
        click.option("--webhook-url", help="POSTed when a run ends."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _changes(**given: Any) -> dict[str, Any]:
    """The settings the user gave, in ``AppSpec`` terms."""
    changes = {k: v for k, v in given.items() if v is not None and k != "connections"}
    if given.get("connections"):
        changes["connections"] = list(given["connections"])
    if "input_schema" in changes:
        changes["input_schema"] = _json_option("--input-schema", changes["input_schema"])
    return changes


def _json_option(option: str, text: str) -> Any:
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except OSError as exc:
            raise InvalidInput(f"{option}: cannot read {text[1:]}: {exc.strerror}") from None
    try:
        return strict_loads(text)  # NaN and Infinity are not JSON, here as over HTTP
    except ValueError as exc:
        raise InvalidInput(f"{option} is not JSON: {exc}") from None


@click.group("app")
def app_group() -> None:
    """Apps: a frozen environment and an entrypoint, run by name. Every change is a version."""


@app_group.command("create")
@click.argument("name")
@click.option("--env", "environment", required=True, help="The environment runs boot.")
@click.option("--entrypoint", required=True, help="file.py:function, e.g. agent.py:main.")
@settings_options
@json_option
@click.pass_obj
@handled
def create(
    corral: Corral, /, name: str, environment: str, entrypoint: str, as_json: bool, **settings: Any
) -> None:
    """Create app NAME (version 1)."""
    raw = {"environment": environment, "entrypoint": entrypoint, **_changes(**settings)}
    version, spec = corral.pipeline.apps.create(name, AppSpec.from_json(raw))
    emit(
        as_json,
        app_json(name, version, spec),
        lambda: click.echo(f"created app {name} version {version}"),
    )


@app_group.command("update")
@click.argument("name")
@click.option("--env", "environment", help="Boot this environment from now on.")
@click.option("--entrypoint", help="file.py:function.")
@settings_options
@json_option
@click.pass_obj
@handled
def update(corral: Corral, /, name: str, as_json: bool, **settings: Any) -> None:
    """Change the settings given; the result is NAME's next version."""
    changes = _changes(**settings)
    if not changes:
        raise InvalidInput("nothing to change: give at least one option")
    version, spec = corral.pipeline.apps.update(name, **changes)
    emit(
        as_json,
        app_json(name, version, spec),
        lambda: click.echo(f"updated app {name}: version {version}"),
    )


@app_group.command("list")
@json_option
@click.pass_obj
@handled
def list_(corral: Corral, as_json: bool) -> None:
    """Every app at its current version."""
    apps = corral.pipeline.apps.all()

    def human() -> None:
        for name, version, spec in apps:
            click.echo(
                f"{name:<24} v{version:<4} {spec.environment:<24} {spec.entrypoint:<24} "
                f"{spec.concurrency}"
            )

    emit(as_json, [app_json(n, v, s) for n, v, s in apps], human)


@app_group.command("show")
@click.argument("name")
@json_option
@click.pass_obj
@handled
def show(corral: Corral, name: str, as_json: bool) -> None:
    """NAME's current settings, its versions and its latest runs."""
    version, spec = corral.pipeline.apps.get(name)
    versions = corral.store.apps.versions(name)
    runs = corral.store.runs.recent(app=name, limit=10)
    payload = {
        **app_json(name, version, spec),
        "versions": [version_json(v.version, v.spec, v.created_at) for v in versions],
        "runs": [run_json(r) for r in runs],
    }

    def human() -> None:
        click.echo(f"{name} version {version} ({len(versions)} versions)")
        for key, value in payload["spec"].items():
            click.echo(f"  {key:<20} {json.dumps(value)}")
        for r in runs:
            click.echo(
                f"  {r.id}  {r.status:<10} {r.trigger:<8} {r.user:<16} "
                f"{r.created_at:%Y-%m-%d %H:%M:%S}"
            )

    emit(as_json, payload, human)


@app_group.command("run")
@click.argument("name")
@click.option("--input", "input_", default="{}", show_default=True, help="The input, as JSON.")
@click.option("--wait", is_flag=True, help="Wait for the run to end; exit 1 unless it succeeds.")
@click.option("--wait-timeout", type=float, help="With --wait: stop waiting after this long.")
@click.option("--here", is_flag=True, help="Execute the run in this process, and wait for it.")
@click.option("--idempotency-key", help="The same key and input within 24 h: the same run.")
@click.option("--user", default="local", show_default=True, help="Whose credits pay for it.")
@json_option
@click.pass_obj
@handled
def run(
    corral: Corral,
    name: str,
    input_: str,
    wait: bool,
    wait_timeout: float | None,
    here: bool,
    idempotency_key: str | None,
    user: str,
    as_json: bool,
) -> None:
    """Run app NAME's agent (trigger cli). A `corral serve` or `corral worker` executes it, or
    this process with --here."""
    value = _json_option("--input", input_)
    check_user(user)
    alive = bool(live_workers(corral.store))
    if wait and not here and not alive:
        # Checked before admission: the wait would be silent for ever, and nothing is queued.
        raise NoWorker(
            "no worker is running to execute the run, so --wait would wait for ever; start one "
            "with `corral worker` (or `corral serve`) sharing this store, or pass --here to "
            "execute it in this process"
        )
    admitted = corral.pipeline.execute_agent(
        name,
        value,
        Trigger("cli"),
        user=user,
        idempotency_key=idempotency_key,
        wait=wait and not here,
        wait_timeout=wait_timeout,
    )
    if here:
        admitted = corral.execute_here(admitted, wait_timeout)
    emit(as_json, run_json(admitted), lambda: _summary(admitted))
    if not wait and not here and not alive:
        click.echo(
            f"corral: no worker is running: {admitted.id} waits in the queue until "
            "`corral worker` or `corral serve` starts (or run it with --here)",
            err=True,
        )
    if (wait or here) and admitted.status != RunStatus.SUCCEEDED:
        sys.exit(1)


def _summary(run: Run) -> None:
    if run.status == RunStatus.SUCCEEDED:
        click.echo(run.result)
    elif run.status in (RunStatus.QUEUED, RunStatus.RUNNING):
        click.echo(f"{run.id} {run.status}")
    else:
        click.echo(f"corral: run {run.id} {run.status}: [{run.error_code}] {run.error}", err=True)


@click.group("credits")
def credits_group() -> None:
    """Users' credits: what their runs may spend."""


# ``-5`` is read as an amount (and refused as one, by name), not as an unknown option.
@credits_group.command("grant", context_settings={"ignore_unknown_options": True})
@click.argument("user")
@click.argument("credits")
@click.option("--note", default="", help="Kept with the ledger entry.")
@json_option
@click.pass_obj
@handled
def grant(corral: Corral, user: str, credits: str, note: str, as_json: bool) -> None:
    """Add CREDITS to USER's balance: a number above 0, at most 6 decimal places."""
    check_user(user)
    micros = corral.ledger.grant(user, credits, note)
    _balance(corral, user, as_json, f"granted {amounts.shown(micros)} to {user}; ")


# Here ``-5`` is the point: a correction is often negative.
@credits_group.command("adjust", context_settings={"ignore_unknown_options": True})
@click.argument("user")
@click.argument("credits")
@click.option("--note", required=True, help="Why: kept with the ledger entry.")
@json_option
@click.pass_obj
@handled
def adjust(corral: Corral, user: str, credits: str, note: str, as_json: bool) -> None:
    """Correct USER's balance by CREDITS, either sign: `adjust alice -5 --note "typo"`.

    The ledger is append-only: a mistaken entry stays, and this one corrects it.
    """
    check_user(user)
    micros = corral.ledger.adjust(user, credits, note)
    _balance(corral, user, as_json, f"adjusted {user} by {amounts.shown(micros)}; ")


@credits_group.command("balance")
@click.argument("user")
@json_option
@click.pass_obj
@handled
def balance(corral: Corral, user: str, as_json: bool) -> None:
    """USER's balance: grants and corrections minus what their runs have spent."""
    check_user(user)
    _balance(corral, user, as_json, "")


def _balance(corral: Corral, user: str, as_json: bool, done: str) -> None:
    micros = corral.store.ledger.balance(user)
    text = f"{done}balance {amounts.shown(micros)}" if done else amounts.shown(micros)
    emit(as_json, {"user": user, "balance": amounts.as_number(micros)}, lambda: click.echo(text))


def register(cli: click.Group) -> None:
    cli.add_command(app_group)
    cli.add_command(credits_group)
