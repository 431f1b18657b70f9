"""Errors of the ledger, accounts, payments and blocks.

Every class subclasses ``BillingError`` (``billcore.common.errors``) and
carries a stable wire ``code`` (with a dot, so it never collides with a
URFA protocol code).  The API layer turns any ``BillingError`` into
``CallFailed(code, message)``.  Raising one of these inside a transaction
means nothing was booked: the transaction is rolled back.
"""

from __future__ import annotations

from typing import ClassVar

from billcore.common.errors import BillingError

__all__ = [
    "LedgerError",
    "InvalidValue",
    "AmountError",
    "UnknownAccount",
    "UnknownUser",
    "UnknownPayment",
    "IdempotencyConflict",
    "PaymentConflict",
    "LoginTaken",
    "BlockRefused",
    "PromisedRefused",
    "NotInTransaction",
]


class LedgerError(BillingError):
    """Root of the ledger-side errors."""

    code: ClassVar[str] = "ledger"


class InvalidValue(LedgerError, ValueError):
    """An argument has the wrong type or is outside its allowed set or range."""

    code: ClassVar[str] = "billing.invalid"


class AmountError(InvalidValue):
    """An amount is zero, negative where it must be positive, or absurdly large."""

    code: ClassVar[str] = "billing.amount"


class UnknownAccount(LedgerError, LookupError):
    """No such account (or not one the caller may see)."""

    code: ClassVar[str] = "accounts.unknown"


class UnknownUser(LedgerError, LookupError):
    """No such user, or the user was deleted."""

    code: ClassVar[str] = "users.unknown"


class UnknownPayment(LedgerError, LookupError):
    """No such payment (or not one the caller may see)."""

    code: ClassVar[str] = "payments.unknown"


class IdempotencyConflict(LedgerError):
    """An idempotency key was reused for a different account or amount."""

    code: ClassVar[str] = "ledger.idempotency_conflict"


class PaymentConflict(LedgerError):
    """An external payment id was reused with a different account, amount or method."""

    code: ClassVar[str] = "payments.conflict"


class LoginTaken(LedgerError):
    """Another user already has this login (or external id)."""

    code: ClassVar[str] = "users.login_taken"


class BlockRefused(LedgerError):
    """The block operation is not allowed (e.g. setting a system block by hand)."""

    code: ClassVar[str] = "blocks.refused"


class PromisedRefused(LedgerError):
    """A promised payment cannot be taken (already taken this period, disabled...)."""

    code: ClassVar[str] = "promised.refused"


class NotInTransaction(LedgerError):
    """A function that must run inside the caller's transaction was called outside one."""

    code: ClassVar[str] = "ledger.no_transaction"
