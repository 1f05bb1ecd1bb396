"""A local market-data JSON service for tests and ``make demo``: daily closes per ticker.

``GET /v1/prices/{ticker}?days=N`` answers N (default 30, at most 365) weekday closes that
depend only on the ticker (a CRC32 seed, a drift and two sine waves), so every run and every
machine sees the same numbers. With an API key the service demands ``X-Api-Key: KEY`` and
answers 401 otherwise; without one it is open. ``GET /healthz`` never needs the key.

Run standalone with ``python -m tests.fakes.market`` (see that module).
"""

from __future__ import annotations

import datetime as dt
import math
import re
import zlib
from typing import Any

from tests.fakes.base import FakeService, RecordedRequest, Response

TICKER = re.compile(r"^[A-Z][A-Z0-9.\-]{0,9}$")
FIRST_DAY = dt.date(2024, 1, 2)  # the first trading day the series starts from


def trading_days(count: int, start: dt.date = FIRST_DAY) -> list[dt.date]:
    """The first ``count`` weekdays from ``start`` on."""
    days: list[dt.date] = []
    day = start
    while len(days) < count:
        if day.weekday() < 5:
            days.append(day)
        day += dt.timedelta(days=1)
    return days


def closes(ticker: str, count: int = 30) -> list[float]:
    """The deterministic daily closes of ``ticker`` (rounded to cents)."""
    seed = zlib.crc32(ticker.upper().encode())
    base = 20 + seed % 480  # 20..499
    drift = ((seed >> 9) % 41 - 20) / 10_000  # -0.20% .. +0.20% a day
    phase = (seed >> 17) % 628 / 100
    return [
        round(
            base
            * (1 + drift) ** i
            * (1 + 0.03 * math.sin(i / 3 + phase) + 0.01 * math.sin(i * 1.7)),
            2,
        )
        for i in range(count)
    ]


class FakeMarketData(FakeService):
    """``GET /v1/prices/{ticker}`` and ``GET /healthz``.

    ``FakeMarketData(api_key=None, *, host, port, delay)``: with ``api_key`` the service
    demands ``X-Api-Key: <api_key>``.
    """

    server_name = "fake-market-data"

    def __init__(
        self,
        api_key: str | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        delay: float = 0.0,
    ) -> None:
        super().__init__(host, port, delay=delay)
        self.api_key = api_key
        if api_key is not None:
            self.expect_auth("X-Api-Key", api_key)
        self.add_route("GET", "/v1/prices/{ticker}", self.prices)
        self.add_route("GET", "/healthz", self.health, auth=False)

    def auth_error(self, request: RecordedRequest) -> Response:
        message = "invalid API key" if "x-api-key" in request.headers else "missing API key"
        return Response.json({"error": {"code": "unauthorized", "message": message}}, 401)

    def not_found(self, request: RecordedRequest) -> Response:
        return Response.json({"error": {"code": "not_found", "message": request.path}}, 404)

    def bad_request(self, message: str) -> Response:
        return Response.json({"error": {"code": "bad_request", "message": message}}, 400)

    def health(self, request: RecordedRequest) -> Response:
        return Response.json({"status": "ok"})

    def prices(self, request: RecordedRequest, ticker: str) -> Response:
        symbol = ticker.upper()
        if not TICKER.match(symbol):
            return Response.json(
                {"error": {"code": "unknown_ticker", "message": f"unknown ticker {ticker!r}"}}, 404
            )
        raw_days = request.query_value("days", "30") or "30"
        if not raw_days.isdigit() or not 1 <= int(raw_days) <= 365:
            return self.bad_request("days must be an integer from 1 to 365")
        count = int(raw_days)
        dates = trading_days(count)
        values = closes(symbol, count)
        payload: dict[str, Any] = {
            "ticker": symbol,
            "currency": "USD",
            "interval": "1d",
            "start": dates[0].isoformat(),
            "end": dates[-1].isoformat(),
            "dates": [d.isoformat() for d in dates],
            "closes": values,
        }
        return Response.json(payload)
