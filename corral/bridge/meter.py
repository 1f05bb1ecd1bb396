"""Reading model usage from provider responses, for billing: what the bridge saw, not what the
sandbox claims. Non-streaming JSON bodies carry ``usage``; server-sent event streams carry it
in their events (OpenAI: a final chunk when ``stream_options.include_usage`` is set;
Anthropic: ``message_start`` for input tokens, ``message_delta`` for output tokens).
"""

from __future__ import annotations

import json
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
            usage = (doc.get("message") or {}).get("usage")
        if not isinstance(usage, dict):
            continue
        found = True
        if kind == "openai":
            tokens_in = max(tokens_in, int(usage.get("prompt_tokens") or 0))
            tokens_out = max(tokens_out, int(usage.get("completion_tokens") or 0))
        else:
            tokens_in = max(tokens_in, int(usage.get("input_tokens") or 0))
            tokens_out = max(tokens_out, int(usage.get("output_tokens") or 0))
    if not found:
        return None
    return {"kind": "model_tokens", "input_tokens": tokens_in, "output_tokens": tokens_out}


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
