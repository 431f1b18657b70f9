"""Admin calls on subscribers: ``users.create/get/edit/search/delete/set_password``.

Rights: ``users.read`` for get/search, ``users.password`` for set_password
(support resets passwords without creating users), ``users.write`` for the rest.  A
password arrives only to be turned into a SCRAM verifier here; it is never
stored or logged, and the audit row records that it changed, not what to.
"""

from __future__ import annotations

import hmac
from typing import Any

from billcore.api import ADMIN, ADMIN_SYSTEM, handler, need_int, page, who
from billcore.billing import accounts, audit
from billcore.billing.ledger_errors import InvalidValue
from billcore.server.call_context import CallContext
from billcore.server.calls import CallSpec
from billcore.server.context import CoreContext
from urfa.scram import make_verifier

__all__ = ["calls", "check_password"]

MAX_PASSWORD = 1024
MAX_ACCOUNTS = 100  # accounts listed in users.get (accounts_total says how many there are)


def check_password(password: object) -> str:
    if type(password) is not str or not 8 <= len(password) <= MAX_PASSWORD:
        raise InvalidValue(f"password must be a string of 8..{MAX_PASSWORD} characters")
    return password


def calls(core: CoreContext) -> list[CallSpec]:
    @handler
    async def users_create(ctx: CallContext, login: str, password: str, full_name: str = "", email: str = "",
                           phone: str = "", address: str = "", external_id: str | None = None) -> dict[str, Any]:
        """Create a subscriber (password: 8 to 1024 characters) and its basic account; returns the user with basic_account_id and created.

        Idempotent by external_id: repeated with the same external id, login, contact fields and password, it answers the subscriber made the first time (created false) and writes nothing; anything different is users.login_taken."""
        accounts.check_login(login)
        verifier = make_verifier(check_password(password))
        fields: dict[str, Any] = {"full_name": full_name or "", "email": email or "",
                                  "phone": phone or "", "address": address or ""}
        if external_id is not None:
            fields["external_id"] = external_id
        def same_password(salt: bytes, iterations: int, stored_key: bytes) -> bool:
            return hmac.compare_digest(make_verifier(password, salt, iterations).stored_key, stored_key)

        async with core.pool.acquire() as conn, conn.transaction():
            user = await accounts.create_user(conn, login, verifier, same_password=same_password, **fields)
            if user["created"]:   # a retry that found its subscriber changed nothing
                await audit.record(conn, who(ctx), "users.create", f"user:{user['id']}",
                                   after=user, now=core.now())
        return user

    @handler
    async def users_get(ctx: CallContext, user_id: int) -> dict[str, Any]:
        """A user with their first MAX_ACCOUNTS accounts and accounts_total (deleted users too,
        marked by deleted_at)."""
        need_int("user_id", user_id)
        async with core.pool.acquire() as conn:
            user = await accounts.get_user(conn, user_id, include_deleted=True)
            user["accounts"] = await accounts.user_accounts(conn, user_id, limit=MAX_ACCOUNTS)
            user["accounts_total"] = await conn.fetchval("SELECT count(*) FROM accounts WHERE user_id = $1", user_id)
        return user

    @handler
    async def users_edit(ctx: CallContext, user_id: int, fields: dict[str, Any]) -> dict[str, Any]:
        """Change contact fields (full_name, email, phone, address, external_id)."""
        need_int("user_id", user_id)
        if type(fields) is not dict:
            raise InvalidValue("fields must be a map")
        async with core.pool.acquire() as conn, conn.transaction():
            before, after = await accounts.edit_user(conn, user_id, **fields)
            await audit.record(conn, who(ctx), "users.edit", f"user:{user_id}",
                               before=before, after=after, now=core.now())
        return after

    @handler
    async def users_search(ctx: CallContext, text: str = "", limit: int = 50, offset: int = 0,
                           include_deleted: bool = False) -> dict[str, Any]:
        """Users matching ``text`` anywhere in login/name/contacts, or bound to the IP ``text``:
        {total, total_capped, users}; total counts up to 10,000 (total_capped: there are more)."""
        limit, offset = page(limit, offset)
        async with core.pool.acquire() as conn:
            return await accounts.search_users(conn, text or "", limit=limit, offset=offset,
                                               include_deleted=bool(include_deleted))

    @handler
    async def users_delete(ctx: CallContext, user_id: int) -> dict[str, Any]:
        """Soft delete: the user can no longer log in; the books keep their rows."""
        need_int("user_id", user_id)
        async with core.pool.acquire() as conn, conn.transaction():
            before, after = await accounts.delete_user(conn, user_id, now=core.now())
            await audit.record(conn, who(ctx), "users.delete", f"user:{user_id}",
                               before=before, after=after, now=core.now())
        # who can no longer log in keeps no session either (bye logged_out)
        ctx.end_sessions_of("user", user_id, "this subscriber was deleted")
        return after

    @handler
    async def users_set_password(ctx: CallContext, user_id: int, password: str) -> bool:
        """Replace a subscriber's password (stored as a SCRAM verifier)."""
        need_int("user_id", user_id)
        verifier = make_verifier(check_password(password))
        async with core.pool.acquire() as conn, conn.transaction():
            await accounts.set_verifier(conn, user_id, verifier)
            await audit.record(conn, who(ctx), "users.set_password", f"user:{user_id}",
                               after={"password": "changed"}, now=core.now())
        return True

    def spec(name: str, fn: Any, right: str, args: dict[str, str], result: str = "map",
             kinds: frozenset[str] = ADMIN, bound: str = "fixed", fields: dict[str, str] | None = None) -> CallSpec:
        return CallSpec(name, fn, right=right, kinds=kinds, args=args, result=result, doc=fn.__doc__ or "",
                        bound=bound, fields=fields or {})

    return [
        spec("users.create", users_create, "users.write",
             {"login": "str", "password": "str", "full_name": "str?", "email": "str?", "phone": "str?",
              "address": "str?", "external_id": "str?"}),
        spec("users.get", users_get, "users.read", {"user_id": "int"}, kinds=ADMIN_SYSTEM,
             fields={"accounts": "list", "accounts.balance": "money", "accounts.credit": "money"}),
        spec("users.edit", users_edit, "users.write", {"user_id": "int", "fields": "map"}),
        spec("users.search", users_search, "users.read",
             {"text": "str?", "limit": "int?", "offset": "int?", "include_deleted": "bool?"}, kinds=ADMIN_SYSTEM,
             bound="page:1000", fields={"total": "int", "users": "list"}),
        spec("users.delete", users_delete, "users.write", {"user_id": "int"}),
        spec("users.set_password", users_set_password, "users.password",
             {"user_id": "int", "password": "str"}, result="bool"),
    ]
