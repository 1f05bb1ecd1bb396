"""The API's request and response bodies, as pydantic models: the OpenAPI document's schemas.

Response shapes mirror ``corral env ... --json`` (``corral/cli/output.py`` and
``corral/cli/env.py``) and ``corral app ... --json`` (``corral/api/shapes.py``), field for
field, so a client can switch between the CLI and the API.
Names, digests and references are checked by the service, not here, so the API and the CLI
refuse the same values with the same ``invalid_input`` error; these models check only the
shape (types, a non-empty argv, a positive timeout) and refuse unknown fields.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from corral.pipeline.apps import AppSpec

_STRICT = ConfigDict(extra="forbid")


def _argv() -> Any:
    return Field(
        min_length=1,
        description="the command and its arguments, run without a shell",
        examples=[["sh", "-c", "echo hello"]],
    )


def _timeout() -> Any:
    return Field(
        default=None, gt=0, description="kill the command after this many seconds; null: no limit"
    )


class Health(BaseModel):
    ok: bool


# -- environments ------------------------------------------------------------------------


class CreateEnvironment(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(description="1-63 of a-z 0-9 _ . -, starting with a letter or digit")
    source: str | None = Field(
        default=None,
        alias="from",
        description="oci:PATH[:TAG] or oci-archive:PATH[:TAG] on the server; null: the base image",
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

    env: str = Field(description="the environment whose snapshot boots the sandbox")
    argv: list[str] = _argv()
    snapshot: str | None = Field(
        default=None, description="a digest from the environment's history; null: its head"
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


# -- apps --------------------------------------------------------------------------------


def _spec_default(name: str) -> Any:
    """The default of one ``AppSpec`` field, so the API documents the service's own."""
    found = AppSpec.__dataclass_fields__[name]
    return found.default_factory() if callable(found.default_factory) else found.default


class AppSettings(BaseModel):
    """The settings every app has besides its environment and entrypoint."""

    model_config = _STRICT

    timeout: float = Field(default=_spec_default("timeout"), gt=0,
                           description="seconds a run may take")  # fmt: skip
    budget_per_run: float | None = Field(
        default=None, ge=0, description="credits one run may spend; 0 admits no run; null: none"
    )
    budget_total: float | None = Field(
        default=None, ge=0, description="credits all the app's runs may spend; null: no limit"
    )
    concurrency: Literal["allow", "enqueue", "reject", "cancel_previous"] = Field(
        default=_spec_default("concurrency"),
        description="what a user's run does while another of theirs is active",
    )
    max_concurrent: int = Field(default=0, ge=0, description="active runs per user; 0: no maximum")
    connections: list[str] = Field(
        default_factory=list, description="connections the runs' tokens may reach"
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
    name: str = Field(description="1-63 of a-z 0-9 _ . -, starting with a letter or digit")
    environment: str = Field(description="the environment whose head snapshot runs boot")
    entrypoint: str = Field(description="file.py:function", examples=["agent.py:main"])


class UpdateApp(AppSettings):
    """Only the fields sent change; every change is a new version."""

    environment: str | None = None
    entrypoint: str | None = None


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
        default=None, gt=0, le=3600,
        description="with wait: answer after this many seconds even if the run goes on "
                    "(202 with the run as it is then); default 600",
    )  # fmt: skip


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

    credits: float = Field(gt=0, description="credits to add to the user's balance")
    note: str | None = Field(default=None, description="kept with the ledger entry")


class Balance(BaseModel):
    user: str
    balance: float = Field(description="grants minus what the user's runs have spent")
