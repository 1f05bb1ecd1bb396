"""Freeze cost: a one-file edit on an environment of at least 300 MB.

The peer, measured in the same run, is what a freeze would cost if it re-read the environment:
hashing every layer blob once (the least any whole-environment snapshot must do). Freezing is
proportional to the change, so the ratio should be tiny.
"""

from __future__ import annotations

import hashlib
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import discard, private_corral

ROUNDS = 10


def main() -> None:
    corral, data = private_corral()
    try:
        env = "bench-freeze"
        envs = corral.envs
        envs.create(env)
        # Grow the environment past 300 MB: 128 MB of incompressible data over the ~200 MB base.
        envs.exec(
            env,
            ("sh", "-c", "head -c 134217728 /dev/urandom > /home/user/data.bin"),
            stdout=subprocess.DEVNULL,
        )
        envs.freeze(env)
        size = envs.images.load(envs.get(env).head).size
        assert size >= 300 * 1024 * 1024, size

        freezes = []
        for i in range(ROUNDS):
            envs.exec(
                env,
                ("sh", "-c", f"echo 'print({i})' > /home/user/plot.py"),
                stdout=subprocess.DEVNULL,
            )
            t = time.perf_counter()
            envs.freeze(env)
            freezes.append(time.perf_counter() - t)

        image = envs.images.load(envs.get(env).head)
        t = time.perf_counter()
        for layer in image.layers:
            h = hashlib.sha256()
            with open(envs.layout.blob_path(layer.digest), "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        rehash = time.perf_counter() - t

        median = statistics.median(freezes)
        print(
            f"freeze: one-file edit on a {image.size / 2**20:.0f} MiB environment, {ROUNDS} rounds"
        )
        print(f"  corral freeze             median {median * 1000:8.1f} ms")
        print(f"  peer: re-hash all layers         {rehash * 1000:8.1f} ms")
        print(f"  ratio {median / rehash:.3f}x the peer (proportional to the change, not the env)")
    finally:
        corral.close()
        discard(data)


if __name__ == "__main__":
    main()
