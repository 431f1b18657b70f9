"""How numbers look on a web edge's pages (the office's and the console's): jinja2 filters.

Money arrives as integer micro-units and is shown by billcore's one money
formatter (``billcore.common.money.format_money``, pure, no I/O): two
decimals, more only when the amount has them, thousands grouped by a narrow
space.  Bytes are shown in binary units with one decimal, computed in
integers; times in UTC.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from billcore.common.money import format_money

__all__ = ["money", "human_bytes", "when", "duration", "FILTERS"]


def money(micro: int) -> str:
    """12_500_000 → '12.50'; 12_345_678 → '12.345678' (the page shows what the ledger holds)."""
    return format_money(int(micro), group="\u202f")


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
FILTERS = {"money": money, "bytes": human_bytes, "when": when, "duration": duration}
