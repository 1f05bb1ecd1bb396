"""Amounts of credits: exact integers of micro-credits, and the one parser every door uses.

The ledger stores every amount as an integer number of micro-credits (one credit is
1,000,000 micros): sums are exact on SQLite and PostgreSQL alike, and no value can be NaN or
infinite (see ``docs/design/ledger.md``). Whatever the door (the CLI's text, a JSON number
over HTTP, a Python ``float`` or ``Decimal`` from code), an amount becomes micros through
``to_micros``, which refuses what is not finite, has more than six decimal places, or is
beyond ``MAX_CREDITS``, naming the value. ``credits`` turns micros back into an exact
``Decimal``; ``shown`` prints one.
"""

from __future__ import annotations

import math
from decimal import Decimal, InvalidOperation

from corral.errors import InvalidInput
from corral.store.schema import LEDGER_MAX_MICROS

MICROS = 1_000_000  # micro-credits in one credit: amounts are exact to 0.000001 credits
PLACES = 6
# The largest amount one entry may carry, and the largest balance a grant may make. Every
# balance then stays below 2**53 micros, so it is exact even as a JSON number (an IEEE double)
# and no sum of entries can overflow a 64-bit integer.
MAX_MICROS = LEDGER_MAX_MICROS
MAX_CREDITS = MAX_MICROS // MICROS  # a billion

Amount = Decimal | int | float | str


def to_micros(value: Amount, what: str = "credits") -> int:
    """``value`` credits as exact micro-credits, or ``InvalidInput`` naming ``what`` and why.

    Only the sign is left to the caller: a grant must be positive, a correction non-zero.
    """
    if isinstance(value, bool) or not isinstance(value, Decimal | int | float | str):
        raise InvalidInput(f"{what} must be a number of credits, not {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidInput(f"{what} must be a finite number, not {value!r}")
    try:
        # A float goes through its shortest repr: 0.1 is the 0.1 the client wrote, not
        # 0.1000000000000000055...
        exact = Decimal(repr(value) if isinstance(value, float) else str(value).strip())
    except InvalidOperation:
        raise InvalidInput(f"{what} must be a number, not {value!r}") from None
    if not exact.is_finite():
        raise InvalidInput(f"{what} must be a finite number, not {value!r}")
    if abs(exact) > MAX_CREDITS:
        raise InvalidInput(f"{what} must be at most {MAX_CREDITS} in size, not {value!r}")
    micros = exact * MICROS
    if micros != micros.to_integral_value():
        raise InvalidInput(
            f"{what} has more than {PLACES} decimal places ({value!r}); "
            f"the ledger counts in millionths of a credit"
        )
    return int(micros)


def positive_micros(value: Amount, what: str = "credits") -> int:
    """``to_micros`` for an amount that must be more than zero (a grant)."""
    micros = to_micros(value, what)
    if micros <= 0:
        raise InvalidInput(f"{what} must be more than zero, not {value!r}")
    return micros


def credits(micros: int) -> Decimal:
    """Micro-credits as exact credits: 12500000 -> Decimal('12.5')."""
    return (Decimal(micros) / MICROS).normalize() if micros else Decimal(0)


def shown(micros: int) -> str:
    """Micro-credits as text for people: 12500000 -> '12.5', 3 -> '0.000003'."""
    return format(credits(micros), "f")


def as_number(micros: int) -> float:
    """Micro-credits as a JSON number; exact, since every amount is below 2**53 micros."""
    return float(credits(micros))
