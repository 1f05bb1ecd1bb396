"""``UnsandboxedRuntime``: a test double of the sandbox runtime that ISOLATES NOTHING.

It exists for tests, so that the executor, the workers and everything that drives them can
run real agent runs without root, runc or namespaces: never wire it into a Corral that runs
anybody's code. Its "sandbox" is a plain host process of the calling user, in its own
process group, with the host's filesystem, network and privileges:

* the root is a directory on the host, ``<directory>/<id>/root``, into which the request's
  layers are *copied* (bottom first; a whiteout deletes, an opaque directory that the caller
  may read as such is emptied first). Nothing is mounted; an edit session's draft is not
  supported (``RequirementMissing``), as there is no overlay to write it through;
* ``start`` runs the real bootstrap (``boot/bootstrap.py``) with ``python3 -E`` semantics
  (this interpreter, ``-E``), its runner home set to ``<root>/opt/corral/runner`` by argv,
  in ``<root>/home/user``; ``inside`` maps sandbox paths onto the root. The runner then posts
  its events to whatever bridge the caller's settings name: a test serves a real bridge on
  127.0.0.1, whose gate admits 127.0.0.0/8, and the sandbox's address is 127.0.0.1;
* ``immutability`` sets no flag (the hot swap's lock step, the layer cache's lock): there is
  no sandbox code to lock out, and an unprivileged user could not set one;
* when the first process ends, the rest of its process group is killed (as a pid namespace
  dies with its init), and ``close`` kills the group and removes the directory;
* a record of the owner and the first process lets ``reap`` clean up after a dead owner.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any

from corral.errors import CommandNotFound, InvalidInput, RequirementMissing
from corral.processes import Owner
from corral.sandbox.channels import Channels, Pipes
from corral.sandbox.runtime import (
    BOOT_DIR,
    BOOTSTRAP,
    Exit,
    SandboxRequest,
    SandboxResult,
    Stream,
    check_startable,
)
from corral.snapshots.fsattr import Immutability

RUNNER_HOME = "opt/corral/runner"
OPAQUE = "trusted.overlay.opaque"


class NoImmutability(Immutability):
    """Sets and lifts no flag: nothing runs in a sandbox that the flag would stop."""

    def set(self, path: Path, immutable: bool) -> None:
        os.lstat(path)  # the path must exist, as it must for the real one

    def is_set(self, path: Path) -> bool:
        os.lstat(path)
        return False


class UnsandboxedRuntime:
    """The runtime protocol over plain host processes; for tests only (see the module)."""

    def __init__(
        self, directory: Path, *, python: str = sys.executable, address: str = "127.0.0.1"
    ) -> None:
        self.directory = directory
        self.python = python
        self.address = address
        self._immutability = NoImmutability()

    @property
    def immutability(self) -> Immutability:
        return self._immutability

    def prepare(self) -> int:
        self.directory.mkdir(parents=True, exist_ok=True)
        return self.reap()

    def start(self, request: SandboxRequest) -> UnsandboxedSandbox:
        check_startable(request)
        home, root = self._make(request)
        argv = [self.python, "-E", str(BOOT_DIR / BOOTSTRAP), str(root / RUNNER_HOME)]
        pipes = Pipes()
        proc: subprocess.Popen[bytes] | None = None
        try:
            stdin, stdout, stderr = pipes.child
            proc = self._spawn(argv, request, root, home, stdin, stdout, stderr)
            pipes.handed_over()
            return UnsandboxedSandbox(self, home, root, proc, pipes.channels())
        except BaseException:
            if proc is not None:  # started, then something failed: it must not outlive this
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            pipes.close()
            _remove(home)
            raise

    def run(
        self,
        request: SandboxRequest,
        *,
        stdin: Stream = None,
        stdout: Stream = None,
        stderr: Stream = None,
    ) -> SandboxResult:
        """Run ``request.argv`` as a host process in the copied root. Its absolute paths are
        the host's: only ``cwd`` and ``HOME`` are moved into the root."""
        if not request.argv or not request.argv[0]:
            raise InvalidInput("a sandbox process needs a non-empty argv")
        began = time.perf_counter()
        home, root = self._make(request)
        try:
            proc = self._spawn(list(request.argv), request, root, home, stdin, stdout, stderr)
            with UnsandboxedSandbox(self, home, root, proc, None) as sandbox:
                ended = sandbox.wait(request.timeout)
            return SandboxResult(
                home.name, self.address, ended.code, ended.timed_out, time.perf_counter() - began
            )
        finally:
            _remove(home)

    def reap(self) -> int:
        """Remove every sandbox whose owner died, killing what still runs in it."""
        reaped = 0
        with contextlib.suppress(FileNotFoundError):
            for home in sorted(self.directory.iterdir()):
                try:
                    record = json.loads((home / "record.json").read_text())
                    owner = Owner(**record["owner"])
                except (OSError, ValueError, TypeError, KeyError):
                    continue  # not one of ours, or a sandbox still being made
                if owner.alive():
                    continue
                leader = record.get("leader")
                if leader and Owner(**leader).alive():
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(leader["pid"], signal.SIGKILL)
                _remove(home)
                reaped += 1
        return reaped

    def _make(self, request: SandboxRequest) -> tuple[Path, Path]:
        """A sandbox directory, recorded before anything is in it, with the copied root."""
        if request.upper is not None or request.work is not None:
            raise RequirementMissing(
                "edit sessions", "the unsandboxed test runtime has no overlay to keep a draft in"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        sid = secrets.token_hex(6)
        pending = self.directory / f".new-{sid}"
        pending.mkdir()
        _write(pending / "record.json", {"owner": asdict(Owner.me())})
        home = self.directory / sid
        os.rename(pending, home)  # from here on, reap() may clean it up
        root = home / "root"
        root.mkdir()
        try:
            for layer in reversed(request.layers):
                _merge(layer, root)
        except BaseException:
            _remove(home)
            raise
        return home, root

    def _spawn(
        self,
        argv: list[str],
        request: SandboxRequest,
        root: Path,
        home: Path,
        stdin: Stream,
        stdout: Stream,
        stderr: Stream,
    ) -> subprocess.Popen[bytes]:
        env = dict(request.env)
        if env.get("HOME", "").startswith("/"):
            env["HOME"] = _inside(root, env["HOME"])
        cwd = Path(_inside(root, request.cwd))
        cwd.mkdir(parents=True, exist_ok=True)
        try:
            proc = subprocess.Popen(
                argv,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                cwd=cwd,
                env=env,
                start_new_session=True,  # its own process group: killed as one
            )
        except FileNotFoundError as exc:
            raise CommandNotFound(argv[0], request.label) from exc
        record = json.loads((home / "record.json").read_text())
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
            record["leader"] = asdict(Owner.of(proc.pid))
        _write(home / "record.json", record)
        return proc


class UnsandboxedSandbox:
    """A started unsandboxed "sandbox": the bootstrap as a host process, and its channels."""

    def __init__(
        self,
        runtime: UnsandboxedRuntime,
        home: Path,
        root: Path,
        process: subprocess.Popen[bytes],
        channels: Channels | None,
    ) -> None:
        self._runtime = runtime
        self._home = home
        self._root = root
        self._process = process
        self._channels = channels
        self._closed = False

    @property
    def id(self) -> str:
        return self._home.name

    @property
    def address(self) -> str:
        return self._runtime.address

    @property
    def rootfs(self) -> Path:
        return self._root

    def inside(self, path: str) -> str:
        return _inside(self._root, path)

    def send(self, command: Mapping[str, Any]) -> None:
        self._open().send(command)

    def next(self, deadline: float) -> dict[str, Any]:
        return self._open().next(deadline)

    def expect(
        self, kinds: tuple[str, ...], deadline: float
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return self._open().expect(kinds, deadline)

    def exited(self) -> bool:
        return self._ended(block=False)

    def kill(self) -> None:
        if self._process.returncode is None:  # unreaped: the group's id is still its own
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> Exit:
        deadline = None if timeout is None else time.monotonic() + timeout
        timed_out = False
        while not self._ended(block=deadline is None):
            if deadline is not None and time.monotonic() >= deadline:
                timed_out = True
                self.kill()
                self._ended(block=True)
                break
            time.sleep(0.01)
        code = self._process.returncode
        assert code is not None
        return Exit(128 - code if code < 0 else code, timed_out)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.kill()
            self._ended(block=True)
        finally:
            if self._channels is not None:
                self._channels.close()
            _remove(self._home)

    def _ended(self, block: bool) -> bool:
        """Whether the first process has ended; once it has, the rest of its group is killed
        (before it is reaped, while the group's id cannot name anything else) and it is
        reaped."""
        if self._process.returncode is not None:
            return True
        flags = os.WEXITED | os.WNOWAIT | (0 if block else os.WNOHANG)
        try:
            if os.waitid(os.P_PID, self._process.pid, flags) is None:
                return False
        except ChildProcessError:  # reaped already: its group's id may name another now
            self._process.wait()
            return True
        self.kill()
        self._process.wait()
        return True

    def _open(self) -> Channels:
        if self._channels is None:
            raise RuntimeError("a run() sandbox has no channels")
        return self._channels

    def __enter__(self) -> UnsandboxedSandbox:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _inside(root: Path, path: str) -> str:
    pure = PurePosixPath(path)
    if not pure.is_absolute():
        raise ValueError(f"a sandbox path must be absolute, got {path!r}")
    return str(root / pure.relative_to("/"))


def _merge(layer: Path, root: Path) -> None:
    """Copy one unpacked layer (overlayfs form) onto ``root``."""
    for directory, dirs, files in os.walk(layer):
        src_dir = Path(directory)
        dest_dir = root / src_dir.relative_to(layer)
        for name in sorted(dirs) + sorted(files):
            src, dest = src_dir / name, dest_dir / name
            st = os.lstat(src)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:  # a whiteout
                _delete(dest)
            elif stat.S_ISDIR(st.st_mode):
                if dest.is_symlink() or (os.path.lexists(dest) and not dest.is_dir()):
                    _delete(dest)  # a file or link in a lower layer, a directory here
                elif _opaque(src):
                    _delete(dest)  # this layer's directory hides the lower one's content
                dest.mkdir(exist_ok=True)
                os.chmod(dest, stat.S_IMODE(st.st_mode) | stat.S_IRWXU)
            elif stat.S_ISLNK(st.st_mode):
                _delete(dest)
                os.symlink(os.readlink(src), dest)
            elif stat.S_ISREG(st.st_mode):
                _delete(dest)
                shutil.copy2(src, dest, follow_symlinks=False)
            # devices, fifos and sockets: nothing an agent run needs


def _opaque(path: Path) -> bool:
    try:
        return os.getxattr(path, OPAQUE, follow_symlinks=False) == b"y"
    except OSError:  # no such attribute, or not readable by this user: taken as not opaque
        return False


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def _remove(home: Path) -> None:
    shutil.rmtree(home, ignore_errors=True)


def _write(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.rename(tmp, path)
