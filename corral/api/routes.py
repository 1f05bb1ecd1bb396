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
from typing import Annotated, cast

from fastapi import APIRouter, Depends, Request, Response

from corral.api import models
from corral.api.errors import documented
from corral.cli.context import Corral
from corral.cli.output import environment, snapshot
from corral.envs.service import Environments
from corral.sandbox.sandboxes import SandboxResult
from corral.store import Snapshot

router = APIRouter(prefix="/v1")


def _envs(request: Request) -> Environments:
    corral: Corral = request.app.state.corral
    return corral.envs


Envs = Annotated[Environments, Depends(_envs)]


@router.get("/health", tags=["meta"])
def health() -> models.Health:
    """Whether the server is up. Touches neither the database nor the sandbox host."""
    return models.Health(ok=True)


# -- environments ------------------------------------------------------------------------


@router.post(
    "/envs", status_code=201, tags=["environments"], responses=documented(400, 409, 422, 500, 507)
)
def create_environment(body: models.CreateEnvironment, envs: Envs) -> models.Environment:
    """Create an environment from the base image, or from an OCI image on the server."""
    return models.Environment.model_validate(environment(envs.create(body.name, body.source)))


@router.get("/envs", tags=["environments"], responses=documented(500))
def list_environments(envs: Envs) -> list[models.Environment]:
    """Every environment and its head snapshot, ordered by name."""
    return [models.Environment.model_validate(environment(e)) for e in envs.list()]


@router.get("/envs/{name}", tags=["environments"], responses=documented(400, 404, 500))
def get_environment(name: str, envs: Envs) -> models.EnvironmentDetail:
    """One environment, and whether its draft holds unfrozen changes."""
    env = envs.get(name)  # validates the name before has_draft builds a path from it
    return models.EnvironmentDetail.model_validate(
        {**environment(env), "draft_changed": envs.has_draft(name)}
    )


@router.delete(
    "/envs/{name}",
    status_code=204,
    response_class=Response,
    tags=["environments"],
    responses=documented(400, 404, 409, 500),
)
def delete_environment(name: str, envs: Envs) -> None:
    """Forget the environment and its draft; blobs shared with other environments stay."""
    envs.delete(name)


@router.post(
    "/envs/{name}/exec", tags=["environments"], responses=documented(400, 404, 409, 422, 500, 503)
)
def exec_in_environment(name: str, body: models.Exec, envs: Envs) -> models.CommandResult:
    """Run a command in an edit session: what it changes waits in the draft for freeze.

    Blocks until the command ends. A non-zero exit is still a 200: see ``exit_code``.
    """
    return captured(functools.partial(envs.exec, name, tuple(body.argv), timeout=body.timeout))


@router.post(
    "/envs/{name}/freeze",
    status_code=201,
    tags=["environments"],
    responses=documented(400, 404, 409, 422, 500, 507),
)
def freeze_environment(name: str, envs: Envs, body: models.Freeze | None = None) -> models.Snapshot:
    """Freeze the draft into a new snapshot on top of the head; 409 if the draft is empty."""
    snap = envs.freeze(name, body.message if body else None)
    return models.Snapshot.model_validate(snapshot(snap))


@router.post(
    "/envs/{name}/discard", tags=["environments"], responses=documented(400, 404, 409, 500)
)
def discard_draft(name: str, envs: Envs) -> models.Discarded:
    """Throw away the draft: the environment goes back to exactly its head snapshot."""
    envs.discard(name)
    return models.Discarded(name=name, discarded=True)


@router.get("/envs/{name}/history", tags=["environments"], responses=documented(400, 404, 500))
def environment_history(name: str, envs: Envs) -> list[models.Snapshot]:
    """Every snapshot of the environment, newest first."""
    # cast: inside Environments, its own ``list`` method shadows the builtin in the
    # annotation ``-> list[Snapshot]``, so mypy cannot read history()'s return type.
    snaps = cast("list[Snapshot]", envs.history(name))
    return [models.Snapshot.model_validate(snapshot(s)) for s in snaps]


@router.post("/envs/{name}/verify", tags=["environments"], responses=documented(400, 404, 500))
def verify_environment(name: str, envs: Envs) -> models.VerifyReport:
    """Re-hash every blob of every snapshot; a changed one is a 500 ``corrupt_blob``."""
    return models.VerifyReport.model_validate(envs.verify(name).to_dict())


# -- sandboxes ---------------------------------------------------------------------------


@router.post("/sandboxes", tags=["sandboxes"], responses=documented(400, 404, 422, 500, 503))
def run_sandbox(body: models.RunSandbox, envs: Envs) -> models.CommandResult:
    """Boot a fresh sandbox from a frozen snapshot, run one command, and tear it down.

    Blocks until the command ends; nothing it writes is kept.
    """
    return captured(
        functools.partial(
            envs.run, body.env, tuple(body.argv), digest=body.snapshot, timeout=body.timeout
        )
    )


def captured(start: Callable[..., SandboxResult]) -> models.CommandResult:
    """Call ``start(stdin=, stdout=, stderr=)`` with stdin empty and the output in temp files."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        result = start(stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        out.seek(0)
        err.seek(0)
        return models.CommandResult(
            sandbox_id=result.sandbox_id,
            exit_code=result.exit_code,
            timed_out=result.timed_out,
            seconds=round(result.seconds, 4),
            stdout=out.read().decode("utf-8", "replace"),
            stderr=err.read().decode("utf-8", "replace"),
        )
