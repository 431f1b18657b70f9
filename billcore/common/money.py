"""Money: integer micro-units, strict strings, exact prices, one rounding rule.

Theory of operation
-------------------
An amount is a Python ``int`` of micro-units: ``1`` is 10⁻⁶ of the currency,
``12_340_000`` is "12.34".  Amounts live in BIGINT columns, so every amount
that leaves this package is checked against ``MAX_AMOUNT`` (10¹⁸ − 1, i.e.
999 999 999 999.999999 currency units — far inside a signed 64-bit integer,
and far above any real balance).

Strings are parsed strictly: ASCII digits, an optional leading ``-``, at most
six decimals, no exponent, no spaces, no ``+``, no thousands separators, and
never a ``float`` (``parse_money(0.1)`` raises; the float has already lost the
cent).  ``format_money`` is the inverse: ``parse_money(format_money(x)) == x``
for every amount within range.

``format_money`` is also THE way an amount is shown to a person — billctl,
the tray, the web office, error messages, import summaries: two decimals by
default, and the currency's own precision (down to the micro-unit) only
where the amount has it, so a display never rounds and never disagrees with
the ledger.  It formats any ``int`` however large (a sum of many balances
may pass ``MAX_AMOUNT``; a display must not fail on it), and takes an
optional thousands separator for pages meant for reading.

A price is a ratio of integers: ``Price(micro_per_unit, unit_size)`` charges
``micro_per_unit`` micro-units for every ``unit_size`` base units (bytes for
traffic, seconds for time).  "0.50 per GB" is ``Price(500_000, GB)``.  The
cost of a quantity is ``floor(quantity × micro_per_unit / unit_size)``, exact
in integers.

``floor_div`` is THE rounding function of billcore: every place that turns an
exact ratio into micro-units calls it, and it always rounds toward −∞.  Rating
and proration apply it to *cumulative* quantities only and charge differences
of floored cumulative values, so rounding never drifts with batching.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from billcore.common.errors import MoneyFormatError, MoneyRangeError, TariffError

__all__ = [
    "GB",
    "GIB",
    "HOUR",
    "KB",
    "MAX_AMOUNT",
    "MAX_QUANTITY",
    "MB",
    "MIB",
    "MICRO",
    "DISPLAY_DECIMALS",
    "Price",
    "check_amount",
    "floor_div",
    "format_money",
    "parse_money",
]

MICRO: Final = 1_000_000
"""Micro-units per currency unit."""

MAX_AMOUNT: Final = 10**18 - 1
"""Largest absolute amount in micro-units (999 999 999 999.999999); < 2⁶³."""

MAX_QUANTITY: Final = 2**63 - 1
"""Largest quantity (bytes or seconds) a counter may hold: a BIGINT."""

KB: Final = 1_000
MB: Final = 1_000_000
GB: Final = 1_000_000_000
MIB: Final = 1 << 20
GIB: Final = 1 << 30
HOUR: Final = 3_600

_DECIMALS: Final = 6
DISPLAY_DECIMALS: Final = 2
"""Decimals every displayed amount shows at least (the currency's minor unit)."""
_MAX_INTEGER_DIGITS: Final = 12  # 10¹² − 1 units is the largest whole part below MAX_AMOUNT
_MONEY_RE: Final = re.compile(r"(-?)(0|[1-9][0-9]{0,11})(?:\.([0-9]{1,6}))?", re.ASCII)


def floor_div(numerator: int, denominator: int) -> int:
    """Round ``numerator / denominator`` toward −∞: the one rounding rule of billcore."""
    if type(numerator) is not int or type(denominator) is not int:
        raise TypeError("floor_div takes ints only")
    if denominator <= 0:
        raise ValueError("floor_div needs a positive denominator")
    return numerator // denominator


def check_amount(amount: int) -> int:
    """Return ``amount`` if it is an int micro-unit amount within ±``MAX_AMOUNT``."""
    if type(amount) is not int:  # rejects bool and float alike
        raise MoneyFormatError(f"amount must be int micro-units, got {type(amount).__name__}")
    if not -MAX_AMOUNT <= amount <= MAX_AMOUNT:
        raise MoneyRangeError(f"amount {format_money(amount)} is outside ±{format_money(MAX_AMOUNT)}")
    return amount


def parse_money(text: str) -> int:
    """Parse a strict decimal string ("12.34", "-0.000001") into micro-units."""
    if type(text) is not str:
        raise MoneyFormatError(f"money must be given as a string, got {type(text).__name__}")
    match = _MONEY_RE.fullmatch(text)
    if match is None:
        raise MoneyFormatError(
            f"not a money string (digits, optional '-', at most {_DECIMALS} decimals, "
            f"at most {_MAX_INTEGER_DIGITS} integer digits): {text[:40]!r}"
        )
    sign, whole, frac = match.group(1), match.group(2), match.group(3) or ""
    micro = int(whole) * MICRO + int(frac.ljust(_DECIMALS, "0"))
    return check_amount(-micro if sign else micro)


def format_money(amount: int, *, min_decimals: int = DISPLAY_DECIMALS, group: str = "") -> str:
    """Micro-units as a person reads them: ``12_500_000`` → ``"12.50"``, ``1`` → ``"0.000001"``.

    At least ``min_decimals`` decimals, more only when the amount has them
    (exact: nothing is rounded away).  ``group`` separates thousands of the
    whole part (the office uses a narrow no-break space).  Any int is
    formatted, whatever its size; only a non-int (a float, a bool) raises.
    """
    if type(amount) is not int:
        raise MoneyFormatError(f"amount must be int micro-units, got {type(amount).__name__}")
    if not 0 <= min_decimals <= _DECIMALS:
        raise ValueError(f"min_decimals must be within 0..{_DECIMALS}")
    whole, frac = divmod(abs(amount), MICRO)
    digits = f"{frac:06d}".rstrip("0").ljust(min_decimals, "0")
    sign = "-" if amount < 0 else ""
    units = _decimal_digits(whole)
    if group:
        head = len(units) % 3 or 3
        units = group.join([units[:head], *(units[i:i + 3] for i in range(head, len(units), 3))])
    return f"{sign}{units}.{digits}" if digits else f"{sign}{units}"


def _decimal_digits(n: int) -> str:
    """``str(n)`` for n ≥ 0 without CPython's 4300-digit conversion limit (a display never raises)."""
    parts = []
    for _ in range(n.bit_length() // 59 + 1):  # 10¹⁸ > 2⁵⁹: one 18-digit part per 59 bits, at most
        if n < 10**18:
            break
        n, low = divmod(n, 10**18)
        parts.append(f"{low:018d}")
    return str(n) + "".join(reversed(parts))


@dataclass(frozen=True, slots=True)
class Price:
    """``micro_per_unit`` micro-units per ``unit_size`` base units (bytes or seconds)."""

    micro_per_unit: int
    unit_size: int

    def __post_init__(self) -> None:
        if type(self.micro_per_unit) is not int or type(self.unit_size) is not int:
            raise TariffError("a price is made of ints (micro-units per unit_size)")
        if not 0 <= self.micro_per_unit <= MAX_AMOUNT:
            raise TariffError(f"price {self.micro_per_unit} outside 0..MAX_AMOUNT")
        if not 0 < self.unit_size <= MAX_QUANTITY:
            raise TariffError(f"unit_size must be positive, got {self.unit_size}")

    @classmethod
    def parse(cls, text: str, unit_size: int) -> Price:
        """``Price.parse("0.50", GB)``: a money string per ``unit_size`` base units."""
        return cls(parse_money(text), unit_size)

    def cost(self, quantity: int) -> int:
        """Exact cost of ``quantity`` base units, floored to micro-units."""
        if type(quantity) is not int or quantity < 0:
            raise TariffError(f"quantity must be a non-negative int, got {quantity!r}")
        return check_amount(floor_div(quantity * self.micro_per_unit, self.unit_size))
