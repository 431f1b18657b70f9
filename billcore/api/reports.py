"""Reports, the period preview, and the subscriber's tariff and traffic calls.

Admin calls (kinds ``{"admin"}``, right ``reports.read``):

* ``reports.traffic`` (streaming) — per (account, class, local day): quantity
  and amount, from ``usage_daily``; chunks of up to 1 000 rows
  ``[account_id, class_id, "YYYY-MM-DD", quantity, amount]``; result: row count.
* ``reports.charges`` (streaming) — per (service, period start): accounts and
  the amount booked, from ``periodic_charges``, ``usage_counters`` and
  ``once_charges`` (a once-off fee's "period start" is when it was booked);
  chunks of ``[service_id, period_start, accounts, amount]``.
* ``reports.revenue`` — per tariff, what was charged for periods starting in
  ``[since, until)`` (once-off fees: booked in it), open periods included,
  split into *final* and *provisional* amounts (see `REVENUE_SQL`), and a
  ``(total)`` row.
* ``reports.preview`` — what an account pays this accounting period so far
  (the pure ``rating.preview``: usage at current tariffs + periodic fees).

Subscriber calls (kinds ``{"user"}``, the principal's own accounts only):
``me.tariff`` (current tariff, services, prepaid volume left this period)
and ``me.traffic`` (per day and class).
"""

from __future__ import annotations

from datetime import datetime, timedelta, tzinfo
from typing import Any, Final

from billcore.api import ADMIN, USER, handler, need_int, page
from billcore.api.tariffs import _date, plain, plain_rows
from billcore.common.errors import TariffError
from billcore.billing.tariffs import account_links, account_period, load_book, load_links, load_periodic
from billcore.billing.ledger_errors import UnknownAccount
from billcore.billing.periods import period_containing
from billcore.billing.reports_sql import REVENUE_SQL
from billcore.billing.rating import CounterKey, preview
from billcore.db.rows import DbConnection
from billcore.server.call_context import CallContext
from billcore.server.calls import CallSpec
from billcore.server.context import CoreContext

__all__ = ["REVENUE_SQL", "account_preview", "calls"]

CHUNK: Final = 1_000
MAX_ROWS: Final = 10_000_000
_WIDE: Final = timedelta(days=400)


# Revenue in one statement, set-wise over every charge of the range: billcore.billing.reports_sql.

_KINDS: Final = ("periodic", "usage", "once")
TOTAL: Final = "(total)"
NO_TARIFF: Final = "(no tariff)"


def revenue_result(rows: list[Any]) -> list[dict[str, Any]]:
    """The rows of `REVENUE_SQL` as the call's answer: one row per tariff, then a ``(total)`` row
    (tariff_id None). ``(no tariff)``: charges of a service no link of the account includes any more.
    Every amount is declared as money in the call's ``fields``; sums stay Python ints, exact however
    large."""
    def empty(tariff_id: Any, name: str) -> dict[str, Any]:
        return {"tariff_id": tariff_id, "name": name, "accounts": 0, "final_amount": 0, "provisional_amount": 0,
                "amount": 0, **{f"{k}_amount": 0 for k in _KINDS}}

    tariffs: dict[Any, dict[str, Any]] = {}
    total = empty(None, TOTAL)
    for row in rows:
        amount = int(row["amount"])
        if row["grand_total"]:
            total.update(amount=amount, accounts=row["accounts"])
            continue
        entry = tariffs.setdefault(row["tariff_id"], empty(row["tariff_id"], row["name"] or NO_TARIFF))
        if row["tariff_total"]:
            entry.update(amount=amount, accounts=row["accounts"])
            continue
        for target in (entry, total):
            target["final_amount" if row["final"] else "provisional_amount"] += amount
            target[f"{row['kind']}_amount"] += amount
    out = [*sorted(tariffs.values(), key=lambda tariff: (tariff["tariff_id"] is None, tariff["tariff_id"] or 0)), total]
    for entry in out:
        # every charge is final or provisional, and of one kind: the three views add up to the same sum
        assert entry["final_amount"] + entry["provisional_amount"] == entry["amount"] \
            == sum(entry[f"{k}_amount"] for k in _KINDS), entry
    return out


async def account_preview(conn: DbConnection, account_id: int, now: datetime, tz: tzinfo) -> dict[str, Any]:
    """The pure preview of one account at ``now``, as plain values."""
    book = await load_book(conn, [account_id], tz=tz, since=now - _WIDE, until=now)
    if account_id not in book.accounts:
        raise UnknownAccount(f"account {account_id} does not exist")
    rows = await conn.fetch(
        "SELECT service_id, class_id, range_id, period_start, quantity FROM usage_counters"
        " WHERE account_id = $1 AND period_start >= $2", account_id, now - _WIDE)
    counters = {CounterKey(account_id, row["service_id"], row["class_id"], row["range_id"], row["period_start"]):
                row["quantity"] for row in rows if row["service_id"] in book.services}
    periodic = await load_periodic(conn)
    links = await load_links(conn, [account_id], now - _WIDE, now + _WIDE, kinds=("periodic",))
    previewed = preview(account_id, book, counters, periodic, links, now)
    return {
        "account_id": account_id, "period_start": previewed.period.start, "period_end": previewed.period.end,
        "total": previewed.total,
        "lines": [{"service_id": line.service_id, "kind": line.kind, "class_id": line.klass,
                   "range_id": line.range_id, "quantity": line.quantity, "amount": line.amount}
                  for line in previewed.lines],
    }


def calls(core: CoreContext) -> list[CallSpec]:
    tz = core.config.zone

    async def stream_rows(ctx: CallContext, sql: str, *args: Any) -> dict[str, Any]:
        sent = 0
        chunk: list[list[Any]] = []
        async with core.pool.acquire() as conn, conn.transaction(readonly=True):
            async for row in conn.cursor(sql, *args, prefetch=CHUNK):
                chunk.append(plain(list(row.values())))
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
    async def reports_traffic(ctx: CallContext, since: str, until: str,
                              account_id: int | None = None) -> dict[str, Any]:
        """Traffic per account, class and day in [since, until) (ISO dates); streamed."""
        return await stream_rows(
            ctx, "SELECT account_id, class_id, day, quantity, amount FROM usage_daily"
            " WHERE day >= $1 AND day < $2 AND ($3::bigint IS NULL OR account_id = $3)"
            " ORDER BY account_id, day, class_id",
            _date(since, "since"), _date(until, "until"), account_id)

    @handler
    async def reports_charges(ctx: CallContext, since: datetime, until: datetime) -> dict[str, Any]:
        """Charges per service and period start in [since, until), once-off fees by the time they were
        booked; streamed."""
        return await stream_rows(
            ctx, "SELECT service_id, period_start, count(DISTINCT account_id), sum(charged)::bigint FROM ("
            " SELECT service_id, period_start, account_id, charged FROM periodic_charges"
            " UNION ALL SELECT service_id, period_start, account_id, charged FROM usage_counters"
            " UNION ALL SELECT service_id, charged_at, account_id, amount FROM once_charges) c"
            " WHERE period_start >= $1 AND period_start < $2 GROUP BY 1, 2 ORDER BY 2, 1", since, until)

    @handler
    async def reports_revenue(ctx: CallContext, since: datetime, until: datetime, limit: int = 1000,
                              offset: int = 0) -> list[dict[str, Any]]:
        """Revenue per tariff, then a (total) row, for the periods that start in [since, until), open
        periods included: amount = final_amount + provisional_amount = periodic_amount + usage_amount +
        once_amount, and accounts. Final amounts can no longer change (closed periods); provisional ones
        are the open periods' charges so far. Paged by tariff id; the (total) row is the last row of the
        last page."""
        limit, offset = page(limit, offset, 1000)
        if not since < until:
            raise TariffError("since must be before until")
        async with core.pool.acquire() as conn, conn.transaction(readonly=True, isolation="repeatable_read"):
            rows = revenue_result(await conn.fetch(REVENUE_SQL, since, until, core.now()))
        return rows[offset:offset + limit]

    @handler
    async def reports_preview(ctx: CallContext, account_id: int) -> dict[str, Any]:
        """What the account pays this accounting period so far, line by line."""
        async with core.pool.acquire() as conn:
            return await account_preview(conn, need_int("account_id", account_id), core.now(), tz)

    async def own(conn: DbConnection, ctx: CallContext, account_id: int | None) -> list[int]:
        ids = [row["id"] for row in await conn.fetch(
            "SELECT id FROM accounts WHERE user_id = $1 ORDER BY is_basic DESC, id", int(ctx.principal.id))]
        if account_id is None:
            return ids
        if account_id not in ids:
            raise UnknownAccount(f"account {account_id} does not exist")
        return [account_id]

    @handler
    async def me_tariff(ctx: CallContext, account_id: int | None = None) -> list[dict[str, Any]]:
        """My tariff and services per account, with the prepaid volume left this period."""
        now = core.now()
        out = []
        async with core.pool.acquire() as conn:
            for acc in await own(conn, ctx, account_id):
                spec = await account_period(conn, acc)
                period = period_containing(spec, now, tz)
                left = await conn.fetch(
                    "SELECT r.service_id, coalesce(r.class_id, -1) AS class_id, r.range_id, r.prepaid,"
                    " greatest(0, r.prepaid - coalesce((SELECT sum(c.quantity) FROM usage_counters c"
                    "  WHERE c.account_id = $1 AND c.service_id = r.service_id AND c.period_start = $2"
                    "  AND c.class_id = coalesce(r.class_id, -1) AND c.range_id = coalesce(r.range_id, 0)), 0))::bigint"
                    "  AS prepaid_left"  # sum(bigint) is numeric: a Decimal cannot cross the wire
                    " FROM service_rates r WHERE r.prepaid > 0 AND r.service_id = ANY($3::bigint[])",
                    acc, period.start, [link["service_id"] for link in await account_links(conn, acc, now)])
                links = await account_links(conn, acc, now)
                out.append({
                    "account_id": acc, "period_start": period.start, "period_end": period.end,
                    "tariff": links[0]["tariff"] if links else None,
                    "services": [{"id": link["service_id"], "name": link["service"], "kind": link["kind"],
                                  "fee": link["fee"]} for link in links],
                    "prepaid": [dict(row) for row in left],
                })
        return out

    @handler
    async def me_traffic(ctx: CallContext, since: str, until: str,
                         account_id: int | None = None) -> list[dict[str, Any]]:
        """My traffic per day and class in [since, until) (at most 366 days)."""
        first, last = _date(since, "since"), _date(until, "until")
        if not timedelta(0) <= last - first <= timedelta(days=366):
            raise TariffError("the range is 0..366 days")
        async with core.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT account_id, day, class_id, quantity, amount FROM usage_daily"
                " WHERE account_id = ANY($1::bigint[]) AND day >= $2 AND day < $3 ORDER BY day, class_id",
                await own(conn, ctx, account_id), first, last)
        return plain_rows(dict(row) for row in rows)

    return [
        CallSpec("reports.traffic", reports_traffic, right="reports.read", kinds=ADMIN, streaming=True,
                 args={"since": "str", "until": "str", "account_id": "int?"}, doc=reports_traffic.__doc__ or "",
                 result="map", fields={"account_id": "int", "class_id": "int", "day": "str", "quantity": "int",
                                       "amount": "money"}, bound="stream"),
        CallSpec("reports.charges", reports_charges, right="reports.read", kinds=ADMIN, streaming=True,
                 args={"since": "time", "until": "time"}, doc=reports_charges.__doc__ or "",
                 result="map", fields={"service_id": "int", "period_start": "time", "accounts": "int",
                                       "amount": "money"}, bound="stream"),
        CallSpec("reports.revenue", reports_revenue, right="reports.read", kinds=ADMIN, result="list",
                 args={"since": "time", "until": "time", "limit": "int?", "offset": "int?"},
                 doc=reports_revenue.__doc__ or "", bound="page:1000",
                 fields={"tariff_id": "int", "name": "str", "accounts": "int", "final_amount": "money",
                         "provisional_amount": "money", "amount": "money",
                         **{f"{k}_amount": "money" for k in _KINDS}}),
        CallSpec("reports.preview", reports_preview, right="reports.read", kinds=ADMIN, result="map",
                 args={"account_id": "int"}, doc=reports_preview.__doc__ or "",
                 fields={"total": "money", "lines": "list", "lines.amount": "money"}, bound="fixed"),
        # one account's tariff and services; the user's accounts are few (users.get lists 100)
        CallSpec("me.tariff", me_tariff, kinds=USER, args={"account_id": "int?"}, doc=me_tariff.__doc__ or "",
                 result="list", fields={"services": "list", "services.fee": "money"}, bound="fixed"),
        # at most 366 days x classes x the user's accounts
        CallSpec("me.traffic", me_traffic, kinds=USER, args={"since": "str", "until": "str", "account_id": "int?"},
                 doc=me_traffic.__doc__ or "", result="list", fields={"quantity": "int", "amount": "money"},
                 bound="fixed"),
    ]
