"""Payment gateways' signatures and amounts, pure: no I/O, time comes in as an argument.

Theory of operation
-------------------
Two messages cross between billcore and a payment gateway, each signed
with the secret the two share (one per gateway, ``[[paygate.gateways]]``):

* the gateway's **callback** to the ``paygate`` edge: headers
  ``X-Billcore-Timestamp: <unix seconds>`` and ``X-Billcore-Signature:
  v1=<hex HMAC-SHA256(secret, "<timestamp>.<raw body bytes>")>`` — the
  same scheme as billcore's own outgoing webhooks.  ``check_callback``
  answers why one is refused (``bad_signature``, ``stale_timestamp``) or
  None; the timestamp may be ``window`` seconds off either way, so a
  captured callback cannot be replayed later (and one replayed within the
  window books nothing twice: callbacks are idempotent by transaction id);
* the office's **order** (pay online): the browser is sent to the gateway's
  pay page with the order's fields and ``sig`` = HMAC-SHA256 over the
  fields in a fixed order, joined by ``\\n`` (``order_signature``), so the
  gateway can trust the account and amount it is asked to collect.

Amounts: a gateway writes them in major units as a decimal string
(``"100.50"``) or in minor units as an integer (``"10050"``);
``amount_to_micro`` turns either into exact integer micro-units with the
currency's minor units, refusing more decimals than the currency has, a
sign, an exponent, spaces or a float — no float ever holds money here.
``micro_to_amount`` is its inverse for the order the office sends.
Every comparison of signatures is ``hmac.compare_digest``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping

__all__ = ["ORDER_FIELDS", "AmountRefused", "amount_to_micro", "callback_signature", "check_callback",
           "micro_to_amount", "order_signature", "order_ok", "MICRO"]

MICRO = 1_000_000
MAX_MICRO = 10**13                 # billcore's largest single payment (billing.payments.MAX_PAYMENT)
_MAJOR = re.compile(r"(0|[1-9][0-9]{0,11})(?:\.([0-9]{1,6}))?", re.ASCII)
_MINOR = re.compile(r"0|[1-9][0-9]{0,17}", re.ASCII)
_TIMESTAMP = re.compile(r"[0-9]{1,12}", re.ASCII)
_SIGNATURE = re.compile(r"v1=([0-9a-f]{64})", re.ASCII)
ORDER_FIELDS = ("order_id", "account", "amount", "currency", "return_url", "ts")


class AmountRefused(ValueError):
    """The amount is not one this currency can carry; the message says why."""


def amount_to_micro(text: object, minor_units: int, amount_format: str = "major") -> int:
    """A gateway's amount (``"100.50"`` major, ``"10050"`` minor) as positive int micro-units."""
    if type(text) is not str:
        raise AmountRefused("amount must be a string of digits (not a JSON number)")
    if amount_format == "minor":
        if _MINOR.fullmatch(text) is None:
            raise AmountRefused("amount must be an integer of minor units, like '10050'")
        micro = int(text) * (MICRO // 10**minor_units)
    else:
        match = _MAJOR.fullmatch(text)
        if match is None:
            raise AmountRefused("amount must be a decimal string in major units, like '100.50'")
        whole, frac = match.group(1), match.group(2) or ""
        if len(frac) > minor_units:
            raise AmountRefused(f"amount has more than the currency's {minor_units} decimal(s)")
        micro = int(whole) * MICRO + int(frac.ljust(6, "0"))
    assert type(micro) is int
    if not 0 < micro <= MAX_MICRO:
        raise AmountRefused("amount must be positive and at most 10000000")
    return micro


def micro_to_amount(micro: int, minor_units: int, amount_format: str = "major") -> str:
    """Int micro-units as the gateway writes them; ``AmountRefused`` when the currency cannot carry them."""
    if type(micro) is not int or not 0 < micro <= MAX_MICRO:
        raise AmountRefused("amount must be positive int micro-units")
    step = MICRO // 10**minor_units
    if micro % step:
        raise AmountRefused(f"amount has more than the currency's {minor_units} decimal(s)")
    if amount_format == "minor":
        return str(micro // step)
    whole, frac = divmod(micro, MICRO)
    return f"{whole}.{frac // step:0{minor_units}d}" if minor_units else str(whole)


def callback_signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """The ``X-Billcore-Signature`` header's value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret, timestamp.encode("ascii") + b"." + body, hashlib.sha256).hexdigest()
    return f"v1={mac}"


def check_callback(secret: bytes, timestamp: str | None, signature: str | None, body: bytes,
                   now: float, window: float) -> str | None:
    """Why a callback is refused (``bad_signature``, ``stale_timestamp``), or None when it is good.

    The signature is checked first: a sender without the secret learns nothing about the window."""
    if not timestamp or not signature or _TIMESTAMP.fullmatch(timestamp) is None:
        return "bad_signature"
    found = _SIGNATURE.fullmatch(signature.strip())
    if found is None:
        return "bad_signature"
    expected = callback_signature(secret, timestamp, body)[3:]
    if not hmac.compare_digest(expected, found.group(1)):
        return "bad_signature"
    if abs(now - int(timestamp)) > window:
        return "stale_timestamp"
    return None


def order_signature(secret: bytes, order: Mapping[str, str]) -> str:
    """HMAC-SHA256 (hex) over the order's ``ORDER_FIELDS`` in order, joined by newlines."""
    text = "\n".join(order[name] for name in ORDER_FIELDS)
    return hmac.new(secret, text.encode("utf-8"), hashlib.sha256).hexdigest()


def order_ok(secret: bytes, order: Mapping[str, str], signature: str | None) -> bool:
    if not signature or any(not isinstance(order.get(name), str) for name in ORDER_FIELDS):
        return False
    return hmac.compare_digest(order_signature(secret, order), signature)
