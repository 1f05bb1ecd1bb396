"""Serve the fake market-data service from the command line (``make demo`` uses it).

``python -m tests.fakes.market --port 0 --key KEY`` prints the service's URL as the first line
of stdout and serves until it is killed (SIGTERM or SIGINT), then exits 0. Without ``--key``
the service is open. Run it from the repository root so that ``tests`` is importable.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Sequence

from tests.fakes.market_data import FakeMarketData


def main(argv: Sequence[str] | None = None) -> int:
    """Serve ``FakeMarketData`` until SIGTERM/SIGINT; the URL is stdout's first line."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.fakes.market", description="Serve the fake market-data service."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--key", default=None, help="demand X-Api-Key: KEY (default: open)")
    args = parser.parse_args(argv)

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(0)

    # SIGINT too: a shell without job control starts background jobs with SIGINT ignored.
    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, terminate)
    fake = FakeMarketData(args.key, host=args.host, port=args.port).start()
    try:
        print(fake.url, flush=True)
        while True:
            time.sleep(3600)
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
