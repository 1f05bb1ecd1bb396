"""The API's request and response bodies, as pydantic models: the OpenAPI document's schemas.

Response shapes mirror ``corral env ... --json`` (``corral/cli/output.py`` and
``corral/cli/env.py``) and ``corral app ... --json`` (``corral/api/shapes.py``), field for
field, so a client can switch between the CLI and the API.
Names, digests and references are checked by the service, not here, so the API and the CLI
refuse the same values with the same ``invalid_input`` error; these models check the shape
strictly: exact JSON types (``"wait": "yes"`` is not a boolean, ``"5"`` is not a number),
finite numbers only, no unknown fields. A body that breaks them is a 422 naming the field.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from corral.billing import amounts
from corral.errors import InvalidInput
from corral.pipeline.apps import AppSpec
from corral.store.rows import DIGEST_PATTERN, NAME_PATTERN, NAME_RULE, USER_PATTERN


def rule(pattern: str, max_length: int, min_length: int = 1) -> dict[str, Any]:
    """The OpenAPI form of a rule the service enforces with ``pattern`` (matched whole)."""
    return {"pattern": f"^{pattern}$", "minLength": min_length, "maxLength": max_length}


def header(schema: dict[str, Any]) -> dict[str, Any]:
    """An optional header's schema: a string when present (never JSON ``null``)."""
    return {"anyOf": [{"type": "string", **schema}]}


NAME = rule(NAME_PATTERN, 63)  # environments, apps, connections
USER = rule(USER_PATTERN, 128)
DIGEST = rule(DIGEST_PATTERN, 71)
# file.py:function, or package.module:function
ENTRYPOINT: dict[str, Any] = {"pattern": ":", "minLength": 3}


def _integral(value: Any) -> Any:
    """JSON has one number type: 5.0 is the integer 5 (JSON Schema agrees), 5.5 is not."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# An integer as JSON Schema means it: 5 or 5.0, never "5", 5.5 or true.
Integer = Annotated[int, BeforeValidator(_integral)]

# Every request body: JSON types exactly (no "yes" for true, no "5" for 5), finite numbers,
# and nothing the model does not name.
_STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

_NO_NUL = "^[^\\u0000]*$"  # an argument travels as a C string: no NUL inside


def _argv() -> Any:
    return Field(
        min_length=1,
        description="the command and its arguments, run without a shell; the command is not "
        "empty, and no argument holds a NUL",
        examples=[["sh", "-c", "echo hello"]],
        json_schema_extra={
            "prefixItems": [{"type": "string", "minLength": 1, "pattern": _NO_NUL}],
            "items": {"type": "string", "pattern": _NO_NUL},
        },
    )


def _timeout() -> Any:
    return Field(
        default=None, gt=0, description="kill the command after this many seconds; null: no limit"
    )


class Health(BaseModel):
    ok: bool


# -- environments ------------------------------------------------------------------------


class CreateEnvironment(BaseModel):
    model_config = ConfigDict(
        strict=True, extra="forbid", allow_inf_nan=False, populate_by_name=True
    )

    name: str = Field(description=NAME_RULE, json_schema_extra=NAME)
    source: str | None = Field(
        default=None,
        alias="from",
        description="oci:PATH[:TAG] or oci-archive:PATH[:TAG] on the server, under its import "
        "directory (403 elsewhere, 404 if nothing is there); null: the base image",
        json_schema_extra={
            "anyOf": [{"type": "string", "pattern": "^(oci|oci-archive):."}, {"type": "null"}]
        },
    )


class Environment(BaseModel):
    name: str
    base: str = Field(description="where it was created from: base:bookworm, oci-archive:...")
    head: str = Field(description="manifest digest of its newest snapshot")
    created_at: datetime
    updated_at: datetime


class DraftUsage(BaseModel):
    """How full an environment's draft is: it holds at most ``limit_bytes``."""

    used_bytes: int
    limit_bytes: int = Field(description="CORRAL_DRAFT_LIMIT_MB when this draft began")
    full: bool = Field(description="writes in an edit session now fail: no space left")
    notice: str | None = Field(description="what to do about a full draft; null otherwise")


class EnvironmentDetail(Environment):
    draft_changed: bool = Field(description="whether the draft holds changes not yet frozen")
    draft: DraftUsage | None = Field(None, description="null until an edit session begins one")


class Discarded(BaseModel):
    name: str
    discarded: bool


# -- snapshots ---------------------------------------------------------------------------


class Freeze(BaseModel):
    model_config = _STRICT

    message: str | None = Field(default=None, description="a note kept with the snapshot")


class Snapshot(BaseModel):
    digest: str = Field(description="manifest digest")
    environment: str
    seq: int = Field(description="1 for the first snapshot, then 2, 3 ...")
    parent: str | None = Field(description="the previous snapshot's digest; null for the first")
    layer: str | None = Field(description="the layer this snapshot added; null for an import")
    size: int = Field(description="bytes of all layers together")
    created_at: datetime
    message: str | None


class BlobCheck(BaseModel):
    digest: str
    size: int


class VerifyReport(BaseModel):
    environment: str
    ok: bool
    snapshots: int = Field(description="how many snapshots of the history were checked")
    blobs: list[BlobCheck] = Field(description="every blob re-hashed, each once")


# -- running commands --------------------------------------------------------------------


class Exec(BaseModel):
    model_config = _STRICT

    argv: list[str] = _argv()
    timeout: float | None = _timeout()


class RunSandbox(BaseModel):
    model_config = _STRICT

    env: str = Field(
        description="the environment whose snapshot boots the sandbox", json_schema_extra=NAME
    )
    argv: list[str] = _argv()
    snapshot: str | None = Field(
        default=None,
        description="a digest from the environment's history; null: its head",
        json_schema_extra={"anyOf": [{"type": "string", **DIGEST}, {"type": "null"}]},
    )
    timeout: float | None = _timeout()


class CommandResult(BaseModel):
    sandbox_id: str
    exit_code: int = Field(description="the command's exit status; 128+N if killed by signal N")
    timed_out: bool
    seconds: float = Field(description="wall time from boot to teardown")
    stdout: str = Field(description="everything the command wrote, decoded as UTF-8")
    stderr: str
    draft: DraftUsage | None = Field(
        None, description="edit sessions: how full the command left the environment's draft"
    )


# -- amounts of credits -------------------------------------------------------------------


def _exact(value: float) -> float:
    """The ledger's own check (finite, at most 6 decimal places, within its bound), so the
    API refuses what the ledger would, as a 422 naming the field."""
    try:
        amounts.to_micros(value)
    except InvalidInput as exc:
        raise ValueError(exc.detail) from None
    return value


_CREDITS_RULE = f"at most {amounts.PLACES} decimal places and {amounts.MAX_CREDITS} in size"
Credits = Annotated[float, AfterValidator(_exact)]
_MICRO = 1 / amounts.MICROS
# For an optional amount, the rules go on its number branch (a bare multipleOf beside
# anyOf would apply to null too).
_CREDITS_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "number", "minimum": 0, "maximum": amounts.MAX_CREDITS, "multipleOf": _MICRO},
        {"type": "null"},
    ]
}


# -- apps --------------------------------------------------------------------------------


def _spec_default(name: str) -> Any:
    """The default of one ``AppSpec`` field, so the API documents the service's own."""
    found = AppSpec.__dataclass_fields__[name]
    return found.default_factory() if callable(found.default_factory) else found.default


class AppSettings(BaseModel):
    """The settings every app has besides its environment and entrypoint."""

    model_config = _STRICT

    timeout: float = Field(
        default=_spec_default("timeout"), gt=0, description="seconds a run may take"
    )
    budget_per_run: Credits | None = Field(
        default=None,
        ge=0,
        le=amounts.MAX_CREDITS,
        json_schema_extra=_CREDITS_SCHEMA,
        description="credits one run may spend; 0 admits no run; null: none",
    )
    budget_total: Credits | None = Field(
        default=None,
        ge=0,
        le=amounts.MAX_CREDITS,
        json_schema_extra=_CREDITS_SCHEMA,
        description="credits all the app's runs may spend; null: no limit",
    )
    concurrency: Literal["allow", "enqueue", "reject", "cancel_previous"] = Field(
        default=_spec_default("concurrency"),
        description="what a user's run does while another of theirs is active",
    )
    max_concurrent: Integer = Field(
        default=0, ge=0, le=1_000_000, description="active runs per user; 0: no maximum"
    )
    connections: list[str] = Field(
        default_factory=list,
        description="connections the runs' tokens may reach",
        json_schema_extra={"items": {"type": "string", **NAME}},
    )
    input_schema: dict[str, Any] | None = Field(
        default=None, description="a JSON Schema every run's input must satisfy"
    )
    webhook_url: str | None = Field(default=None, description="POSTed when a run ends")
    webhook_secret: str | None = Field(
        default=None, description="signs the webhook (HMAC); write-only: never shown again"
    )
    callable_by_agents: bool = Field(default=_spec_default("callable_by_agents"))
    extra: dict[str, Any] = Field(default_factory=dict)


class CreateApp(AppSettings):
    name: str = Field(description=NAME_RULE, json_schema_extra=NAME)
    environment: str = Field(
        description="the environment whose head snapshot runs boot", json_schema_extra=NAME
    )
    entrypoint: str = Field(
        description="file.py:function", examples=["agent.py:main"], json_schema_extra=ENTRYPOINT
    )


class UpdateApp(AppSettings):
    """Only the fields sent change; every change is a new version."""

    environment: str | None = Field(
        default=None, json_schema_extra={"anyOf": [{"type": "string", **NAME}, {"type": "null"}]}
    )
    entrypoint: str | None = Field(
        default=None,
        json_schema_extra={"anyOf": [{"type": "string", **ENTRYPOINT}, {"type": "null"}]},
    )


class AppSpecBody(BaseModel):
    """An app's settings as stored, without the webhook secret."""

    environment: str
    entrypoint: str
    timeout: float
    budget_per_run: float | None
    budget_total: float | None
    concurrency: str
    max_concurrent: int
    connections: list[str]
    input_schema: dict[str, Any] | None
    webhook_url: str | None
    callable_by_agents: bool
    extra: dict[str, Any]


class App(BaseModel):
    name: str
    version: int = Field(description="the current version: 1, then one more for each change")
    spec: AppSpecBody
    webhook_secret_set: bool


class AppVersion(BaseModel):
    version: int
    spec: AppSpecBody
    created_at: datetime


# -- runs --------------------------------------------------------------------------------


class StartRun(BaseModel):
    model_config = _STRICT

    input: Any = Field(default=None, description="the agent's input: any JSON value")
    wait: bool = Field(default=False, description="answer once the run has ended")
    timeout: float | None = Field(
        default=None,
        gt=0,
        le=3600,
        description="with wait: answer after this many seconds even if the run goes on "
        "(202 with the run as it is then); default 600",
    )


class Run(BaseModel):
    id: str
    app: str | None
    app_version: int | None
    environment: str
    snapshot: str = Field(description="the snapshot digest the run boots (or booted)")
    trigger: str = Field(description="ui | schedule | http | agent | cli")
    status: str = Field(description="queued | running | succeeded | failed | timed_out | cancelled")
    user: str
    result: Any = Field(description="what the agent returned, decoded; null until it succeeds")
    error_code: str | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int
    runner_version: str | None
    swapped: bool
    parent_run: str | None = Field(description="the calling run, for an agent-to-agent call")
    depth: int
    cancel_requested: bool = Field(description="cancelled while running; its worker stops it")


# -- credits -----------------------------------------------------------------------------


class Grant(BaseModel):
    model_config = _STRICT

    credits: Credits = Field(
        gt=0,
        le=amounts.MAX_CREDITS,
        json_schema_extra={"multipleOf": _MICRO},
        description=f"credits to add to the user's balance: above 0, {_CREDITS_RULE}",
    )
    note: str | None = Field(
        default=None, max_length=1000, description="kept with the ledger entry"
    )


class Adjustment(BaseModel):
    """An operator's correction: the ledger is append-only, so a mistake is corrected by a
    new entry (the negative of a mistaken grant, say), never edited away."""

    model_config = _STRICT

    credits: Credits = Field(
        ge=-amounts.MAX_CREDITS,
        le=amounts.MAX_CREDITS,
        json_schema_extra={"multipleOf": _MICRO, "not": {"const": 0}},
        description=f"credits to add (or, negative, to take away): not 0, {_CREDITS_RULE}",
    )
    note: str = Field(
        min_length=1, max_length=1000, pattern=r"\S", description="why: kept with the ledger entry"
    )


class Balance(BaseModel):
    user: str
    balance: float = Field(
        description="grants and corrections minus what the user's runs have spent; exact to "
        "the millionth of a credit"
    )
