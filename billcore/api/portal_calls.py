"""Subscriber calls the virtual office and the tray tool need beyond ``me.*``
of ``billcore.api.me``: ``me.tariff``, ``me.traffic`` and ``me.sessions``.

Theory of operation
-------------------
Same rules as ``billcore.api.me``: kinds ``{"user"}`` only, the principal id
is the user id, and an ``account_id`` that is not the principal's answers
``accounts.unknown`` exactly like one that does not exist (``me._own``).
Every call is read-only and bounded (days, limit).

* ``me.tariff`` — the tariff in force now, its services, the current
  accounting period and, per priced traffic class (or time) with a prepaid
  volume, how much of it is used and left.
* ``me.traffic`` — per-day, per-class quantities and amounts of the last
  ``days`` days (``usage_daily``), days as ISO strings.
* ``me.sessions`` — the account's RADIUS sessions, newest first.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from typing import Any

from billcore.api import USER, handler, need_int, page
from billcore.api.me import _own
from billcore.billing.ledger_errors import InvalidValue
from billcore.billing.periods import period_containing
from billcore.billing.tariffs import account_links, account_period
from billcore.calls import CallSpec
from billcore.context import CoreContext

__all__ = ["calls"]

MAX_DAYS = 366


def calls(core: CoreContext) -> list[CallSpec]:
    def uid(ctx: Any) -> int:
        if ctx.principal.kind != "user":
            raise InvalidValue("me.* calls are for subscriber sessions")
        return int(ctx.principal.id)

    def tz() -> dt.tzinfo:
        return zoneinfo.ZoneInfo(core.config.core.timezone)

    @handler
    async def me_tariff(ctx: Any, account_id: int | None = None) -> dict[str, Any]:
        """My tariff now: services, the current period, prepaid volume used and left."""
        now = core.now()
        async with core.pool.acquire() as conn:
            acc = (await _own(conn, uid(ctx), account_id))[0]
            links = await account_links(conn, acc, now)
            period = period_containing(await account_period(conn, acc), now, tz())
            service_ids = [r["service_id"] for r in links]
            rates = await conn.fetch(
                "SELECT r.service_id, s.name AS service, s.kind, r.class_id, c.name AS class,"
                " r.range_id, t.name AS range, r.prepaid,"
                " coalesce((SELECT sum(u.quantity) FROM usage_counters u WHERE u.account_id = $1"
                "   AND u.service_id = r.service_id AND u.class_id = coalesce(r.class_id, -1)"
                "   AND u.range_id = coalesce(r.range_id, 0) AND u.period_start = $3), 0)::bigint AS used"
                " FROM service_rates r JOIN services s ON s.id = r.service_id"
                " LEFT JOIN traffic_classes c ON c.id = r.class_id"
                " LEFT JOIN time_ranges t ON t.id = r.range_id"
                " WHERE r.service_id = ANY($2::bigint[]) AND r.prepaid > 0 ORDER BY r.service_id, r.id",
                acc, service_ids, period.start)
        prepaid = [{
            "service_id": r["service_id"], "service": r["service"], "kind": r["kind"],
            "class_id": r["class_id"], "class": r["class"], "range": r["range"],
            "prepaid": int(r["prepaid"]), "used": int(r["used"]),
            "left": max(0, int(r["prepaid"]) - int(r["used"])),
        } for r in rates]
        return {
            "account_id": acc,
            "tariff_id": links[0]["tariff_id"] if links else None,
            "tariff": links[0]["tariff"] if links else None,
            "since": links[0]["valid_from"] if links else None,
            "services": [{"id": r["service_id"], "name": r["service"], "kind": r["kind"], "fee": r["fee"]}
                         for r in links],
            "period_start": period.start, "period_end": period.end,
            "prepaid": prepaid,
        }

    @handler
    async def me_traffic(ctx: Any, account_id: int | None = None, days: int = 31) -> dict[str, Any]:
        """My traffic per day and class over the last ``days`` days (quantities in bytes)."""
        days = need_int("days", 31 if days is None else days, 1, MAX_DAYS)
        today = core.now().astimezone(tz()).date()
        first = today - dt.timedelta(days=days - 1)
        async with core.pool.acquire() as conn:
            acc = (await _own(conn, uid(ctx), account_id))[0]
            rows = await conn.fetch(
                "SELECT d.day, d.class_id, coalesce(c.name, '#' || d.class_id) AS class,"
                " d.quantity, d.amount FROM usage_daily d"
                " LEFT JOIN traffic_classes c ON c.id = d.class_id"
                " WHERE d.account_id = $1 AND d.day BETWEEN $2 AND $3 AND d.class_id <> -1"
                " ORDER BY d.day, d.class_id", acc, first, today)
        return {
            "account_id": acc, "first": first.isoformat(), "last": today.isoformat(),
            "rows": [{"day": r["day"].isoformat(), "class_id": r["class_id"], "class": r["class"],
                      "bytes": int(r["quantity"]), "amount": int(r["amount"])} for r in rows],
        }

    @handler
    async def me_sessions(ctx: Any, account_id: int | None = None, limit: int = 50,
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
        return [dict(r) for r in rows]

    def spec(name: str, fn: Any, args: dict[str, str], result: str = "map") -> CallSpec:
        return CallSpec(name, fn, right=None, kinds=USER, module="builtin", args=args, result=result,
                        doc=fn.__doc__ or "")

    return [
        spec("me.tariff", me_tariff, {"account_id": "int?"}),
        spec("me.traffic", me_traffic, {"account_id": "int?", "days": "int?"}),
        spec("me.sessions", me_sessions, {"account_id": "int?", "limit": "int?", "offset": "int?"}, "list"),
    ]
