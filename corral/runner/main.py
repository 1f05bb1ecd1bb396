"""Run one agent: load the entrypoint, call it with the input, report the result.

``run(spec)`` is what the sandbox bootstrap calls (``PROTOCOL`` 2: events go to the
bridge). The spec names the entrypoint
as ``file.py:function`` (relative to the working directory) or ``package.module:function``.
The function receives the decoded input; one that takes a second parameter also receives
the run's context. Exit status: 0 with a ``result`` event, 1 with an ``error`` event.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: never imported at run time, so the runner loads fast
    from typing import Any

from . import REQUIRES_PYTHON, __version__, sdk
from .events import Channel, LogStream

PROTOCOL = 2  # the bootstrap calls run(spec); protocol 1 passed an event descriptor as well


class AgentError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def run(spec: dict[str, Any]) -> int:
    import platform  # here, not at the top: importing the runner stays cheap for validation

    channel = Channel(
        str(spec["bridge"]), str(spec["token"]), int(spec.get("attempt", 0)), spec.get("limits")
    )
    channel.emit(
        "runner.started",
        version=__version__,
        python=platform.python_version(),
        requires_python=".".join(map(str, REQUIRES_PYTHON)),
    )
    context = {
        "run_id": spec.get("run_id"),
        "environment": spec.get("environment"),
        "entrypoint": spec.get("entrypoint"),
        "user": spec.get("user"),
    }
    sdk._bind(channel, context, str(spec["bridge"]), str(spec["token"]))
    capture = _Capture(channel)
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout = LogStream(channel, "stdout")
    sys.stderr = LogStream(channel, "stderr")
    try:
        output = _call(spec)
        try:
            json.dumps(output, allow_nan=False)  # NaN and Infinity are not JSON either
        except (TypeError, ValueError) as exc:
            raise AgentError(
                "result_not_json",
                f"the agent returned {type(output).__name__}, which is not JSON: {exc}",
            ) from None
        _flush()
        if channel.failure is None:  # an event over its limit has already failed the run
            channel.emit("result", output=output)
        return 0 if channel.failure is None else 1
    except AgentError as exc:
        _flush()
        channel.emit("error", code=exc.code, message=_cut(str(exc), 4096))
        return 1
    except BaseException as exc:  # the agent's own failure, whatever it is, is a result
        _flush()
        channel.emit(
            "error",
            code="agent_raised",
            message=_cut(f"{type(exc).__name__}: {exc}", 4096),
            traceback=_cut(__import__("traceback").format_exc(limit=20), 32768),
        )
        return 1
    finally:
        sys.stdout, sys.stderr = stdout, stderr
        capture.close()
        channel.close()


class _Capture:
    """Descriptors 1 and 2 (what subprocesses and C code write) turned into log events."""

    def __init__(self, channel: Channel) -> None:
        read, write = os.pipe()
        self._saved = [os.dup(1), os.dup(2)]
        os.dup2(write, 1)
        os.dup2(write, 2)
        os.close(write)
        self._stream = LogStream(channel, "output")
        self._thread = threading.Thread(target=self._pump, args=(read,), daemon=True)
        self._thread.start()

    def _pump(self, fd: int) -> None:
        with os.fdopen(fd, "rb", buffering=0) as pipe:
            for chunk in iter(lambda: pipe.read(65536), b""):
                self._stream.write(chunk.decode("utf-8", "replace"))
        self._stream.flush()

    def close(self) -> None:
        os.dup2(self._saved[0], 1)  # the pipe's last writers are gone: the pump sees EOF
        os.dup2(self._saved[1], 2)
        self._thread.join(timeout=5)


def _cut(text: str, limit: int) -> str:
    """An error's text, short enough that its event fits the event limit."""
    return text if len(text) <= limit else text[:limit] + " [cut]"


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        stream.flush()


def _call(spec: dict[str, Any]) -> Any:
    function = load_entrypoint(str(spec.get("entrypoint", "")), str(spec.get("workdir", ".")))
    import inspect

    value = spec.get("input")
    try:
        parameters = len(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        parameters = 1
    if parameters == 0:
        return function()
    if parameters == 1:
        return function(value)
    return function(value, sdk.context())


def load_entrypoint(entrypoint: str, workdir: str) -> Callable[..., Any]:
    target, sep, name = entrypoint.partition(":")
    if not sep or not target or not name.isidentifier():
        raise AgentError(
            "bad_entrypoint", f"entrypoint {entrypoint!r} is not of the form file.py:function"
        )
    if workdir not in sys.path:
        sys.path.insert(0, workdir)
    if target.endswith(".py"):
        path = os.path.join(workdir, target)
        if not os.path.isfile(path):
            raise AgentError("entrypoint_not_found", f"no file {path} in the sandbox")
        spec = importlib.util.spec_from_file_location("__corral_agent__", path)
        if spec is None or spec.loader is None:
            raise AgentError("entrypoint_not_found", f"cannot load {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules["__corral_agent__"] = module
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise AgentError("entrypoint_not_found", f"cannot import {target}: {exc}") from None
    function: Callable[..., Any] | None = getattr(module, name, None)
    if not callable(function):
        raise AgentError("entrypoint_not_found", f"{target} has no function {name!r}")
    return function
