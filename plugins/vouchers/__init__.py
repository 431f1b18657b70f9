"""Payment-card vouchers (first-party plugin).

Redeeming is idempotent per code, and exactly-once in money even across a
crash: the redemption is recorded first (voucher row → redeemed by this
account), then the account is credited through ``api.billing.add_payment``
with ``external_id = "voucher:<serial>"``, then ``credited_at`` is set.  A
repeated redeem by the same account returns the first result and credits
only if the earlier attempt never got to ``credited_at``; the core's
``add_payment`` is itself idempotent per external id, so that retry cannot
book twice either.

Who may redeem: an administrator or system login holding the right
``vouchers.redeem``, onto any account; a subscriber (``user`` session), only
onto an account they own.  Failed redeems are limited per caller
(``max_failures`` in ``failure_window`` seconds, see limits.py) so codes
cannot be enumerated; the limit lives in memory and starts afresh when the
core restarts.
"""

from __future__ import annotations

from typing import Any

from billcore.plugins.api import PluginAPI, Refused

from .codes import code_hash, new_code, normalize
from .limits import FailureLimit

ADMIN = frozenset({"admin", "system"})


def setup(api: PluginAPI) -> None:
    db = api.db
    if db is None:
        raise Refused("the vouchers plugin needs a database")
    max_batch = int(api.config["max_batch"])
    method = str(api.config["payment_method"])
    limit = FailureLimit(int(api.config["max_failures"]), float(api.config["failure_window"]))

    async def generate(ctx: Any, count: int, amount: int, batch: str = "",
                       valid_days: int | None = None) -> list[dict[str, Any]]:
        """Create ``count`` vouchers worth ``amount`` each; the codes are returned only now."""
        if not 1 <= count <= max_batch:
            raise Refused(f"count must be between 1 and {max_batch}")
        if amount <= 0:
            raise Refused("amount must be positive")
        if valid_days is not None and valid_days <= 0:
            raise Refused("valid_days must be positive")
        out = []
        async with db.transaction() as tx:
            for _ in range(count):
                code = new_code()
                serial = await tx.fetchval(
                    "INSERT INTO vouchers (code_hash, amount, batch, expires_at) VALUES "
                    "($1, $2, $3, now() + make_interval(days => $4)) RETURNING serial",
                    code_hash(normalize(code) or ""), amount, batch, valid_days)
                out.append({"serial": serial, "code": code, "amount": amount})
        api.log.info("vouchers generated", extra={"count": count, "batch": batch})
        return out

    async def list_(ctx: Any, batch: str | None = None, status: str | None = None,
                    after: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        """Vouchers (without codes) by serial; status is new, redeemed or expired."""
        if status not in (None, "new", "redeemed", "expired"):
            raise Refused("status must be new, redeemed or expired")
        limit = max(1, min(limit, 1000))
        return await db.fetch(
            "SELECT serial, amount, batch, extract(epoch FROM created_at)::bigint AS created_at,"
            " extract(epoch FROM expires_at)::bigint AS expires_at, redeemed_by,"
            " extract(epoch FROM redeemed_at)::bigint AS redeemed_at,"
            " CASE WHEN redeemed_at IS NOT NULL THEN 'redeemed'"
            "      WHEN expires_at <= now() THEN 'expired' ELSE 'new' END AS status"
            " FROM vouchers WHERE serial > $1 AND ($2::text IS NULL OR batch = $2)"
            " AND ($3::text IS NULL OR $3 = CASE WHEN redeemed_at IS NOT NULL THEN 'redeemed'"
            "      WHEN expires_at <= now() THEN 'expired' ELSE 'new' END)"
            " ORDER BY serial LIMIT $4", after, batch, status, limit)

    async def redeem(ctx: Any, code: str, account_id: int) -> dict[str, Any]:
        """Credit the voucher's amount to ``account_id``; repeating it credits nothing more.

        Subscribers redeem onto their own accounts only; administrators need
        the right ``vouchers.redeem``.  Too many failed redeems by one caller
        are refused for a while.
        """
        principal = ctx.principal
        if principal.kind != "user" and not api.has_right(principal, "vouchers.redeem"):
            raise Refused("redeeming vouchers needs the right vouchers.redeem")
        caller = (principal.kind, principal.id)
        started = api.now()
        if not limit.begin(caller, started):
            wait = limit.retry_after(caller, started)
            raise Refused(f"too many failed redeems; try again in {int(wait) + 1} s")
        try:
            result = await attempt(principal, code, account_id)
        except Refused:
            raise  # a failure: its slot stays taken
        except BaseException:
            limit.succeeded(caller, started)  # the core's fault, not a guess
            raise
        limit.succeeded(caller, started)
        return result

    async def attempt(principal: Any, code: str, account_id: int) -> dict[str, Any]:
        if api.billing is None:
            raise Refused("payments are not available to plugins in this core")
        if principal.kind == "user" and not await api.owns(principal, account_id):
            raise Refused("not your account")
        normalized = normalize(code)
        if normalized is None:
            raise Refused("not a voucher code")
        async with db.transaction() as tx:
            row = await tx.fetchrow(
                "SELECT serial, amount, redeemed_by, credited_at IS NOT NULL AS credited,"
                " expires_at IS NOT NULL AND expires_at <= now() AS expired"
                " FROM vouchers WHERE code_hash = $1 FOR UPDATE", code_hash(normalized))
            if row is None:
                raise Refused("unknown voucher code")
            if row["redeemed_by"] is None:
                if row["expired"]:
                    raise Refused("voucher expired")
                await tx.execute("UPDATE vouchers SET redeemed_by = $2, redeemed_at = now()"
                                 " WHERE serial = $1", row["serial"], account_id)
                repeated = False
            elif row["redeemed_by"] != account_id:
                raise Refused("voucher already redeemed")
            else:
                repeated = True
        serial, amount = row["serial"], row["amount"]
        if not row["credited"]:
            payment_id = await api.billing.add_payment(
                account_id, amount, f"voucher:{serial}", method, f"voucher {serial}")
            await db.execute("UPDATE vouchers SET credited_at = now(), payment_id = $2"
                             " WHERE serial = $1 AND credited_at IS NULL", serial, payment_id)
        payment_id = await db.fetchval("SELECT payment_id FROM vouchers WHERE serial = $1", serial)
        return {"serial": serial, "amount": amount, "account_id": account_id,
                "payment_id": payment_id, "repeated": repeated}

    api.register_call("vouchers.generate", generate, right="vouchers.manage", kinds=ADMIN,
                      args={"count": "int", "amount": "money", "batch": "str?", "valid_days": "int?"},
                      result="list", fields={"amount": "money"})
    api.register_call("vouchers.list", list_, right="vouchers.read", kinds=ADMIN,
                      args={"batch": "str?", "status": "str?", "after": "int?", "limit": "int?"},
                      result="list", fields={"amount": "money"})
    # right=None: subscribers hold no plugin rights; redeem checks who calls.
    api.register_call("vouchers.redeem", redeem, right=None,
                      args={"code": "str", "account_id": "int"}, result="map", fields={"amount": "money"})
