"""The web UI under ``/ui``: the apps, an app's Run form and recent runs, a run followed live.

Plain HTML from the templates in ``templates/`` and a little vanilla JavaScript; no build step.
A run started here goes through the same ``Pipeline.execute_agent`` as every other trigger,
with trigger ``ui``: the form's script POSTs the input to ``/ui/apps/{app}/runs`` (JSON), then
opens ``/ui/runs/{id}``, whose script follows ``/v1/runs/{id}/events`` with ``EventSource``.

Everything rendered is untrusted (app settings, inputs, results, errors): ``render`` escapes
every value unless it is ``Html`` this module built from escaped parts, and the scripts write
what they receive with ``textContent`` only. Each page carries a Content-Security-Policy whose
nonce is the only way a script or style runs. No authentication yet, as for the API: the
form's User field becomes the ``X-Corral-User`` header.
"""

from __future__ import annotations

import html
import json
import re
import secrets
from functools import cache
from importlib import resources
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import BaseModel, ConfigDict, Field

from corral.api import models
from corral.api.runs import IdempotencyKey, Service, User, start_run
from corral.errors import CorralError
from corral.pipeline.apps import AppSpec
from corral.pipeline.executor import SANDBOX_EVENTS
from corral.pipeline.service import Trigger
from corral.states import RunStatus
from corral.statuses import status_for
from corral.store import Run

router = APIRouter(include_in_schema=False)
RECENT_RUNS = 20

# The event kinds the run page listens for from the start (EventSource has no "any event"
# listener). A kind missing here is not lost: the stream's ``end`` names every kind it sent,
# and the page then follows the (ended, so instant) stream once more listening for them too.
EVENT_KINDS = sorted(
    SANDBOX_EVENTS
    | {"run.admitted", "run.started", "run.resumed", "attempt.failed"}
    | {"sandbox.booted", "sandbox.log", "sandbox.unknown"}
    | {f"swap.{s}" for s in ("started", "staged", "validated", "swapped", "purged", "locked")}
    | {"run.stopped", "run.finished", "fold_in.done", "fold_in.skipped"}
)
_PLACEHOLDER = re.compile(r"\{\{([a-z_]+)\}\}")


class Html(str):
    """Markup this module built from escaped parts: ``render`` inserts it as it is."""


def escape(value: object) -> Html:
    return Html(html.escape(str(value), quote=True))


@cache
def _template(name: str) -> str:
    return (resources.files("corral.api") / "templates" / name).read_text(encoding="utf-8")


def render(template: str, /, **values: object) -> Html:
    """``template`` with each ``{{key}}`` replaced by ``values[key]``, escaped."""

    def fill(match: re.Match[str]) -> str:
        value = values[match.group(1)]
        return value if isinstance(value, Html) else escape(value)

    return Html(_PLACEHOLDER.sub(fill, _template(template)))


def page(title: str, template: str, http_status: int = 200, /, **values: object) -> HTMLResponse:
    """A whole page: ``template`` inside ``base.html``, with a fresh CSP nonce."""
    nonce = secrets.token_urlsafe(16)
    content = render(template, nonce=nonce, **values)
    body = render("base.html", title=title, nonce=nonce, content=content)
    policy = (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
        "connect-src 'self'; img-src 'self'; form-action 'self'; base-uri 'none'; "
        "frame-ancestors 'none'"
    )
    headers = {
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
    }
    return HTMLResponse(body, status_code=http_status, headers=headers)


def error_page(exc: CorralError) -> HTMLResponse:
    code = status_for(exc)
    return page("Error", "error.html", code, heading=f"{code} {exc.code}", detail=exc.detail)


def _link(href: str, text: object) -> Html:
    return Html(f'<a href="{escape(href)}">{escape(text)}</a>')


def app_url(app: str) -> str:
    return f"/ui/apps/{quote(app, safe='')}"


def run_url(run_id: str) -> str:
    return f"/ui/runs/{quote(run_id, safe='')}"


def _cells(*cells: object) -> Html:
    return Html(
        "<tr>"
        + "".join(f"<td>{c if isinstance(c, Html) else escape(c)}</td>" for c in cells)
        + "</tr>"
    )


def _empty(columns: int, text: str) -> Html:
    return Html(f'<tr><td colspan="{columns}" class="muted">{escape(text)}</td></tr>')


def example_input(spec: AppSpec) -> str:
    """The form's starting input: the schema's first example, else its default, else {}."""
    schema = spec.input_schema or {}
    examples = schema.get("examples")
    if isinstance(examples, list) and examples:
        return json.dumps(examples[0], indent=2)
    if "example" in schema:
        return json.dumps(schema["example"], indent=2)
    if "default" in schema:
        return json.dumps(schema["default"], indent=2)
    return "{}"


def _status(run: Run) -> Html:
    return Html(f'<span class="status status-{escape(run.status)}">{escape(run.status)}</span>')


def _when(run: Run) -> str:
    return run.created_at.strftime("%Y-%m-%d %H:%M:%S")


# -- pages -------------------------------------------------------------------------------


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/ui/")


@router.get("/ui")
def ui_root() -> RedirectResponse:
    return RedirectResponse("/ui/")


@router.get("/ui/")
def apps_page(corral: Service) -> HTMLResponse:
    rows = [
        _cells(_link(app_url(n), n), v, spec.environment, spec.entrypoint, spec.concurrency)
        for n, v, spec in corral.pipeline.apps.all()
    ]
    return page("Apps", "apps.html", rows=Html("\n".join(rows)) if rows else _empty(5, "No apps."))


@router.get("/ui/apps/{app}")
def app_page(app: str, corral: Service) -> HTMLResponse:
    try:
        version, spec = corral.pipeline.apps.get(app)
        runs = corral.store.runs.recent(app=app, limit=RECENT_RUNS)
    except CorralError as exc:
        return error_page(exc)
    rows = [
        _cells(_link(run_url(r.id), r.id), _status(r), r.trigger, r.user, r.app_version, _when(r))
        for r in runs
    ]
    schema = Html("")
    if spec.input_schema is not None:
        shown = json.dumps(spec.input_schema, indent=2)
        schema = Html(
            f"<details><summary>Input schema</summary><pre>{escape(shown)}</pre></details>"
        )
    return page(
        app,
        "app.html",
        name=app,
        version=version,
        environment=spec.environment,
        entrypoint=spec.entrypoint,
        timeout=f"{spec.timeout:g}",
        concurrency=spec.concurrency,
        action=f"{app_url(app)}/runs",
        input=example_input(spec),
        schema=schema,
        rows=Html("\n".join(rows)) if rows else _empty(6, "No runs yet."),
    )


@router.get("/ui/runs/{run_id}")
def run_page(run_id: str, corral: Service) -> HTMLResponse:
    try:
        run = corral.store.runs.get(run_id)
    except CorralError as exc:
        return error_page(exc)
    active = not RunStatus(run.status).terminal
    quoted = quote(run.id, safe="")
    return page(
        f"Run {run.id}",
        "run.html",
        id=run.id,
        app_link=_link(app_url(run.app), run.app) if run.app else "(no app)",
        app_version=run.app_version if run.app_version is not None else "-",
        trigger=run.trigger,
        user=run.user,
        created_at=_when(run),
        status=run.status,
        cancel_hidden=Html("" if active else "hidden"),
        events_url=f"/v1/runs/{quoted}/events",
        cancel_url=f"/v1/runs/{quoted}/cancel",
        kinds=json.dumps(EVENT_KINDS),
    )


# -- the Run button ----------------------------------------------------------------------


class UiRun(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: Any = Field(default=None, description="the agent's input: any JSON value")


class UiStarted(BaseModel):
    run: models.Run
    url: str = Field(description="the run's page")


@router.post("/ui/apps/{app}/runs", status_code=201)
async def ui_run(
    app: str,
    body: UiRun,
    corral: Service,
    user: User,
    idempotency_key: IdempotencyKey,
    response: Response,
) -> UiStarted:
    """The form's Run button: ``execute_agent`` with trigger ``ui``; JSON in, JSON out.

    JSON only (a cross-site form cannot send it without a CORS preflight, which this server
    never grants). Errors answer as the API's do.
    """
    started = models.StartRun(input=body.input)
    run = await start_run(corral, app, started, Trigger("ui"), user, idempotency_key, response)
    return UiStarted(run=run, url=run_url(run.id))
