"""The runc implementation of the sandbox runtime (``runtime.py``).

A sandbox is one process tree under runc, on an overlay of a snapshot's unpacked layers (never
written) and an upper directory: the sandbox's own scratch for a run, thrown away at teardown,
or the environment's draft for an edit session, kept for the next freeze. The steps, and the
resource each one leaves for teardown to undo:

=====================  ===========================================  =========================
step                   resource                                     undone by
=====================  ===========================================  =========================
claim a slot           ``<run>/slots/<n>/record.json``              release the slot (last)
mount the root         overlay at ``<data>/sandboxes/<id>/rootfs``  umount
create the network     netns ``corral-<n>`` with its veth pair      ``ip netns delete``
run                    runc container and its cgroups               runc (or ``delete -f``)
=====================  ===========================================  =========================

Teardown runs on every path out of ``run`` and on ``RuncSandbox.close``; the record written
before the first resource lets any later Corral process reap a sandbox whose owner died.

Building a ``RuncRuntime`` touches nothing; ``prepare`` checks the host (``host.py``),
installs the network's anchor and nftables table, and reaps. A started sandbox's bootstrap is
bind-mounted read-only at ``/run/corral-boot``; its runc child (a ``Popen``) never leaves
this module.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any

from corral.config import Settings
from corral.errors import out_of_space
from corral.processes import Owner
from corral.sandbox import host
from corral.sandbox.channels import Channels, Pipes
from corral.sandbox.network import Network, host_resolvers
from corral.sandbox.runc import Runc
from corral.sandbox.runtime import (
    BOOT_DIR,
    BOOTSTRAP,
    Exit,
    NetworkMode,
    SandboxRequest,
    SandboxResult,
    Stream,
    check_startable,
)
from corral.sandbox.slots import Record, Slots
from corral.sandbox.spec import BindMount, ProcessSpec, runtime_config
from corral.snapshots import overlay
from corral.snapshots.fsattr import Immutability

CGROUP_PARENT = "corral"
BOOT_MOUNT = "/run/corral-boot"
BOOT_ARGV = ("python3", "-E", f"{BOOT_MOUNT}/{BOOTSTRAP}")


class RuncRuntime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.runc = Runc(settings.run_dir / "runc")
        self.network = Network(settings.network, settings.run_dir)
        self.slots = Slots(settings.run_dir, self.network.capacity())
        self.bundles = settings.data_dir / "sandboxes"
        self._immutability = Immutability()

    @property
    def immutability(self) -> Immutability:
        return self._immutability

    def prepare(self) -> int:
        """Check the host, install the network's anchor and table, reap; how many reaped."""
        host.check()
        self.network.ensure_host()
        return self.reap()

    def run(
        self,
        request: SandboxRequest,
        *,
        stdin: Stream = None,
        stdout: Stream = None,
        stderr: Stream = None,
    ) -> SandboxResult:
        """Boot a sandbox for ``request``, run its command to the end, and tear it down."""
        started = time.perf_counter()
        with self._booted(request) as (record, address):
            code, timed_out = self.runc.run(
                record.container,
                Path(record.bundle),
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                timeout=request.timeout,
                env_name=request.label,
            )
        return SandboxResult(
            record.sandbox_id, address, code, timed_out, time.perf_counter() - started
        )

    def start(self, request: SandboxRequest) -> RuncSandbox:
        """Boot ``request`` with the bootstrap (bind-mounted read-only) as its first process."""
        check_startable(request)
        request = replace(
            request,
            argv=BOOT_ARGV,
            mounts=(*request.mounts, BindMount(BOOT_DIR, BOOT_MOUNT, readonly=True)),
        )
        stack = contextlib.ExitStack()  # undone in reverse: the pipes, then the sandbox
        try:
            record, address = stack.enter_context(self._booted(request))
            pipes = Pipes()
            stack.callback(pipes.close)
            bundle = Path(record.bundle)
            stdin, stdout, stderr = pipes.child
            proc = self.runc.start(
                record.container, bundle, stdin=stdin, stdout=stdout, stderr=stderr
            )
            pipes.handed_over()
            return RuncSandbox(self, record, address, request.label, proc, pipes.channels(), stack)
        except BaseException:
            stack.close()
            raise

    @contextlib.contextmanager
    def _booted(self, request: SandboxRequest) -> Iterator[tuple[Record, str]]:
        slot = self.slots.claim()
        sid = secrets.token_hex(6)
        edit = request.network is NetworkMode.EDIT
        link = self.network.link_for(slot, edit)
        bundle = self.bundles / sid
        record = Record(
            slot=slot,
            sandbox_id=sid,
            owner=Owner.me(),
            runc_root=str(self.runc.root),
            container=f"corral-{sid}",
            bundle=str(bundle),
            netns=link.netns,
        )
        self.slots.write(record)
        try:
            with out_of_space(self.bundles):  # the bundle and an edit's draft: the data disk
                rootfs = bundle / "rootfs"
                rootfs.mkdir(parents=True)
                upper, work = request.upper, request.work
                if upper is None or work is None:
                    scratch = bundle / "scratch"
                    scratch.mkdir()
                    overlay.mount_scratch(scratch, self.settings.limits.scratch_bytes)
                    upper, work = scratch / "upper", scratch / "work"
                for d in (upper, work):
                    d.mkdir(parents=True, exist_ok=True)
                overlay.mount(request.layers, upper, work, rootfs)
                self.network.create(link)
                mounts = list(request.mounts)
                if edit:
                    mounts.append(self._resolv_conf(bundle))
                config = runtime_config(
                    rootfs=rootfs,
                    process=ProcessSpec(
                        argv=request.argv,
                        env=request.env,
                        cwd=request.cwd,
                        uid=request.uid,
                        gid=request.gid,
                    ),
                    hostname="sandbox",
                    netns=link.netns_path,
                    cgroups_path=f"/{CGROUP_PARENT}/{record.container}",
                    limits=request.limits or self.settings.limits,
                    mounts=mounts,
                )
                (bundle / "config.json").write_text(json.dumps(config))
            yield record, str(link.address)
        finally:
            self.teardown(record)

    @staticmethod
    def _resolv_conf(bundle: Path) -> BindMount:
        path = bundle / "resolv.conf"
        path.write_text("".join(f"nameserver {r}\n" for r in host_resolvers()))
        return BindMount(path, "/etc/resolv.conf", readonly=True)

    def teardown(self, record: Record) -> None:
        """Undo every resource ``record`` names. Idempotent; safe on a half-booted sandbox."""
        runc = Runc(Path(record.runc_root))
        if runc.exists(record.container):
            runc.delete(record.container)
        bundle = Path(record.bundle)
        for point in overlay.mounted_under(bundle):
            overlay.unmount(point)
        self.network.destroy(record.netns)
        shutil.rmtree(bundle, ignore_errors=True)
        _remove_cgroups(record.container)
        self.slots.release(record.slot)

    def reap(self) -> int:
        """Tear down every sandbox whose owning process is gone. Returns how many."""
        dead, stale = self.slots.orphans()
        for record in dead:
            self.teardown(record)
        for slot in stale:
            self.slots.release(slot)
        return len(dead) + len(stale)


class RuncSandbox:
    """A started runc sandbox: its bootstrap under ``runc run``, its channels, its record."""

    def __init__(
        self,
        runtime: RuncRuntime,
        record: Record,
        address: str,
        label: str,
        process: subprocess.Popen[bytes],
        channels: Channels,
        teardown: contextlib.ExitStack,
    ) -> None:
        self._runtime = runtime
        self.record = record  # the slot registry's record: tests find its resources by it
        self._address = address
        self._rootfs = Path(record.bundle) / "rootfs"
        self._teardown = teardown
        self._label = label
        self._process = process
        self._channels = channels
        self._closed = False

    @property
    def id(self) -> str:
        return self.record.sandbox_id

    @property
    def address(self) -> str:
        return self._address

    @property
    def rootfs(self) -> Path:
        return self._rootfs

    def inside(self, path: str) -> str:
        return path  # the sandbox's root is its processes' "/"

    def send(self, command: Mapping[str, Any]) -> None:
        self._channels.send(command)

    def next(self, deadline: float) -> dict[str, Any]:
        return self._channels.next(deadline)

    def expect(
        self, kinds: tuple[str, ...], deadline: float
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return self._channels.expect(kinds, deadline)

    def exited(self) -> bool:
        return self._process.poll() is not None

    def kill(self) -> None:
        self._runtime.runc.kill(self.record.container)

    def wait(self, timeout: float | None = None) -> Exit:
        code, timed_out = self._runtime.runc.wait(
            self._process,
            self.record.container,
            Path(self.record.bundle),
            timeout=timeout,
            env_name=self._label,
        )
        return Exit(code, timed_out)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._process.poll() is None:
                self.kill()
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()  # runc itself is stuck; teardown force-deletes the container
                self._process.wait()
        finally:
            self._channels.close()
            self._teardown.close()

    def __enter__(self) -> RuncSandbox:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _remove_cgroups(container: str) -> None:
    """runc removes a container's cgroups; these are left only if runc itself was killed."""
    root = Path("/sys/fs/cgroup")
    candidates = [root / CGROUP_PARENT / container]
    with contextlib.suppress(FileNotFoundError):
        candidates += [c / CGROUP_PARENT / container for c in root.iterdir() if c.is_dir()]
    for path in candidates:
        with contextlib.suppress(OSError):
            os.rmdir(path)
