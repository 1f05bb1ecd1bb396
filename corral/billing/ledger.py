"""Billing: turning a run's usage into ledger deductions, exactly once.

Usage is what the host observed, never what the sandbox claims: model tokens the bridge read
from provider responses, calls the bridge forwarded, and seconds the sandbox ran. Each usage
event becomes at most one ledger entry, keyed by the event (``usage:<id>``), so billing a run
twice, or from two workers, deducts once. Balances are sums over the append-only ledger.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from corral.errors import Conflict
from corral.store import Store


class BudgetExhausted(Conflict):
    code = "budget_exhausted"


@dataclass(frozen=True)
class Prices:
    """Credits per unit. One credit is an operator's choice (say, a cent)."""

    input_token: float = 0.001
    output_token: float = 0.003
    sandbox_second: float = 0.01
    bridge_call: float = 0.0005


class Ledger:
    def __init__(self, store: Store, prices: Prices | None = None) -> None:
        self.store = store
        self.prices = prices or Prices()

    def grant(self, user: str, credits: float, note: str = "") -> None:
        self.store.pipeline.post([{
            "user": user, "run": None, "app": None, "source": f"grant:{secrets.token_hex(8)}",
            "kind": "grant", "credits": float(credits), "detail": note or None,
            "at": datetime.now(UTC),
        }])  # fmt: skip

    def balance(self, user: str) -> float:
        return self.store.pipeline.balance(user)

    def cost(self, run: str) -> float:
        """What ``run`` has used so far, billed or not (for budget checks while it runs)."""
        total = 0.0
        for usage in self.store.bridge.usage(run):
            total += self._price(usage)
        return total + len(self._billable_calls(run)) * self.prices.bridge_call

    def price(
        self, input_tokens: int, output_tokens: int, sandbox_seconds: float, bridge_calls: int
    ) -> float:
        """What usage totals cost: ``cost`` for totals summed elsewhere (a call tree's)."""
        p = self.prices
        return (input_tokens * p.input_token + output_tokens * p.output_token
                + sandbox_seconds * p.sandbox_second + bridge_calls * p.bridge_call)  # fmt: skip

    def bill(self, run: str, user: str, app: str | None) -> float:
        """Post a deduction for every usage event of ``run`` not yet billed; returns credits."""
        now = datetime.now(UTC)
        entries = []
        for usage in self.store.bridge.usage(run):
            entries.append({
                "user": user, "run": run, "app": app, "source": f"usage:{usage['id']}",
                "kind": "deduction", "credits": -self._price(usage),
                "detail": json.dumps({"usage": usage["kind"], "connection": usage["connection"]}),
                "at": now,
            })  # fmt: skip
        for call in self._billable_calls(run):
            entries.append({
                "user": user, "run": run, "app": app, "source": f"call:{call['id']}",
                "kind": "deduction", "credits": -self.prices.bridge_call,
                "detail": json.dumps({"usage": "bridge_call", "connection": call["connection"]}),
                "at": now,
            })  # fmt: skip
        self.store.pipeline.post(entries)
        return self.store.pipeline.spent(run=run)

    def _billable_calls(self, run: str) -> list[dict[str, object]]:
        """Calls the bridge forwarded for the run; its own endpoints and refusals are free."""
        return [c for c in self.store.bridge.calls(run)
                if c["connection"] not in ("_corral", None) and not c["error"]]  # fmt: skip

    def _price(self, usage: dict[str, object]) -> float:
        kind = usage["kind"]
        if kind == "model_tokens":
            tokens_in, tokens_out = str(usage["input_tokens"]), str(usage["output_tokens"])
            return (int(tokens_in) * self.prices.input_token
                    + int(tokens_out) * self.prices.output_token)  # fmt: skip
        if kind == "sandbox_seconds":
            return float(str(usage["quantity"])) * self.prices.sandbox_second
        return 0.0
