"""The ``/v1`` routes of the pipeline: apps and their versions, runs, their events, credits.

Every run this API starts goes through ``Pipeline.execute_agent`` with trigger ``http``:
admission (the app's schema, idempotency, credits and budgets, the concurrency policy)
happens there, a worker executes the run, and this module only reads the records back.

Blocking service calls run in the threadpool. The routes that wait for a run (``wait`` on
start, the event stream) are ``async`` and poll the store from there (``stream.py``), so a
client that waits for a ten-minute run holds no thread while it waits.

There is no authentication yet: the calling user is whoever the ``X-Corral-User`` header
names (``local`` if it is absent), and credits are granted to anyone who asks. Serve the API
on a trusted network only.
"""

from __future__ import annotations

import functools
import re
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.responses import StreamingResponse

from corral.api import models, stream
from corral.api.errors import documented
from corral.api.http import StrictRoute
from corral.api.shapes import app_json, version_json
from corral.billing import amounts
from corral.context import Corral
from corral.errors import InvalidInput
from corral.pipeline.apps import AppSpec
from corral.pipeline.service import Trigger
from corral.pipeline.shapes import run_json
from corral.states import RunStatus
from corral.store.rows import NAME_RULE, USER_RULE, check_user

router = APIRouter(prefix="/v1", route_class=StrictRoute)
DEFAULT_USER = "local"
MAX_KEY = 255


def _corral(request: Request) -> Corral:
    corral: Corral = request.app.state.corral
    return corral


def _user(
    x_corral_user: Annotated[
        str | None,
        Header(
            description="the calling user (no authentication yet); default `local`. " + USER_RULE,
            json_schema_extra=models.header(models.USER),
        ),
    ] = None,
) -> str:
    return check_user(x_corral_user if x_corral_user is not None else DEFAULT_USER)


# Visible ASCII: a header value's spaces at either end are not the client's to keep, and
# anything beyond ASCII is not portable in a header.
KEY_PATTERN = rf"[!-~]{{1,{MAX_KEY}}}"
_KEY_RE = re.compile(KEY_PATTERN)


def _idempotency_key(
    idempotency_key: Annotated[
        str | None,
        Header(
            description="the same key and body within 24 h give the same run, once; "
            f"1-{MAX_KEY} visible ASCII characters (no spaces)",
            json_schema_extra=models.header(
                {"pattern": f"^{KEY_PATTERN}$", "minLength": 1, "maxLength": MAX_KEY}
            ),
        ),
    ] = None,
) -> str | None:
    if idempotency_key is None:
        return None
    if _KEY_RE.fullmatch(idempotency_key) is None:
        raise InvalidInput(
            f"Idempotency-Key must be 1-{MAX_KEY} visible ASCII characters, not {idempotency_key!r}"
        )
    return idempotency_key


Service = Annotated[Corral, Depends(_corral)]
AppName = Annotated[str, Path(description=NAME_RULE, json_schema_extra=models.NAME)]
UserName = Annotated[str, Path(description=USER_RULE, json_schema_extra=models.USER)]
User = Annotated[str, Depends(_user)]
IdempotencyKey = Annotated[str | None, Depends(_idempotency_key)]


async def blocking(func: Any, *args: Any, **kwargs: Any) -> Any:
    """``func(*args, **kwargs)`` in the threadpool."""
    return await anyio.to_thread.run_sync(functools.partial(func, *args, **kwargs))


def run_body(run: Any) -> models.Run:
    return models.Run.model_validate(run_json(run))


def _app_body(name: str, version: int, spec: AppSpec) -> models.App:
    return models.App.model_validate(app_json(name, version, spec))


async def start_run(
    corral: Corral,
    app: str,
    body: models.StartRun,
    trigger: Trigger,
    user: str,
    idempotency_key: str | None,
    response: Response,
) -> models.Run:
    """Admit a run through ``execute_agent``; with ``wait``, follow it to its end.

    201 with the queued run; with ``wait``, 200 with the ended run, or 202 with the run as it
    is if ``timeout`` passed first. A repeated idempotent request answers as the first did.
    """
    run = await blocking(
        corral.pipeline.execute_agent,
        app,
        body.input,
        trigger,
        user=user,
        idempotency_key=idempotency_key,
    )
    if body.wait:
        run = await stream.wait_for_end(corral.store, run.id, body.timeout)
        response.status_code = 200 if RunStatus(run.status).terminal else 202
    return run_body(run)


# -- apps --------------------------------------------------------------------------------


@router.post("/apps", status_code=201, tags=["apps"], responses=documented(400, 404, 409, 422))
def new_app(body: models.CreateApp, corral: Service) -> models.App:
    """Create an app (version 1): an environment, an entrypoint and the settings of its runs."""
    raw = body.model_dump(exclude_unset=True, exclude={"name"})
    version, spec = corral.pipeline.apps.create(body.name, AppSpec.from_json(raw))
    return _app_body(body.name, version, spec)


@router.get("/apps", tags=["apps"], responses=documented(500))
def list_apps(corral: Service) -> list[models.App]:
    """Every app at its current version, ordered by name."""
    return [_app_body(n, v, s) for n, v, s in corral.pipeline.apps.all()]


@router.get("/apps/{app}", tags=["apps"], responses=documented(404))
def get_app(app: AppName, corral: Service) -> models.App:
    """One app: its current version and settings."""
    version, spec = corral.pipeline.apps.get(app)
    return _app_body(app, version, spec)


@router.patch("/apps/{app}", tags=["apps"], responses=documented(400, 404, 422))
def update_app(app: AppName, body: models.UpdateApp, corral: Service) -> models.App:
    """Change the fields sent (the others stay); every change is a new version, returned.

    Runs already admitted keep the version they were admitted with.
    """
    changes = body.model_dump(exclude_unset=True)
    version, spec = corral.pipeline.apps.update(app, **changes)
    return _app_body(app, version, spec)


@router.get("/apps/{app}/versions", tags=["apps"], responses=documented(404))
def app_versions(app: AppName, corral: Service) -> list[models.AppVersion]:
    """Every version of the app, newest first."""
    return [
        models.AppVersion.model_validate(version_json(v.version, v.spec, v.created_at))
        for v in corral.store.apps.versions(app)
    ]


@router.get("/apps/{app}/runs", tags=["runs"], responses=documented(404))
def app_runs(
    app: AppName, corral: Service, limit: Annotated[int, Query(ge=1, le=500)] = 50
) -> list[models.Run]:
    """The app's runs, newest first."""
    corral.pipeline.apps.get(app)  # AppNotFound rather than an empty list
    return [run_body(r) for r in corral.store.runs.recent(app=app, limit=limit)]


# -- runs --------------------------------------------------------------------------------


@router.post(
    "/apps/{app}/runs",
    status_code=201,
    tags=["runs"],
    responses={
        200: {"model": models.Run, "description": "with `wait`: the run has ended"},
        202: {"model": models.Run, "description": "with `wait`: `timeout` passed first"},
        **documented(400, 402, 404, 409, 413, 422, 429),
    },
)
async def run_app(
    app: AppName,
    body: models.StartRun,
    corral: Service,
    user: User,
    idempotency_key: IdempotencyKey,
    response: Response,
) -> models.Run:
    """Run the app's agent on ``input`` (trigger ``http``), as user ``X-Corral-User``.

    No authentication yet: the header names the user, whose credits pay for the run
    (`local` without it). The input must satisfy the app's ``input_schema`` (400 naming the
    field). 402 ``budget_exhausted`` when the user has no credits or the app's budget is
    zero or spent; 429 ``concurrency_limit`` when its concurrency policy refuses the run for
    now; 413 ``input_too_large`` for an input over 1 MiB of JSON (``corral/limits.py``).
    With ``Idempotency-Key``, the same key and body within 24 h give the same run (409
    ``idempotency_mismatch`` for the same key with another body).
    """
    return await start_run(corral, app, body, Trigger("http"), user, idempotency_key, response)


@router.get("/runs/{run_id}", tags=["runs"], responses=documented(404))
def get_run(run_id: str, corral: Service) -> models.Run:
    """One run: its status, and once it has ended its result or error."""
    return run_body(corral.store.runs.get(run_id))


@router.get(
    "/runs/{run_id}/events",
    tags=["runs"],
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "Server-Sent Events: `id: <seq>`, `event: <kind>`, `data: <json>` "
            "for each event, then `event: end` with the run",
            "content": {stream.MEDIA_TYPE: {"schema": {"type": "string"}}},
        },
        **documented(400, 404),
    },
)
async def run_events(
    run_id: str,
    corral: Service,
    last_event_id: Annotated[
        str | None,
        Header(
            description="resume after this event's seq (EventSource sends it)",
            json_schema_extra=models.header(
                {"pattern": f"^{stream.LAST_EVENT_ID_PATTERN}$", "maxLength": 18}
            ),
        ),
    ] = None,
) -> StreamingResponse:
    """The run's events live, as Server-Sent Events, until it ends; then ``end``."""
    after = stream.last_event_id(last_event_id)
    await stream.get_run(corral.store, run_id)  # a 404 before the stream starts
    return StreamingResponse(
        stream.run_events(corral.store, run_id, after),
        media_type=stream.MEDIA_TYPE,
        headers=stream.HEADERS,
    )


@router.post("/runs/{run_id}/cancel", tags=["runs"], responses=documented(404))
def cancel_run(run_id: str, corral: Service) -> models.Run:
    """Cancel a run: a queued one ends at once; a running one is stopped by its worker
    within a second or so (``cancel_requested`` until then). An ended run is left as it is."""
    return run_body(corral.pipeline.cancel(run_id))


# -- credits -----------------------------------------------------------------------------


def _balance(corral: Corral, user: str) -> models.Balance:
    return models.Balance(user=user, balance=amounts.as_number(corral.store.ledger.balance(user)))


@router.post(
    "/users/{user}/credits",
    status_code=201,
    tags=["credits"],
    responses=documented(400, 409, 422),
)
def grant_credits(user: UserName, body: models.Grant, corral: Service) -> models.Balance:
    """Add credits to a user's balance (no authentication yet: anyone may); the new balance."""
    corral.ledger.grant(check_user(user), body.credits, body.note or "")
    return _balance(corral, user)


@router.post(
    "/users/{user}/credits/adjustments",
    status_code=201,
    tags=["credits"],
    responses=documented(400, 409, 422),
)
def adjust_credits(user: UserName, body: models.Adjustment, corral: Service) -> models.Balance:
    """Correct a user's balance by a new entry of either sign, with a note saying why; the
    new balance. The ledger is append-only: the mistaken entry stays, corrected."""
    corral.ledger.adjust(check_user(user), body.credits, body.note)
    return _balance(corral, user)


@router.get("/users/{user}/credits", tags=["credits"], responses=documented(400))
def credit_balance(user: UserName, corral: Service) -> models.Balance:
    """A user's balance: grants and corrections minus what their runs have spent."""
    return _balance(corral, check_user(user))
