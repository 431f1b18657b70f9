"""``radius.history``: an account's RADIUS sessions, past and current, for the subscriber card.

Right ``radius.read`` (as ``radius.sessions``, which lists only the open
ones with what a Disconnect needs).  Paged: an account's history grows with
every session it ever had.
"""

from __future__ import annotations

from typing import Any

from billcore.api import ADMIN, handler, need_int, page
from billcore.billing.accounts import get_account
from billcore.radius.sessions import PAGE, session_history
from billcore.server.call_context import CallContext
from billcore.server.calls import CallSpec
from billcore.server.context import CoreContext

__all__ = ["calls"]


def calls(core: CoreContext) -> list[CallSpec]:
    @handler
    async def radius_history(ctx: CallContext, account_id: int, limit: int = 100,
                             offset: int = 0) -> list[dict[str, Any]]:
        """Past and current RADIUS sessions of the account, newest first: login, NAS name, framed IP, start
        and stop (none while open), octets in and out, and why it ended (terminate_cause)."""
        need_int("account_id", account_id)
        limit, offset = page(limit, offset, PAGE)
        async with core.pool.acquire() as conn:
            await get_account(conn, account_id)
            return await session_history(conn, account_id, limit=limit, offset=offset)

    return [CallSpec("radius.history", radius_history, right="radius.read", kinds=ADMIN,
                     args={"account_id": "int", "limit": "int?", "offset": "int?"}, result="list",
                     doc=radius_history.__doc__ or "", bound=f"page:{PAGE}")]
