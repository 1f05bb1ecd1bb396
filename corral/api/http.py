"""HTTP rules every route shares: how a JSON body is read, and which methods a path allows.

* A JSON body is decoded strictly (``StrictRoute``): ``NaN``, ``Infinity`` and a number too
  large for a float (``1e999``, which Python would read as infinity) are not JSON numbers,
  and are refused as a 422 naming where they stand, before any model or service sees them.
* A body over ``corral.limits.MAX_REQUEST_BODY`` is a 413 ``body_too_large`` (``Gatekeeper``):
  at once when its Content-Length says so, else as soon as the bytes read pass the limit.
* ``allowed(app, scope)`` is every method some route of the app answers on the request's path.
  A 405 carries all of them in ``Allow`` (RFC 9110 section 15.5.6; Starlette names only the
  methods of the first route that matched the path), and ``OPTIONS`` answers 204 with the
  same ``Allow`` on every path that exists (``Gatekeeper``).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from corral.limits import strict_loads


class _StrictRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = strict_loads(await self.body())
        return self._json


class StrictRoute(APIRoute):
    """An ``APIRoute`` whose JSON body is decoded by ``strict_loads``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(_StrictRequest(request.scope, request.receive))

        return strict


PROBED = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def allowed(app: Any, scope: Scope) -> list[str]:
    """The methods the app answers on ``scope``'s path (and OPTIONS), sorted; empty if no
    route has that path. Each method is tried against the router as a request would be, so
    routers included in others and routes' own method sets are honoured as they are."""
    methods = {
        method
        for method in PROBED
        if any(
            route.matches({**scope, "method": method})[0] is Match.FULL
            for route in app.router.routes
        )
    }
    if methods:
        methods.add("OPTIONS")
    return sorted(methods)


BODY_TOO_LARGE = "body_too_large"


def too_large(limit: int) -> JSONResponse:
    detail = f"request bodies are limited to {limit} bytes"
    return JSONResponse({"error": BODY_TOO_LARGE, "detail": detail}, status_code=413)


class Gatekeeper:
    """ASGI middleware: ``OPTIONS`` on a path some route serves is 204 with ``Allow``; a body
    whose declared length is over ``limit`` is a 413 before a byte of it is read."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        response = self._answer(scope)
        if response is not None:
            await response(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # FastAPI re-raises an HTTPException met reading the body
                raise HTTPException(413)
            return message

        await self.app(scope, counted, send)

    def _answer(self, scope: Scope) -> Response | None:
        if scope["method"] == "OPTIONS":
            methods = allowed(scope["app"], scope)
            if methods:
                return Response(status_code=204, headers={"Allow": ", ".join(methods)})
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > self.limit):
                return too_large(self.limit)
        return None
