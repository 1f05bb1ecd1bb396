"""The analyst's agent: lives in the frozen environment, runs in every sandbox.

It fetches prices through the bridge (the sandbox holds only its run token; the bridge adds
the market-data API key host-side), charts them with the frozen matplotlib, and returns a
summary. Nothing it does can reach the key or any other service.
"""

import io
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from corral_runner import sdk  # noqa: E402


def main(input):
    ticker = input.get("ticker", "ACME")
    response = sdk.request("market", "GET", f"/v1/prices/{ticker}?days=30")
    if not response.ok:
        raise RuntimeError(f"market data refused: {response.status} {response.body[:200]!r}")
    closes = response.json()["closes"]
    sdk.log("fetched prices", ticker=ticker, days=len(closes))
    sdk.progress(0.5, "charting")
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(closes, marker="o")
    ax.set_title(f"{ticker}: last {len(closes)} closes")
    png = io.BytesIO()
    fig.savefig(png, format="png")
    change = (closes[-1] - closes[0]) / closes[0] * 100
    return {
        "ticker": ticker,
        "days": len(closes),
        "mean": round(statistics.mean(closes), 2),
        "change_pct": round(change, 2),
        "chart_png_bytes": len(png.getvalue()),
        "matplotlib": matplotlib.__version__,
    }
