"""Payments, their cancellation, and promised payments.

Theory of operation
-------------------
A payment is a ``payments`` row plus the ledger row it posted
(idempotency key ``payment:<id>``).  An *external id* (bank transaction,
receipt number) makes it idempotent: the same external id again with the
same account, amount and method returns the first payment (``created`` is
False); with anything different it is a ``PaymentConflict`` and nothing is
booked.  Two concurrent first attempts with one external id: the UNIQUE
index stops the second; its savepoint rolls back and it answers as a retry.

Cancelling posts a reversal row (``payment_cancel:<id>``, ``reverses`` →
the payment's ledger row) for exactly ``-amount``; cancelling again
returns the first cancellation.

A booked payment enqueues ``payment.added`` and a cancellation
``payment.cancelled`` in the outbox, in the transaction that books it (a
retry that finds the first payment enqueues nothing).

Amounts: positive and at most ``MAX_PAYMENT``; only method ``correction``
may be negative.

Promised payment (rule): a subscriber may take one per account per calendar
month (UTC).  It is temporary extra *credit*, never a ledger row: while
open and unexpired its amount is added to the credit limit in the debt rule
(``blocks.in_debt``).  It closes as ``covered`` when a posting leaves the
balance ≥ 0, or as ``expired`` when ``expire_promised(conn, now)`` (run by
the core's scheduler) finds it past ``expires_at``.  Amount and duration
come from a ``PromisedRule`` (a global default; per-tariff rules can pass
their own).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import asyncpg

from billcore.billing.blocks import BlockChange, sync_system_block, sync_system_blocks
from billcore.billing.outbox import enqueue_one
from billcore.billing.ledger import Entry, lock_accounts, post_charges, utcnow
from billcore.common.errors import InvariantViolation
from billcore.billing.ledger_errors import (
    AmountError, InvalidValue, PaymentConflict, PromisedRefused, UnknownPayment,
)
from billcore.common.money import format_money
from billcore.db.rows import DbConnection, expect_row

__all__ = [
    "METHODS",
    "MAX_PAYMENT",
    "DEFAULT_PROMISED",
    "PaymentResult",
    "CancelResult",
    "PromisedRule",
    "PromisedResult",
    "add_payment",
    "cancel_payment",
    "take_promised",
    "promised_taken",
    "expire_promised",
    "list_payments",
]

METHODS = frozenset({"cash", "bank", "card", "credit", "correction", "voucher", "online"})
MAX_PAYMENT = 10**13          # 10 000 000 currency units in one payment: beyond is a typo
MAX_COMMENT = 1000
MAX_EXTERNAL_ID = 128


@dataclass(frozen=True, slots=True)
class PaymentResult:
    payment_id: int
    ledger_id: int
    created: bool                  # False: an earlier payment with this external id
    balance: int
    block_changes: tuple[BlockChange, ...]


@dataclass(frozen=True, slots=True)
class CancelResult:
    payment_id: int
    ledger_id: int                 # the reversal row
    created: bool                  # False: it was cancelled before
    balance: int
    block_changes: tuple[BlockChange, ...]


@dataclass(frozen=True, slots=True)
class PromisedRule:
    amount: int = 100_000_000                 # 100 currency units
    duration: dt.timedelta = dt.timedelta(days=5)


DEFAULT_PROMISED = PromisedRule()


@dataclass(frozen=True, slots=True)
class PromisedResult:
    promised_id: int
    amount: int
    expires_at: dt.datetime
    block_changes: tuple[BlockChange, ...]


def check_payment_amount(amount: object, method: str) -> int:
    if type(amount) is not int:
        raise AmountError(f"amount must be int micro-units, got {type(amount).__name__}")
    if amount == 0 or abs(amount) > MAX_PAYMENT:
        raise AmountError(f"amount must be non-zero and at most {format_money(MAX_PAYMENT)},"
                          f" got {format_money(amount)}")
    if amount < 0 and method != "correction":
        raise AmountError("only a correction may be negative")
    return amount


def _check_text(name: str, value: object, limit: int) -> str:
    if type(value) is not str or len(value) > limit:
        raise InvalidValue(f"{name} must be a string of at most {limit} characters")
    return value


async def _existing(conn: DbConnection, external_id: str, account_id: int, amount: int,
                    method: str) -> PaymentResult | None:
    row = await conn.fetchrow(
        "SELECT p.id, p.account_id, p.amount, p.method, p.ledger_id, a.balance FROM payments p"
        " JOIN accounts a ON a.id = p.account_id WHERE p.external_id = $1", external_id)
    if row is None:
        return None
    if (row["account_id"], row["amount"], row["method"]) != (account_id, amount, method):
        raise PaymentConflict(
            f"external id {external_id!r} is payment {row['id']}: {format_money(row['amount'])} by"
            f" {row['method']} to account {row['account_id']}")
    return PaymentResult(row["id"], row["ledger_id"], False, row["balance"], ())


async def add_payment(conn: DbConnection, *, account_id: int, amount: int, method: str,
                      actor: str, external_id: str | None = None, comment: str = "",
                      now: dt.datetime | None = None) -> PaymentResult:
    """Book a payment (idempotent by ``external_id``); own transaction or savepoint."""
    if type(method) is not str or method not in METHODS:
        raise InvalidValue(f"method must be one of {sorted(METHODS)}, got {method!r}")
    check_payment_amount(amount, method)
    _check_text("comment", comment, MAX_COMMENT)
    if external_id is not None:
        _check_text("external id", external_id, MAX_EXTERNAL_ID)
        if not external_id:
            raise InvalidValue("external id must not be empty")
    now = now or utcnow()
    try:
        async with conn.transaction():
            await lock_accounts(conn, [account_id])
            if external_id is not None:
                found = await _existing(conn, external_id, account_id, amount, method)
                if found is not None:
                    return found
            payment_id = await conn.fetchval(
                "INSERT INTO payments(account_id, amount, method, comment, operator, external_id,"
                " created_at) VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
                account_id, amount, method, comment, actor, external_id, now)
            result = await post_charges(conn, [Entry(
                account_id, amount, "payment", f"payment:{payment_id}", f"payment:{payment_id}")],
                actor=actor, now=now)
            if len(result.posted) != 1 or result.posted[0].amount != amount:
                raise InvariantViolation(f"payment {payment_id} did not post exactly one row")
            ledger_id = result.posted[0].ledger_id
            await conn.execute("UPDATE payments SET ledger_id = $2 WHERE id = $1", payment_id, ledger_id)
            await enqueue_one(conn, "payment.added", {
                "account_id": account_id, "amount": amount, "balance": result.balances[account_id],
                "external_id": external_id, "method": method, "payment_id": payment_id}, now, account_id=account_id)
            return PaymentResult(payment_id, ledger_id, True, result.balances[account_id],
                                 result.block_changes)
    except asyncpg.UniqueViolationError:
        if external_id is None:
            raise
        async with conn.transaction():
            found = await _existing(conn, external_id, account_id, amount, method)
        if found is None:
            raise
        return found


async def cancel_payment(conn: DbConnection, payment_id: int, *, actor: str,
                         reason: str = "", now: dt.datetime | None = None) -> CancelResult:
    """Reverse a payment exactly; cancelling twice returns the first reversal."""
    if type(payment_id) is not int:
        raise InvalidValue("payment id must be an int")
    _check_text("reason", reason, MAX_COMMENT)
    now = now or utcnow()
    async with conn.transaction():
        account_id = await conn.fetchval("SELECT account_id FROM payments WHERE id = $1", payment_id)
        if account_id is None:
            raise UnknownPayment(f"payment {payment_id} does not exist")
        accounts = await lock_accounts(conn, [account_id])
        payment = expect_row(await conn.fetchrow("SELECT * FROM payments WHERE id = $1 FOR UPDATE", payment_id),
                             f"payment {payment_id}")
        if payment["cancel_ledger_id"] is not None:
            return CancelResult(payment_id, payment["cancel_ledger_id"], False,
                                accounts[account_id]["balance"], ())
        if payment["ledger_id"] is None:
            raise InvariantViolation(f"payment {payment_id} has no ledger row")
        result = await post_charges(conn, [Entry(
            account_id, -payment["amount"], "payment_cancel", f"payment_cancel:{payment_id}",
            f"payment:{payment_id}", reverses=payment["ledger_id"])], actor=actor, now=now)
        if len(result.posted) != 1:
            raise InvariantViolation(f"cancel of payment {payment_id} did not post exactly one row")
        ledger_id = result.posted[0].ledger_id
        await conn.execute(
            "UPDATE payments SET cancelled_at = $2, cancelled_by = $3, cancel_reason = $4,"
            " cancel_ledger_id = $5 WHERE id = $1", payment_id, now, actor, reason, ledger_id)
        await enqueue_one(conn, "payment.cancelled", {
            "account_id": account_id, "payment_id": payment_id, "amount": int(payment["amount"]),
            "balance": result.balances[account_id]}, now, account_id=account_id)
        return CancelResult(payment_id, ledger_id, True, result.balances[account_id],
                            result.block_changes)


def _month(now: dt.datetime) -> dt.date:
    day = now.astimezone(dt.timezone.utc).date()
    return day.replace(day=1)


async def take_promised(conn: DbConnection, account_id: int, *, actor: str,
                        rule: PromisedRule = DEFAULT_PROMISED,
                        now: dt.datetime | None = None) -> PromisedResult:
    """Open this month's promised payment on an account (once per month)."""
    if type(rule.amount) is not int or not 0 < rule.amount <= MAX_PAYMENT:
        raise PromisedRefused("promised payments are disabled (no valid amount configured)")
    now = now or utcnow()
    async with conn.transaction():
        await lock_accounts(conn, [account_id])
        expires = now + rule.duration
        promised_id = await conn.fetchval(
            "INSERT INTO promised_payments(account_id, amount, period, taken_at, expires_at, taken_by)"
            " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (account_id, period) DO NOTHING RETURNING id",
            account_id, rule.amount, _month(now), now, expires, actor)
        if promised_id is None:
            raise PromisedRefused("a promised payment was already taken this month")
        change = await sync_system_block(conn, account_id, actor=actor, now=now)
        return PromisedResult(promised_id, rule.amount, expires, (change,) if change else ())


async def promised_taken(conn: DbConnection, account_id: int, now: dt.datetime) -> bool:
    """True when this month's promised payment of the account has been taken (by anyone)."""
    return bool(await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM promised_payments WHERE account_id = $1 AND period = $2)",
        account_id, _month(now)))


async def expire_promised(conn: DbConnection, now: dt.datetime) -> list[BlockChange]:
    """Close promised payments past their expiry and re-block accounts that
    are now in debt.  The scheduler calls it; returns the block changes."""
    async with conn.transaction():
        ids = [row["account_id"] for row in await conn.fetch(
            "SELECT DISTINCT account_id FROM promised_payments"
            " WHERE closed_at IS NULL AND expires_at <= $1", now)]
        if not ids:
            return []
        await lock_accounts(conn, ids)
        await conn.execute(
            "UPDATE promised_payments SET closed_at = $2, closed_why = 'expired'"
            " WHERE account_id = ANY($1::bigint[]) AND closed_at IS NULL AND expires_at <= $2",
            ids, now)
        return await sync_system_blocks(conn, sorted(ids), actor="system:promised", now=now)


async def list_payments(conn: DbConnection, account_ids: list[int], *, limit: int = 100,
                        offset: int = 0) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT id, account_id, amount, method, comment, operator, external_id, created_at,"
        " ledger_id, cancelled_at, cancelled_by, cancel_reason, cancel_ledger_id FROM payments"
        " WHERE account_id = ANY($1::bigint[]) ORDER BY id DESC LIMIT $2 OFFSET $3",
        account_ids, limit, offset)
    return [dict(row) for row in rows]
