"""A gateway callback's body, checked: pure, no I/O.

``parse_callback(body, gateway, currency, minor_units)`` turns the raw
bytes of a signed callback into a ``Callback`` or raises ``BadField``
naming the field and why.  The body is a JSON object:

* ``txn_id`` — the gateway's transaction id, 1 to 64 of ``A-Z a-z 0-9 . _ : -``
  (the payment's external id is ``"<gateway>:<txn_id>"``);
* ``account`` — the account id (digits) or the subscriber's contract number;
* ``amount`` — a string, in major units (``"100.50"``) or minor units
  (``"10050"``) as the gateway's ``amount_format`` says: never a JSON number;
* ``currency`` — must be the gateway's (the installation's) currency;
* ``status`` — ``"paid"`` books; any other status is acknowledged and books nothing.

JSON numbers are read as their text (no float is ever made), so an
``amount`` sent as a number is refused rather than rounded.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from webedge.paysign import AmountRefused, amount_to_micro

__all__ = ["BadField", "Callback", "parse_callback", "PAID"]

PAID = "paid"
_TXN = re.compile(r"[A-Za-z0-9._:-]{1,64}", re.ASCII)
_ACCOUNT = re.compile(r"[A-Za-z0-9./_-]{1,64}", re.ASCII)
_STATUS = re.compile(r"[a-z_]{1,32}", re.ASCII)
_DEPTH = 4


class BadField(ValueError):
    """A callback field is missing or malformed: ``error`` is the answer's code, ``field`` the field."""

    def __init__(self, field: str, why: str, error: str = "bad_field") -> None:
        super().__init__(f"{field}: {why}")
        self.field = field
        self.why = why
        self.error = error


@dataclass(frozen=True, slots=True)
class Callback:
    txn_id: str
    account: str
    amount: int            # micro-units
    currency: str
    status: str
    order_id: str


class _Number(str):
    """A JSON number kept as its text (``parse_float``/``parse_int``): money never becomes a float."""


def _depth(value: Any, level: int = 0) -> int:
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level + 1)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level + 1)
    return level


def _text(data: dict[str, Any], name: str, pattern: re.Pattern[str]) -> str:
    value = data.get(name)
    if value is None:
        raise BadField(name, "missing")
    if type(value) is not str or pattern.fullmatch(value) is None:
        raise BadField(name, "malformed")
    return value


def parse_callback(body: bytes, amount_format: str, currency: str, minor_units: int) -> Callback:
    try:
        data = json.loads(body.decode("utf-8"), parse_float=_Number, parse_int=_Number)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise BadField("body", "not a JSON object") from None
    if not isinstance(data, dict) or _depth(data) > _DEPTH:
        raise BadField("body", "not a JSON object")
    txn_id = _text(data, "txn_id", _TXN)
    status = _text(data, "status", _STATUS)
    got_currency = data.get("currency")
    if type(got_currency) is not str:
        raise BadField("currency", "missing")
    if got_currency != currency:
        raise BadField("currency", f"not {currency}", error="wrong_currency")
    raw_account = data.get("account")
    if isinstance(raw_account, _Number):      # an account id sent as a JSON number
        raw_account = str(raw_account)
    if not isinstance(raw_account, str):
        raise BadField("account", "missing")
    account = str(raw_account)
    if _ACCOUNT.fullmatch(account) is None:
        raise BadField("account", "malformed")
    raw_amount = data.get("amount")
    if isinstance(raw_amount, _Number):
        raise BadField("amount", "a string of digits, not a JSON number")
    try:
        amount = amount_to_micro(raw_amount, minor_units, amount_format)
    except AmountRefused as exc:
        raise BadField("amount", str(exc)) from None
    order = data.get("order_id", "")
    order_id = order if type(order) is str and _TXN.fullmatch(order) else ""
    return Callback(txn_id, account, amount, got_currency, status, order_id)
