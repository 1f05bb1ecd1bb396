"""``corral connection`` (where authenticated calls go) and ``corral bridge serve``."""

from __future__ import annotations

import click

from corral.bridge.connections import BUILTIN, Connection
from corral.cli.main import handled, json_option
from corral.cli.output import emit
from corral.context import Corral


@click.group("connection")
def connection_group() -> None:
    """Connections: the services agents reach through the bridge, and how to authenticate."""


@connection_group.command("add")
@click.argument("name")
@click.option("--base-url", required=True, help="e.g. https://api.example.com/v2")
@click.option(
    "--auth", default="bearer", show_default=True, help="bearer | basic | header:NAME | query:PARAM"
)
@click.option("--meter", type=click.Choice(["openai", "anthropic"]), help="Read model usage.")
@json_option
@click.pass_obj
@handled
def add(
    corral: Corral, name: str, base_url: str, auth: str, meter: str | None, as_json: bool
) -> None:
    """Add a connection, or point a built-in one (github, slack, openai, anthropic) elsewhere."""
    conn = Connection(name, base_url.rstrip("/"), auth, meter)  # validates
    corral.store.connections.put(conn.name, conn.base_url, conn.auth, conn.meter)
    emit(as_json, _shape(conn, "stored"), lambda: click.echo(f"{conn.name} -> {conn.base_url}"))


@connection_group.command("list")
@json_option
@click.pass_obj
@handled
def list_(corral: Corral, as_json: bool) -> None:
    """Built-in and stored connections (a stored one overrides the built-in of its name)."""
    stored = {
        r.name: Connection(r.name, r.base_url, r.auth, r.meter)
        for r in corral.store.connections.all()
    }
    rows = [_shape(c, "stored") for c in stored.values()]
    rows += [_shape(c, "built-in") for n, c in BUILTIN.items() if n not in stored]
    rows.sort(key=lambda r: str(r["name"]))

    def human() -> None:
        for r in rows:
            click.echo(f"{r['name']:<16} {r['origin']:<9} {r['auth']:<18} {r['base_url']}")

    emit(as_json, rows, human)


@connection_group.command("rm")
@click.argument("name")
@json_option
@click.pass_obj
@handled
def rm(corral: Corral, name: str, as_json: bool) -> None:
    """Remove a stored connection (a built-in one returns to its default)."""
    removed = corral.store.connections.remove(name)
    emit(
        as_json,
        {"name": name, "removed": removed},
        lambda: click.echo(f"removed {name}" if removed else f"no stored connection {name}"),
    )


def _shape(conn: Connection, origin: str) -> dict[str, object]:
    return {
        "name": conn.name,
        "base_url": conn.base_url,
        "auth": conn.auth,
        "meter": conn.meter,
        "origin": origin,
    }


@click.group("bridge")
def bridge_group() -> None:
    """The host-side bridge between sandboxes and authenticated services."""


@bridge_group.command("serve")
@click.pass_obj
@handled
def serve(corral: Corral) -> None:
    """Serve the bridge in the foreground on the sandbox gateway (every agent run starts one
    in its own process when none is running)."""
    bridge = corral.bridge()
    if bridge is None:
        raise click.ClickException("another Corral process already serves the bridge")
    net = corral.settings.network
    click.echo(f"bridge listening on {net.gateway}:{net.bridge_port}; Ctrl-C stops it", err=True)
    try:
        import threading

        threading.Event().wait()
    except KeyboardInterrupt:
        pass


def register(cli: click.Group) -> None:
    cli.add_command(connection_group)
    cli.add_command(bridge_group)
