"""The fake upstream services (tests/fakes) answer the real SDKs and clients as the real
services would, check the credential they demand, and misbehave on request.

Nothing here may leave the machine: a guard refuses any connection to a non-loopback address,
the SDKs get explicit base URLs (their environment variables and proxies are cleared) and
``max_retries=0`` so that an error is one request, not a backoff.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.fakes import (
    FakeAnthropic,
    FakeGitHub,
    FakeMarketData,
    FakeOAuthAPI,
    FakeOpenAI,
    FakeService,
    FakeSlack,
    FakeSlowUpstream,
    Headers,
    Response,
    pattern_bytes,
)
from tests.fakes.market_data import closes

ROOT = Path(__file__).resolve().parents[2]
OPENAI_KEY = "sk-test-real-openai-key-0001"
ANTHROPIC_KEY = "sk-ant-test-real-key-0001"
GITHUB_TOKEN = "ghp_testrealtoken0001"
SLACK_TOKEN = "xoxb-1-2-testrealtoken"
MARKET_KEY = "mk-test-real-0001"


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clear what could point a client elsewhere, and refuse non-loopback connections."""
    for name in (
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "OPENAI_ORG_ID",
        "OPENAI_PROJECT_ID",
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_AUTH_TOKEN",
        "ANTHROPIC_BASE_URL",
        "ANTHROPIC_CUSTOM_HEADERS",
        "ANTHROPIC_PROFILE",
        "ANTHROPIC_CONFIG_DIR",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    real_connect = socket.socket.connect

    def loopback_only(sock: socket.socket, address: Any) -> None:
        inet = sock.family in (socket.AF_INET, socket.AF_INET6)
        if inet and not ipaddress.ip_address(address[0]).is_loopback:
            raise AssertionError(f"a test tried to reach {address!r}")
        real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)


def no_handler_errors(fake: FakeService) -> None:
    assert fake.errors == [], fake.errors


# The base class ---------------------------------------------------------------------------


class Plain(FakeService):
    """A minimal fake: GET /hello, POST /upload (echoes the body length)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_route("GET", "/hello", lambda request: Response.json({"hello": "world"}))
        self.add_route(
            "POST", "/upload", lambda request: Response.json({"received": len(request.body)})
        )


@pytest.fixture
def plain() -> Iterator[Plain]:
    with Plain() as fake:
        yield fake
    no_handler_errors(fake)


def test_start_binds_loopback_on_a_free_port_and_stop_frees_it() -> None:
    fake = Plain().start()
    try:
        assert fake.url.startswith("http://127.0.0.1:")
        assert fake.port > 0
        assert httpx.get(fake.url + "/hello").json() == {"hello": "world"}
    finally:
        fake.stop()
    fake.stop()  # idempotent
    with pytest.raises(RuntimeError):
        _ = fake.url
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{fake.port}/hello", timeout=2)


def test_requests_are_recorded_with_case_insensitive_headers(plain: Plain) -> None:
    with httpx.Client(base_url=plain.url) as client:
        client.post("/upload?x=1&x=2", content=b"\x00payload", headers={"X-Run-Token": "rt-1"})
    (request,) = plain.requests
    assert request.method == "POST"
    assert request.target == "/upload?x=1&x=2"
    assert request.path == "/upload"
    assert request.query == {"x": ["1", "2"]}
    assert request.body == b"\x00payload"
    assert request.headers["x-run-token"] == request.headers["X-RUN-TOKEN"] == "rt-1"
    assert "X-Run-Token" in request.headers
    assert request.client_address[0] == "127.0.0.1"
    assert plain.requests.last is request
    assert plain.requests.matching("POST", "/upload") == [request]


def test_headers_keep_duplicates() -> None:
    headers = Headers([("Accept", "a"), ("accept", "b"), ("X-One", "1")])
    assert headers["ACCEPT"] == "a, b"
    assert headers.get_all("accept") == ["a", "b"]
    assert len(headers) == 2
    assert list(headers) == ["Accept", "X-One"]


def test_keep_alive_serves_many_requests_on_one_connection(plain: Plain) -> None:
    with httpx.Client(base_url=plain.url) as client:
        first = client.get("/hello")
        second = client.get("/hello")
    assert first.http_version == "HTTP/1.1"
    assert first.headers["content-length"] == str(len(first.content))
    ports = {request.client_address for request in plain.requests}
    assert len(ports) == 1, "both requests should travel on the same kept-alive connection"
    assert second.json() == {"hello": "world"}


def test_chunked_request_bodies_are_read_whole(plain: Plain) -> None:
    def parts() -> Iterator[bytes]:
        yield b"abc"
        yield b"x" * 70_000
        yield b"end"

    with httpx.Client(base_url=plain.url) as client:
        answer = client.post("/upload", content=parts())
        again = client.get("/hello")  # the connection is still in step
    assert answer.json() == {"received": 70_006}
    request = plain.requests[0]
    assert request.headers["transfer-encoding"] == "chunked"
    assert request.body == b"abc" + b"x" * 70_000 + b"end"
    assert again.status_code == 200


def test_expect_auth_demands_the_credential(plain: Plain) -> None:
    plain.expect_auth("X-Secret", "s3cret")
    assert httpx.get(plain.url + "/hello").status_code == 401
    assert httpx.get(plain.url + "/hello", headers={"x-secret": "nope"}).status_code == 401
    assert httpx.get(plain.url + "/hello", headers={"x-secret": "s3cret"}).status_code == 200
    plain.also_accept("Authorization", "Bearer other")
    assert httpx.get(plain.url + "/hello", headers={"authorization": "bearer other"}).is_success
    plain.disable_auth()
    assert httpx.get(plain.url + "/hello").status_code == 200


def test_unknown_paths_and_methods(plain: Plain) -> None:
    assert httpx.get(plain.url + "/nope").status_code == 404
    assert httpx.delete(plain.url + "/hello").status_code == 405


def test_reset_next_drops_the_connection_without_an_answer(plain: Plain) -> None:
    plain.reset_next()
    with httpx.Client(base_url=plain.url) as client:
        with pytest.raises(httpx.TransportError):
            client.get("/hello")
        assert client.get("/hello").status_code == 200
    assert len(plain.requests) == 2  # the dropped request was still recorded


def test_delay_makes_clients_time_out_and_stop_is_prompt() -> None:
    fake = Plain(delay=30).start()
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.get(fake.url + "/hello", timeout=0.3)
        fake.requests.wait_for(1)
    finally:
        started = time.monotonic()
        fake.stop()
    assert time.monotonic() - started < 3, "stop() must not wait out the delay"


def test_stop_closes_kept_alive_connections() -> None:
    fake = Plain().start()
    with httpx.Client(base_url=fake.url) as client:
        client.get("/hello")
        started = time.monotonic()
        fake.stop()
        assert time.monotonic() - started < 3
        assert not [t for t in threading.enumerate() if t.name.startswith("Plain:")]


def test_respond_next_cans_an_answer(plain: Plain) -> None:
    plain.respond_next(429, {"error": "slow down"}, {"Retry-After": "7"})
    first = httpx.get(plain.url + "/hello")
    assert (first.status_code, first.headers["retry-after"]) == (429, "7")
    assert first.json() == {"error": "slow down"}
    assert httpx.get(plain.url + "/hello").json() == {"hello": "world"}


def test_a_failing_handler_answers_500_and_is_kept(plain: Plain) -> None:
    def boom(request: Any) -> Response:
        raise ValueError("boom")

    plain.add_route("GET", "/boom", boom)
    assert httpx.get(plain.url + "/boom").status_code == 500
    assert [type(e) for e in plain.errors] == [ValueError]
    plain.errors.clear()


# The misbehaving upstream -----------------------------------------------------------------


@pytest.fixture
def slow() -> Iterator[FakeSlowUpstream]:
    with FakeSlowUpstream() as fake:
        yield fake
    no_handler_errors(fake)


@pytest.mark.parametrize("chunked", [False, True])
def test_large_bodies(slow: FakeSlowUpstream, chunked: bool) -> None:
    size = 5 * 1024 * 1024 + 3
    answer = httpx.get(f"{slow.url}/bytes/{size}", params={"chunked": "1"} if chunked else None)
    assert answer.content == pattern_bytes(size)
    if chunked:
        assert answer.headers["transfer-encoding"] == "chunked"
    else:
        assert answer.headers["content-length"] == str(size)


def test_drip_feeds_slower_than_a_read_timeout(slow: FakeSlowUpstream) -> None:
    quick = httpx.get(slow.url + "/drip", params={"chunks": 3, "interval": 0.01, "size": 2})
    assert quick.content == b"aabbcc"
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(slow.url + "/drip", params={"chunks": 3, "interval": 2}, timeout=0.3)


def test_delay_route(slow: FakeSlowUpstream) -> None:
    assert httpx.post(slow.url + "/delay/0.05").json() == {"delayed": 0.05}
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(slow.url + "/delay/5", timeout=0.2)


def test_reset_and_truncate_routes(slow: FakeSlowUpstream) -> None:
    with pytest.raises(httpx.TransportError):
        httpx.get(slow.url + "/reset")
    with pytest.raises(httpx.TransportError):
        httpx.get(slow.url + "/truncate", params={"declared": 1000, "sent": 10})


def test_echo_and_status_routes(slow: FakeSlowUpstream) -> None:
    echoed = httpx.put(slow.url + "/echo/a", content=b"hi", headers={"X-Thing": "1"}).json()
    assert (echoed["method"], echoed["path"], echoed["body"]) == ("PUT", "/echo/a", "hi")
    assert ["X-Thing", "1"] in echoed["headers"]
    assert httpx.get(slow.url + "/status/503").status_code == 503
    assert httpx.get(slow.url + "/status/204").content == b""


# OpenAI -----------------------------------------------------------------------------------


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(OPENAI_KEY) as fake:
        yield fake
    no_handler_errors(fake)


def openai_client(fake: FakeService, key: str = OPENAI_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake.url + "/v1", api_key=key, max_retries=0, timeout=10)


def test_openai_chat_completion(fake_openai: FakeOpenAI) -> None:
    with openai_client(fake_openai) as client:
        completion = client.chat.completions.create(
            model="gpt-4o",
            messages=[
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hello there"},
            ],
        )
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "gpt-4o"
    choice = completion.choices[0]
    assert (choice.message.role, choice.message.content) == ("assistant", "echo: hello there")
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (4, 3)
    assert completion.usage.total_tokens == 7
    assert completion._request_id is not None
    request = fake_openai.requests.last
    assert (request.method, request.path) == ("POST", "/v1/chat/completions")
    assert request.headers["Authorization"] == f"Bearer {OPENAI_KEY}"
    assert request.json()["model"] == "gpt-4o"


def test_openai_content_parts_and_max_tokens(fake_openai: FakeOpenAI) -> None:
    with openai_client(fake_openai) as client:
        completion = client.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": [{"type": "text", "text": "one two three"}]}],
            max_completion_tokens=2,
        )
    assert completion.choices[0].message.content == "echo: one"
    assert completion.choices[0].finish_reason == "length"


@pytest.mark.parametrize("include_usage", [True, False])
def test_openai_streaming(fake_openai: FakeOpenAI, include_usage: bool) -> None:
    with openai_client(fake_openai) as client:
        stream = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "stream me please"}],
            stream=True,
            stream_options={"include_usage": include_usage},
        )
        with stream:
            chunks = list(stream)
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk.id for chunk in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: stream me please"
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    if include_usage:
        assert chunks[-1].choices == []
        assert chunks[-1].usage is not None
        assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (3, 4)
    else:
        assert all(chunk.usage is None for chunk in chunks)


def test_openai_stream_is_sse_over_chunked_http(fake_openai: FakeOpenAI) -> None:
    answer = httpx.post(
        fake_openai.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {OPENAI_KEY}"},
        json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    )
    assert answer.headers["content-type"].startswith("text/event-stream")
    assert answer.headers["transfer-encoding"] == "chunked"
    events = [line for line in answer.text.split("\n\n") if line]
    assert all(event.startswith("data: ") for event in events)
    assert events[-1] == "data: [DONE]"


def test_openai_wrong_or_missing_key(fake_openai: FakeOpenAI) -> None:
    client = openai_client(fake_openai, "sk-wrong-key-12345678")
    with client, pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"
    assert caught.value.type == "invalid_request_error"
    assert "sk-wrong-key-12345678" not in caught.value.message  # masked, like OpenAI does
    assert len(fake_openai.requests) == 1, "max_retries=0: a single attempt"
    missing = httpx.get(fake_openai.url + "/v1/models")
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_api_key"
    assert set(missing.json()["error"]) == {"message", "type", "param", "code"}


def test_openai_models_and_bad_requests(fake_openai: FakeOpenAI) -> None:
    with openai_client(fake_openai) as client:
        assert [model.id for model in client.models.list()] == list(fake_openai.models)
        assert client.models.retrieve("gpt-4o").owned_by == "openai"
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("no-such-model")
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="gpt-4o", messages=[])
    assert caught.value.param == "messages"


# Anthropic --------------------------------------------------------------------------------


@pytest.fixture
def fake_anthropic() -> Iterator[FakeAnthropic]:
    with FakeAnthropic(ANTHROPIC_KEY) as fake:
        yield fake
    no_handler_errors(fake)


def anthropic_client(fake: FakeService, key: str = ANTHROPIC_KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=fake.url, api_key=key, max_retries=0, timeout=10)


def test_anthropic_message(fake_anthropic: FakeAnthropic) -> None:
    with anthropic_client(fake_anthropic) as client:
        message = client.messages.create(
            model="claude-test-model",
            max_tokens=64,
            system="be brief",
            messages=[{"role": "user", "content": "hello there"}],
        )
    assert (message.type, message.role, message.model) == (
        "message",
        "assistant",
        "claude-test-model",
    )
    assert message.id.startswith("msg_")
    assert message.content[0].type == "text"
    assert message.content[0].text == "echo: hello there"
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (4, 3)
    request = fake_anthropic.requests.last
    assert request.path == "/v1/messages"
    assert "anthropic-version" in request.headers


def test_anthropic_sdk_sends_the_key_as_bearer(fake_anthropic: FakeAnthropic) -> None:
    """anthropic 2.x sends ``api_key`` as ``Authorization: Bearer``, not ``x-api-key``."""
    with anthropic_client(fake_anthropic) as client:
        client.messages.create(
            model="m", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )
        request = fake_anthropic.requests.last
        assert request.headers["authorization"] == f"Bearer {ANTHROPIC_KEY}"
        assert "x-api-key" not in request.headers
        # Demanding x-api-key strictly then turns the SDK away; a raw x-api-key call passes.
        fake_anthropic.expect_auth("x-api-key", ANTHROPIC_KEY)
        with pytest.raises(anthropic.AuthenticationError):
            client.messages.create(
                model="m", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
            )
    answer = httpx.post(
        fake_anthropic.url + "/v1/messages",
        headers={"x-api-key": ANTHROPIC_KEY, "anthropic-version": "2023-06-01"},
        json={"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert answer.json()["content"] == [{"type": "text", "text": "echo: hi"}]


def test_anthropic_stream_helper(fake_anthropic: FakeAnthropic) -> None:
    with (
        anthropic_client(fake_anthropic) as client,
        client.messages.stream(
            model="claude-test-model",
            max_tokens=64,
            messages=[
                {"role": "user", "content": "first"},
                {"role": "assistant", "content": "echo: first"},
                {"role": "user", "content": [{"type": "text", "text": "stream me please"}]},
            ],
        ) as stream,
    ):
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == "echo: stream me please"
    assert len(pieces) == 4
    assert final.content[0].type == "text"
    assert final.content[0].text == "echo: stream me please"
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (6, 4)
    assert fake_anthropic.requests.last.json()["stream"] is True


def test_anthropic_raw_event_sequence(fake_anthropic: FakeAnthropic) -> None:
    with anthropic_client(fake_anthropic) as client:
        stream = client.messages.create(
            model="m",
            max_tokens=2,
            messages=[{"role": "user", "content": "a b c"}],
            stream=True,
        )
        with stream:
            events = list(stream)
    kinds = [event.type for event in events]
    assert kinds == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]  # the ping between them is skipped by the SDK
    delta = events[-2]
    assert delta.type == "message_delta"
    assert (delta.delta.stop_reason, delta.usage.output_tokens) == ("max_tokens", 2)


def test_anthropic_wire_format_names_every_event(fake_anthropic: FakeAnthropic) -> None:
    answer = httpx.post(
        fake_anthropic.url + "/v1/messages",
        headers={"x-api-key": ANTHROPIC_KEY, "anthropic-version": "2023-06-01"},
        json={
            "model": "m",
            "max_tokens": 9,
            "stream": True,
            "messages": [{"role": "user", "content": "x"}],
        },
    )
    assert answer.headers["content-type"].startswith("text/event-stream")
    for block in filter(None, answer.text.split("\n\n")):
        event_line, data_line = block.split("\n")
        name = event_line.removeprefix("event: ")
        assert json.loads(data_line.removeprefix("data: "))["type"] == name


def test_anthropic_wrong_key_and_missing_version(fake_anthropic: FakeAnthropic) -> None:
    client = anthropic_client(fake_anthropic, "sk-ant-wrong")
    with client, pytest.raises(anthropic.AuthenticationError) as caught:
        client.messages.create(
            model="m", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["type"] == "error"
    assert body["error"]["type"] == "authentication_error"
    assert len(fake_anthropic.requests) == 1
    missing = httpx.post(
        fake_anthropic.url + "/v1/messages",
        headers={"x-api-key": ANTHROPIC_KEY},
        json={"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert missing.status_code == 400
    assert missing.json()["error"]["type"] == "invalid_request_error"
    no_key = httpx.post(fake_anthropic.url + "/v1/messages", json={})
    assert no_key.status_code == 401
    assert no_key.json()["error"]["message"] == "x-api-key header is required"


def test_anthropic_count_tokens(fake_anthropic: FakeAnthropic) -> None:
    with anthropic_client(fake_anthropic) as client:
        counted = client.messages.count_tokens(
            model="m", messages=[{"role": "user", "content": "three little words"}]
        )
    assert counted.input_tokens == 3


# GitHub -----------------------------------------------------------------------------------


@pytest.fixture
def github() -> Iterator[FakeGitHub]:
    with FakeGitHub(GITHUB_TOKEN, login="corral-bot", repos=["acme/widgets"]) as fake:
        yield fake
    no_handler_errors(fake)


def test_github_user_with_either_scheme(github: FakeGitHub) -> None:
    for scheme in ("Bearer", "token"):
        answer = httpx.get(
            github.url + "/user", headers={"Authorization": f"{scheme} {GITHUB_TOKEN}"}
        )
        assert answer.status_code == 200
        assert answer.json()["login"] == "corral-bot"
        assert isinstance(answer.json()["id"], int)


def test_github_bad_and_missing_credentials(github: FakeGitHub) -> None:
    bad = httpx.get(github.url + "/user", headers={"Authorization": "Bearer ghp_wrong"})
    assert bad.status_code == 401
    assert bad.json()["message"] == "Bad credentials"
    assert "documentation_url" in bad.json()
    missing = httpx.get(github.url + "/user")
    assert (missing.status_code, missing.json()["message"]) == (401, "Requires authentication")


def test_github_repos_and_issues(github: FakeGitHub) -> None:
    headers = {"Authorization": f"Bearer {GITHUB_TOKEN}", "Accept": "application/vnd.github+json"}
    with httpx.Client(base_url=github.url, headers=headers) as client:
        repo = client.get("/repos/acme/widgets").json()
        assert repo["full_name"] == "acme/widgets"
        assert repo["owner"]["login"] == "acme"
        assert client.get("/repos/acme/nothing").status_code == 404
        created = client.post(
            "/repos/acme/widgets/issues", json={"title": "Bug", "body": "It broke"}
        )
        again = client.post("/repos/acme/widgets/issues", json={"title": "Another"})
        invalid = client.post("/repos/acme/widgets/issues", json={"body": "no title"})
        garbled = client.post("/repos/acme/widgets/issues", content=b"{not json")
    assert created.status_code == 201
    issue = created.json()
    assert (issue["number"], issue["title"], issue["state"]) == (1, "Bug", "open")
    assert issue["url"] == f"{github.url}/repos/acme/widgets/issues/1"
    assert created.headers["location"] == issue["url"]
    assert again.json()["number"] == 2
    assert invalid.status_code == 422
    assert invalid.json()["errors"][0]["field"] == "title"
    assert garbled.status_code == 400
    assert [i["title"] for i in github.issues["acme/widgets"]] == ["Bug", "Another"]


# Slack ------------------------------------------------------------------------------------


@pytest.fixture
def slack() -> Iterator[FakeSlack]:
    with FakeSlack(SLACK_TOKEN) as fake:
        yield fake
    no_handler_errors(fake)


def test_slack_post_message_json_and_form(slack: FakeSlack) -> None:
    auth = {"Authorization": f"Bearer {SLACK_TOKEN}"}
    with httpx.Client(base_url=slack.url + "/api", headers=auth) as client:
        as_json = client.post(
            "/chat.postMessage",
            content=json.dumps({"channel": "#general", "text": "hello"}),
            headers={"Content-Type": "application/json; charset=utf-8"},
        ).json()
        as_form = client.post(
            "/chat.postMessage", data={"channel": "C0123ABCD", "text": "form"}
        ).json()
        no_charset = client.post("/chat.postMessage", json={"channel": "C1", "text": "x"}).json()
    assert as_json["ok"] is True
    assert as_json["channel"].startswith("C")
    assert as_json["message"]["text"] == "hello"
    assert as_json["ts"] == as_json["message"]["ts"]
    assert (as_form["ok"], as_form["channel"]) == (True, "C0123ABCD")
    assert no_charset["warning"] == "missing_charset"
    assert [m["text"] for m in slack.posted] == ["hello", "form", "x"]


def test_slack_auth_failures_are_http_200(slack: FakeSlack) -> None:
    bad = httpx.post(
        slack.url + "/api/chat.postMessage",
        headers={"Authorization": "Bearer xoxb-wrong"},
        json={"channel": "C1", "text": "x"},
    )
    assert (bad.status_code, bad.json()) == (200, {"ok": False, "error": "invalid_auth"})
    missing = httpx.post(slack.url + "/api/chat.postMessage", json={"channel": "C1", "text": "x"})
    assert (missing.status_code, missing.json()["error"]) == (200, "not_authed")
    assert slack.posted == []


def test_slack_argument_errors(slack: FakeSlack) -> None:
    auth = {"Authorization": f"Bearer {SLACK_TOKEN}"}
    with httpx.Client(base_url=slack.url + "/api", headers=auth) as client:
        assert client.post("/chat.postMessage", data={"text": "x"}).json()["error"] == (
            "channel_not_found"
        )
        assert client.post("/chat.postMessage", data={"channel": "C1"}).json()["error"] == "no_text"
        assert client.post("/auth.test").json()["ok"] is True


# OAuth ------------------------------------------------------------------------------------


@pytest.fixture
def oauth() -> Iterator[FakeOAuthAPI]:
    with FakeOAuthAPI(rotate_refresh_tokens=True) as fake:
        yield fake
    no_handler_errors(fake)


def refresh(client: httpx.Client, fake: FakeOAuthAPI, refresh_token: str) -> httpx.Response:
    return client.post(
        "/oauth/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": fake.client_id,
            "client_secret": fake.client_secret,
        },
    )


def test_oauth_refresh_flow(oauth: FakeOAuthAPI) -> None:
    access, refresh_token = oauth.access_token, oauth.refresh_token
    assert access is not None and refresh_token is not None
    with httpx.Client(base_url=oauth.url) as client:
        data = client.get("/v1/data", headers={"Authorization": f"Bearer {access}"})
        assert data.status_code == 200
        assert data.json()["items"][0]["name"] == "alpha"

        oauth.expire_access_token()
        expired = client.get("/v1/data", headers={"Authorization": f"Bearer {access}"})
        assert expired.status_code == 401
        assert expired.json()["error"] == "invalid_token"
        assert 'error="invalid_token"' in expired.headers["www-authenticate"]

        tokens = refresh(client, oauth, refresh_token)
        assert tokens.status_code == 200
        answer = tokens.json()
        assert answer["token_type"] == "Bearer"
        assert answer["expires_in"] == 3600
        assert answer["access_token"] not in (access, None)
        assert answer["refresh_token"] != refresh_token  # rotated
        assert oauth.refresh_count == 1

        fresh = client.get(
            "/v1/data", headers={"Authorization": f"Bearer {answer['access_token']}"}
        )
        assert fresh.status_code == 200
        assert fresh.json()["token_serial"] == 2

        reused = refresh(client, oauth, refresh_token)  # the rotated-out refresh token
        assert (reused.status_code, reused.json()["error"]) == (400, "invalid_grant")
        newer = refresh(client, oauth, answer["refresh_token"]).json()
        # A new access token retires the previous one.
        stale = client.get(
            "/v1/data", headers={"Authorization": f"Bearer {answer['access_token']}"}
        )
        assert stale.status_code == 401
        assert client.get(
            "/v1/data", headers={"Authorization": f"Bearer {newer['access_token']}"}
        ).is_success
    assert oauth.refresh_count == 2
    assert oauth.token_requests == 3
    assert oauth.rejected_tokens == 2


def test_oauth_without_rotation_keeps_the_refresh_token() -> None:
    fake = FakeOAuthAPI(refresh_token="rt-fixed", client_secret="s")
    with fake, httpx.Client(base_url=fake.url) as client:
        first = refresh(client, fake, "rt-fixed").json()
        second = refresh(client, fake, "rt-fixed").json()
    assert first["refresh_token"] == second["refresh_token"] == "rt-fixed"
    assert first["access_token"] != second["access_token"]
    assert fake.refresh_count == 2


def test_oauth_client_authentication_and_grants(oauth: FakeOAuthAPI) -> None:
    basic = base64.b64encode(f"{oauth.client_id}:{oauth.client_secret}".encode()).decode()
    with httpx.Client(base_url=oauth.url) as client:
        wrong = client.post(
            "/oauth/token",
            data={
                "grant_type": "client_credentials",
                "client_id": oauth.client_id,
                "client_secret": "wrong",
            },
        )
        assert (wrong.status_code, wrong.json()["error"]) == (401, "invalid_client")
        by_basic = client.post(
            "/oauth/token",
            data={"grant_type": "client_credentials"},
            headers={"Authorization": f"Basic {basic}"},
        )
        assert by_basic.status_code == 200
        assert "refresh_token" not in by_basic.json()
        unsupported = client.post(
            "/oauth/token",
            data={"grant_type": "password"},
            headers={"Authorization": f"Basic {basic}"},
        )
        assert unsupported.json()["error"] == "unsupported_grant_type"
        oauth.revoke_refresh_token()
        revoked = refresh(client, oauth, "anything")
        assert revoked.json()["error"] == "invalid_grant"
        missing = client.get("/v1/data")
        assert (missing.status_code, missing.json()["error"]) == (401, "invalid_token")


def test_oauth_tokens_expire_with_time() -> None:
    with FakeOAuthAPI(expires_in=0) as fake, httpx.Client(base_url=fake.url) as client:
        answer = client.get("/v1/data", headers={"Authorization": f"Bearer {fake.access_token}"})
    assert answer.status_code == 401


# Market data ------------------------------------------------------------------------------


@pytest.fixture
def market() -> Iterator[FakeMarketData]:
    with FakeMarketData(MARKET_KEY) as fake:
        yield fake
    no_handler_errors(fake)


def test_market_prices_are_deterministic(market: FakeMarketData) -> None:
    with httpx.Client(base_url=market.url, headers={"X-Api-Key": MARKET_KEY}) as client:
        first = client.get("/v1/prices/acme").json()
        second = client.get("/v1/prices/ACME").json()
        other = client.get("/v1/prices/GLOBX").json()
        week = client.get("/v1/prices/ACME", params={"days": 5}).json()
        assert client.get("/v1/prices/ACME", params={"days": 0}).status_code == 400
        assert client.get("/v1/prices/not_a$ticker").status_code == 404
    assert first == second
    assert first["ticker"] == "ACME"
    assert len(first["closes"]) == len(first["dates"]) == 30
    assert all(close > 0 for close in first["closes"])
    assert first["closes"] == closes("ACME", 30)
    assert first["dates"][0] == "2024-01-02"
    assert other["closes"] != first["closes"]
    assert week["closes"] == first["closes"][:5]


def test_market_demands_its_key(market: FakeMarketData) -> None:
    assert httpx.get(market.url + "/v1/prices/ACME").status_code == 401
    wrong = httpx.get(market.url + "/v1/prices/ACME", headers={"X-Api-Key": "nope"})
    assert wrong.status_code == 401
    assert httpx.get(market.url + "/healthz").json() == {"status": "ok"}
    with FakeMarketData() as open_market:
        assert httpx.get(open_market.url + "/v1/prices/ACME").status_code == 200


def test_market_runs_as_a_module() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.market", "--port", "0", "--key", MARKET_KEY],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        answer = httpx.get(url + "/v1/prices/ACME", headers={"X-Api-Key": MARKET_KEY})
        assert answer.json()["closes"] == closes("ACME", 30)
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=10)
    assert process.returncode == 0
    assert stderr == ""  # no traceback, no runpy warning
