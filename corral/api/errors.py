"""Errors over HTTP: the handlers that answer every exception in one shape.

Every error the API returns has the body ``{"error": "<code>", "detail": "<sentence>"}``:
``code`` is the ``CorralError.code`` the service raised (see ``corral/errors.py``), or, for
what FastAPI itself refuses before any service runs, ``invalid_request`` (a body or parameter
that does not fit its schema, 422) and the snake-cased HTTP reason (``not_found`` for an
unknown route, ``method_not_allowed``). Anything unexpected is ``internal_error``, 500, and
its traceback goes to the server log rather than to the client.

The status of each code is data shared with the bridge: ``corral/statuses.py``. ``status_for``
walks the class's MRO, so a subclass added later without a row answers with its family's
status.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any, Final

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from corral.api import http
from corral.errors import CorralError
from corral.limits import MAX_REQUEST_BODY
from corral.statuses import STATUS, status_for

log = logging.getLogger("corral.api")

INVALID_REQUEST: Final = "invalid_request"  # the body or a parameter does not fit its schema
INTERNAL_ERROR: Final = "internal_error"  # an exception that is not a CorralError


class ErrorBody(BaseModel):
    """The body of every error response."""

    error: str = Field(description="machine-readable code, e.g. environment_not_found")
    detail: str = Field(description="one human-readable sentence saying what went wrong")


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for a route that may answer with ``statuses``, naming the codes."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        codes = sorted(code for code, s in STATUS.items() if s == status)
        if status == 422:
            codes.append(INVALID_REQUEST)
        if status == 500:
            codes.append(INTERNAL_ERROR)
        phrase = HTTPStatus(status).phrase
        out[status] = {
            "model": ErrorBody,
            "description": f"{phrase}: " + ", ".join(f"`{c}`" for c in codes),
        }
    # Also stops FastAPI documenting its own 422 body, which the handlers below replace.
    out["default"] = {"model": ErrorBody, "description": "Any other error, in the same shape"}
    return out


def _body(code: str, detail: str, status: int) -> JSONResponse:
    return JSONResponse(ErrorBody(error=code, detail=detail).model_dump(), status_code=status)


async def _corral_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, CorralError)
    status = status_for(exc)
    if status >= 500:
        log.error("%s %s: %s", request.method, request.url.path, exc.detail, exc_info=exc)
    return _body(exc.code, exc.detail, status)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err.get("loc", ()))
        message = err.get("msg", "invalid")
        if err.get("type") == "json_invalid":  # say what is wrong, not only that it is
            message = f"{message}: {err.get('ctx', {}).get('error', '')}"
        problems.append(f"{where}: {message}" if where else message)
    return _body(INVALID_REQUEST, "; ".join(problems) or "the request is invalid", 422)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    try:
        code = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        code = f"http_{exc.status_code}"
    if exc.status_code == 413:  # a body read past the limit: as when its length said so
        return http.too_large(MAX_REQUEST_BODY)
    response = _body(code, str(exc.detail), exc.status_code)
    for name, value in (exc.headers or {}).items():
        response.headers[name] = value
    if exc.status_code == 405:  # every method of every route on the path, not the first's
        response.headers["Allow"] = ", ".join(http.allowed(request.app, request.scope))
    return response


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Starlette logs the traceback itself after this handler answers.
    return _body(
        INTERNAL_ERROR, f"unexpected {type(exc).__name__}; the server log has the traceback", 500
    )


def install(app: FastAPI) -> None:
    """Register the handlers that turn every exception into an ``ErrorBody`` response."""
    app.add_exception_handler(CorralError, _corral_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
