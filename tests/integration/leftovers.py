"""The leak check: everything a Corral host creates, before and after a test.

``Leftovers(settings)`` takes an inventory of the host when it is made; ``assert_none()``
takes another and fails, naming each one, on anything new that is still there. The inventory
holds every kind of thing a sandbox or a freeze leaves on a host (see
``corral/sandbox/runc_runtime.py`` for the lifecycle that must undo them):

=============  =========================================================================
kind           what
=============  =========================================================================
container      runc containers, in the run directory's runc root and any a record names
runc           ``runc`` processes still working on one of those roots
slot           ``<run>/slots/<n>``: the machine-wide registry of live sandboxes
netns          network namespaces ``/run/netns/corral-*``
veth           host ends of sandbox links, ``cr<slot>`` and ``ce<slot>``
mount          mounts at or under a watched data directory (overlay roots, scratch tmpfs)
cgroup         ``/sys/fs/cgroup/<controller>/corral/<container>`` (v1 and the unified tree)
bundle         ``<data>/sandboxes/<id>``
temporary      working files of a write that did not finish: ``.tmp-*`` in the OCI layout,
               ``.unpack-*`` and ``.import-*`` in the layer cache, ``.platform-*`` (a
               runner fold-in) in the data directory
=============  =========================================================================

Other Corral processes share this machine (other tests, other checkouts): whatever a slot
record of theirs names (its bundle is outside the watched data directories) is theirs, alive
or dying, and not counted. What no record names is counted wherever it came from. Teardown of
a sandbox that is ending as the inventory is taken can show a resource for an instant, so
``assert_none`` takes the inventory again for a few seconds before it concludes.

``reap=True`` first gives the reaper its documented chance: ``corral sandbox reap`` in a
process of its own, as an operator (or any later Corral command) would.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from corral.config import Settings
from corral.sandbox.network import NETNS_DIR
from corral.sandbox.runc_runtime import CGROUP_PARENT
from corral.sandbox.slots import Record, Slots

Inventory = dict[str, set[str]]
KINDS = ("container", "runc", "slot", "netns", "veth", "mount", "cgroup", "bundle", "temporary")
_VETH = re.compile(r"^c[re][0-9a-f]+$")
_CGROUPS = Path("/sys/fs/cgroup")
_SYS_NET = Path("/sys/class/net")


def environ_for(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment a ``corral`` subprocess needs to be the same Corral as ``settings``."""
    return {
        **os.environ,
        "CORRAL_DATA_DIR": str(settings.data_dir),
        "CORRAL_RUN_DIR": str(settings.run_dir),
        "CORRAL_DATABASE_URL": settings.database_url,
        "CORRAL_BRIDGE_PORT": str(settings.network.bridge_port),
        **extra,
    }


class Leftovers:
    """An inventory of the host taken now, to compare with one taken after the test."""

    def __init__(self, settings: Settings, *more_data_dirs: Path) -> None:
        self.settings = settings
        self.data_dirs = tuple(p.resolve() for p in (settings.data_dir, *more_data_dirs))
        self.before = self.take()

    # -- the inventory -----------------------------------------------------------------------

    def take(self) -> Inventory:
        records = Slots(self.settings.run_dir, 1).records()
        roots = {self.settings.run_dir / "runc", *(Path(r.runc_root) for r in records)}
        found: Inventory = {kind: set() for kind in KINDS}
        for root in roots:
            found["container"] |= {f"{root}:{c}" for c in _containers(root)}
        found["runc"] = _runc_processes(roots)
        slots = self.settings.run_dir / "slots"
        found["slot"] = {f"slot {p.name}" for p in _children(slots)}
        found["netns"] = {p.name for p in _children(NETNS_DIR) if p.name.startswith("corral-")}
        found["veth"] = {p.name for p in _children(_SYS_NET) if _VETH.match(p.name)}
        found["mount"] = {str(p) for p in _mounts() if self._watched(p)}
        for controller in _children(_CGROUPS):
            found["cgroup"] |= {
                f"{controller.name}/{CGROUP_PARENT}/{p.name}"
                for p in _children(controller / CGROUP_PARENT)
                if p.is_dir()
            }
        for data in self.data_dirs:
            found["bundle"] |= {str(p) for p in _children(data / "sandboxes")}
            found["temporary"] |= {
                str(p)
                for folder, prefix in (
                    (data / "oci" / "blobs" / "sha256", ".tmp-"),
                    (data / "oci", ".tmp-"),
                    (data / "layers", ".unpack-"),
                    (data / "layers", ".import-"),
                    (data, ".platform-"),
                )
                for p in _children(folder)
                if p.name.startswith(prefix)
            }
        return found

    def new(self) -> dict[str, list[str]]:
        """What is on the host now, was not before, and no other Corral's live record names."""
        now = self.take()
        excused = self._others(Slots(self.settings.run_dir, 1).records())
        out = {}
        for kind in KINDS:
            fresh = sorted(now[kind] - self.before[kind] - excused)
            if fresh:
                out[kind] = fresh
        return out

    def assert_none(
        self, *, reap: bool = False, ignore: Iterable[str] = (), settle: float = 5.0
    ) -> None:
        """Fail, naming each, on anything new left on the host (after the reaper, if ``reap``)."""
        if reap:
            self.reap()
        skipped = set(ignore)
        deadline = time.monotonic() + settle
        while True:
            leaks = {k: v for k, v in self.new().items() if k not in skipped}
            if not leaks or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        assert not leaks, "left behind on the host:\n" + "\n".join(
            f"  {kind}: {', '.join(items)}" for kind, items in leaks.items()
        )

    def reap(self, environ: Mapping[str, str] | None = None) -> int:
        """``corral sandbox reap`` in a process of its own; how many sandboxes it reaped."""
        done = subprocess.run(
            [sys.executable, "-m", "corral.cli", "sandbox", "reap", "--json"],
            env=dict(environ or environ_for(self.settings)),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return int(json.loads(done.stdout)["reaped"])

    # -- attribution -------------------------------------------------------------------------

    def _watched(self, path: Path) -> bool:
        return any(path == d or d in path.parents for d in self.data_dirs)

    def _others(self, records: list[Record]) -> set[str]:
        """Every resource named by a record of another Corral (one not in our data dirs)."""
        out: set[str] = set()
        for r in records:
            if self._watched(Path(r.bundle)):
                continue
            out |= {
                f"{r.runc_root}:{r.container}",
                f"slot {r.slot}",
                r.netns,
                f"cr{r.slot:x}",
                f"ce{r.slot:x}",
                r.bundle,
            }
            out |= {f"{c.name}/{CGROUP_PARENT}/{r.container}" for c in _children(_CGROUPS)}
            out |= {p for p in _runc_processes({Path(r.runc_root)}) if r.container in p}
        return out


def _children(path: Path) -> list[Path]:
    try:
        return list(path.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _containers(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    listed = subprocess.run(
        ["runc", "--root", str(root), "list", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if listed.returncode != 0:
        return [f"(runc list failed: {listed.stderr.strip()})"]
    return [str(c["id"]) for c in json.loads(listed.stdout or "null") or []]


def _runc_processes(roots: set[Path]) -> set[str]:
    """``runc`` processes whose command line names one of ``roots``: "pid: argv"."""
    wanted = {str(r) for r in roots}
    out = set()
    for proc in _children(Path("/proc")):
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv if a]
        if args and os.path.basename(args[0]) == "runc" and wanted & set(args):
            out.add(f"pid {proc.name}: {' '.join(args)}")
    return out


def _mounts() -> list[Path]:
    with open("/proc/self/mountinfo") as f:
        return [Path(line.split()[4].encode().decode("unicode_escape")) for line in f]
