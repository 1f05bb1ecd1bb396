"""Runner hot swap: how long the swap takes, and what fold-in saves on the next run.

The swap (staged, validated by the sandbox's interpreter, swapped, bytecode purged, locked) is
timed inside ``corral.sandbox.hotswap.swap`` and reported on its ``swap.locked`` event. Runs
that boot the pre-fold snapshot swap every time; runs that boot the folded head never do.
Target: a median swap of at most 30 ms (the CREAO article reports about 300 ms).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import discard, private_corral
from corral.pipeline.apps import AdHoc

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 20
AGENT = 'def main(input):\n    return {"ok": True}\n'


def main() -> None:
    corral, data = private_corral()
    try:
        env = "bench-swap"
        corral.envs.create(env)
        corral.envs.exec(
            env, ("sh", "-c", f"printf '{AGENT}' > /home/user/agent.py"), stdout=subprocess.DEVNULL
        )
        before = corral.envs.freeze(env).digest
        first = corral.run_here(AdHoc(env, "agent.py:main"), None, user="local")
        assert first.status == "succeeded" and first.folded_snapshot, first.error

        swaps, with_swap, without = [], [], []
        for _ in range(RUNS):
            t = time.perf_counter()
            swapped = corral.run_here(
                AdHoc(env, "agent.py:main", snapshot=before), None, user="local"
            )
            with_swap.append(time.perf_counter() - t)
            assert swapped.swapped and swapped.status == "succeeded"
            locked = [e for e in corral.store.runs.events(swapped.id) if e.kind == "swap.locked"]
            swaps.append(json.loads(locked[0].data)["seconds"])
            t = time.perf_counter()
            folded = corral.run_here(AdHoc(env, "agent.py:main"), None, user="local")
            without.append(time.perf_counter() - t)
            assert not folded.swapped and folded.status == "succeeded"

        swap = statistics.median(swaps) * 1000
        a, b = statistics.median(with_swap) * 1000, statistics.median(without) * 1000
        print(f"hotswap: {RUNS} runs each")
        print(
            f"  swap (stage, validate, swap, purge, lock)  median {swap:6.1f} ms  "
            f"max {max(swaps) * 1000:6.1f} ms  (target <= 30 ms) {'OK' if swap <= 30 else 'MISS'}"
        )
        print(f"  agent run, snapshot needing a swap          median {a:6.1f} ms")
        print(f"  agent run, after fold-in (no swap)          median {b:6.1f} ms")
        print(f"  saved per run by fold-in                    {a - b:6.1f} ms ({(a - b) / a:.0%})")
    finally:
        corral.close()
        discard(data)


if __name__ == "__main__":
    main()
