"""The JSON shape of a run, the one every surface shows: the API, the CLI, a calling agent."""

from __future__ import annotations

import json
from typing import Any

from corral.store import Run


def run_json(run: Run) -> dict[str, Any]:
    """A run's record as clients see it: ``result`` decoded, lease bookkeeping left out."""
    return {
        "id": run.id,
        "app": run.app,
        "app_version": run.app_version,
        "environment": run.environment,
        "snapshot": run.snapshot,
        "trigger": run.trigger,
        "status": run.status,
        "user": run.user,
        "result": None if run.result is None else json.loads(run.result),
        "error_code": run.error_code,
        "error": run.error,
        "created_at": run.created_at,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
        "attempts": run.attempts,
        "runner_version": run.runner_version,
        "swapped": run.swapped,
        "parent_run": run.parent_run,
        "depth": run.depth,
        "cancel_requested": run.cancel_requested,
    }
