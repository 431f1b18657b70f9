"""The subscriber filter, as typed into a form and as ``subscribers.search`` takes it.

The search page, its CSV export and the bulk page share one filter: the
same fields in the query string (``q``, ``tariff``, ``blocked``,
``debtors``, ``balance_min``, ``balance_max``, ``online``), read here into
the call's arguments.  Reading is pure and total: whatever the browser sent,
the answer is a ``SubscriberFilter`` whose ``errors`` name the fields that
could not be read (a bad amount is the form's error, never a 500), and
``echo`` gives back what was typed so the form shows it again.
Money is typed as decimal text and read by billcore's one parser
(``parse_money``: micro-units, never a float).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlencode

from billcore.common.errors import BillingError
from billcore.common.money import parse_money

__all__ = ["FIELDS", "PAGE_SIZE", "MAX_OFFSET", "SubscriberFilter", "read_filter", "read_id", "read_page"]

FIELDS: Final = ("q", "tariff", "blocked", "debtors", "balance_min", "balance_max", "online")
PAGE_SIZE: Final = 50
MAX_OFFSET: Final = 10_000          # 200 pages: a list longer than that is narrowed by a filter or exported
MAX_TEXT: Final = 200
_MAX_ID_DIGITS: Final = 18


@dataclass(frozen=True, slots=True)
class SubscriberFilter:
    """What ``subscribers.search`` (and ``bulk.preview``'s ``filter``) is given."""

    args: dict[str, Any] = field(default_factory=dict)
    echo: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)   # field name → message key

    @property
    def empty(self) -> bool:
        return not self.args

    def query(self, **extra: Any) -> str:
        """The filter (and ``extra``, e.g. a page) as a query string for a link."""
        pairs = {name: value for name, value in self.echo.items() if value}
        pairs.update({name: str(value) for name, value in extra.items() if value is not None})
        return urlencode(pairs)


def read_id(raw: str) -> int | None:
    """An id typed or sent as text: 1..18 ASCII digits, else None."""
    # str.isdigit also takes '²' and '١'; only ASCII digits are an id
    if not raw or len(raw) > _MAX_ID_DIGITS or not raw.isascii() or not raw.isdecimal():
        return None
    return int(raw)


def _money(raw: str) -> int | None:
    try:
        return parse_money(raw.replace(",", ".").replace(" ", "").replace("\u202f", ""))
    except BillingError:
        return None


def read_filter(values: Mapping[str, str]) -> SubscriberFilter:
    """The filter typed into ``values`` (a query string or a posted form)."""
    echo = {name: str(values.get(name, "")).strip()[:MAX_TEXT] for name in FIELDS}
    args: dict[str, Any] = {}
    errors: dict[str, str] = {}
    if echo["q"]:
        args["text"] = echo["q"]
    if echo["tariff"]:
        tariff_id = read_id(echo["tariff"])
        if tariff_id is None:
            errors["tariff"] = "filter.bad_tariff"
        else:
            args["tariff_id"] = tariff_id
    if echo["blocked"] in ("yes", "no"):
        args["blocked"] = echo["blocked"] == "yes"
    elif echo["blocked"]:
        errors["blocked"] = "filter.bad_choice"
    for flag in ("debtors", "online"):
        if echo[flag] in ("1", "on", "yes"):
            echo[flag] = "1"
            args[flag] = True
        else:
            echo[flag] = ""
    for name in ("balance_min", "balance_max"):
        if echo[name]:
            amount = _money(echo[name])
            if amount is None:
                errors[name] = "filter.bad_amount"
            else:
                args[name] = amount
    if "balance_min" in args and "balance_max" in args and args["balance_min"] > args["balance_max"]:
        errors["balance_max"] = "filter.bad_range"
    return SubscriberFilter(args=args, echo=echo, errors=errors)


def read_page(raw: str | None) -> int:
    """A 1-based page number from the query; 1 for anything unreadable, capped so
    the offset stays within what the search counts."""
    number = read_id(raw or "") or 1
    return max(1, min(number, MAX_OFFSET // PAGE_SIZE))
