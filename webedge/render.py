"""How numbers look on a web edge's pages (the office's and the console's): jinja2 filters.

Money arrives as integer micro-units and is shown by billcore's one money
formatter (``billcore.common.money.format_money``, pure, no I/O) with the
installation's currency (``[billing] currency`` and ``minor_units``, a
``Currency`` the app loads from the config and hands every template as
``currency``): at least the currency's decimals (0 for JPY, 2 for RUB, 3
for KWD), more only when the amount has them, thousands grouped by a
narrow space.  ``{{ amount | money }}`` is the number, ``{{ total |
money(code=True) }}`` adds the currency's code where a page shows a total.
Bytes are shown in binary units with one decimal, computed in integers;
times in UTC.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import jinja2

from billcore.common.money import DISPLAY_DECIMALS, format_money

__all__ = ["Currency", "money", "human_bytes", "when", "duration", "FILTERS"]


@dataclass(frozen=True, slots=True)
class Currency:
    """The installation's one currency: its ISO 4217 code and decimals (``[billing]``)."""

    code: str = "RUB"
    minor_units: int = DISPLAY_DECIMALS

    @classmethod
    def of(cls, config: Any) -> Currency:
        """``[billing]`` of billcore's config (a config without one: the defaults)."""
        billing = getattr(config, "billing", None)
        return cls(billing.currency, billing.minor_units) if billing is not None else cls()

    def show(self, micro: int, *, code: bool = False) -> str:
        text = money(micro, self.minor_units)
        return f"{text}\u00a0{self.code}" if code else text


def money(micro: int, minor_units: int = DISPLAY_DECIMALS) -> str:
    """12_500_000 → '12.50'; 12_345_678 → '12.345678' (the page shows what the ledger holds)."""
    return format_money(int(micro), min_decimals=minor_units, group="\u202f")


@jinja2.pass_context
def _money_filter(context: Any, micro: int, code: bool = False) -> str:
    currency = context.get("currency")
    if not isinstance(currency, Currency):
        currency = Currency()
    return currency.show(micro, code=code)


def human_bytes(n: int) -> str:
    n = int(n)
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            tenths = n * 10 // size
            return f"{tenths // 10}.{tenths % 10} {unit}"
    return f"{n} B"


def when(value: Any) -> str:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    return "" if value is None else str(value)


def duration(seconds: int) -> str:
    hours, rest = divmod(int(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


# the names templates use
FILTERS = {"money": _money_filter, "bytes": human_bytes, "when": when, "duration": duration}
