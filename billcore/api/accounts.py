"""Admin calls on accounts, blocks, balance history and the audit log.

Rights:
* ``accounts.read``   accounts.get, accounts.history (ledger rows, paged)
* ``accounts.write``  accounts.create, accounts.edit (credit, VAT, unlimited)
* ``accounts.credit`` accounts.set_credit (the credit limit alone: a cashier
  role can be given this without the rest of accounts.write)
* ``blocks.read``     blocks.list;  ``blocks.write`` blocks.set, blocks.lift
* ``audit.read``      audit.query, accounts.audit (the rows of one account and its user)

Every write records an audit row in its transaction and announces block
changes after commit.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from billcore.api import ADMIN, ADMIN_SYSTEM, announce, handler, need_int, page, who
from billcore.billing import accounts, audit, blocks, payments
from billcore.billing.ledger import ledger_history
from billcore.billing.ledger_errors import InvalidValue
from billcore.db.rows import DbConnection
from billcore.server.call_context import CallContext
from billcore.server.calls import CallSpec
from billcore.server.context import CoreContext

__all__ = ["ACCOUNT_FIELDS", "LEDGER_FIELDS", "calls", "account_view"]

# the money in an account view and in a ledger row, as sys.calls declares it
ACCOUNT_FIELDS = {"balance": "money", "credit": "money", "promised": "money", "promised_taken": "bool"}
LEDGER_FIELDS = {"amount": "money", "balance_after": "money"}


async def account_view(conn: DbConnection, account_id: int, now: dt.datetime) -> dict[str, Any]:
    """An account with its active blocks, open promised credit and whether
    this month's promised payment is used up (``promised_taken``)."""
    acc = await accounts.get_account(conn, account_id)
    acc["blocks"] = [block["kind"] for block in await blocks.list_blocks(conn, [account_id], active_only=True)]
    acc["promised"] = await blocks.active_promised(conn, account_id, now)
    acc["promised_taken"] = await payments.promised_taken(conn, account_id, now)
    return acc


def calls(core: CoreContext) -> list[CallSpec]:
    async def _edit(ctx: CallContext, action: str, account_id: int, **changes: Any) -> dict[str, Any]:
        need_int("account_id", account_id)
        now = core.now()
        async with core.pool.acquire() as conn:
            async with conn.transaction():
                change = await accounts.edit_account(conn, account_id, actor=who(ctx).actor, now=now, **changes)
                await audit.record(conn, who(ctx), action, f"account:{account_id}",
                                   before=change.before, after=change.after, now=now)
            await announce(core, change.block_changes)
            return await account_view(conn, account_id, now)

    @handler
    async def accounts_create(ctx: CallContext, user_id: int, credit: int = 0, vat_bp: int = 0,
                              unlimited: bool = False) -> dict[str, Any]:
        """Open a further account for a user."""
        need_int("user_id", user_id)
        async with core.pool.acquire() as conn, conn.transaction():
            acc = await accounts.create_account(conn, user_id, credit=credit or 0, vat_bp=vat_bp or 0,
                                                unlimited=bool(unlimited))
            await audit.record(conn, who(ctx), "accounts.create", f"account:{acc['id']}",
                               after=acc, now=core.now())
        return acc

    @handler
    async def accounts_get(ctx: CallContext, account_id: int) -> dict[str, Any]:
        """Balance, credit, VAT, unlimited flag, active blocks and promised credit."""
        need_int("account_id", account_id)
        async with core.pool.acquire() as conn:
            return await account_view(conn, account_id, core.now())

    @handler
    async def accounts_edit(ctx: CallContext, account_id: int, credit: int | None = None, vat_bp: int | None = None,
                            unlimited: bool | None = None) -> dict[str, Any]:
        """Change the credit limit, VAT rate (basis points) or unlimited flag."""
        return await _edit(ctx, "accounts.edit", account_id, credit=credit, vat_bp=vat_bp, unlimited=unlimited)

    @handler
    async def accounts_set_credit(ctx: CallContext, account_id: int, credit: int) -> dict[str, Any]:
        """Set the credit limit (micro-units, ≥ 0); re-checks the debt block."""
        return await _edit(ctx, "accounts.set_credit", account_id, credit=credit)

    @handler
    async def accounts_history(ctx: CallContext, account_id: int, limit: int = 100, offset: int = 0,
                               since: dt.datetime | None = None, until: dt.datetime | None = None,
                               ) -> list[dict[str, Any]]:
        """Ledger rows of the account, newest first."""
        need_int("account_id", account_id)
        limit, offset = page(limit, offset)
        async with core.pool.acquire() as conn:
            await accounts.get_account(conn, account_id)
            return await ledger_history(conn, [account_id], limit=limit, offset=offset, since=since, until=until)

    async def _block(ctx: CallContext, account_id: int, kind: str, on: bool, reason: str) -> dict[str, Any]:
        need_int("account_id", account_id)
        now = core.now()
        async with core.pool.acquire() as conn:
            async with conn.transaction():
                if on:
                    change = await blocks.set_block(conn, account_id, kind, actor=who(ctx).actor,
                                                    reason=reason, now=now)
                else:
                    change = await blocks.lift_block(conn, account_id, kind, actor=who(ctx).actor, now=now)
                if change is not None:
                    await audit.record(conn, who(ctx), f"blocks.{'set' if on else 'lift'}",
                                       f"account:{account_id}", before=None, after=change.event(), now=now)
            await announce(core, [change] if change else [])
        return {"changed": change is not None, "block": change.event() if change else None}

    @handler
    async def blocks_set(ctx: CallContext, account_id: int, reason: str = "", kind: str = "admin") -> dict[str, Any]:
        """Set an administrative (or user) block; {changed: false} if already set."""
        return await _block(ctx, account_id, kind or "admin", True, reason or "")

    @handler
    async def blocks_lift(ctx: CallContext, account_id: int, kind: str = "admin") -> dict[str, Any]:
        """Lift an administrative (or user) block; the system block lifts itself."""
        return await _block(ctx, account_id, kind or "admin", False, "")

    @handler
    async def blocks_list(ctx: CallContext, account_id: int, active_only: bool = False, limit: int = 100,
                          offset: int = 0) -> list[dict[str, Any]]:
        """Blocks of an account, newest first: kind, reason, who/when set and lifted."""
        need_int("account_id", account_id)
        limit, offset = page(limit, offset)
        async with core.pool.acquire() as conn:
            await accounts.get_account(conn, account_id)
            return await blocks.list_blocks(conn, [account_id], active_only=bool(active_only),
                                            limit=limit, offset=offset)

    @handler
    async def audit_query(ctx: CallContext, object: str | None = None, action: str | None = None,
                          login: str | None = None, since: dt.datetime | None = None,
                          until: dt.datetime | None = None, limit: int = 100, offset: int = 0,
                          ) -> list[dict[str, Any]]:
        """Audit rows, newest first; filter by object ("account:5"), action, login, time."""
        limit, offset = page(limit, offset)
        for name, v in (("object", object), ("action", action), ("login", login)):
            if v is not None and (type(v) is not str or len(v) > 200):
                raise InvalidValue(f"{name} must be a string of at most 200 characters")
        async with core.pool.acquire() as conn:
            return await audit.query(conn, obj=object, action=action, login=login, since=since,
                                     until=until, limit=limit, offset=offset)

    @handler
    async def accounts_audit(ctx: CallContext, account_id: int, limit: int = 100,
                             offset: int = 0) -> list[dict[str, Any]]:
        """Audit rows of the account and of its user (payments, blocks, settings, contact edits), newest
        first."""
        need_int("account_id", account_id)
        limit, offset = page(limit, offset)
        async with core.pool.acquire() as conn:
            account = await accounts.get_account(conn, account_id)
            return await audit.account_audit(conn, account_id, account["user_id"], limit=limit, offset=offset)

    def spec(name: str, fn: Any, right: str, args: dict[str, str], result: str = "map",
             kinds: frozenset[str] = ADMIN, bound: str = "fixed", fields: dict[str, str] | None = None) -> CallSpec:
        return CallSpec(name, fn, right=right, kinds=kinds, args=args, result=result, doc=fn.__doc__ or "",
                        bound=bound, fields=fields or {})

    page_args = {"limit": "int?", "offset": "int?"}
    return [
        spec("accounts.create", accounts_create, "accounts.write",
             {"user_id": "int", "credit": "money?", "vat_bp": "int?", "unlimited": "bool?"}, fields=ACCOUNT_FIELDS),
        spec("accounts.get", accounts_get, "accounts.read", {"account_id": "int"}, kinds=ADMIN_SYSTEM,
             fields=ACCOUNT_FIELDS),
        spec("accounts.edit", accounts_edit, "accounts.write",
             {"account_id": "int", "credit": "money?", "vat_bp": "int?", "unlimited": "bool?"}, fields=ACCOUNT_FIELDS),
        spec("accounts.set_credit", accounts_set_credit, "accounts.credit",
             {"account_id": "int", "credit": "money"}, fields=ACCOUNT_FIELDS),
        spec("accounts.history", accounts_history, "accounts.read",
             {"account_id": "int", **page_args, "since": "time?", "until": "time?"}, result="list",
             bound="page:1000", fields=LEDGER_FIELDS),
        spec("blocks.set", blocks_set, "blocks.write", {"account_id": "int", "reason": "str?", "kind": "str?"}),
        spec("blocks.lift", blocks_lift, "blocks.write", {"account_id": "int", "kind": "str?"}),
        spec("blocks.list", blocks_list, "blocks.read",
             {"account_id": "int", "active_only": "bool?", **page_args}, result="list", kinds=ADMIN_SYSTEM,
             bound="page:1000"),
        spec("audit.query", audit_query, "audit.read",
             {"object": "str?", "action": "str?", "login": "str?", "since": "time?", "until": "time?",
              **page_args}, result="list", bound="page:1000"),
        spec("accounts.audit", accounts_audit, "audit.read", {"account_id": "int", **page_args}, result="list",
             bound="page:1000"),
    ]
