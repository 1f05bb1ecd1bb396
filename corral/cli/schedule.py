"""``corral schedule``: cron schedules that start an app's runs (trigger ``schedule``).

These commands only edit the schedules table; a running scheduler (``Corral.scheduler()``)
fires them. Times are printed in UTC and in the schedule's own time zone.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import click

from corral.cli.main import handled, json_option
from corral.cli.output import emit
from corral.context import Corral
from corral.errors import InvalidInput
from corral.limits import strict_loads
from corral.store import Schedule
from corral.triggers import schedules
from corral.triggers.schedules import MISFIRE_POLICIES


@click.group("schedule")
def schedule_group() -> None:
    """Cron schedules: run an app at fixed times, in a time zone."""


@schedule_group.command("add")
@click.argument("app")
@click.option(
    "--cron",
    "cron_expr",
    required=True,
    help="Five fields: minute hour day-of-month month day-of-week, e.g. '0 9 * * MON'.",
)
@click.option(
    "--tz",
    "timezone",
    default="UTC",
    show_default=True,
    help="IANA time zone the expression is read in, e.g. Europe/Paris.",
)
@click.option("--input", "input_json", default="null", help="The runs' input, as JSON.")
@click.option("--user", default="local", show_default=True, help="Who the runs are billed to.")
@click.option(
    "--misfire",
    type=click.Choice(MISFIRE_POLICIES),
    default="skip",
    show_default=True,
    help="Fire times missed while no scheduler ran: skip them, or run once for them.",
)
@json_option
@click.pass_obj
@handled
def add(
    corral: Corral,
    app: str,
    cron_expr: str,
    timezone: str,
    input_json: str,
    user: str,
    misfire: str,
    as_json: bool,
) -> None:
    """Run APP on a cron schedule.

    \b
    corral schedule add report --cron "0 9 * * MON" --tz Europe/Paris --input '{"week": true}'
    """
    try:
        value: Any = strict_loads(input_json)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"--input is not JSON: {exc}") from None
    schedule = schedules.add(
        corral.store, app, cron_expr, timezone, value, user, misfire, now=datetime.now(UTC)
    )
    human = f"scheduled {app} as {schedule.id}: {_describe(schedule)}"
    emit(as_json, schedule.to_dict(), lambda: click.echo(human))


@schedule_group.command("list")
@click.option("--app", help="Only this app's schedules.")
@json_option
@click.pass_obj
@handled
def list_(corral: Corral, app: str | None, as_json: bool) -> None:
    """Every schedule, oldest first."""
    found = corral.store.schedules.all(app)

    def human() -> None:
        if not found:
            click.echo("no schedules; `corral schedule add APP --cron ...` makes one")
        for s in found:
            click.echo(f"{s.id:<16} {s.app:<20} {_describe(s)}")

    emit(as_json, [s.to_dict() for s in found], human)


@schedule_group.command("pause")
@click.argument("schedule_id")
@json_option
@click.pass_obj
@handled
def pause(corral: Corral, schedule_id: str, as_json: bool) -> None:
    """Stop firing SCHEDULE_ID until it is resumed."""
    schedule = corral.store.schedules.pause(schedule_id)
    emit(as_json, schedule.to_dict(), lambda: click.echo(f"paused {schedule.id}"))


@schedule_group.command("resume")
@click.argument("schedule_id")
@json_option
@click.pass_obj
@handled
def resume(corral: Corral, schedule_id: str, as_json: bool) -> None:
    """Fire SCHEDULE_ID again from now on. Fire times missed while paused are not run, except
    the latest one under --misfire run_once."""
    schedule = schedules.resume(corral.store, schedule_id, now=datetime.now(UTC))
    emit(
        as_json,
        schedule.to_dict(),
        lambda: click.echo(f"resumed {schedule.id}: {_describe(schedule)}"),
    )


@schedule_group.command("remove")
@click.argument("schedule_id")
@json_option
@click.pass_obj
@handled
def remove(corral: Corral, schedule_id: str, as_json: bool) -> None:
    """Delete SCHEDULE_ID and its tick records; the runs it started are kept."""
    corral.store.schedules.remove(schedule_id)
    emit(
        as_json, {"id": schedule_id, "removed": True}, lambda: click.echo(f"removed {schedule_id}")
    )


def _describe(s: Schedule) -> str:
    local = s.next_fire.astimezone(ZoneInfo(s.timezone))
    state = "paused" if s.paused else f"next {local:%Y-%m-%d %H:%M %Z} ({s.next_fire:%H:%M} UTC)"
    return f"'{s.cron}' {s.timezone}, misfire {s.misfire}, user {s.user}: {state}"


def register(cli: click.Group) -> None:
    cli.add_command(schedule_group)
