"""The ``/v1`` routes: each one a thin call into the ``Environments`` service.

Every route is a plain ``def``: the service blocks (SQL, layer files, and for exec and
sandbox runs a whole sandbox's lifetime), so FastAPI runs each request in its threadpool and
the event loop stays free for the others. The service is shared by those threads; the
environment lock (``EnvironmentBusy``, 409) and the store's compare-and-swap (``Conflict``,
409) keep concurrent edits of one environment apart. Errors are raised, never returned:
``corral.api.errors`` turns them into responses.
"""

from __future__ import annotations

import functools
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi import Path as PathParam

from corral.api import models
from corral.api.errors import documented
from corral.api.http import StrictRoute
from corral.config import Settings
from corral.context import Corral
from corral.envs.service import EditResult, Environments
from corral.envs.shapes import environment, snapshot
from corral.errors import ImportForbidden
from corral.sandbox.runtime import SandboxResult
from corral.store.rows import NAME_RULE

router = APIRouter(prefix="/v1", route_class=StrictRoute)


def _envs(request: Request) -> Environments:
    corral: Corral = request.app.state.corral
    return corral.envs


def _settings(request: Request) -> Settings:
    corral: Corral = request.app.state.corral
    return corral.settings


Envs = Annotated[Environments, Depends(_envs)]
EnvName = Annotated[str, PathParam(description=NAME_RULE, json_schema_extra=models.NAME)]
Config = Annotated[Settings, Depends(_settings)]
OUTPUT_CAP = 4 << 20  # bytes of stdout or stderr returned over HTTP; the rest is cut


def _importable(source: str | None, settings: Settings) -> str | None:
    """Over HTTP the server (root) reads only images an operator placed in the import dir."""
    kind, _, rest = (source or "").partition(":")
    if kind not in ("oci", "oci-archive"):
        return source  # nothing to read: the service names what is wrong with it
    path = rest.partition(":")[0]
    root = settings.import_dir.resolve()
    if not Path(path).resolve().is_relative_to(root):
        raise ImportForbidden(f"over HTTP, 'from' must name an image under {root}, not {path!r}")
    return source


def _timeout(requested: float | None, settings: Settings) -> float:
    return min(requested or settings.sandbox_timeout, settings.sandbox_timeout)


@router.get("/health", tags=["meta"])
def health() -> models.Health:
    """Whether the server is up. Touches neither the database nor the sandbox host."""
    return models.Health(ok=True)


# -- environments ------------------------------------------------------------------------


@router.post(
    "/envs", status_code=201, tags=["environments"], responses=documented(400, 409, 422, 500, 507)
)
def create_environment(
    body: models.CreateEnvironment, envs: Envs, settings: Config
) -> models.Environment:
    """Create an environment from the base image, or from an OCI image in the import dir."""
    env = envs.create(body.name, _importable(body.source, settings))
    return models.Environment.model_validate(environment(env))


@router.get("/envs", tags=["environments"], responses=documented(500))
def list_environments(envs: Envs) -> list[models.Environment]:
    """Every environment and its head snapshot, ordered by name."""
    return [models.Environment.model_validate(environment(e)) for e in envs.all()]


@router.get("/envs/{name}", tags=["environments"], responses=documented(400, 404, 500))
def get_environment(name: EnvName, envs: Envs) -> models.EnvironmentDetail:
    """One environment, and whether its draft holds unfrozen changes."""
    env = envs.get(name)  # validates the name before has_draft builds a path from it
    usage = envs.draft_usage(name)
    return models.EnvironmentDetail.model_validate(
        {
            **environment(env),
            "draft_changed": envs.has_draft(name),
            "draft": None if usage is None else usage.to_dict(),
        }
    )


@router.delete(
    "/envs/{name}",
    status_code=204,
    response_class=Response,
    tags=["environments"],
    responses=documented(400, 404, 409, 500),
)
def delete_environment(name: EnvName, envs: Envs) -> None:
    """Forget the environment and its draft; blobs shared with other environments stay."""
    envs.delete(name)


@router.post(
    "/envs/{name}/exec",
    tags=["environments"],
    responses=documented(400, 404, 409, 422, 500, 503, 507),
)
def exec_in_environment(
    name: EnvName, body: models.Exec, envs: Envs, settings: Config
) -> models.CommandResult:
    """Run a command in an edit session: what it changes waits in the draft for freeze.

    Blocks until the command ends. A non-zero exit is still a 200: see ``exit_code``. A draft
    holds at most CORRAL_DRAFT_LIMIT_MB: past it writes fail in the sandbox, and ``draft``
    says the draft is full, and what its limit is.
    """
    timeout = _timeout(body.timeout, settings)
    return captured(functools.partial(envs.exec, name, tuple(body.argv), timeout=timeout))


@router.post(
    "/envs/{name}/freeze",
    status_code=201,
    tags=["environments"],
    responses=documented(400, 404, 409, 422, 500, 507),
)
def freeze_environment(
    name: EnvName, envs: Envs, body: models.Freeze | None = None
) -> models.Snapshot:
    """Freeze the draft into a new snapshot on top of the head; 409 if the draft is empty."""
    snap = envs.freeze(name, body.message if body else None)
    return models.Snapshot.model_validate(snapshot(snap))


@router.post(
    "/envs/{name}/discard", tags=["environments"], responses=documented(400, 404, 409, 500)
)
def discard_draft(name: EnvName, envs: Envs) -> models.Discarded:
    """Throw away the draft: the environment goes back to exactly its head snapshot."""
    envs.discard(name)
    return models.Discarded(name=name, discarded=True)


@router.get("/envs/{name}/history", tags=["environments"], responses=documented(400, 404, 500))
def environment_history(name: EnvName, envs: Envs) -> list[models.Snapshot]:
    """Every snapshot of the environment, newest first."""
    return [models.Snapshot.model_validate(snapshot(s)) for s in envs.history(name)]


@router.post("/envs/{name}/verify", tags=["environments"], responses=documented(400, 404, 500))
def verify_environment(name: EnvName, envs: Envs) -> models.VerifyReport:
    """Re-hash every blob of every snapshot; a changed one is a 500 ``corrupt_blob``."""
    return models.VerifyReport.model_validate(envs.verify(name).to_dict())


# -- sandboxes ---------------------------------------------------------------------------


@router.post("/sandboxes", tags=["sandboxes"], responses=documented(400, 404, 422, 500, 503))
def run_sandbox(body: models.RunSandbox, envs: Envs, settings: Config) -> models.CommandResult:
    """Boot a fresh sandbox from a frozen snapshot, run one command, and tear it down.

    Blocks until the command ends; nothing it writes is kept.
    """
    return captured(
        functools.partial(
            envs.run,
            body.env,
            tuple(body.argv),
            digest=body.snapshot,
            timeout=_timeout(body.timeout, settings),
        )
    )


def captured(start: Callable[..., SandboxResult]) -> models.CommandResult:
    """Call ``start(stdin=, stdout=, stderr=)`` with stdin empty and the output in temp files."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        result = start(stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        out.seek(0)
        err.seek(0)
        draft = result.draft if isinstance(result, EditResult) else None
        return models.CommandResult(
            sandbox_id=result.sandbox_id,
            exit_code=result.exit_code,
            timed_out=result.timed_out,
            seconds=round(result.seconds, 4),
            stdout=out.read(OUTPUT_CAP).decode("utf-8", "replace"),
            stderr=err.read(OUTPUT_CAP).decode("utf-8", "replace"),
            draft=None if draft is None else models.DraftUsage.model_validate(draft.to_dict()),
        )
