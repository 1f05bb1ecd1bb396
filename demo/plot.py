"""The analyst's charting script: lives in the frozen environment, runs in every sandbox."""

import io
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PRICES = {"ACME": [101.2, 102.8, 101.9, 104.4, 106.1, 105.3, 107.8, 109.0]}

for ticker, closes in PRICES.items():
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(closes, marker="o")
    ax.set_title(f"{ticker} closing prices")
    png = io.BytesIO()
    fig.savefig(png, format="png")
    change = (closes[-1] - closes[0]) / closes[0] * 100
    print(
        f"{ticker}: {len(closes)} closes, mean {statistics.mean(closes):.2f}, "
        f"change {change:+.1f}%, chart {len(png.getvalue())} bytes of PNG "
        f"(matplotlib {matplotlib.__version__})"
    )
