"""Errors of the billing core.

Theory of operation
-------------------
One root, ``BillingError``, for everything the money code refuses.  The split
follows h11's: *input* errors (a malformed money string, an invalid tariff,
a period spec that makes no sense) are the caller's fault and say exactly
what was wrong; ``InvariantViolation`` means the billing code itself broke a
rule it promises (a charge went negative, pieces did not sum to the whole)
and the operation must stop before anything is booked.

Every class carries a stable ``code`` for the wire (the URFA error table);
codes never change once published.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "AlreadyExists",
    "BillingError",
    "InUse",
    "UnknownObject",
    "InvariantViolation",
    "MoneyFormatError",
    "MoneyRangeError",
    "PeriodError",
    "TariffError",
    "TimeRangeError",
    "UsageError",
]


class BillingError(Exception):
    """Root of every error raised by ``billcore.billing``."""

    code: ClassVar[str] = "billing"


class MoneyFormatError(BillingError, ValueError):
    """A money string (or value offered as money) is not in the strict format."""

    code: ClassVar[str] = "billing.money_format"


class MoneyRangeError(BillingError, ValueError):
    """An amount is outside ``[-MAX_AMOUNT, MAX_AMOUNT]`` (it would not fit a BIGINT safely)."""

    code: ClassVar[str] = "billing.money_range"


class TariffError(BillingError, ValueError):
    """A price, tier schedule or tariff is invalid (negative price, unsorted tiers, ...)."""

    code: ClassVar[str] = "billing.tariff"


class PeriodError(BillingError, ValueError):
    """A period spec or an interval handed to proration is invalid."""

    code: ClassVar[str] = "billing.period"


class TimeRangeError(BillingError, ValueError):
    """A time-range definition is invalid (minute out of range, unknown weekday, ...)."""

    code: ClassVar[str] = "billing.timerange"


class UsageError(BillingError, ValueError):
    """A usage record or counter handed to rating is malformed (negative bytes, naive time)."""

    code: ClassVar[str] = "billing.usage"


class AlreadyExists(BillingError):
    """Another object already has this name, login, address or key."""

    code: ClassVar[str] = "core.already_exists"


class InUse(BillingError):
    """The object is still referred to (active sessions, leases, links): remove those first."""

    code: ClassVar[str] = "core.in_use"


class UnknownObject(BillingError, LookupError):
    """An id or name in the arguments names no existing object."""

    code: ClassVar[str] = "core.unknown"


class InvariantViolation(BillingError):
    """The billing code broke one of its own rules; nothing may be booked."""

    code: ClassVar[str] = "billing.invariant"
