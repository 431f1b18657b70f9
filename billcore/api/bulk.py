"""``bulk.preview`` and ``bulk.apply``: one action over every subscriber a filter finds.

Rights: ``bulk.write``, and the right of the action's own call
(``tariffs.write`` for set_tariff, ``blocks.write`` for block/unblock),
checked at preview and again at apply.  The rules (token, count, cap, one
transaction, audit) are ``billcore.billing.bulk``'s; block changes are
announced after the commit as blocks.set announces them, so the radius
process disconnects newly blocked sessions.
"""

from __future__ import annotations

import secrets
from typing import Any

from billcore.api import ADMIN, announce, handler, who
from billcore.billing.bulk import (
    BulkAction, apply_bulk, check_action, count_for_bulk, open_token, seal_token,
)
from billcore.billing.subscribers import ROW_FIELDS, SubscriberFilter, find_subscribers
from billcore.server.call_context import CallContext
from billcore.server.calls import CallSpec, allows
from billcore.server.context import CoreContext
from urfa.errors import CallFailed

__all__ = ["SAMPLE", "calls"]

SAMPLE = 20


def calls(core: CoreContext) -> list[CallSpec]:
    # tokens are signed with a key of this process: a restarted core asks for a new preview
    key: bytes = core.extras.setdefault("bulk_token_key", secrets.token_bytes(32))
    tz = core.config.zone

    def principal(ctx: CallContext) -> str:
        return f"{ctx.principal.kind}:{ctx.principal.id}"

    def need_right(ctx: CallContext, action: BulkAction) -> None:
        if not allows(ctx.principal.rights, action.right):
            raise CallFailed("forbidden", f"{action.action} needs the right {action.right} too")

    @handler
    async def bulk_preview(ctx: CallContext, filter: dict[str, Any], action: str, tariff_id: int | None = None,
                           start: str | None = None, reason: str | None = None) -> dict[str, Any]:
        """What an action would change: {count, sample (at most 20 rows), token, expires_at}. The filter
        takes the arguments of subscribers.search; action is set_tariff (with tariff_id and start "now" or
        "next_period"), block or unblock (the administrative block, with a reason). Apply the token within
        10 minutes with bulk.apply; more than 10,000 subscribers is refused (bulk.too_many)."""
        wanted = SubscriberFilter.of(filter)
        bulk_action = BulkAction.of(action, tariff_id, start, reason)
        need_right(ctx, bulk_action)
        now = core.now()
        async with core.pool.acquire() as conn, conn.transaction(readonly=True):
            await check_action(conn, bulk_action)
            count = await count_for_bulk(conn, wanted, now)
            sample = await find_subscribers(conn, wanted, now, limit=SAMPLE)
        token, preview = seal_token(key, wanted, bulk_action, count, principal(ctx), now)
        return {"count": count, "sample": sample, "token": token, "expires_at": preview.expires_at}

    @handler
    async def bulk_apply(ctx: CallContext, token: str, expect_count: int) -> dict[str, Any]:
        """Apply a previewed action in one transaction: {bulk_id, changed}. Refused with bulk.changed when the
        filter now matches another count than expect_count and the preview, bulk.used when applied already,
        bulk.token when the token expired or is not this operator's. Every changed account gets its own audit
        row, and the bulk one (bulk_id)."""
        now = core.now()
        preview = open_token(key, token, principal(ctx), now)
        need_right(ctx, preview.action)
        async with core.pool.acquire() as conn:
            outcome = await apply_bulk(conn, preview, expect_count, who(ctx), now=now, tz=tz)
        await announce(core, outcome.block_changes)
        return {"bulk_id": outcome.bulk_id, "changed": outcome.changed}

    return [
        CallSpec("bulk.preview", bulk_preview, right="bulk.write", kinds=ADMIN,
                 args={"filter": "map", "action": "str", "tariff_id": "int?", "start": "str?", "reason": "str?"},
                 result="map", doc=bulk_preview.__doc__ or "", bound="fixed",
                 fields={"count": "int", "sample": "list", "token": "str", "expires_at": "time",
                         **{f"sample.{name}": kind for name, kind in ROW_FIELDS.items()}}),
        CallSpec("bulk.apply", bulk_apply, right="bulk.write", kinds=ADMIN,
                 args={"token": "str", "expect_count": "int"}, result="map", doc=bulk_apply.__doc__ or "",
                 bound="fixed", fields={"bulk_id": "int", "changed": "int"}),
    ]

