"""``corral serve``: the HTTP API (and its OpenAPI document) over the same services."""

from __future__ import annotations

import click

from corral.context import Corral


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8700, show_default=True, type=int)
@click.pass_obj
def serve(corral: Corral, host: str, port: int) -> None:
    """Serve the HTTP API (OpenAPI document at /openapi.json) and the sandbox bridge."""
    import uvicorn

    from corral.api.app import create_app

    if corral.bridge() is None:
        click.echo("corral: another Corral process serves the bridge on this host", err=True)
    uvicorn.run(create_app(corral), host=host, port=port, log_level="info")


def register(cli: click.Group) -> None:
    cli.add_command(serve)
