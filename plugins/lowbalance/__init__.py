"""Low-balance notices (first-party plugin, driven by hooks).

After a payment, a charge, a rated batch or a block, an account whose
balance is below ``threshold`` gets one pending notice (refreshed, not
duplicated, while unsent).  A payment that lifts the balance back to the
threshold withdraws the pending notice.  A mailer lists notices with
``lowbalance.pending`` and confirms them with ``lowbalance.mark_sent``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from billcore.plugins.api import (
    ACCOUNT_BLOCKED,
    ACCOUNT_CHARGED,
    BATCH_RATED,
    PAYMENT_ADDED,
    PluginAPI,
    Refused,
)

ADMIN = frozenset({"admin", "system"})


def setup(api: PluginAPI) -> None:
    db = api.db
    if db is None:
        raise Refused("the lowbalance plugin needs a database")
    threshold = int(api.config["threshold"])

    async def check(account_id: int, balance: int, reason: str) -> None:
        if balance >= threshold:
            await db.execute("DELETE FROM notices WHERE account_id = $1 AND sent_at IS NULL", account_id)
            return
        await db.execute(
            "INSERT INTO notices (account_id, balance, threshold, reason) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (account_id) WHERE sent_at IS NULL DO UPDATE SET balance = EXCLUDED.balance,"
            " reason = EXCLUDED.reason, queued_at = now()",
            account_id, balance, threshold, reason)

    async def on_payment(payload: Mapping[str, Any]) -> None:
        await check(int(payload["account_id"]), int(payload["balance"]), "payment")

    async def on_charge(payload: Mapping[str, Any]) -> None:
        await check(int(payload["account_id"]), int(payload["balance"]), "charge")

    async def on_batch(payload: Mapping[str, Any]) -> None:
        for charge in payload["charges"]:
            await check(int(charge["account_id"]), int(charge["balance"]), "traffic")

    async def on_block(payload: Mapping[str, Any]) -> None:
        await check(int(payload["account_id"]), int(payload["balance"]), "blocked")

    async def pending(ctx: Any, limit: int = 100) -> list[dict[str, Any]]:
        """Unsent low-balance notices, oldest first."""
        return await db.fetch(
            "SELECT id, account_id, balance, threshold, reason,"
            " extract(epoch FROM queued_at)::bigint AS queued_at"
            " FROM notices WHERE sent_at IS NULL ORDER BY id LIMIT $1", max(1, min(limit, 1000)))

    async def mark_sent(ctx: Any, ids: list[int]) -> int:
        """Mark notices as sent; returns how many were still pending."""
        status = await db.execute("UPDATE notices SET sent_at = now() WHERE id = ANY($1::bigint[])"
                                  " AND sent_at IS NULL", [int(i) for i in ids[:1000]])
        return int(status.split()[-1])

    api.on(PAYMENT_ADDED, on_payment)
    api.on(ACCOUNT_CHARGED, on_charge)
    api.on(BATCH_RATED, on_batch)
    api.on(ACCOUNT_BLOCKED, on_block)
    api.register_call("lowbalance.pending", pending, right="lowbalance.read", kinds=ADMIN,
                      args={"limit": "int?"}, result="list", fields={"balance": "money", "threshold": "money"})
    api.register_call("lowbalance.mark_sent", mark_sent, right="lowbalance.manage", kinds=ADMIN,
                      args={"ids": "list"}, result="int")
