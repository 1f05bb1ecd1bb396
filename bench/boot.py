"""Boot time: snapshot -> sandbox -> the command's first instruction -> exit -> torn down.

Measured against the floor, ``runc run /bin/true`` from a plain bundle (``runc spec``, the
base layer as its root), in the same run, interleaved so that both see the same machine.
Target: Corral's median at most 2.0x the floor.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import discard, private_corral, summary
from corral.sandbox.runtime import SandboxRequest

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 60


def plain_bundle(rootfs: Path, where: Path) -> Path:
    bundle = where / "plain-bundle"
    bundle.mkdir()
    subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True)
    config = json.loads((bundle / "config.json").read_text())
    config["root"] = {"path": str(rootfs), "readonly": True}
    config["process"]["args"] = ["/bin/true"]
    config["process"]["terminal"] = False
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


def main() -> None:
    corral, data = private_corral()
    try:
        env = "bench-boot"
        corral.envs.create(env)
        corral.envs.exec(
            env, ("sh", "-c", "echo 'print(42)' > /home/user/plot.py"), stdout=subprocess.DEVNULL
        )
        corral.envs.freeze(env)
        image = corral.envs.images.load(corral.envs.get(env).head)
        layers = tuple(corral.envs.images.unpacked(image))
        sandboxes = corral.sandboxes()
        bundle = plain_bundle(layers[-1], data)
        runc_root = data / "runc-floor"
        request = SandboxRequest(
            layers=layers, argv=("/bin/true",), env=(("PATH", "/usr/bin:/bin"),)
        )

        floor, ours = [], []
        for i in range(RUNS + 3):
            t = time.perf_counter()
            subprocess.run(
                ["runc", "--root", str(runc_root), "run", "--bundle", str(bundle), f"floor-{i}"],
                check=True,
                stdin=subprocess.DEVNULL,
            )
            floor_s = time.perf_counter() - t
            t = time.perf_counter()
            result = sandboxes.run(request, stdin=subprocess.DEVNULL)
            ours_s = time.perf_counter() - t
            assert result.exit_code == 0
            if i >= 3:  # warm-up: page cache, first nft/ip calls
                floor.append(floor_s)
                ours.append(ours_s)

        f, o = summary(floor), summary(ours)
        ratio = o["median_ms"] / f["median_ms"]
        print(f"boot: {RUNS} runs each, interleaved")
        print(
            f"  floor  runc run /bin/true (plain bundle)  median {f['median_ms']:6.1f} ms  "
            f"p90 {f['p90_ms']:6.1f} ms"
        )
        print(
            f"  corral snapshot -> /bin/true -> teardown   median {o['median_ms']:6.1f} ms  "
            f"p90 {o['p90_ms']:6.1f} ms"
        )
        print(
            f"  ratio  {ratio:.2f}x the floor (target <= 2.00x) {'OK' if ratio <= 2.0 else 'MISS'}"
        )
    finally:
        corral.close()
        discard(data)


if __name__ == "__main__":
    main()
