"""A local stand-in for the Anthropic Messages API: ``POST /v1/messages``, plain and streamed.

The assistant answers ``"echo: " + <text of the last user message>``; tokens are
whitespace-separated words (input: the system prompt and every message; output: the reply).
``max_tokens`` cuts the reply to that many words (``stop_reason`` ``"max_tokens"``). The
stream is the real event sequence: ``message_start``, ``content_block_start``, ``ping``,
``content_block_delta`` (``text_delta``) per word, ``content_block_stop``, ``message_delta``
(``stop_reason`` and ``usage.output_tokens``), ``message_stop``.

Credentials: the API documents ``x-api-key: KEY``; the ``anthropic`` Python SDK 2.x sends an
API key as ``Authorization: Bearer KEY`` instead, so ``FakeAnthropic(api_key=...)`` accepts
both (``expect_auth`` demands exactly one). Every request must carry ``anthropic-version``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

from tests.fakes.base import (
    FakeService,
    RecordedRequest,
    Response,
    parse_json_object,
    sse,
    word_pieces,
    words,
)
from tests.fakes.openai_api import message_text

DEFAULT_MODELS = ("claude-sonnet-4-6", "claude-haiku-4-5", "claude-opus-4-6")


class FakeAnthropic(FakeService):
    """``POST /v1/messages``, ``POST /v1/messages/count_tokens``, ``GET /v1/models``.

    ``FakeAnthropic(api_key=None, *, accept_bearer=True, chunk_delay=0.0, host, port, delay)``.
    Each request body of ``/v1/messages`` is appended to ``messages``.
    """

    server_name = "fake-anthropic"

    def __init__(
        self,
        api_key: str | None = None,
        *,
        accept_bearer: bool = True,
        models: tuple[str, ...] = DEFAULT_MODELS,
        chunk_delay: float = 0.0,
        host: str = "127.0.0.1",
        port: int = 0,
        delay: float = 0.0,
    ) -> None:
        super().__init__(host, port, delay=delay)
        self.api_key = api_key
        self.models = models
        self.chunk_delay = chunk_delay
        self.messages: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        if api_key is not None:
            self.expect_auth("x-api-key", api_key)
            if accept_bearer:
                self.also_accept("Authorization", f"Bearer {api_key}")
        self.add_route("POST", "/v1/messages", self.create_message)
        self.add_route("POST", "/v1/messages/count_tokens", self.count_tokens)
        self.add_route("GET", "/v1/models", self.list_models)

    @staticmethod
    def reply_for(messages: list[dict[str, Any]]) -> str:
        """What the fake assistant answers to ``messages``."""
        users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        return "echo: " + (message_text(users[-1].get("content")) if users else "")

    @staticmethod
    def input_tokens(body: dict[str, Any]) -> int:
        """The input token count of a request: words of the system prompt and messages."""
        messages = body.get("messages") or []
        return words(message_text(body.get("system"))) + sum(
            words(message_text(m.get("content"))) for m in messages if isinstance(m, dict)
        )

    def _request_id(self) -> str:
        return f"req_fake{next(self._ids):012d}"

    # Error shapes --------------------------------------------------------------------------

    def error(self, status: int, type: str, message: str) -> Response:
        """An error in Anthropic's shape, with its ``request-id``."""
        request_id = self._request_id()
        body = {
            "type": "error",
            "error": {"type": type, "message": message},
            "request_id": request_id,
        }
        return Response.json(body, status, {"request-id": request_id})

    def auth_error(self, request: RecordedRequest) -> Response:
        sent = "x-api-key" in request.headers or "authorization" in request.headers
        message = "invalid x-api-key" if sent else "x-api-key header is required"
        return self.error(401, "authentication_error", message)

    def not_found(self, request: RecordedRequest) -> Response:
        return self.error(404, "not_found_error", "Not Found")

    def method_not_allowed(self, request: RecordedRequest) -> Response:
        return self.error(405, "invalid_request_error", f"Method {request.method} not allowed")

    def bad_request(self, message: str) -> Response:
        return self.error(400, "invalid_request_error", message)

    def internal_error(self, request: RecordedRequest, exc: BaseException) -> Response:
        return self.error(500, "api_error", f"Internal server error: {exc!r}")

    def _invalid(self, request: RecordedRequest, require_max_tokens: bool) -> Response | None:
        if "anthropic-version" not in request.headers:
            return self.bad_request("anthropic-version: header is required")
        body = parse_json_object(request)
        if body is None:
            return self.bad_request("There was an issue with your request body: invalid JSON")
        for name in ("model", "messages") + (("max_tokens",) if require_max_tokens else ()):
            if name not in body:
                return self.bad_request(f"{name}: Field required")
        if not isinstance(body["messages"], list) or not body["messages"]:
            return self.bad_request("messages: at least one message is required")
        return None

    # Endpoints -----------------------------------------------------------------------------

    def list_models(self, request: RecordedRequest) -> Response:
        if "anthropic-version" not in request.headers:
            return self.bad_request("anthropic-version: header is required")
        data = [
            {
                "type": "model",
                "id": model,
                "display_name": model.replace("-", " ").title(),
                "created_at": "2025-01-01T00:00:00Z",
            }
            for model in self.models
        ]
        return Response.json(
            {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}
        )

    def count_tokens(self, request: RecordedRequest) -> Response:
        invalid = self._invalid(request, require_max_tokens=False)
        if invalid is not None:
            return invalid
        return Response.json({"input_tokens": self.input_tokens(request.json())})

    def create_message(self, request: RecordedRequest) -> Response:
        invalid = self._invalid(request, require_max_tokens=True)
        if invalid is not None:
            return invalid
        body: dict[str, Any] = request.json()
        self.messages.append(body)
        reply = self.reply_for(body["messages"])
        stop_reason = "end_turn"
        limit = body["max_tokens"]
        if isinstance(limit, int) and words(reply) > limit:
            reply = "".join(word_pieces(reply)[:limit]).rstrip()
            stop_reason = "max_tokens"
        request_id = self._request_id()
        message_id = "msg_fake" + request_id.removeprefix("req_fake")
        message: dict[str, Any] = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": str(body["model"]),
            "content": [{"type": "text", "text": reply}],
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {
                "input_tokens": self.input_tokens(body),
                "output_tokens": words(reply),
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "service_tier": "standard",
            },
        }
        headers = {"request-id": request_id}
        if body.get("stream"):
            return Response.event_stream(self._events(message), headers)
        return Response.json(message, headers=headers)

    def _events(self, message: dict[str, Any]) -> Iterator[bytes]:
        reply = message["content"][0]["text"]
        start = {
            **message,
            "content": [],
            "stop_reason": None,
            "usage": {**message["usage"], "output_tokens": 1},
        }
        yield sse({"type": "message_start", "message": start}, "message_start")
        yield sse(
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
            "content_block_start",
        )
        yield sse({"type": "ping"}, "ping")
        for piece in word_pieces(reply):
            self.sleep(self.chunk_delay)
            delta = {"type": "text_delta", "text": piece}
            yield sse(
                {"type": "content_block_delta", "index": 0, "delta": delta}, "content_block_delta"
            )
        yield sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
        yield sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                "usage": {"output_tokens": message["usage"]["output_tokens"]},
            },
            "message_delta",
        )
        yield sse({"type": "message_stop"}, "message_stop")
