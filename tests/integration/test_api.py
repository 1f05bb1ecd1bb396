"""The HTTP API served by uvicorn on a real socket, driven by httpx, over real sandboxes.

The server runs in a background thread on 127.0.0.1 (a socket bound to port 0, handed to
uvicorn, so there is no window for another process to take the port) and serves the
session's ``corral``. Each test asserts the status code and the body's fields.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from corral.api.app import create_app
from corral.context import Corral
from tests.hosts import serving

pytestmark = [pytest.mark.root, pytest.mark.runc]

FILE = "/home/user/api-note.txt"
TEXT = "written through the API"


@pytest.fixture(scope="module")
def base_url(corral: Corral) -> Iterator[str]:
    with serving(create_app(corral)) as url:
        yield url


@pytest.fixture
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=120) as c:
        yield c


@pytest.fixture
def api_env(client: httpx.Client) -> Iterator[str]:
    """A fresh environment created (and finally deleted) through the API."""
    name = f"api-{secrets.token_hex(4)}"
    created = client.post("/v1/envs", json={"name": name})
    assert created.status_code == 201, created.text
    yield name
    client.delete(f"/v1/envs/{name}")


def error_of(response: httpx.Response, status: int, code: str) -> str:
    """Assert ``response`` is the error ``code`` with ``status``; return its detail."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"}
    assert body["error"] == code
    assert isinstance(body["detail"], str) and body["detail"]
    return str(body["detail"])


def exec_(client: httpx.Client, name: str, *argv: str, **extra: Any) -> dict[str, Any]:
    response = client.post(f"/v1/envs/{name}/exec", json={"argv": list(argv), **extra})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == {
        "sandbox_id",
        "exit_code",
        "timed_out",
        "seconds",
        "stdout",
        "stderr",
        "draft",
    }
    assert body["draft"]["limit_bytes"] > 0 and not body["draft"]["full"]
    return body


# -- the happy path ----------------------------------------------------------------------


def test_health(client: httpx.Client) -> None:
    response = client.get("/v1/health")
    assert response.status_code == 200
    assert response.json() == {"ok": True}


def test_create_exec_freeze_history_run_verify(client: httpx.Client) -> None:
    name = f"api-{secrets.token_hex(4)}"
    created = client.post("/v1/envs", json={"name": name, "from": None})
    assert created.status_code == 201, created.text
    env = created.json()
    assert env["name"] == name
    assert env["base"] == "base:bookworm"
    assert env["head"].startswith("sha256:")
    first_head = env["head"]
    try:
        shown = client.get(f"/v1/envs/{name}").json()
        assert shown["head"] == first_head and shown["draft_changed"] is False
        assert name in [e["name"] for e in client.get("/v1/envs").json()]

        ran = exec_(client, name, "sh", "-c", f"echo '{TEXT}' > {FILE}; echo done; echo oops >&2")
        assert ran["exit_code"] == 0 and ran["timed_out"] is False
        assert ran["stdout"] == "done\n" and ran["stderr"] == "oops\n"
        assert ran["seconds"] > 0 and ran["sandbox_id"]
        assert client.get(f"/v1/envs/{name}").json()["draft_changed"] is True

        frozen = client.post(f"/v1/envs/{name}/freeze", json={"message": "add a note"})
        assert frozen.status_code == 201, frozen.text
        snap = frozen.json()
        assert snap["environment"] == name and snap["seq"] == 2
        assert snap["parent"] == first_head and snap["message"] == "add a note"
        assert snap["layer"].startswith("sha256:") and snap["size"] > 0

        shown = client.get(f"/v1/envs/{name}").json()
        assert shown["head"] == snap["digest"] and shown["draft_changed"] is False

        history = client.get(f"/v1/envs/{name}/history")
        assert history.status_code == 200
        snaps = history.json()
        assert [s["seq"] for s in snaps] == [2, 1]
        assert [s["digest"] for s in snaps] == [snap["digest"], first_head]
        assert snaps[1]["parent"] is None

        run = client.post("/v1/sandboxes", json={"env": name, "argv": ["cat", FILE]})
        assert run.status_code == 200, run.text
        assert run.json()["exit_code"] == 0 and run.json()["stdout"] == f"{TEXT}\n"

        older = client.post(
            "/v1/sandboxes",
            json={"env": name, "argv": ["test", "-e", FILE], "snapshot": first_head},
        )
        assert older.status_code == 200 and older.json()["exit_code"] == 1

        verified = client.post(f"/v1/envs/{name}/verify")
        assert verified.status_code == 200
        report = verified.json()
        assert report["environment"] == name and report["ok"] is True
        assert report["snapshots"] == 2
        digests = {b["digest"] for b in report["blobs"]}
        assert snap["layer"] in digests and snap["digest"] in digests
    finally:
        deleted = client.delete(f"/v1/envs/{name}")
    assert deleted.status_code == 204 and deleted.content == b""
    error_of(client.get(f"/v1/envs/{name}"), 404, "environment_not_found")


def test_discard_throws_the_draft_away(client: httpx.Client, api_env: str) -> None:
    exec_(client, api_env, "touch", "/home/user/scratch")
    discarded = client.post(f"/v1/envs/{api_env}/discard")
    assert discarded.status_code == 200
    assert discarded.json() == {"name": api_env, "discarded": True}
    assert client.get(f"/v1/envs/{api_env}").json()["draft_changed"] is False
    assert exec_(client, api_env, "test", "-e", "/home/user/scratch")["exit_code"] == 1


def test_a_failing_command_and_a_timeout_are_results(client: httpx.Client, api_env: str) -> None:
    failed = exec_(client, api_env, "sh", "-c", "exit 3")
    assert failed["exit_code"] == 3 and failed["timed_out"] is False
    slow = client.post(
        "/v1/sandboxes", json={"env": api_env, "argv": ["sleep", "30"], "timeout": 1}
    )
    assert slow.status_code == 200, slow.text
    assert slow.json()["timed_out"] is True and slow.json()["seconds"] < 20


def test_sandboxes_run_in_threads_and_the_lock_answers_409(
    client: httpx.Client, base_url: str, api_env: str
) -> None:
    def hold() -> httpx.Response:
        with httpx.Client(base_url=base_url, timeout=120) as other:
            return other.post(f"/v1/envs/{api_env}/exec", json={"argv": ["sleep", "4"]})

    with ThreadPoolExecutor(1) as pool:
        holder = pool.submit(hold)
        deadline = time.monotonic() + 60
        while True:  # wait until the edit session holds the environment
            busy = client.post(f"/v1/envs/{api_env}/discard")
            if busy.status_code == 409 or holder.done() or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert "is held by another" in error_of(busy, 409, "environment_busy")
        started = time.monotonic()
        assert client.get("/v1/health").status_code == 200
        assert time.monotonic() - started < 1, "a running sandbox blocked the event loop"
        assert holder.result().status_code == 200


# -- errors ------------------------------------------------------------------------------


def test_unknown_environment_is_404(client: httpx.Client) -> None:
    detail = error_of(client.get("/v1/envs/no-such-env"), 404, "environment_not_found")
    assert "no-such-env" in detail
    error_of(client.get("/v1/envs/no-such-env/history"), 404, "environment_not_found")
    error_of(
        client.post("/v1/envs/no-such-env/exec", json={"argv": ["true"]}),
        404,
        "environment_not_found",
    )
    error_of(
        client.post("/v1/sandboxes", json={"env": "no-such-env", "argv": ["true"]}),
        404,
        "environment_not_found",
    )
    error_of(client.delete("/v1/envs/no-such-env"), 404, "environment_not_found")


def test_unknown_snapshot_is_404(client: httpx.Client, api_env: str) -> None:
    digest = "sha256:" + "0" * 64
    body = {"env": api_env, "argv": ["true"], "snapshot": digest}
    assert digest in error_of(client.post("/v1/sandboxes", json=body), 404, "snapshot_not_found")


def test_duplicate_create_is_409(client: httpx.Client, env: str) -> None:
    detail = error_of(client.post("/v1/envs", json={"name": env}), 409, "environment_exists")
    assert env in detail


def test_freeze_without_changes_is_409(client: httpx.Client, api_env: str) -> None:
    detail = error_of(client.post(f"/v1/envs/{api_env}/freeze"), 409, "nothing_to_freeze")
    assert "no changes" in detail
    assert len(client.get(f"/v1/envs/{api_env}/history").json()) == 1


def test_bad_name_is_400(client: httpx.Client) -> None:
    detail = error_of(client.post("/v1/envs", json={"name": "Bad Name!"}), 400, "invalid_input")
    assert "Bad Name!" in detail and "starting with a letter or digit" in detail
    error_of(client.get("/v1/envs/UPPER"), 400, "invalid_input")
    assert "Bad Name!" not in [e["name"] for e in client.get("/v1/envs").json()]


def test_bad_source_and_digest_are_400(client: httpx.Client, api_env: str, corral: Corral) -> None:
    name = f"api-{secrets.token_hex(4)}"
    bad_from = client.post("/v1/envs", json={"name": name, "from": "docker://debian"})
    assert "oci-archive:PATH" in error_of(bad_from, 400, "invalid_input")
    # Well formed, but not the client's to read (403), or not there (404): not a malformed 400.
    outside = client.post("/v1/envs", json={"name": name, "from": "oci:/etc:latest"})
    assert "must name an image under" in error_of(outside, 403, "import_forbidden")
    import_dir = corral.settings.import_dir
    missing_path = f"oci:{import_dir}/nonexistent"
    missing = client.post("/v1/envs", json={"name": name, "from": missing_path})
    assert "nonexistent" in error_of(missing, 404, "image_not_found")
    (import_dir / "empty").mkdir(parents=True, exist_ok=True)
    empty = client.post("/v1/envs", json={"name": name, "from": f"oci:{import_dir}/empty"})
    assert "no index.json" in error_of(empty, 400, "import_failed")
    error_of(client.get(f"/v1/envs/{name}"), 404, "environment_not_found")
    bad_digest = {"env": api_env, "argv": ["true"], "snapshot": "sha256:nope"}
    error_of(client.post("/v1/sandboxes", json=bad_digest), 400, "invalid_input")


def test_missing_command_is_422(client: httpx.Client, api_env: str) -> None:
    run = client.post("/v1/sandboxes", json={"env": api_env, "argv": ["no-such-command", "x"]})
    detail = error_of(run, 422, "command_not_found")
    assert "no-such-command" in detail and api_env in detail
    edit = client.post(f"/v1/envs/{api_env}/exec", json={"argv": ["no-such-command"]})
    error_of(edit, 422, "command_not_found")


def test_a_corrupt_blob_is_500_naming_it(
    client: httpx.Client, corral: Corral, api_env: str
) -> None:
    exec_(client, api_env, "sh", "-c", f"echo {secrets.token_hex(16)} > {FILE}")
    layer = client.post(f"/v1/envs/{api_env}/freeze").json()["layer"]
    blob = corral.settings.oci_dir / "blobs" / "sha256" / layer.removeprefix("sha256:")
    with open(blob, "ab") as f:  # this layer is this environment's alone: its content is random
        f.write(b"rot")
    detail = error_of(client.post(f"/v1/envs/{api_env}/verify"), 500, "corrupt_blob")
    assert layer in detail and str(blob) in detail


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/sandboxes", {"env": "x", "argv": []}, "argv"),
        ("/v1/sandboxes", {"argv": ["true"]}, "env"),
        ("/v1/sandboxes", {"env": "x", "argv": ["true"], "timeout": 0}, "timeout"),
        ("/v1/envs/x/exec", {"argv": "true"}, "argv"),
        ("/v1/envs", {"name": "x", "form": "oci:/x"}, "form"),
    ],
)
def test_malformed_body_is_422(
    client: httpx.Client, path: str, body: dict[str, Any], field: str
) -> None:
    assert f"body.{field}" in error_of(client.post(path, json=body), 422, "invalid_request")


def test_unknown_route_and_method_use_the_error_shape(client: httpx.Client) -> None:
    error_of(client.get("/v1/nothing-here"), 404, "not_found")
    wrong = client.put("/v1/health")
    error_of(wrong, 405, "method_not_allowed")
    assert wrong.headers["allow"] == "GET, OPTIONS"  # OPTIONS answers on every route


# -- the OpenAPI document ----------------------------------------------------------------

ROUTES = {
    "/v1/health": {"get"},
    "/v1/envs": {"get", "post"},
    "/v1/envs/{name}": {"get", "delete"},
    "/v1/envs/{name}/exec": {"post"},
    "/v1/envs/{name}/freeze": {"post"},
    "/v1/envs/{name}/discard": {"post"},
    "/v1/envs/{name}/history": {"get"},
    "/v1/envs/{name}/verify": {"post"},
    "/v1/sandboxes": {"post"},
    "/v1/apps": {"get", "post"},
    "/v1/apps/{app}": {"get", "patch"},
    "/v1/apps/{app}/versions": {"get"},
    "/v1/apps/{app}/runs": {"get", "post"},
    "/v1/runs/{run_id}": {"get"},
    "/v1/runs/{run_id}/events": {"get"},
    "/v1/runs/{run_id}/cancel": {"post"},
    "/v1/users/{user}/credits": {"get", "post"},
    "/v1/users/{user}/credits/adjustments": {"post"},
}


def test_openapi_lists_every_route(client: httpx.Client) -> None:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    doc = response.json()
    assert doc["openapi"].startswith("3.")
    assert doc["info"]["title"] == "Corral" and doc["info"]["version"]
    assert {path: set(ops) for path, ops in doc["paths"].items()} == ROUTES
    create = doc["paths"]["/v1/envs"]["post"]
    assert "201" in create["responses"] and "409" in create["responses"]
    schemas = doc["components"]["schemas"]
    assert set(schemas["CreateEnvironment"]["properties"]) == {"name", "from"}
    assert schemas["Exec"]["properties"]["argv"]["minItems"] == 1
    assert "HTTPValidationError" not in schemas  # 422 answers with ErrorBody instead
    unprocessable = doc["paths"]["/v1/sandboxes"]["post"]["responses"]["422"]
    assert unprocessable["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
