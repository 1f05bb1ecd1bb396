"""Shared set-up for the benchmarks: a Corral on a private data directory, and statistics."""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
from pathlib import Path

from corral.config import Settings
from corral.context import Corral
from corral.snapshots.fsattr import unlock_layer_caches


def private_corral() -> tuple[Corral, Path]:
    data = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    return Corral(Settings.from_env({**os.environ, "CORRAL_DATA_DIR": str(data)})), data


def discard(data: Path) -> None:
    unlock_layer_caches(data)
    shutil.rmtree(data, ignore_errors=True)


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": statistics.median(ordered) * 1000,
        "p90_ms": ordered[int(len(ordered) * 0.9) - 1] * 1000,
        "min_ms": ordered[0] * 1000,
    }
