"""The lifecycle of a sandbox: claim, boot, run, tear down, and reap what a crash left.

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

Teardown runs on every path out of ``run``; the record written before the first resource lets
any later Corral process reap a sandbox whose owner died mid-run.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from corral.config import Settings
from corral.errors import out_of_space
from corral.processes import Owner
from corral.sandbox import host
from corral.sandbox.network import Network
from corral.sandbox.runc import Runc
from corral.sandbox.slots import Record, Slots
from corral.sandbox.spec import BindMount, ProcessSpec, runtime_config
from corral.snapshots import overlay

CGROUP_PARENT = "corral"
Stream = IO[bytes] | int | None


@dataclass(frozen=True)
class SandboxRequest:
    layers: tuple[Path, ...]  # unpacked layer directories, topmost first
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    edit: bool = False  # an edit session: package registries are reachable
    upper: Path | None = None  # an edit session's draft (upper and work on one filesystem)
    work: Path | None = None
    uid: int = 1000
    gid: int = 1000
    cwd: str = "/home/user"
    timeout: float | None = None
    label: str = ""  # the environment's name, for messages
    mounts: tuple[BindMount, ...] = field(default=())


@dataclass(frozen=True)
class Started:
    """A sandbox whose process is running: its host-side root and its runc child."""

    record: Record
    address: str
    rootfs: Path  # the sandbox's root as the host sees it (host code only: never follow links)
    process: subprocess.Popen[bytes]


@dataclass(frozen=True)
class SandboxResult:
    sandbox_id: str
    address: str
    exit_code: int
    timed_out: bool
    seconds: float


class Sandboxes:
    def __init__(self, settings: Settings, *, check_host: bool = True) -> None:
        if check_host:
            host.check()
        self.settings = settings
        self.runc = Runc(settings.run_dir / "runc")
        self.network = Network(settings.network, settings.run_dir)
        self.slots = Slots(settings.run_dir, self.network.capacity())
        self.bundles = settings.data_dir / "sandboxes"
        self.network.ensure_host()
        self.reaped_at_start = self.reap()

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

    @contextlib.contextmanager
    def started(
        self,
        request: SandboxRequest,
        *,
        stdin: Stream = None,
        stdout: Stream = None,
        stderr: Stream = None,
    ) -> Iterator[Started]:
        """Boot a sandbox and start its command; on exit, kill whatever still runs, tear down."""
        with self._booted(request) as (record, address):
            bundle = Path(record.bundle)
            proc = self.runc.start(
                record.container, bundle, stdin=stdin, stdout=stdout, stderr=stderr
            )
            try:
                yield Started(record, address, bundle / "rootfs", proc)
            finally:
                if proc.poll() is None:
                    self.runc.kill(record.container)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()  # runc itself is stuck; teardown force-deletes the container
                    proc.wait()

    def raise_start_failure(self, started: Started, label: str) -> None:
        """After a started sandbox ended unexpectedly: raise if runc never started its command
        (CommandNotFound, SandboxDied, RuncError); return if the command itself ended."""
        self.runc.wait(
            started.process,
            started.record.container,
            Path(started.record.bundle),
            timeout=30,
            env_name=label,
        )

    def kill(self, started: Started) -> None:
        """Kill every process of a started sandbox (it then tears down as usual)."""
        self.runc.kill(started.record.container)

    @contextlib.contextmanager
    def _booted(self, request: SandboxRequest) -> Iterator[tuple[Record, str]]:
        slot = self.slots.claim()
        sid = secrets.token_hex(6)
        link = self.network.link_for(slot, request.edit)
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
                if request.edit:
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
                    limits=self.settings.limits,
                    mounts=mounts,
                )
                _write_json(bundle / "config.json", config)
            yield record, str(link.address)
        finally:
            self.teardown(record)

    @staticmethod
    def _resolv_conf(bundle: Path) -> BindMount:
        from corral.sandbox.network import host_resolvers

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


def _remove_cgroups(container: str) -> None:
    """runc removes a container's cgroups; these are left only if runc itself was killed."""
    root = Path("/sys/fs/cgroup")
    candidates = [root / CGROUP_PARENT / container]
    with contextlib.suppress(FileNotFoundError):
        candidates += [c / CGROUP_PARENT / container for c in root.iterdir() if c.is_dir()]
    for path in candidates:
        with contextlib.suppress(OSError):
            os.rmdir(path)


def _write_json(path: Path, obj: object) -> None:
    import json

    path.write_text(json.dumps(obj))
