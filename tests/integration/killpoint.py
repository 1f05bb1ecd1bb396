"""Run a ``corral`` command that SIGKILLs itself at a chosen point: a crash on cue.

    python -m tests.integration.killpoint POINT MARK -- corral-arguments...

POINT names where the process dies:

* ``module:Qualified.name[@when][#n]``: just ``before`` or ``after`` (the default) the
  ``n``-th call (default 1) of that function or method, e.g.
  ``corral.store.environments:Environments.add_snapshot`` (the head has moved, nothing is
  tagged yet);
* ``swap:STEP``: at a runner hot swap's step (``staged``, ``validated``, ``swapped``,
  ``purged``, ``locked``), through the executor's ``Hooks`` seam.

Only the moment is chosen: the death is a real SIGKILL of a real ``corral`` process, so
nothing (no ``finally``, no ``atexit``, no flush) runs after it. Just before dying the process
writes POINT to the file MARK, which tells the test the point was reached (and the command
did not simply end or die elsewhere).
"""

from __future__ import annotations

import functools
import importlib
import os
import signal
import sys
from pathlib import Path
from typing import Any


def die(point: str, mark: Path) -> None:
    mark.write_text(point)
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str, mark: Path) -> None:
    if point.startswith("swap:"):
        _arm_swap(point.removeprefix("swap:"), point, mark)
        return
    where, _, count = point.partition("#")
    target, _, when = where.partition("@")
    nth = int(count or 1)
    module_name, _, qualname = target.partition(":")
    owner: Any = importlib.import_module(module_name)
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    calls = [0]

    @functools.wraps(original)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if when == "before" and calls[0] == nth:
            die(point, mark)
        result = original(*args, **kwargs)
        if when in ("", "after") and calls[0] == nth:
            die(point, mark)
        return result

    setattr(owner, name, wrapped)


def _arm_swap(step: str, point: str, mark: Path) -> None:
    from corral.pipeline.executor import Executor

    class KillAtStep:
        def on_step(self, attempt: int, name: str, session: object) -> None:
            if name == step:
                die(point, mark)

    init = Executor.__init__

    @functools.wraps(init)
    def with_hooks(self: Executor, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("hooks", KillAtStep())
        init(self, *args, **kwargs)

    Executor.__init__ = with_hooks  # type: ignore[method-assign]


def main() -> None:
    point, mark, separator, *argv = sys.argv[1:]
    if separator != "--":
        raise SystemExit("usage: python -m tests.integration.killpoint POINT MARK -- ARGS...")
    arm(point, Path(mark))
    from corral.cli.main import main as corral

    sys.argv = ["corral", *argv]
    corral()


if __name__ == "__main__":
    main()
