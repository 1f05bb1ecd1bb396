"""A local stand-in for the OpenAI API: Chat Completions (plain and streamed) and Models.

The assistant answers ``"echo: " + <text of the last user message>``, so a test can predict
it; tokens are counted as whitespace-separated words (the prompt: every message's text; the
completion: the reply). ``max_tokens`` / ``max_completion_tokens`` cut the reply to that many
words and set ``finish_reason`` to ``"length"``. The credential is ``Authorization: Bearer
KEY``; anything else is answered 401 with OpenAI's error body.
"""

from __future__ import annotations

import itertools
import time
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

DEFAULT_MODELS = ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "o3-mini")
SYSTEM_FINGERPRINT = "fp_fake0001"


def message_text(content: Any) -> str:
    """The text of a message's ``content``: a string or a list of ``{"type": "text"}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


def openai_error(
    message: str,
    status: int,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> Response:
    """An error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return Response.json(body, status)


def mask_key(key: str) -> str:
    """How OpenAI echoes a wrong key: its start and its last four characters."""
    return f"{key[:3]}{'*' * 10}{key[-4:]}" if len(key) > 8 else "*" * len(key)


class FakeOpenAI(FakeService):
    """``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /v1/models/{model}``.

    ``FakeOpenAI(api_key=None, *, models=DEFAULT_MODELS, chunk_delay=0.0, host, port, delay)``:
    with ``api_key`` the server demands ``Authorization: Bearer <api_key>``. Every completion
    is appended to ``completions`` (the parsed request bodies).
    """

    server_name = "fake-openai"

    def __init__(
        self,
        api_key: str | None = None,
        *,
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
        self.completions: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        if api_key is not None:
            self.expect_auth("Authorization", f"Bearer {api_key}")
        self.add_route("POST", "/v1/chat/completions", self.chat_completions)
        self.add_route("GET", "/v1/models", self.list_models)
        self.add_route("GET", "/v1/models/{model}", self.get_model)

    @staticmethod
    def reply_for(messages: list[dict[str, Any]]) -> str:
        """What the fake assistant answers to ``messages``."""
        users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        return "echo: " + (message_text(users[-1].get("content")) if users else "")

    # Error shapes --------------------------------------------------------------------------

    def auth_error(self, request: RecordedRequest) -> Response:
        sent = request.headers.get("Authorization", "")
        scheme, _, key = sent.partition(" ")
        if not sent or scheme.lower() != "bearer" or not key.strip():
            message = (
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
        else:
            message = f"Incorrect API key provided: {mask_key(key.strip())}."
        return openai_error(message, 401, code="invalid_api_key")

    def not_found(self, request: RecordedRequest) -> Response:
        return openai_error(f"Invalid URL ({request.method} {request.path})", 404)

    def method_not_allowed(self, request: RecordedRequest) -> Response:
        return openai_error(f"Invalid URL ({request.method} {request.path})", 404)

    def bad_request(self, message: str) -> Response:
        return openai_error(message, 400)

    def internal_error(self, request: RecordedRequest, exc: BaseException) -> Response:
        return openai_error(f"The server had an error: {exc!r}", 500, type="server_error")

    # Endpoints -----------------------------------------------------------------------------

    def _model_object(self, model: str) -> dict[str, Any]:
        return {"id": model, "object": "model", "created": 1_700_000_000, "owned_by": "openai"}

    def list_models(self, request: RecordedRequest) -> Response:
        return Response.json(
            {"object": "list", "data": [self._model_object(m) for m in self.models]}
        )

    def get_model(self, request: RecordedRequest, model: str) -> Response:
        if model not in self.models:
            return openai_error(
                f"The model '{model}' does not exist", 404, param="model", code="model_not_found"
            )
        return Response.json(self._model_object(model))

    def chat_completions(self, request: RecordedRequest) -> Response:
        body = parse_json_object(request)
        if body is None:
            return openai_error(
                "We could not parse the JSON body of your request. (HINT: This likely means "
                "you aren't using your HTTP library correctly. The OpenAI API expects a JSON "
                "payload, but what was sent was not valid JSON.)",
                400,
            )
        if not body.get("model"):
            return openai_error("you must provide a model parameter", 400)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return openai_error(
                "Missing required parameter: 'messages'.",
                400,
                param="messages",
                code="missing_required_parameter",
            )
        self.completions.append(body)
        model = str(body["model"])
        reply = self.reply_for(messages)
        finish_reason = "stop"
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        if isinstance(limit, int) and words(reply) > limit:
            reply = "".join(word_pieces(reply)[:limit]).rstrip()
            finish_reason = "length"
        prompt_tokens = sum(words(message_text(m.get("content"))) for m in messages)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": words(reply),
            "total_tokens": prompt_tokens + words(reply),
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }
        serial = next(self._ids)
        completion_id = f"chatcmpl-fake{serial:08d}"
        headers = {"x-request-id": f"req_fake{serial:08d}", "openai-processing-ms": "1"}
        created = int(time.time())
        if body.get("stream"):
            options = body.get("stream_options") or {}
            include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            chunks = self._chunks(
                completion_id,
                created,
                model,
                reply,
                finish_reason,
                usage if include_usage else None,
            )
            return Response.event_stream(chunks, headers)
        completion = {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": reply,
                        "refusal": None,
                        "annotations": [],
                    },
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
            "usage": usage,
            "service_tier": "default",
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        return Response.json(completion, headers=headers)

    def _chunks(
        self,
        completion_id: str,
        created: int,
        model: str,
        reply: str,
        finish_reason: str,
        usage: dict[str, Any] | None,
    ) -> Iterator[bytes]:
        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            payload: dict[str, Any] = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "service_tier": "default",
                "system_fingerprint": SYSTEM_FINGERPRINT,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }
            if usage is not None:
                payload["usage"] = None  # every chunk but the last carries "usage": null
            return payload

        yield sse(chunk({"role": "assistant", "content": "", "refusal": None}, None))
        for piece in word_pieces(reply):
            self.sleep(self.chunk_delay)
            yield sse(chunk({"content": piece}, None))
        yield sse(chunk({}, finish_reason))
        if usage is not None:
            last = chunk({}, None)
            last["choices"] = []
            last["usage"] = usage
            yield sse(last)
        yield sse("[DONE]")
