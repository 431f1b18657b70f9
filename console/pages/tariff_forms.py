"""What the tariff and network forms read and show, without I/O.

Theory of operation
-------------------
An operator types prices as money per a unit they think in ("0.50" per GB,
"0.60" per hour) and volumes in that unit ("10" GB prepaid); the core takes
micro-units per ``unit_size`` base units and bytes or seconds
(``services.set_rate``, docs/tariffs.md).  This module turns one into the
other exactly, in integers (money by ``billcore.common.money``, the core's
own parser, so a bad amount reads the same as it would from billctl), and
back for display.

Checking what a value *means* is the core's job: the pages send what was
typed and show the core's refusal beside the field it is about
(``field_of``).  Only what cannot even be sent — text where a number goes —
is refused here, as a ``FormInvalid`` naming its field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from billcore.common.money import GB, GIB, HOUR, MAX_QUANTITY, MB, MIB, parse_money
from console.page import money_text

__all__ = [
    "FieldError", "FormInvalid", "TRAFFIC_UNITS", "TIME_UNITS", "MAX_TIERS_TYPED", "field_of", "given",
    "parse_int", "parse_ports", "parse_price", "parse_quantity", "show_ports", "show_price", "show_quantity",
    "unit_name", "unit_size", "window_text", "PROTOCOLS",
]

TRAFFIC_UNITS: Final = (("MB", MB), ("GB", GB), ("MiB", MIB), ("GiB", GIB))
TIME_UNITS: Final = (("min", 60), ("hour", HOUR))
_UNITS: Final = dict(TRAFFIC_UNITS + TIME_UNITS)
MAX_TIERS_TYPED: Final = 4   # tier rows a rate form offers; the core allows more (billctl)
PROTOCOLS: Final = (("6", "TCP"), ("17", "UDP"), ("1", "ICMP"), ("58", "ICMPv6"), ("47", "GRE"))
_QUANTITY_RE: Final = re.compile(r"(0|[1-9][0-9]{0,18})(?:\.([0-9]{1,9}))?", re.ASCII)
_INT_RE: Final = re.compile(r"-?[0-9]{1,19}", re.ASCII)
_DAYS: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True, slots=True)
class FieldError:
    """An error shown beside a field: the core's message as it came (``text``),
    or a console message key to translate (``key``)."""

    text: str = ""
    key: str = ""


class FormInvalid(ValueError):
    """A typed value cannot be sent at all; ``field`` is where to say so."""

    def __init__(self, field: str, error: FieldError) -> None:
        super().__init__(error.text or error.key)
        self.field = field
        self.error = error


def given(**args: Any) -> dict[str, Any]:
    """Call arguments without the ones left empty (the core's default applies)."""
    return {name: value for name, value in args.items() if value is not None and value != ""}


def unit_size(name: str, field: str = "unit") -> int:
    """Base units (bytes or seconds) of a unit a form offers."""
    size = _UNITS.get(name)
    if size is None:
        raise FormInvalid(field, FieldError(key="form.bad_unit"))
    return size


def unit_name(size: int) -> str:
    """The name a form shows for ``size`` base units ("" when it offers none)."""
    return next((name for name, known in _UNITS.items() if known == size), "")


def parse_price(text: str, field: str) -> int:
    """Money per unit typed as decimal text → micro-units (the core checks the range)."""
    try:
        return parse_money(text.strip())
    except ValueError as exc:    # MoneyFormatError / MoneyRangeError: billcore's own words
        raise FormInvalid(field, FieldError(text=str(exc))) from exc


def parse_quantity(text: str, size: int, field: str) -> int:
    """``"1.5"`` of a unit of ``size`` base units → base units, exactly (a
    fraction of a byte or a second is refused, not rounded)."""
    match = _QUANTITY_RE.fullmatch(text.strip())
    if match is None:
        raise FormInvalid(field, FieldError(key="form.bad_quantity"))
    whole, frac = match.group(1), match.group(2) or ""
    scale: int = 10 ** len(frac)
    base, rest = divmod((int(whole) * scale + int(frac or "0")) * size, scale)
    if rest or base > MAX_QUANTITY:
        raise FormInvalid(field, FieldError(key="form.bad_quantity"))
    return base


def parse_int(text: str, field: str) -> int | None:
    """An optional integer field (empty: None)."""
    text = text.strip()
    if not text:
        return None
    if _INT_RE.fullmatch(text) is None:
        raise FormInvalid(field, FieldError(key="form.bad_int"))
    return int(text)


def parse_ports(text: str, field: str) -> list[int] | None:
    """``"80"`` or ``"1024-65535"`` → ``[first, last]`` (empty: any port)."""
    text = text.strip()
    if not text:
        return None
    first, dash, last = text.partition("-")
    low, high = parse_int(first, field), parse_int(last, field) if dash else None
    if low is None or (dash and high is None):
        raise FormInvalid(field, FieldError(key="form.bad_ports"))
    return [low, high if high is not None else low]


def show_quantity(amount: int, size: int) -> str:
    """Base units in the form's unit when it divides them, else as base units."""
    name = unit_name(size)
    if name and amount % size == 0:
        return f"{amount // size} {name}"
    if name:
        whole, rest = divmod(amount, size)
        return f"{whole}.{str(rest * 10**9 // size).rjust(9, '0').rstrip('0')} {name}"
    return str(amount)


def show_price(micro: int, size: int, kind: str) -> str:
    """A tier's price as typed: ``"0.50 / GB"``."""
    name = unit_name(size) or f"{size} {'s' if kind == 'time' else 'B'}"
    return f"{money_text(micro)} / {name}"


def show_ports(ports: Sequence[int] | None) -> str:
    if not ports:
        return ""
    return str(ports[0]) if ports[0] == ports[1] else f"{ports[0]}-{ports[1]}"


def window_text(window: Mapping[str, Any]) -> str:
    """A stored window (weekdays 0 = Monday, minutes of the day) as the form types it."""
    days = sorted(window.get("weekdays", []))
    names = "all" if days == list(range(7)) else ",".join(_DAYS[day] for day in days if 0 <= day < 7)
    return f"{names} {_clock(window['start_minute'])}-{_clock(window['end_minute'])}"


def _clock(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}" if minute else "00:00"


def field_of(message: str, words: Sequence[tuple[str, str]], default: str) -> str:
    """The field a core message is about: the first (word, field) whose word
    the message names, else ``default``.  The core's messages name what they
    refuse (``tier price must be …``, ``prepaid must be …``)."""
    lowered = message.lower()
    return next((field for word, field in words if word in lowered), default)
