"""Errors over HTTP: the one table from ``CorralError`` to status code, and the handlers.

Every error the API returns has the body ``{"error": "<code>", "detail": "<sentence>"}``:
``code`` is the ``CorralError.code`` the service raised (see ``corral/errors.py``), or, for
what FastAPI itself refuses before any service runs, ``invalid_request`` (a body or parameter
that does not fit its schema, 422) and the snake-cased HTTP reason (``not_found`` for an
unknown route, ``method_not_allowed``). Anything unexpected is ``internal_error``, 500, and
its traceback goes to the server log rather than to the client.

``STATUS`` lists every class in ``corral/errors.py`` and the services' own errors that a
route can raise (the pipeline's, the ledger's, the run records'); ``status_for`` walks the
class's MRO, so a subclass added later without an entry answers with its family's status.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any, Final

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from corral.api import http
from corral.billing.ledger import BudgetExhausted
from corral.bridge.backend import RefreshFailed
from corral.bridge.keys import SigningKeyError
from corral.bridge.server import BridgeUnavailable
from corral.bridge.tokens import TokenRefused
from corral.errors import (
    AppExists,
    AppNotFound,
    BalanceLimit,
    BlobMissing,
    CommandNotFound,
    ConfigError,
    Conflict,
    CorralError,
    CorruptBlob,
    CredentialNotFound,
    CredentialRevoked,
    CredentialTampered,
    DeliveryNotFound,
    DiskFull,
    DraftFull,
    EnvironmentBusy,
    EnvironmentExists,
    EnvironmentNotFound,
    ImageNotFound,
    ImportFailed,
    ImportForbidden,
    InvalidInput,
    LeaseLost,
    MasterKeyError,
    MasterKeyInUse,
    NetworkError,
    NotFound,
    NothingToFreeze,
    ReleaseNotFound,
    RequirementMissing,
    RuncError,
    RunNotFound,
    SandboxCapacity,
    SandboxDied,
    SandboxError,
    ScheduleNotFound,
    SnapshotError,
    SnapshotNotFound,
    StoreError,
    StoreUnavailable,
    UnknownMasterKey,
    VaultError,
)
from corral.limits import MAX_REQUEST_BODY
from corral.pipeline.service import (
    CallRefused,
    ConcurrencyLimit,
    IdempotencyMismatch,
    InputTooLarge,
)
from corral.pipeline.worker import NoWorker
from corral.sandbox.channels import ProtocolError, SessionEnded, SessionTimeout
from corral.sandbox.hotswap import RunnerInvalid, SwapFailed
from corral.triggers.cron import InvalidCron, InvalidTimeZone

log = logging.getLogger("corral.api")

INVALID_REQUEST: Final = "invalid_request"  # the body or a parameter does not fit its schema
INTERNAL_ERROR: Final = "internal_error"  # an exception that is not a CorralError

STATUS: Final[Mapping[type[CorralError], int]] = {
    CorralError: 500,
    # A CORRAL_* variable on the server is malformed: nothing the client sent can fix that.
    ConfigError: 500,
    NotFound: 404,
    EnvironmentNotFound: 404,
    SnapshotNotFound: 404,
    ImageNotFound: 404,
    # Over HTTP the server reads images only from its import directory: the path is well
    # formed, the server will not read it for this client.
    ImportForbidden: 403,
    Conflict: 409,  # includes the compare-and-swap loser of a racing freeze
    EnvironmentExists: 409,
    EnvironmentBusy: 409,  # another edit session or freeze holds the environment: retry later
    InvalidInput: 400,
    StoreError: 500,
    StoreUnavailable: 503,  # the database is unreachable or restarting: retry shortly
    SnapshotError: 500,
    # The request is well formed but contradicts the environment's state (an empty draft).
    NothingToFreeze: 409,
    # A stored blob's bytes changed under us: the server's state is damaged, not the request,
    # and retrying will not help. 500, with the detail naming the blob, its path and its hash.
    CorruptBlob: 500,
    BlobMissing: 500,  # a stored snapshot names a blob that is gone: damage, as above
    ImportFailed: 400,  # the oci:/oci-archive: source the client named is unreadable
    DiskFull: 507,  # Insufficient Storage; nothing stored was changed
    DraftFull: 507,  # the environment's draft is at its limit: freeze or discard it first
    SandboxError: 500,
    RequirementMissing: 503,  # this host cannot run sandboxes until an operator fixes it
    SandboxCapacity: 503,  # every sandbox address is taken: retry later
    SandboxDied: 503,  # killed before its command started: an infrastructure failure, retry
    RuncError: 500,
    NetworkError: 500,
    CommandNotFound: 422,  # the argv is well formed but names nothing in the sandbox
    # The vault: a key problem is the server's to fix, never the client's, so 500.
    VaultError: 500,
    MasterKeyError: 500,
    UnknownMasterKey: 500,
    CredentialTampered: 500,  # the stored bytes changed under us: damage or an attack
    CredentialNotFound: 404,
    CredentialRevoked: 410,  # Gone: it existed and was destroyed on purpose
    MasterKeyInUse: 409,
    # The pipeline: apps, runs and their admission (corral/pipeline, corral/store).
    AppNotFound: 404,
    RunNotFound: 404,
    ReleaseNotFound: 404,
    AppExists: 409,
    IdempotencyMismatch: 409,  # the key was first used with another body: never retry as is
    NoWorker: 503,  # nothing would execute the run waited for: start a worker, then retry
    CallRefused: 409,  # an agent-to-agent call too deep, or a cycle: retrying cannot help
    # The app's concurrency policy refused the run for now (``reject``, or ``max_concurrent``
    # reached). 429, not 409: the request is fine and will be admitted once a run of the
    # user's ends, and clients and retry libraries treat 429 as "back off and retry", 409 as
    # final.
    ConcurrencyLimit: 429,
    # Content Too Large: the input is over corral.limits.MAX_INPUT; the same request will never
    # be admitted, and no run was recorded.
    InputTooLarge: 413,
    BalanceLimit: 409,  # a grant would lift the balance past the ledger's bound
    BudgetExhausted: 402,  # Payment Required: the user's credits, or the app's budget, are spent
    LeaseLost: 409,  # a worker's lease was taken over; never a client's doing in practice
    # Cron schedules (corral/triggers, corral/store/schedules.py).
    InvalidCron: 400,  # the detail names the expression and what is wrong with it
    InvalidTimeZone: 400,  # not an IANA zone name
    ScheduleNotFound: 404,
    # Errors of the run machinery; over HTTP they surface only inside a run's record, but each
    # keeps a status so that nothing reaching a handler is ever unmapped.
    TokenRefused: 401,  # a run token the bridge refused
    RefreshFailed: 502,  # the provider's token endpoint refused an OAuth refresh
    SigningKeyError: 500,
    BridgeUnavailable: 503,
    RunnerInvalid: 500,  # the current runner release does not work in this environment
    SwapFailed: 500,
    ProtocolError: 502,  # a sandbox broke the event protocol
    SessionEnded: 503,  # the sandbox died: an infrastructure failure, retried
    SessionTimeout: 504,
    DeliveryNotFound: 404,
}

# The same table by code, for clients and documentation.
STATUS_BY_CODE: Final[Mapping[str, int]] = {cls.code: status for cls, status in STATUS.items()}


class ErrorBody(BaseModel):
    """The body of every error response."""

    error: str = Field(description="machine-readable code, e.g. environment_not_found")
    detail: str = Field(description="one human-readable sentence saying what went wrong")


def status_for(exc: CorralError) -> int:
    """The HTTP status for ``exc``: its own entry in ``STATUS``, else its nearest ancestor's."""
    for cls in type(exc).__mro__:
        if issubclass(cls, CorralError) and cls in STATUS:
            return STATUS[cls]
    return 500


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for a route that may answer with ``statuses``, naming the codes."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        codes = sorted(code for code, s in STATUS_BY_CODE.items() if s == status)
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
