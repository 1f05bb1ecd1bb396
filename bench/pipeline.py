"""The pipeline under load: runs started per second, and trigger-to-first-instruction latency.

Many callers (threads) call ``execute_agent`` at once, the way HTTP requests, cron ticks and
agents would; workers lease the runs from the store and execute each in a real sandbox. The
agent's first instruction records the time (host and sandbox share one clock), so the
latency is everything between the trigger and the user's code: admission, the queue, the
lease, the sandbox boot, the runner. Measured on SQLite and on PostgreSQL in the same run;
the floor is ``bench/boot.py``'s sandbox boot, the part no queue can remove.
"""

from __future__ import annotations

import json
import os
import secrets
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import discard
from corral.config import Settings
from corral.context import Corral
from corral.pipeline.apps import AppSpec
from corral.pipeline.service import Trigger

# (callers, runs): fewer callers than workers shows the pipeline's own latency; more shows it
# under load, where queueing for a worker dominates.
LOADS = [(2, 16), (16, 48)]
if os.environ.get("BENCH_CALLERS"):
    LOADS = [(int(os.environ["BENCH_CALLERS"]), int(os.environ.get("BENCH_RUNS", "64")))]
WORKERS = int(os.environ.get("BENCH_WORKERS", "4"))
PG = os.environ.get("CORRAL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
AGENT = "import time\ndef main(input):\n    return {'first': time.time()}\n"


def measure(label: str, database_url: str | None) -> None:
    for callers, runs in LOADS:
        measure_once(label, database_url, callers, runs)


def measure_once(label: str, database_url: str | None, callers: int, runs: int) -> None:
    import tempfile

    data = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    environ = {
        **os.environ,
        "CORRAL_DATA_DIR": str(data),
        "CORRAL_BRIDGE_PORT": str(8800 + secrets.randbelow(80)),
    }
    if database_url:
        environ["CORRAL_DATABASE_URL"] = database_url
    corral = Corral(Settings.from_env(environ))
    try:
        corral.envs.create("bench")
        corral.envs.exec(
            "bench",
            ("sh", "-c", f'printf "{AGENT}" > /home/user/agent.py'),
            stdout=subprocess.DEVNULL,
        )
        corral.envs.freeze("bench")
        corral.pipeline.apps.create("bench", AppSpec("bench", "agent.py:main"))
        corral.ledger.grant("bench", 1e9)
        corral.start_workers(WORKERS)
        warm = corral.pipeline.execute_agent(
            "bench", {}, Trigger("http"), user="bench", wait=True, wait_timeout=120
        )
        assert warm.status == "succeeded", warm.error  # swap and fold-in happen here, once

        latencies: list[float] = []
        lock = threading.Lock()
        per_caller = runs // callers

        def caller() -> None:
            for _ in range(per_caller):
                sent = time.time()
                run = corral.pipeline.execute_agent(
                    "bench", {}, Trigger("http"), user="bench", wait=True, wait_timeout=300
                )
                assert run.status == "succeeded", (run.error_code, run.error)
                first = json.loads(run.result or "{}")["first"]
                with lock:
                    latencies.append(first - sent)

        began = time.perf_counter()
        threads = [threading.Thread(target=caller) for _ in range(callers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - began
        ordered = sorted(latencies)
        p50 = statistics.median(ordered) * 1000
        p99 = ordered[max(0, int(len(ordered) * 0.99) - 1)] * 1000
        print(
            f"pipeline[{label}]: {len(ordered)} runs, {callers} callers, {WORKERS} workers: "
            f"{len(ordered) / elapsed:5.1f} runs started/s; trigger -> first instruction "
            f"p50 {p50:6.0f} ms, p99 {p99:6.0f} ms"
        )
    finally:
        corral.close()
        discard(data)


def main() -> None:
    measure("sqlite", None)
    name = f"corral_bench_{secrets.token_hex(4)}"
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        measure("postgresql", PG.rsplit("/", 1)[0] + f"/{name}")
    finally:
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
