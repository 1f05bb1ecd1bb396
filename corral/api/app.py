"""The HTTP API's application: ``create_app(corral)`` wires the routes and error handlers.

The app owns no state of its own: it serves the ``Corral`` it is given (``app.state.corral``)
and leaves closing it to whoever built it (``corral serve``, or a test fixture). The OpenAPI
document is at ``/openapi.json`` and its rendering at ``/docs``, FastAPI's defaults. Routers:
``routes`` (environments, sandboxes), ``runs`` (apps, runs, credits: the HTTP trigger) and
``ui`` (the web UI under ``/ui``, left out of the OpenAPI document).

Start-up builds the store, the ``Environments`` service and the ``Pipeline`` (there must be
one: workers wait on its condition) once, before the first request, so the threads that serve
requests never race to build them (``cached_property`` takes no lock from Python 3.12 on).
The sandbox host is left to build on first use, under its own lock (``Corral.sandboxes``): a
host that cannot run sandboxes still serves the rest.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST

from corral import __version__
from corral.api import errors, http, routes, runs, ui
from corral.context import Corral
from corral.limits import MAX_REQUEST_BODY

DESCRIPTION = """\
Frozen environments and isolated sandboxes for cloud agents.

Create an environment, change it with `exec`, `freeze` the changes into a snapshot, and run
commands in fresh sandboxes booted from its snapshots. Make an app of a frozen environment and
an entrypoint, and run its agent: `POST /v1/apps/{app}/runs`, then follow the run's events.
Every error answers with `{"error": "<code>", "detail": "<sentence>"}`.

There is no authentication yet: `X-Corral-User` names the calling user (default `local`).
"""


def create_app(corral: Corral) -> FastAPI:
    """The API over ``corral``'s services."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await anyio.to_thread.run_sync(lambda: (corral.envs, corral.pipeline))
        yield

    app = FastAPI(
        title="Corral",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_tags=[
            {"name": "environments", "description": "Create, edit, freeze and inspect."},
            {"name": "sandboxes", "description": "Run a command in a throwaway sandbox."},
            {"name": "apps", "description": "An environment, an entrypoint, settings; versioned."},
            {"name": "runs", "description": "Run an app's agent, follow it, cancel it."},
            {"name": "credits", "description": "What users' runs may spend."},
            {"name": "meta", "description": "The server itself."},
        ],
    )
    app.state.corral = corral
    app.add_middleware(http.Gatekeeper, limit=MAX_REQUEST_BODY)
    errors.install(app)
    app.include_router(routes.router)
    app.include_router(runs.router)
    app.include_router(ui.router)

    @app.get("/metrics", tags=["meta"], include_in_schema=False)
    def metrics() -> Response:
        """Prometheus metrics: runs by status and trigger, durations, boot and swap times,
        bridge calls, credits charged, the queue's depth."""
        return Response(corral.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
