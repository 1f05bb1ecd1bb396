"""Billing: turning a run's usage into ledger deductions, exactly once.

Usage is what the host observed, never what the sandbox claims: model tokens the bridge read
from provider responses, calls the bridge forwarded, and seconds the sandbox ran. Each usage
event becomes at most one ledger entry, keyed by the event (``usage:<id>``), so billing a run
twice, or from two workers, deducts once. Balances are sums over the append-only ledger.

Every amount is an integer of micro-credits (``amounts.py``; why: ``docs/design/ledger.md``),
so balances, costs and budgets compare exactly. An amount from outside (a grant, an
operator's correction) is checked here whatever door it came through: it must be finite,
have at most six decimal places and fit the ledger's bound; a grant must be positive, a
correction non-zero and say why. A mistaken entry is never edited or deleted: an
``adjustment`` of either sign corrects it, and both stay in the history.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal

from corral.billing.amounts import MAX_MICROS, MICROS, credits, positive_micros, to_micros
from corral.errors import InvalidInput
from corral.store import BridgeCall, LedgerEntry, Store, UsageEvent
from corral.store.rows import check_user


@dataclass(frozen=True)
class Prices:
    """Credits per unit. One credit is an operator's choice (say, a cent)."""

    input_token: Decimal = Decimal("0.001")
    output_token: Decimal = Decimal("0.003")
    sandbox_second: Decimal = Decimal("0.01")
    bridge_call: Decimal = Decimal("0.0005")

    def __post_init__(self) -> None:
        for name in ("input_token", "output_token", "sandbox_second", "bridge_call"):
            value = Decimal(str(getattr(self, name)))
            if not value.is_finite() or value < 0:
                raise InvalidInput(f"the price per {name} must be a finite number >= 0")
            object.__setattr__(self, name, value)


def micros_of(amount: Decimal) -> int:
    """Credits (a priced quantity, maybe finer than a micro-credit) as whole micro-credits,
    capped at what one ledger entry may carry: a usage event that large is already far past
    any balance, and billing must still post it."""
    if not amount.is_finite() or amount <= 0:  # usage the host measured: never a credit
        return 0
    exact = (amount * MICROS).to_integral_value(ROUND_HALF_UP)
    return int(min(exact, Decimal(MAX_MICROS)))


class Ledger:
    def __init__(self, store: Store, prices: Prices | None = None) -> None:
        self.store = store
        self.prices = prices or Prices()

    def grant(self, user: str, amount: Decimal | int | float | str, note: str = "") -> int:
        """Add ``amount`` credits to ``user``'s balance; returns the micro-credits posted."""
        check_user(user)
        micros = positive_micros(amount, "a grant")
        self._post(user, "grant", micros, note or None)
        return micros

    def adjust(self, user: str, amount: Decimal | int | float | str, note: str) -> int:
        """Correct ``user``'s balance by ``amount`` credits, either sign (a mistaken grant is
        undone by its negative); ``note`` says why and is kept. Returns the micros posted."""
        check_user(user)
        micros = to_micros(amount, "a correction")
        if micros == 0:
            raise InvalidInput(f"a correction must not be zero, not {amount!r}")
        if not note or not note.strip():
            raise InvalidInput("a correction needs a note saying why (--note)")
        self._post(user, "adjustment", micros, note.strip())
        return micros

    def balance(self, user: str) -> Decimal:
        """Grants and corrections minus deductions, exactly."""
        return credits(self.store.ledger.balance(user))

    def cost(self, run: str) -> Decimal:
        """What ``run`` has used so far, billed or not (for budget checks while it runs)."""
        total = sum((self._price(usage) for usage in self.store.usage.events(run)), Decimal(0))
        return total + len(self._billable_calls(run)) * self.prices.bridge_call

    def price(
        self, input_tokens: int, output_tokens: int, sandbox_seconds: float, bridge_calls: int
    ) -> Decimal:
        """What usage totals cost: ``cost`` for totals summed elsewhere (a call tree's)."""
        p = self.prices
        seconds = Decimal(repr(float(sandbox_seconds)))  # as measured, not its binary double
        return (
            input_tokens * p.input_token
            + output_tokens * p.output_token
            + seconds * p.sandbox_second
            + bridge_calls * p.bridge_call
        )

    def bill(self, run: str, user: str, app: str | None) -> Decimal:
        """Post a deduction for every usage event of ``run`` not yet billed; returns credits."""
        now = datetime.now(UTC)
        entries = []
        for usage in self.store.usage.events(run):
            entries.append(
                LedgerEntry(
                    user=user,
                    run=run,
                    app=app,
                    source=f"usage:{usage.id}",
                    kind="deduction",
                    micros=-micros_of(self._price(usage)),
                    detail=json.dumps({"usage": usage.kind, "connection": usage.connection}),
                    at=now,
                )
            )
        for call in self._billable_calls(run):
            entries.append(
                LedgerEntry(
                    user=user,
                    run=run,
                    app=app,
                    source=f"call:{call.id}",
                    kind="deduction",
                    micros=-micros_of(self.prices.bridge_call),
                    detail=json.dumps({"usage": "bridge_call", "connection": call.connection}),
                    at=now,
                )
            )
        self.store.ledger.post(entries)
        return credits(self.store.ledger.spent(run=run))

    def _post(self, user: str, kind: str, micros: int, note: str | None) -> None:
        self.store.ledger.post(
            [
                LedgerEntry(
                    user=user,
                    run=None,
                    app=None,
                    source=f"{kind}:{secrets.token_hex(8)}",
                    kind=kind,
                    micros=micros,
                    detail=note,
                    at=datetime.now(UTC),
                )
            ]
        )

    def _billable_calls(self, run: str) -> list[BridgeCall]:
        """Calls the bridge forwarded for the run; its own endpoints and refusals are free."""
        return [
            c
            for c in self.store.usage.calls(run)
            if c.connection not in ("_corral", None) and not c.error
        ]

    def _price(self, usage: UsageEvent) -> Decimal:
        kind = usage.kind
        if kind == "model_tokens":
            tokens_in, tokens_out = int(usage.input_tokens), int(usage.output_tokens)
            return tokens_in * self.prices.input_token + tokens_out * self.prices.output_token
        if kind == "sandbox_seconds":
            # The stored quantity is a float of seconds; its repr is what was measured.
            return Decimal(repr(float(usage.quantity))) * self.prices.sandbox_second
        return Decimal(0)
