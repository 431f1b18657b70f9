"""Reports, the period preview, and the subscriber's tariff and traffic calls.

Admin calls (kinds ``{"admin"}``, right ``reports.read``):

* ``reports.traffic`` (streaming) — per (account, class, local day): quantity
  and amount, from ``usage_daily``; chunks of up to 1 000 rows
  ``[account_id, class_id, "YYYY-MM-DD", quantity, amount]``; result: row count.
* ``reports.charges`` (streaming) — per (service, period start): accounts and
  the amount booked, from ``periodic_charges`` and ``usage_counters``; chunks
  of ``[service_id, period_start, accounts, amount]``.
* ``reports.revenue`` — per tariff, the periodic and usage amounts of
  periods starting in ``[since, until)`` (links in force at the period start).
* ``reports.preview`` — what an account pays this accounting period so far
  (the pure ``rating.preview``: usage at current tariffs + periodic fees).

Subscriber calls (kinds ``{"user"}``, the principal's own accounts only):
``me.tariff`` (current tariff, services, prepaid volume left this period)
and ``me.traffic`` (per day and class).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Final

from billcore.api import ADMIN, USER, handler, need_int, page
from billcore.api.tariffs import _date, plain
from billcore.billing.errors import TariffError
from billcore.billing import tariffs as T
from billcore.billing.ledger_errors import UnknownAccount
from billcore.billing.periods import period_containing
from billcore.billing.rating import CounterKey, preview
from billcore.calls import CallSpec
from billcore.context import CoreContext

__all__ = ["account_preview", "calls"]

CHUNK: Final = 1_000
MAX_ROWS: Final = 10_000_000
_WIDE: Final = timedelta(days=400)


async def account_preview(conn: Any, account_id: int, now: datetime, tz: Any) -> dict[str, Any]:
    """The pure preview of one account at ``now``, as plain values."""
    book = await T.load_book(conn, [account_id], tz=tz, since=now - _WIDE, until=now)
    if account_id not in book.accounts:
        raise UnknownAccount(f"account {account_id} does not exist")
    rows = await conn.fetch(
        "SELECT service_id, class_id, range_id, period_start, quantity FROM usage_counters"
        " WHERE account_id = $1 AND period_start >= $2", account_id, now - _WIDE)
    counters = {CounterKey(account_id, r["service_id"], r["class_id"], r["range_id"], r["period_start"]):
                r["quantity"] for r in rows if r["service_id"] in book.services}
    periodic = await T.load_periodic(conn)
    links = await T.load_links(conn, [account_id], now - _WIDE, now + _WIDE, kinds=("periodic",))
    p = preview(account_id, book, counters, periodic, links, now)
    return {
        "account_id": account_id, "period_start": p.period.start, "period_end": p.period.end,
        "total": p.total,
        "lines": [{"service_id": l.service_id, "kind": l.kind, "class_id": l.klass,
                   "range_id": l.range_id, "quantity": l.quantity, "amount": l.amount} for l in p.lines],
    }


def calls(core: CoreContext) -> list[CallSpec]:
    tz = core.config.zone

    async def stream_rows(ctx: Any, sql: str, *args: Any) -> dict[str, Any]:
        sent = 0
        chunk: list[list[Any]] = []
        async with core.pool.acquire() as conn, conn.transaction(readonly=True):
            async for r in conn.cursor(sql, *args, prefetch=CHUNK):
                chunk.append(plain(list(r.values())))
                sent += 1
                if len(chunk) >= CHUNK:
                    await ctx.stream(chunk)
                    chunk = []
                if sent >= MAX_ROWS:
                    break
        if chunk:
            await ctx.stream(chunk)
        return {"rows": sent, "truncated": sent >= MAX_ROWS}

    @handler
    async def reports_traffic(ctx: Any, since: str, until: str, account_id: int | None = None) -> dict[str, Any]:
        """Traffic per account, class and day in [since, until) (ISO dates); streamed."""
        return await stream_rows(
            ctx, "SELECT account_id, class_id, day, quantity, amount FROM usage_daily"
            " WHERE day >= $1 AND day < $2 AND ($3::bigint IS NULL OR account_id = $3)"
            " ORDER BY account_id, day, class_id",
            _date(since, "since"), _date(until, "until"), account_id)

    @handler
    async def reports_charges(ctx: Any, since: datetime, until: datetime) -> dict[str, Any]:
        """Charges per service and period start in [since, until); streamed."""
        return await stream_rows(
            ctx, "SELECT service_id, period_start, count(DISTINCT account_id), sum(charged)::bigint FROM ("
            " SELECT service_id, period_start, account_id, charged FROM periodic_charges"
            " UNION ALL SELECT service_id, period_start, account_id, charged FROM usage_counters) c"
            " WHERE period_start >= $1 AND period_start < $2 GROUP BY 1, 2 ORDER BY 2, 1", since, until)

    @handler
    async def reports_revenue(ctx: Any, since: datetime, until: datetime, limit: int = 1000,
                              offset: int = 0) -> list[dict[str, Any]]:
        """Amounts per tariff for periods starting in [since, until), by tariff id (paged)."""
        limit, offset = page(limit, offset, 1000)
        async with core.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT f.id AS tariff_id, f.name, sum(c.charged)::bigint AS amount,"
                " count(DISTINCT c.account_id) AS accounts FROM ("
                " SELECT account_id, service_id, period_start, charged FROM periodic_charges"
                " UNION ALL SELECT account_id, service_id, period_start, charged FROM usage_counters) c"
                " JOIN account_tariffs t ON t.account_id = c.account_id AND t.valid_from <= c.period_start"
                "  AND (t.valid_to IS NULL OR t.valid_to > c.period_start)"
                " JOIN tariffs f ON f.id = t.tariff_id"
                " JOIN tariff_services ts ON ts.tariff_id = f.id AND ts.service_id = c.service_id"
                " WHERE c.period_start >= $1 AND c.period_start < $2 GROUP BY f.id ORDER BY f.id LIMIT $3 OFFSET $4",
                since, until, limit, offset)
        return [dict(r) for r in rows]

    @handler
    async def reports_preview(ctx: Any, account_id: int) -> dict[str, Any]:
        """What the account pays this accounting period so far, line by line."""
        async with core.pool.acquire() as conn:
            return await account_preview(conn, need_int("account_id", account_id), core.now(), tz)

    async def own(conn: Any, ctx: Any, account_id: int | None) -> list[int]:
        ids = [r["id"] for r in await conn.fetch(
            "SELECT id FROM accounts WHERE user_id = $1 ORDER BY is_basic DESC, id", int(ctx.principal.id))]
        if account_id is None:
            return ids
        if account_id not in ids:
            raise UnknownAccount(f"account {account_id} does not exist")
        return [account_id]

    @handler
    async def me_tariff(ctx: Any, account_id: int | None = None) -> list[dict[str, Any]]:
        """My tariff and services per account, with the prepaid volume left this period."""
        now = core.now()
        out = []
        async with core.pool.acquire() as conn:
            for acc in await own(conn, ctx, account_id):
                spec = await T.account_period(conn, acc)
                period = period_containing(spec, now, tz)
                left = await conn.fetch(
                    "SELECT r.service_id, coalesce(r.class_id, -1) AS class_id, r.range_id, r.prepaid,"
                    " greatest(0, r.prepaid - coalesce((SELECT sum(c.quantity) FROM usage_counters c"
                    "  WHERE c.account_id = $1 AND c.service_id = r.service_id AND c.period_start = $2"
                    "  AND c.class_id = coalesce(r.class_id, -1) AND c.range_id = coalesce(r.range_id, 0)), 0))::bigint"
                    "  AS prepaid_left"  # sum(bigint) is numeric: a Decimal cannot cross the wire
                    " FROM service_rates r WHERE r.prepaid > 0 AND r.service_id = ANY($3::bigint[])",
                    acc, period.start, [s["service_id"] for s in await T.account_links(conn, acc, now)])
                links = await T.account_links(conn, acc, now)
                out.append({
                    "account_id": acc, "period_start": period.start, "period_end": period.end,
                    "tariff": links[0]["tariff"] if links else None,
                    "services": [{"id": l["service_id"], "name": l["service"], "kind": l["kind"],
                                  "fee": l["fee"]} for l in links],
                    "prepaid": [dict(r) for r in left],
                })
        return out

    @handler
    async def me_traffic(ctx: Any, since: str, until: str, account_id: int | None = None) -> list[dict[str, Any]]:
        """My traffic per day and class in [since, until) (at most 366 days)."""
        first, last = _date(since, "since"), _date(until, "until")
        if not timedelta(0) <= last - first <= timedelta(days=366):
            raise TariffError("the range is 0..366 days")
        async with core.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT account_id, day, class_id, quantity, amount FROM usage_daily"
                " WHERE account_id = ANY($1::bigint[]) AND day >= $2 AND day < $3 ORDER BY day, class_id",
                await own(conn, ctx, account_id), first, last)
        return plain([dict(r) for r in rows])

    return [
        CallSpec("reports.traffic", reports_traffic, right="reports.read", kinds=ADMIN, streaming=True,
                 args={"since": "str", "until": "str", "account_id": "int?"}, doc=reports_traffic.__doc__ or "",
                 bound="stream"),
        CallSpec("reports.charges", reports_charges, right="reports.read", kinds=ADMIN, streaming=True,
                 args={"since": "time", "until": "time"}, doc=reports_charges.__doc__ or "", bound="stream"),
        CallSpec("reports.revenue", reports_revenue, right="reports.read", kinds=ADMIN,
                 args={"since": "time", "until": "time", "limit": "int?", "offset": "int?"},
                 doc=reports_revenue.__doc__ or "", bound="page:1000"),
        CallSpec("reports.preview", reports_preview, right="reports.read", kinds=ADMIN,
                 args={"account_id": "int"}, doc=reports_preview.__doc__ or "", bound="fixed"),
        # one account's tariff and services; the user's accounts are few (users.get lists 100)
        CallSpec("me.tariff", me_tariff, kinds=USER, args={"account_id": "int?"}, doc=me_tariff.__doc__ or "",
                 bound="fixed"),
        # at most 366 days x classes x the user's accounts
        CallSpec("me.traffic", me_traffic, kinds=USER, args={"since": "str", "until": "str", "account_id": "int?"},
                 doc=me_traffic.__doc__ or "", bound="fixed"),
    ]
