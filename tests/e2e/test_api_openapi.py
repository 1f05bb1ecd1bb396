"""The API's contract without a sandbox host: the OpenAPI document and its error shape.

Runs anywhere (no root, no runc): the app is called in-process (httpx's ASGI transport)
over a Corral whose data directory is a temporary one, and only routes that never boot a
sandbox are called.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI

from corral.api.app import create_app
from corral.config import Settings
from corral.context import Corral


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
