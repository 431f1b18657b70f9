"""Subscriber calls the virtual office needs beyond ``billcore.api.me`` and
``billcore.api.reports`` (``me.tariff``, ``me.traffic``): ``me.sessions`` and
``me.classes``.

Theory of operation
-------------------
Same rules as ``billcore.api.me``: kinds ``{"user"}`` only, the principal id
is the user id, and an ``account_id`` that is not the principal's answers
``accounts.unknown`` exactly like one that does not exist (``me._own``).
Every call is read-only and bounded.

* ``me.sessions`` — the account's RADIUS sessions, newest first.
* ``me.classes`` — id and name of each traffic class, so that the office
  can label ``me.traffic``'s class ids (names only: the rules stay admin's).
"""

from __future__ import annotations

from typing import Any

from billcore.api import USER, handler, page
from billcore.api.me import _own
from billcore.billing.ledger_errors import InvalidValue
from billcore.server.call_context import CallContext
from billcore.server.calls import CallSpec
from billcore.server.context import CoreContext

__all__ = ["calls"]


def calls(core: CoreContext) -> list[CallSpec]:
    def uid(ctx: CallContext) -> int:
        if ctx.principal.kind != "user":
            raise InvalidValue("me.* calls are for subscriber sessions")
        return int(ctx.principal.id)

    @handler
    async def me_classes(ctx: CallContext) -> list[dict[str, Any]]:
        """Names of the traffic classes (to label my traffic; no rules, no other data)."""
        uid(ctx)
        async with core.pool.acquire() as conn:
            rows = await conn.fetch("SELECT id, name FROM traffic_classes ORDER BY position, id LIMIT 1000")
        return [dict(row) for row in rows]

    @handler
    async def me_sessions(ctx: CallContext, account_id: int | None = None, limit: int = 50,
                          offset: int = 0) -> list[dict[str, Any]]:
        """My RADIUS sessions, newest first."""
        limit, offset = page(limit, offset, 200)
        async with core.pool.acquire() as conn:
            ids = await _own(conn, uid(ctx), account_id)
            rows = await conn.fetch(
                "SELECT id, account_id, host(framed_ip) AS ip, started_at, ended_at, end_reason,"
                " session_time, input_octets, output_octets, charged FROM radius_sessions"
                " WHERE account_id = ANY($1::bigint[]) ORDER BY started_at DESC, id DESC"
                " LIMIT $2 OFFSET $3", ids, limit, offset)
        return [dict(row) for row in rows]

    def spec(name: str, fn: Any, args: dict[str, str], result: str = "map", bound: str = "fixed",
             fields: dict[str, str] | None = None) -> CallSpec:
        return CallSpec(name, fn, right=None, kinds=USER, module="builtin", args=args, result=result,
                        doc=fn.__doc__ or "", bound=bound, fields=fields or {})

    return [
        spec("me.classes", me_classes, {}, "list"),  # at most 1 000 names: a catalogue, not data
        spec("me.sessions", me_sessions, {"account_id": "int?", "limit": "int?", "offset": "int?"}, "list",
             "page:200", {"charged": "money"}),
    ]
