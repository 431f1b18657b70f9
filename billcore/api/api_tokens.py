"""API token calls: ``tokens.*`` (the bearer credentials of the HTTP API).

Rights: ``tokens.read`` for the list, ``tokens.write`` to create and revoke;
kinds admin and system (so ``billctl`` over the Unix socket as a system
login works too), and an API token whose groups grant ``tokens.*``.  Every
change is audited like ``operators.*``.  ``tokens.create`` answers the token
itself, once: only its hash is stored (``billcore.billing.api_tokens``).
``tokens.revoke`` ends the token's sessions at once, so the next request
made with it is refused, not only its next login.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from billcore.api import ADMIN_SYSTEM, handler, need_int, page, who
from billcore.billing import api_tokens, audit
from billcore.server.call_context import CallContext
from billcore.server.calls import CallSpec
from billcore.server.context import CoreContext

__all__ = ["calls", "PAGE", "TOKEN_FIELDS"]

PAGE = 1000
TOKEN_FIELDS = {"id": "int", "name": "str", "groups": "list", "created_by": "str", "created_at": "time",
                "expires_at": "time", "revoked_at": "time", "last_used_at": "time"}
CREATED_FIELDS = {"id": "int", "name": "str", "groups": "list", "token": "str", "created_at": "time",
                  "expires_at": "time"}


def calls(core: CoreContext) -> list[CallSpec]:

    @handler
    async def tokens_create(ctx: CallContext, name: str, groups: list[str],
                            expires_at: dt.datetime | None = None) -> dict[str, Any]:
        """Create an API token named name (1 to 64 of A-Z a-z 0-9 . _ -) acting with the rights of the
        admin groups given (as an operator in them would), optionally until expires_at. Returns the token
        (bct_...) this once: only its hash is kept."""
        by = who(ctx)
        async with core.pool.acquire() as conn, conn.transaction():
            created = await api_tokens.create_token(conn, name, groups, expires_at, created_by=by.actor,
                                                    now=core.now())
            shown = {key: value for key, value in created.items() if key != "token"}   # never in the log
            await audit.record(conn, by, "tokens.create", f"token:{created['id']}", after=shown, now=core.now())
        return created

    @handler
    async def tokens_list(ctx: CallContext, limit: int | None = None, offset: int | None = None
                          ) -> list[dict[str, Any]]:
        """API tokens by id, paged: name, groups, who created them and when, expiry, revocation, last use.
        Never the token nor its hash."""
        limit, offset = page(limit, offset, PAGE)
        async with core.pool.acquire() as conn:
            return await api_tokens.list_tokens(conn, limit, offset)

    @handler
    async def tokens_revoke(ctx: CallContext, token_id: int) -> bool:
        """Revoke an API token: it logs in no more, and its sessions end at once."""
        token_id = need_int("token_id", token_id)
        async with core.pool.acquire() as conn, conn.transaction():
            before, after = await api_tokens.revoke_token(conn, token_id, core.now())
            await audit.record(conn, who(ctx), "tokens.revoke", f"token:{token_id}", before=before, after=after,
                               now=core.now())
        ctx.end_sessions_of("token", token_id, "this API token was revoked")
        return True

    def spec(name: str, fn: Any, right: str, args: dict[str, str], result: str = "map", bound: str = "fixed",
             fields: dict[str, str] | None = None) -> CallSpec:
        return CallSpec(name, fn, right=right, kinds=ADMIN_SYSTEM, args=args, result=result,
                        doc=fn.__doc__ or "", bound=bound, fields=fields or {})

    return [
        spec("tokens.create", tokens_create, "tokens.write",
             {"name": "str", "groups": "list", "expires_at": "time?"}, fields=CREATED_FIELDS),
        spec("tokens.list", tokens_list, "tokens.read", {"limit": "int?", "offset": "int?"}, result="list",
             bound=f"page:{PAGE}", fields=TOKEN_FIELDS),
        spec("tokens.revoke", tokens_revoke, "tokens.write", {"token_id": "int"}, result="bool"),
    ]
