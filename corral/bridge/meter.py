"""Reading model usage from provider responses, for billing: what the bridge saw, not what the
sandbox claims. Non-streaming JSON bodies carry ``usage``; server-sent event streams carry it
in their events (OpenAI: a final chunk when ``stream_options.include_usage`` is set;
Anthropic: ``message_start`` for input tokens, ``message_delta`` for output tokens).
"""

from __future__ import annotations

import json
import math
from typing import Any


def read_usage(kind: str, content_type: bytes, body: bytes) -> dict[str, Any] | None:
    if b"event-stream" in content_type:
        docs = _sse_documents(body)
    else:
        try:
            docs = [json.loads(body)]
        except ValueError:
            return None
    tokens_in = tokens_out = 0
    found = False
    for doc in docs:
        if not isinstance(doc, dict):
            continue
        usage = doc.get("usage")
        if kind == "anthropic" and doc.get("type") == "message_start":
            message = doc.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
        if not isinstance(usage, dict):
            continue
        found = True
        if kind == "openai":
            tokens_in = max(tokens_in, _count(usage.get("prompt_tokens")))
            tokens_out = max(tokens_out, _count(usage.get("completion_tokens")))
        else:
            tokens_in = max(tokens_in, _count(usage.get("input_tokens")))
            tokens_out = max(tokens_out, _count(usage.get("output_tokens")))
    if not found:
        return None
    return {"kind": "model_tokens", "input_tokens": tokens_in, "output_tokens": tokens_out}


def _count(value: Any) -> int:
    """A token count as the provider sent it; anything but a finite number counts 0 (this
    runs inside the proxy's response callbacks, where an exception would break the call)."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    return int(value) if math.isfinite(value) and value > 0 else 0


def _sse_documents(body: bytes) -> list[Any]:
    out = []
    for line in body.split(b"\n"):
        if line.startswith(b"data:"):
            payload = line[5:].strip()
            if payload and payload != b"[DONE]":
                try:
                    out.append(json.loads(payload))
                except ValueError:
                    continue
    return out
