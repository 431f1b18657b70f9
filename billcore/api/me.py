"""The subscriber's own calls: ``me.*`` (kinds ``{"user"}``).

Theory of operation
-------------------
A subscriber session's principal id IS the user id; no call takes a user
id.  Calls that name an account (``account_id``) first check that it
belongs to the principal (``_own``) and answer ``accounts.unknown`` for any
other — the same answer as for an account that does not exist, so a
subscriber cannot even probe for other accounts.  Calls without one act on
every account of the principal (lists) or on the basic account (actions).

Calls: me.accounts, me.blocks, me.payments, me.history, me.block
(the user's own "internet off" switch), me.promised, me.password.
"""

from __future__ import annotations

import hmac
from typing import Any

from billcore.api import USER, announce, handler, need_int, page, who
from billcore.api.accounts import ACCOUNT_FIELDS, LEDGER_FIELDS, account_view
from billcore.api.users import check_password
from billcore.billing import accounts, audit, blocks, payments
from billcore.server.call_context import CallContext
from billcore.server.topics import subscriber_block
from billcore.billing.ledger import ledger_history
from billcore.billing.ledger_errors import InvalidValue, UnknownAccount, UnknownUser
from billcore.db.rows import DbConnection
from billcore.server.calls import CallSpec
from billcore.server.context import CoreContext
from urfa.scram import client_keys, make_verifier

__all__ = ["calls"]


async def _own(conn: DbConnection, user_id: int, account_id: int | None) -> list[int]:
    """The principal's account ids; with ``account_id``, just that one if it is theirs."""
    rows = await conn.fetch(
        "SELECT a.id, a.is_basic FROM accounts a JOIN users u ON u.id = a.user_id"
        " WHERE a.user_id = $1 AND u.deleted_at IS NULL ORDER BY a.is_basic DESC, a.id", user_id)
    ids = [row["id"] for row in rows]
    if not ids:
        raise UnknownUser("this user no longer exists")
    if account_id is None:
        return ids
    need_int("account_id", account_id)
    if account_id not in ids:
        raise UnknownAccount(f"account {account_id} does not exist")
    return [account_id]


def calls(core: CoreContext) -> list[CallSpec]:
    def uid(ctx: CallContext) -> int:
        if ctx.principal.kind != "user":     # the call table already ensures it; belt and braces
            raise InvalidValue("me.* calls are for subscriber sessions")
        return int(ctx.principal.id)

    @handler
    async def me_accounts(ctx: CallContext, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """My accounts (basic first): balance, credit, blocks, promised credit."""
        limit, offset = page(limit, offset, 100)
        async with core.pool.acquire() as conn:
            ids = (await _own(conn, uid(ctx), None))[offset:offset + limit]
            return [await account_view(conn, account_id, core.now()) for account_id in ids]

    @handler
    async def me_blocks(ctx: CallContext, account_id: int | None = None, active_only: bool = False, limit: int = 100,
                        offset: int = 0) -> list[dict[str, Any]]:
        """Blocks of my accounts, newest first."""
        limit, offset = page(limit, offset, 200)
        async with core.pool.acquire() as conn:
            ids = await _own(conn, uid(ctx), account_id)
            rows = await blocks.list_blocks(conn, ids, active_only=bool(active_only), limit=limit, offset=offset)
        return [subscriber_block(row) for row in rows]   # no operator's login or reason text

    @handler
    async def me_payments(ctx: CallContext, account_id: int | None = None, limit: int = 50,
                          offset: int = 0) -> list[dict[str, Any]]:
        """My payments, newest first."""
        limit, offset = page(limit, offset, 200)
        async with core.pool.acquire() as conn:
            ids = await _own(conn, uid(ctx), account_id)
            rows = await payments.list_payments(conn, ids, limit=limit, offset=offset)
        keep = ("id", "account_id", "amount", "method", "created_at", "cancelled_at")
        return [{k: row[k] for k in keep} for row in rows]

    @handler
    async def me_history(ctx: CallContext, account_id: int | None = None, limit: int = 50,
                         offset: int = 0) -> list[dict[str, Any]]:
        """My balance history (ledger rows), newest first."""
        limit, offset = page(limit, offset, 200)
        async with core.pool.acquire() as conn:
            ids = await _own(conn, uid(ctx), account_id)
            rows = await ledger_history(conn, ids, limit=limit, offset=offset)
        keep = ("id", "account_id", "amount", "balance_after", "kind", "created_at")
        return [{k: row[k] for k in keep} for row in rows]

    @handler
    async def me_block(ctx: CallContext, on: bool, account_id: int | None = None) -> dict[str, Any]:
        """Switch my own block ("internet off") on or off."""
        if type(on) is not bool:
            raise InvalidValue("on must be a bool")
        now = core.now()
        async with core.pool.acquire() as conn:
            acc = (await _own(conn, uid(ctx), account_id))[0]
            async with conn.transaction():
                if on:
                    change = await blocks.set_block(conn, acc, "user", actor=who(ctx).actor,
                                                    reason="by the subscriber", now=now)
                else:
                    change = await blocks.lift_block(conn, acc, "user", actor=who(ctx).actor, now=now)
                if change is not None:
                    await audit.record(conn, who(ctx), "me.block", f"account:{acc}",
                                       after=change.event(), now=now)
        await announce(core, [change] if change else [])
        return {"account_id": acc, "blocked": on, "changed": change is not None}

    @handler
    async def me_promised(ctx: CallContext, account_id: int | None = None) -> dict[str, Any]:
        """Take this month's promised payment (temporary credit)."""
        now = core.now()
        rule = core.extras.get("promised_rule", payments.DEFAULT_PROMISED)
        async with core.pool.acquire() as conn:
            acc = (await _own(conn, uid(ctx), account_id))[0]
            async with conn.transaction():
                promised = await payments.take_promised(conn, acc, actor=who(ctx).actor, rule=rule, now=now)
                await audit.record(conn, who(ctx), "me.promised", f"account:{acc}",
                                   after={"promised_id": promised.promised_id, "amount": promised.amount,
                                          "expires_at": promised.expires_at}, now=now)
        await announce(core, promised.block_changes)
        return {"account_id": acc, "amount": promised.amount, "expires_at": promised.expires_at}

    @handler
    async def me_password(ctx: CallContext, old_password: str, new_password: str) -> bool:
        """Change my password; the old one must be given."""
        if type(old_password) is not str:
            raise InvalidValue("old_password must be a string")
        verifier = make_verifier(check_password(new_password))
        async with core.pool.acquire() as conn, conn.transaction():
            # the stored verifier, not the session's copy: another session may have changed it
            row = await conn.fetchrow(
                "SELECT scram_salt, scram_iterations, scram_stored_key FROM users"
                " WHERE id = $1 AND deleted_at IS NULL FOR UPDATE", uid(ctx))
            if row is None:
                raise UnknownUser("this user no longer exists")
            old_key = client_keys(old_password, bytes(row["scram_salt"]), row["scram_iterations"]).stored_key
            if not hmac.compare_digest(old_key, bytes(row["scram_stored_key"])):
                raise InvalidValue("the old password is wrong")
            await accounts.set_verifier(conn, uid(ctx), verifier)
            await audit.record(conn, who(ctx), "me.password", f"user:{uid(ctx)}",
                               after={"password": "changed"}, now=core.now())
        return True

    def spec(name: str, fn: Any, args: dict[str, str], result: str = "map", bound: str = "fixed",
             fields: dict[str, str] | None = None) -> CallSpec:
        return CallSpec(name, fn, right=None, kinds=USER, module="builtin", args=args, result=result,
                        doc=fn.__doc__ or "", bound=bound, fields=fields or {})

    paged = {"limit": "int?", "offset": "int?"}
    return [
        spec("me.accounts", me_accounts, paged, "list", "page:100", ACCOUNT_FIELDS),
        spec("me.blocks", me_blocks, {"account_id": "int?", "active_only": "bool?", **paged}, "list", "page:200"),
        spec("me.payments", me_payments, {"account_id": "int?", **paged}, "list", "page:200", {"amount": "money"}),
        spec("me.history", me_history, {"account_id": "int?", **paged}, "list", "page:200", LEDGER_FIELDS),
        spec("me.block", me_block, {"on": "bool", "account_id": "int?"}),
        spec("me.promised", me_promised, {"account_id": "int?"}, fields={"amount": "money"}),
        spec("me.password", me_password, {"old_password": "str", "new_password": "str"}, "bool"),
    ]
