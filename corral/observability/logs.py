"""Structured logs: one JSON object per line, carrying the run id of whatever is running.

``run_context(run_id)`` binds the id for the current thread or task; every record logged
inside it carries ``run_id``. ``configure()`` installs the formatter on the root logger.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from datetime import UTC, datetime

_RUN: contextvars.ContextVar[str | None] = contextvars.ContextVar("corral_run", default=None)


@contextlib.contextmanager
def run_context(run_id: str) -> Iterator[None]:
    token = _RUN.set(run_id)
    try:
        yield
    finally:
        _RUN.reset(token)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "at": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        run = getattr(record, "run_id", None) or _RUN.get()
        if run:
            out["run_id"] = run
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
