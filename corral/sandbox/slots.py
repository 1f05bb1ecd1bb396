"""The machine-wide registry of live sandboxes, and the reaper of dead ones.

A slot is a directory ``<run_dir>/slots/<n>``: creating it (``mkdir`` is atomic) claims slot
``n`` and with it the sandbox's address and interface names. Before any resource exists, the
slot gets a ``record.json`` naming its owner (pid and process start time, so a recycled pid is
not mistaken for the owner) and every resource the sandbox will hold. Whoever finds a record
whose owner is dead tears down what it names and frees the slot: that is how nothing outlives
a sandbox even when ``corral`` itself is killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from corral.errors import SandboxCapacity
from corral.processes import Owner

# A slot directory without a record is a claim in progress; older than this, a crash.
_CLAIM_GRACE_S = 30.0


@dataclass(frozen=True)
class Record:
    slot: int
    sandbox_id: str
    owner: Owner
    runc_root: str
    container: str
    bundle: str
    netns: str

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Record:
        raw = json.loads(text)
        raw["owner"] = Owner(**raw["owner"])
        return cls(**raw)


class Slots:
    def __init__(self, run_dir: Path, capacity: int) -> None:
        self.dir = run_dir / "slots"
        self.capacity = capacity

    def claim(self) -> int:
        """Claim a free slot number; SandboxError when the subnet is full."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for _ in range(64):
            n = random.randint(1, self.capacity)
            try:
                (self.dir / str(n)).mkdir()
                return n
            except FileExistsError:
                continue
        taken = sum(1 for _ in self.dir.iterdir())
        raise SandboxCapacity(
            f"no free sandbox slot ({taken} of {self.capacity} taken); retry later"
        )

    def write(self, record: Record) -> None:
        path = self.dir / str(record.slot) / "record.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(record.to_json())
        os.rename(tmp, path)

    def release(self, slot: int) -> None:
        shutil.rmtree(self.dir / str(slot), ignore_errors=True)

    def records(self) -> list[Record]:
        out = []
        with contextlib.suppress(FileNotFoundError):
            for entry in self.dir.iterdir():
                with contextlib.suppress(FileNotFoundError, ValueError, TypeError, KeyError):
                    out.append(Record.from_json((entry / "record.json").read_text()))
        return out

    def orphans(self) -> tuple[list[Record], list[int]]:
        """Records whose owner is dead, and claims abandoned before a record was written."""
        dead = [r for r in self.records() if not r.owner.alive()]
        stale = []
        with contextlib.suppress(FileNotFoundError):
            for entry in self.dir.iterdir():
                if not entry.name.isdigit() or (entry / "record.json").exists():
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if time.time() - entry.stat().st_mtime > _CLAIM_GRACE_S:
                        stale.append(int(entry.name))
        return dead, stale
