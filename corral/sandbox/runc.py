"""The only module that runs runc.

Each sandbox is one runc container, run in the foreground (``runc run``) so that runc itself
deletes the container and its cgroups when the process exits, and the caller's stdio is the
container's stdio. runc's own errors go to a JSON log in the bundle, which is how a failure to
*start* (a missing command, a bad spec) is told apart from the command's own non-zero exit.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path
from typing import IO

from corral.errors import CommandNotFound, RuncError, SandboxDied

_NOT_FOUND = ("executable file not found", "no such file or directory")


class Runc:
    def __init__(self, root: Path, binary: str = "runc") -> None:
        self.root = root
        self.binary = binary

    def _argv(self, *args: str) -> list[str]:
        return [self.binary, "--root", str(self.root), *args]

    def run(
        self,
        container_id: str,
        bundle: Path,
        *,
        stdin: IO[bytes] | int | None = None,
        stdout: IO[bytes] | int | None = None,
        stderr: IO[bytes] | int | None = None,
        timeout: float | None = None,
        env_name: str = "",
    ) -> tuple[int, bool]:
        """Run the bundle to its end: (exit status, timed out); 128+N means killed by signal N."""
        proc = self.start(container_id, bundle, stdin=stdin, stdout=stdout, stderr=stderr)
        return self.wait(proc, container_id, bundle, timeout=timeout, env_name=env_name)

    def start(
        self,
        container_id: str,
        bundle: Path,
        *,
        stdin: IO[bytes] | int | None = None,
        stdout: IO[bytes] | int | None = None,
        stderr: IO[bytes] | int | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``runc run`` in the foreground of a child process; ``wait`` reaps it."""
        argv = self._argv(
            "--log",
            str(bundle / "runc.log"),
            "--log-format",
            "json",
            "run",
            "--bundle",
            str(bundle),
            container_id,
        )
        return subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=stderr)

    def wait(
        self,
        proc: subprocess.Popen[bytes],
        container_id: str,
        bundle: Path,
        *,
        timeout: float | None = None,
        env_name: str = "",
    ) -> tuple[int, bool]:
        timed_out = False
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            self.kill(container_id)
            code = proc.wait()
        except BaseException:
            self.kill(container_id)
            proc.wait()
            raise
        if code != 0 and not timed_out:
            self._raise_start_failure(proc.args, code, bundle / "runc.log", env_name)  # type: ignore[arg-type]
        return code, timed_out

    def kill(self, container_id: str, signal: str = "KILL") -> None:
        with contextlib.suppress(OSError):
            subprocess.run(self._argv("kill", "--all", container_id, signal), capture_output=True)

    def delete(self, container_id: str) -> None:
        """Force-delete a container, running or not; a missing one is already deleted."""
        proc = subprocess.run(
            self._argv("delete", "--force", container_id), capture_output=True, text=True
        )
        if proc.returncode != 0 and "does not exist" not in proc.stderr:
            raise RuncError(proc.args, proc.returncode, proc.stderr)

    def exists(self, container_id: str) -> bool:
        return (self.root / container_id).exists()

    def _raise_start_failure(self, argv: list[str], code: int, log: Path, env_name: str) -> None:
        """If runc itself failed to start the process, raise; a command's own exit code is fine."""
        errors = [e for e in _read_log(log) if e.get("level") in ("error", "fatal")]
        if not errors:
            return
        message = "; ".join(str(e.get("msg", "")) for e in errors)
        if "already dead" in message:
            raise SandboxDied(argv[-1])
        if "exec" in message and any(s in message for s in _NOT_FOUND):
            command = message.split('exec: "', 1)[-1].split('"', 1)[0]
            raise CommandNotFound(command, env_name)
        raise RuncError(argv, code, message)


def _read_log(log: Path) -> list[dict[str, object]]:
    try:
        lines = log.read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        with contextlib.suppress(json.JSONDecodeError):
            entry = json.loads(line)
            if isinstance(entry, dict):
                out.append(entry)
    return out
