"""The HTTP API's application: ``create_app(corral)`` wires the routes and error handlers.

The app owns no state of its own: it serves the ``Corral`` it is given (``app.state.corral``)
and leaves closing it to whoever built it (``corral serve``, or a test fixture). The OpenAPI
document is at ``/openapi.json`` and its rendering at ``/docs``, FastAPI's defaults.

Start-up builds the store and the ``Environments`` service once, before the first request,
so the threads that serve requests never race to build them (``cached_property`` takes no
lock from Python 3.12 on). The sandbox host is left to build on first use, under its own
lock (``Corral.sandboxes``): a host that cannot run sandboxes still serves the rest.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI

from corral import __version__
from corral.api import errors, routes
from corral.context import Corral

DESCRIPTION = """\
Frozen environments and isolated sandboxes for cloud agents.

Create an environment, change it with `exec`, `freeze` the changes into a snapshot, and run
commands in fresh sandboxes booted from its snapshots. Every error answers with
`{"error": "<code>", "detail": "<sentence>"}`.
"""


def create_app(corral: Corral) -> FastAPI:
    """The API over ``corral``'s services."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await anyio.to_thread.run_sync(lambda: corral.envs)
        yield

    app = FastAPI(
        title="Corral",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_tags=[
            {"name": "environments", "description": "Create, edit, freeze and inspect."},
            {"name": "sandboxes", "description": "Run a command in a throwaway sandbox."},
            {"name": "meta", "description": "The server itself."},
        ],
    )
    app.state.corral = corral
    errors.install(app)
    app.include_router(routes.router)
    return app
