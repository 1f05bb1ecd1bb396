"""The API's request and response bodies, as pydantic models: the OpenAPI document's schemas.

Response shapes mirror ``corral env ... --json`` (``corral/cli/output.py`` and
``corral/cli/env.py``), field for field, so a client can switch between the CLI and the API.
Names, digests and references are checked by the service, not here, so the API and the CLI
refuse the same values with the same ``invalid_input`` error; these models check only the
shape (types, a non-empty argv, a positive timeout) and refuse unknown fields.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

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


class EnvironmentDetail(Environment):
    draft_changed: bool = Field(description="whether the draft holds changes not yet frozen")


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
