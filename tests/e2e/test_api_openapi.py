"""The API's contract without a sandbox host: the error table and the OpenAPI document.

Runs anywhere (no root, no runc): the app is called in-process (httpx's ASGI transport)
over a Corral whose data directory is a temporary one, and only routes that never boot a
sandbox are called.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI

from corral import errors as corral_errors
from corral.api.app import create_app
from corral.api.errors import STATUS, STATUS_BY_CODE, status_for
from corral.config import Settings
from corral.context import Corral
from corral.errors import CorralError, SandboxError, SnapshotError


@pytest.fixture
def app(tmp_path: Path) -> Iterator[FastAPI]:
    settings = Settings.from_env(
        {"CORRAL_DATA_DIR": str(tmp_path / "data"), "CORRAL_RUN_DIR": str(tmp_path / "run")}
    )
    corral = Corral(settings)
    try:
        yield create_app(corral)
    finally:
        corral.close()


def call(app: FastAPI, method: str, path: str, body: Any = None) -> httpx.Response:
    """One request to ``app``, in-process."""

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            return await client.request(method, path, json=body)

    return anyio.run(send)


def _error_classes() -> list[type[CorralError]]:
    """Every CorralError subclass defined anywhere in the corral package."""
    import importlib
    import pkgutil

    import corral

    skip = ("runner", "boot", "migrations", "__main__", "corral.cli")
    for module in pkgutil.walk_packages(corral.__path__, "corral."):
        if not any(part in module.name for part in skip):
            importlib.import_module(module.name)

    def below(cls: type[CorralError]) -> list[type[CorralError]]:
        return [c for sub in cls.__subclasses__() for c in (sub, *below(sub))]

    found = {c for c in [CorralError, *below(CorralError)] if c.__module__.startswith("corral")}
    assert {
        c
        for _, c in inspect.getmembers(corral_errors, inspect.isclass)
        if issubclass(c, CorralError)
    } <= found
    return sorted(found, key=lambda c: (c.__module__, c.__name__))


def test_every_error_class_has_its_own_row() -> None:
    classes = _error_classes()
    assert set(classes) == set(STATUS), "add the new error to corral/api/errors.py:STATUS"
    assert len(STATUS_BY_CODE) == len(classes), "two error classes share a code"
    assert all(100 <= s < 600 for s in STATUS.values())


def test_status_table_choices() -> None:
    expected = {
        "environment_not_found": 404,
        "snapshot_not_found": 404,
        "environment_exists": 409,
        "environment_busy": 409,
        "conflict": 409,
        "nothing_to_freeze": 409,
        "invalid_input": 400,
        "import_failed": 400,
        "corrupt_blob": 500,
        "disk_full": 507,
        "command_not_found": 422,
        "requirement_missing": 503,
        "store_error": 500,
        "runc_error": 500,
    }
    assert {code: STATUS_BY_CODE[code] for code in expected} == expected


def test_an_unlisted_subclass_answers_with_its_family_status() -> None:
    class Later(SnapshotError):
        code = "later"

    class Sooner(SandboxError):
        code = "sooner"

    assert status_for(Later()) == 500
    assert status_for(Sooner()) == 500
    assert status_for(corral_errors.EnvironmentNotFound("x")) == 404


def test_openapi_documents_errors_in_one_shape(app: FastAPI) -> None:
    doc = call(app, "GET", "/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            for status, response in op["responses"].items():
                if status.startswith("2"):
                    continue
                ref = response["content"]["application/json"]["schema"]["$ref"]
                assert ref == "#/components/schemas/ErrorBody", (method, path, status)
    assert doc["components"]["schemas"]["ErrorBody"]["required"] == ["error", "detail"]


def test_routes_that_boot_no_sandbox(app: FastAPI) -> None:
    assert call(app, "GET", "/v1/health").json() == {"ok": True}
    assert call(app, "GET", "/v1/envs").json() == []
    missing = call(app, "GET", "/v1/envs/absent")
    assert missing.status_code == 404 and missing.json()["error"] == "environment_not_found"
    bad = call(app, "GET", "/v1/envs/NOT_OK")
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_input"
    empty = call(app, "POST", "/v1/envs/absent/exec", {"argv": []})
    assert empty.status_code == 422 and empty.json()["error"] == "invalid_request"
