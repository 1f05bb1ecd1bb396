"""The JSON shapes of apps, runs and run events, shared by the API, the web UI and the CLI.

``corral app ... --json`` prints exactly what the API answers, field for field. These are plain
functions over the service's records (no FastAPI here), so the CLI can use them without
loading the web stack. An app's ``webhook_secret`` never leaves the server: its shape says
only whether one is set.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from corral.pipeline.apps import AppSpec
from corral.store import RunEvent

SECRET_FIELDS = ("webhook_secret",)


def spec_json(spec: AppSpec) -> dict[str, Any]:
    """An app's settings, without its secrets."""
    out = spec.to_json()
    for name in SECRET_FIELDS:
        out.pop(name, None)
    return out


def app_json(name: str, version: int, spec: AppSpec) -> dict[str, Any]:
    return {
        "name": name,
        "version": version,
        "spec": spec_json(spec),
        "webhook_secret_set": spec.webhook_secret is not None,
    }


def version_json(version: int, raw_spec: dict[str, Any], created_at: datetime) -> dict[str, Any]:
    return {
        "version": version,
        "spec": spec_json(AppSpec.from_json(raw_spec)),
        "created_at": created_at,
    }


def event_json(event: RunEvent) -> dict[str, Any]:
    """One event of a run's log: its own fields, then ``seq``, ``kind`` and ``at``."""
    data = json.loads(event.data)
    body = data if isinstance(data, dict) else {"data": data}
    return {**body, "seq": event.seq, "kind": event.kind, "at": event.at.isoformat()}
