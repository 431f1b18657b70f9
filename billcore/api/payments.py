"""Admin (and service) calls on payments: ``payments.add/cancel/list``.

Rights: ``payments.add``, ``payments.cancel``, ``payments.read``,
``payments.promised`` — the ``cashiers`` group's ``payments.*`` grants them
all.  ``payments.promised`` grants an account this month's promised payment
on the subscriber's behalf (the same once-a-month rule as ``me.promised``;
amount and duration default to ``[billing]``'s), audited like every admin
write.  ``payments.add`` with
an ``external_id`` is safe to retry: the answer carries the first payment's
id and ``created: false``.  Amounts are int micro-units, positive and at
most ``billcore.billing.payments.MAX_PAYMENT`` (a correction may be
negative).
"""

from __future__ import annotations

import datetime as dt
import dataclasses
from typing import Any

from billcore.api import ADMIN, ADMIN_SYSTEM, announce, handler, need_int, page, who
from billcore.billing import accounts, audit, payments
from billcore.billing.ledger_errors import InvalidValue
from billcore.server.call_context import CallContext
from billcore.server.calls import CallSpec
from billcore.server.context import CoreContext

__all__ = ["calls"]

MAX_PROMISED_DAYS = 31


def calls(core: CoreContext) -> list[CallSpec]:
    @handler
    async def payments_add(ctx: CallContext, account_id: int, amount: int, method: str,
                           external_id: str | None = None, comment: str = "") -> dict[str, Any]:
        """Book a payment; idempotent by external_id.  Returns {payment_id, created, balance}."""
        need_int("account_id", account_id)
        now = core.now()
        async with core.pool.acquire() as conn:
            async with conn.transaction():
                result = await payments.add_payment(conn, account_id=account_id, amount=amount, method=method,
                                               actor=who(ctx).actor, external_id=external_id,
                                               comment=comment or "", now=now)
                if result.created:
                    await audit.record(conn, who(ctx), "payments.add", f"account:{account_id}",
                                       before=None, after={"payment_id": result.payment_id, "amount": amount,
                                                           "method": method, "external_id": external_id,
                                                           "balance": result.balance}, now=now)
        await announce(core, result.block_changes)
        return {"payment_id": result.payment_id, "ledger_id": result.ledger_id, "created": result.created,
                "balance": result.balance}

    @handler
    async def payments_cancel(ctx: CallContext, payment_id: int, reason: str = "") -> dict[str, Any]:
        """Reverse a payment exactly (a reversal row); cancelling twice is a no-op."""
        need_int("payment_id", payment_id)
        now = core.now()
        async with core.pool.acquire() as conn:
            async with conn.transaction():
                result = await payments.cancel_payment(conn, payment_id, actor=who(ctx).actor,
                                                  reason=reason or "", now=now)
                if result.created:
                    await audit.record(conn, who(ctx), "payments.cancel", f"payment:{payment_id}",
                                       before={"cancelled": False},
                                       after={"cancelled": True, "reason": reason or "",
                                              "reversal_ledger_id": result.ledger_id, "balance": result.balance},
                                       now=now)
        await announce(core, result.block_changes)
        return {"payment_id": payment_id, "ledger_id": result.ledger_id, "created": result.created,
                "balance": result.balance}

    @handler
    async def payments_list(ctx: CallContext, account_id: int, limit: int = 100,
                            offset: int = 0) -> list[dict[str, Any]]:
        """Payments of an account, newest first, with their cancellation."""
        need_int("account_id", account_id)
        limit, offset = page(limit, offset)
        async with core.pool.acquire() as conn:
            await accounts.get_account(conn, account_id)
            return await payments.list_payments(conn, [account_id], limit=limit, offset=offset)

    @handler
    async def payments_promised(ctx: CallContext, account_id: int, amount: int | None = None, days: int | None = None,
                                reason: str = "") -> dict[str, Any]:
        """Grant this month's promised payment (temporary credit) to an account; once per month."""
        need_int("account_id", account_id)
        rule = core.extras.get("promised_rule", payments.DEFAULT_PROMISED)
        if amount is not None:
            if type(amount) is int and amount < 0:
                raise InvalidValue("a promised payment is positive")
            payments.check_payment_amount(amount, "promised")
            rule = dataclasses.replace(rule, amount=amount)
        if days is not None:
            if type(days) is not int or not 1 <= days <= MAX_PROMISED_DAYS:
                raise InvalidValue(f"days must be within 1..{MAX_PROMISED_DAYS}")
            rule = dataclasses.replace(rule, duration=dt.timedelta(days=days))
        if type(reason) is not str or len(reason) > 1000:
            raise InvalidValue("reason is a string of at most 1000 characters")
        now = core.now()
        async with core.pool.acquire() as conn:
            async with conn.transaction():
                await accounts.get_account(conn, account_id)
                result = await payments.take_promised(conn, account_id, actor=who(ctx).actor, rule=rule, now=now)
                await audit.record(conn, who(ctx), "payments.promised", f"account:{account_id}", before=None,
                                   after={"promised_id": result.promised_id, "amount": result.amount,
                                          "expires_at": result.expires_at, "reason": reason}, now=now)
        await announce(core, result.block_changes)
        return {"account_id": account_id, "promised_id": result.promised_id, "amount": result.amount,
                "expires_at": result.expires_at}

    return [
        CallSpec("payments.promised", payments_promised, right="payments.promised", kinds=ADMIN,
                 args={"account_id": "int", "amount": "money?", "days": "int?", "reason": "str?"}, result="map",
                 doc=payments_promised.__doc__ or "", fields={"amount": "money", "expires_at": "time"}, bound="fixed"),
        CallSpec("payments.add", payments_add, right="payments.add", kinds=ADMIN_SYSTEM,
                 args={"account_id": "int", "amount": "money", "method": "str", "external_id": "str?",
                       "comment": "str?"}, result="map", doc=payments_add.__doc__ or "", bound="fixed",
                 fields={"balance": "money"}),
        CallSpec("payments.cancel", payments_cancel, right="payments.cancel", kinds=ADMIN,
                 args={"payment_id": "int", "reason": "str?"}, result="map", doc=payments_cancel.__doc__ or "",
                 bound="fixed", fields={"balance": "money"}),
        CallSpec("payments.list", payments_list, right="payments.read", kinds=ADMIN_SYSTEM,
                 args={"account_id": "int", "limit": "int?", "offset": "int?"}, result="list",
                 doc=payments_list.__doc__ or "", bound="page:1000", fields={"amount": "money"}),
    ]
