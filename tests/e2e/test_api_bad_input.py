"""Hostile requests to the API: strict bodies, non-finite numbers, sizes, methods.

Runs anywhere (no root, no runc): the app is called in-process over a Corral on a temporary
data directory, and only routes that boot no sandbox are called. Each request here was
accepted, or answered wrongly, before: ``{"credits": 1e999}`` granted infinite credits,
``"wait": "yes"`` read as true, a 10 MB input was admitted, a 405 named one method of several.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI

from corral.api.app import create_app
from corral.config import Settings
from corral.context import Corral
from corral.limits import MAX_INPUT, MAX_REQUEST_BODY


@pytest.fixture
def corral(tmp_path: Path) -> Iterator[Corral]:
    settings = Settings.from_env(
        {"CORRAL_DATA_DIR": str(tmp_path / "data"), "CORRAL_RUN_DIR": str(tmp_path / "run")}
    )
    opened = Corral(settings)
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def app(corral: Corral) -> FastAPI:
    return create_app(corral)


def send(
    app: FastAPI,
    method: str,
    path: str,
    body: Any = None,
    raw: str | bytes | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """One request, in-process; ``raw`` is sent as the JSON body's exact bytes."""
    sent = {"content-type": "application/json", **(headers or {})}
    content = raw if raw is not None else (None if body is None else json.dumps(body))

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            return await client.request(method, path, content=content, headers=sent)

    return anyio.run(go)


def refused(response: httpx.Response, status: int, code: str, *words: str) -> None:
    assert (response.status_code, response.json()["error"]) == (status, code), response.text
    for word in words:
        assert word in response.json()["detail"], (word, response.json()["detail"])


# -- credits -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, named",
    [
        ('{"credits": 1e999}', "1e999"),
        ('{"credits": NaN}', "NaN"),
        ('{"credits": Infinity}', "Infinity"),
        ('{"credits": -Infinity}', "-Infinity"),
    ],
)
def test_non_finite_numbers_are_not_json(app: FastAPI, raw: str, named: str) -> None:
    refused(send(app, "POST", "/v1/users/alice/credits", raw=raw), 422, "invalid_request", named)
    assert send(app, "GET", "/v1/users/alice/credits").json()["balance"] == 0


@pytest.mark.parametrize(
    "body, field",
    [
        ({"credits": "5"}, "credits"),
        ({"credits": True}, "credits"),
        ({"credits": 0}, "credits"),
        ({"credits": -1}, "credits"),
        ({"credits": 0.0000001}, "6 decimal places"),
        ({"credits": 1e12}, "credits"),
        ({"credits": 5, "extra": 1}, "extra"),
        ({}, "credits"),
    ],
)
def test_a_grant_is_refused_naming_the_field(app: FastAPI, body: Any, field: str) -> None:
    refused(send(app, "POST", "/v1/users/alice/credits", body), 422, "invalid_request", field)
    assert send(app, "GET", "/v1/users/alice/credits").json()["balance"] == 0


def test_grants_and_corrections_are_exact(app: FastAPI) -> None:
    for amount in (0.1, 0.2):
        assert send(app, "POST", "/v1/users/alice/credits", {"credits": amount}).status_code == 201
    assert send(app, "GET", "/v1/users/alice/credits").json() == {"user": "alice", "balance": 0.3}
    fixed = send(
        app,
        "POST",
        "/v1/users/alice/credits/adjustments",
        {"credits": -0.25, "note": "refund of a mistaken top-up"},
    )
    assert fixed.status_code == 201 and fixed.json() == {"user": "alice", "balance": 0.05}
    refused(
        send(app, "POST", "/v1/users/alice/credits/adjustments", {"credits": 0, "note": "x"}),
        400,
        "invalid_input",
        "not be zero",
    )
    refused(
        send(app, "POST", "/v1/users/alice/credits/adjustments", {"credits": -1}),
        422,
        "invalid_request",
        "note",
    )
    huge = send(app, "POST", "/v1/users/bob/credits", {"credits": 1_000_000_000})
    assert huge.status_code == 201
    refused(send(app, "POST", "/v1/users/bob/credits", {"credits": 1}), 409, "balance_limit")


# -- strict bodies ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, field",
    [
        ({"wait": "yes"}, "wait"),
        ({"wait": 1}, "wait"),
        ({"timeout": "5"}, "timeout"),
        ({"timeout": 5, "wiat": True}, "wiat"),
    ],
)
def test_run_bodies_are_strict(app: FastAPI, body: Any, field: str) -> None:
    refused(send(app, "POST", "/v1/apps/charts/runs", body), 422, "invalid_request", field)


def test_app_settings_are_strict_and_finite(app: FastAPI) -> None:
    base = {"name": "charts", "environment": "analyst", "entrypoint": "agent.py:main"}
    changes: list[tuple[dict[str, object], str]] = [
        ({"max_concurrent": "2"}, "max_concurrent"),
        ({"max_concurrent": 2.5}, "max_concurrent"),
        ({"callable_by_agents": "false"}, "callable_by_agents"),
        ({"budget_total": 1e12}, "budget_total"),
    ]
    for change, field in changes:
        refused(send(app, "POST", "/v1/apps", {**base, **change}), 422, "invalid_request", field)
    refused(
        send(app, "POST", "/v1/apps", raw=json.dumps(base)[:-1] + ', "timeout": 1e999}'),
        422,
        "invalid_request",
        "1e999",
    )
    refused(
        send(app, "POST", "/v1/apps", raw=json.dumps(base)[:-1] + ', "extra": {"x": NaN}}'),
        422,
        "invalid_request",
        "NaN",
    )
    # 2.0 is an integer in JSON: refused only for the environment that does not exist
    whole = send(app, "POST", "/v1/apps", {**base, "max_concurrent": 2.0})
    refused(whole, 404, "environment_not_found")


# -- sizes -----------------------------------------------------------------------------------


def test_an_input_over_its_limit_is_413_at_admission(app: FastAPI, corral: Corral) -> None:
    big = {"input": "x" * MAX_INPUT, "wait": False}  # MAX_INPUT + 2 bytes of JSON
    refused(
        send(app, "POST", "/v1/apps/charts/runs", big),
        413,
        "input_too_large",
        str(MAX_INPUT + 2),
        str(MAX_INPUT),
    )
    assert corral.store.runs.recent() == []


def test_a_body_over_the_request_limit_is_413_before_it_is_read(app: FastAPI) -> None:
    raw = json.dumps({"input": "x" * MAX_REQUEST_BODY})
    refused(send(app, "POST", "/v1/apps/charts/runs", raw=raw), 413, "body_too_large")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(3):
            yield b" " * (MAX_REQUEST_BODY // 2)
        yield b"{}"

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            return await client.post(
                "/v1/apps/charts/runs",
                content=chunks(),
                headers={"content-type": "application/json"},
            )

    refused(anyio.run(go), 413, "body_too_large", str(MAX_REQUEST_BODY))


# -- headers and methods ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers, named",
    [
        ({"idempotency-key": "has space"}, "Idempotency-Key"),
        ({"x-corral-user": ""}, "user"),
        ({"x-corral-user": "Alice"}, "user"),
    ],
)
def test_headers_follow_the_documented_rules(app: FastAPI, headers: Any, named: str) -> None:
    response = send(app, "POST", "/v1/apps/charts/runs", {"input": 1}, headers=headers)
    refused(response, 400, "invalid_input", named)


@pytest.mark.parametrize("value", ["null", "+5", "5 0", "0x5", "1" * 19, "-1"])
def test_last_event_id_is_digits(app: FastAPI, value: str) -> None:
    response = send(app, "GET", "/v1/runs/run-x/events", headers={"last-event-id": value})
    refused(response, 400, "invalid_input", "Last-Event-ID")


def test_the_document_states_the_rules_the_server_enforces(app: FastAPI) -> None:
    doc = send(app, "GET", "/openapi.json").json()
    app_param = doc["paths"]["/v1/apps/{app}"]["get"]["parameters"][0]["schema"]
    assert app_param["pattern"] == "^[a-z0-9][a-z0-9_.-]{0,62}$"
    run = doc["paths"]["/v1/apps/{app}/runs"]["post"]["parameters"]
    schemas = {p["name"]: p["schema"]["anyOf"][0] for p in run if p["in"] == "header"}
    assert schemas["x-corral-user"]["maxLength"] == 128
    assert schemas["idempotency-key"]["pattern"] == "^[!-~]{1,255}$"
    events = doc["paths"]["/v1/runs/{run_id}/events"]["get"]["parameters"]
    assert [p["schema"]["anyOf"][0]["pattern"] for p in events if p["in"] == "header"] == [
        "^[0-9]{0,18}$"
    ]
    grant = doc["components"]["schemas"]["Grant"]["properties"]["credits"]
    assert grant["exclusiveMinimum"] == 0 and grant["multipleOf"] == 1e-06
    assert doc["components"]["schemas"]["StartRun"]["properties"]["wait"]["type"] == "boolean"


def test_a_405_allows_every_method_of_the_path(app: FastAPI) -> None:
    response = send(app, "PUT", "/v1/apps")
    assert response.status_code == 405 and response.json()["error"] == "method_not_allowed"
    assert response.headers["allow"] == "GET, OPTIONS, POST"
    assert send(app, "DELETE", "/v1/apps/x").headers["allow"] == "GET, OPTIONS, PATCH"


@pytest.mark.parametrize(
    "path, allow",
    [
        ("/v1/apps", "GET, OPTIONS, POST"),
        ("/v1/envs/x", "DELETE, GET, OPTIONS"),
        ("/v1/users/x/credits", "GET, OPTIONS, POST"),
        ("/openapi.json", "GET, HEAD, OPTIONS"),
        ("/ui/", "GET, OPTIONS"),
    ],
)
def test_options_answers_on_every_route(app: FastAPI, path: str, allow: str) -> None:
    response = send(app, "OPTIONS", path)
    assert (response.status_code, response.headers["allow"]) == (204, allow)
    assert send(app, "OPTIONS", "/v1/no-such-thing").status_code == 404
