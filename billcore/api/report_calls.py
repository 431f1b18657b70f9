"""The operator's reports: revenue by day/service/tariff, payments, debtors with aging, ARPU, churn, top
traffic and one account's raw flows (docs/reports.md).

Theory of operation
-------------------
Every call here is an admin call (kinds ``{"admin"}``) that needs the right
``reports.read``, streams its rows in chunks of at most `CHUNK` rows
(positional, in the order the call's ``fields`` declare) and answers a
summary map. The rows come from one set-based statement of
`billcore.billing.reports_sql` read through a server-side cursor inside a
read-only REPEATABLE READ transaction: the rows and the summary are of one
snapshot, and however many rows the range holds, the core keeps one chunk
(the summary is a fixed number of sums folded over the rows as they pass).

``reports.flows`` reads the NetFlow workers' hourly Parquet store with
DuckDB, which aggregates the account's legs inside its own bounded memory;
only the top ``limit`` groups come back. An hour without a folder (before
the store began, after retention) reads as no flows.

Arguments are checked before any statement runs: a bad date, an empty or
reversed range, a range over the report's bound, an unknown group word or
a limit outside its range is refused with ``billing.invalid``.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable, Sequence
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from billcore.api import ADMIN, handler, need_int
from billcore.billing.ledger_errors import InvalidValue
from billcore.billing.reports_sql import (
    AGING, ARPU_SQL, CHURN_SQL, DEBTORS_SQL, PAYMENT_GROUPS, PAYMENTS_SQL, REVENUE_DAILY_SQL, REVENUE_GROUPS,
    TRAFFIC_TOP_SQL, average, bucket_of, day_range, local_midnight, month_starts, next_month, parse_month,
)
from billcore.common.rawflows import HOUR_MS, PART_GLOB, hour_dir, pair_to_addr
from billcore.server.call_context import CallContext
from billcore.server.calls import CallSpec
from billcore.server.context import CoreContext

__all__ = ["CHUNK", "FLOW_MAX_DAYS", "calls", "flow_files", "top_flows"]

CHUNK: Final = 1_000
FLOW_MAX_DAYS: Final = 31
MAX_TOP: Final = 1_000
FLOW_BY: Final = ("host", "port", "proto")
PROTOCOLS: Final = {1: "icmp", 6: "tcp", 17: "udp", 47: "gre", 50: "esp", 58: "ipv6-icmp", 132: "sctp"}
OUTBOUND: Final = 1   # a leg's direction: the account sent it (netflow.classifier), so the remote end is dst

Row = list[Any]


def _int(value: Any) -> int:
    """A sum from the database (numeric: an exact Decimal, or NULL over no rows) as an int."""
    return 0 if value is None else int(value)


def _choice(value: object, what: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise InvalidValue(f"{what} must be one of {', '.join(allowed)}")
    assert isinstance(value, str)
    return value


def _instant(value: object, what: str, core: CoreContext, end_of_day: bool) -> datetime:
    """An ISO date or datetime from outside; a date is its local midnight (the next one if ``end_of_day``), a
    datetime without an offset is local time."""
    if type(value) is not str:
        raise InvalidValue(f"{what} must be an ISO date or time string")
    tz = core.config.zone
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            return local_midnight(day + timedelta(days=1) if end_of_day else day, tz)
        at = datetime.fromisoformat(value)
    except (ValueError, OverflowError):
        raise InvalidValue(f"{what} is not an ISO date or time") from None
    return at if at.tzinfo is not None else at.replace(tzinfo=tz)


def _proto(n: int) -> str:
    return PROTOCOLS.get(n, str(n))


def flow_files(root: Path, since_ms: int, until_ms: int) -> list[str]:
    """The finished part files of the hours that hold legs starting in [since_ms, until_ms)."""
    files: list[str] = []
    hour = since_ms // HOUR_MS * HOUR_MS
    while hour < until_ms:
        folder = hour_dir(root, hour)
        hour += HOUR_MS
        if folder.is_dir():
            files.extend(str(p) for p in sorted(folder.glob(PART_GLOB)))
    return files


_FLOW_KEYS: Final = {
    "host": "CASE WHEN direction = 1 THEN dst_hi ELSE src_hi END, CASE WHEN direction = 1 THEN dst_lo ELSE src_lo END",
    "port": "CASE WHEN direction = 1 THEN dst_port ELSE src_port END, proto",
    "proto": "proto",
}


def top_flows(root: Path, account_id: int, since_ms: int, until_ms: int, by: str, limit: int) -> list[Row]:
    """The account's top ``limit`` remote hosts, remote ports (with protocol) or protocols by bytes in
    [since_ms, until_ms): rows ``[key, bytes, packets, flows]``. Counters are scaled by each leg's sampling
    interval, as billing counts them. Runs DuckDB in the calling thread."""
    import duckdb  # DuckDB only where raw flows are aggregated

    keys = _FLOW_KEYS[by]
    sql = (f"SELECT {keys}, sum(bytes::HUGEINT * greatest(sampling, 1)) AS b,"
           f" sum(packets::HUGEINT * greatest(sampling, 1)) AS p, count(*) AS n"
           f" FROM read_parquet($files) WHERE account = $account AND first_ms >= $since AND first_ms < $until"
           f" GROUP BY {keys} ORDER BY b DESC, {keys} LIMIT $limit")
    for attempt in (1, 2):
        files = flow_files(root, since_ms, until_ms)
        if not files:
            return []
        # bounded: one thread, 256 MB, and what does not fit spills under the system's temporary directory
        # (an in-memory DuckDB would spill into the core's working directory)
        con = duckdb.connect(config={"threads": 1, "memory_limit": "256MB",
                                     "temp_directory": str(Path(tempfile.gettempdir()) / "billcore-duckdb")})
        try:
            rows = con.execute(sql, {"files": files, "account": account_id, "since": since_ms, "until": until_ms,
                                     "limit": limit}).fetchall()
            break
        except duckdb.IOException:
            if attempt == 2:    # retention removed a file between the listing and the read, twice
                raise
        finally:
            con.close()
    out: list[Row] = []
    for row in rows:
        if by == "host":
            key = pair_to_addr(row[0], row[1])
        elif by == "port":
            key = f"{row[0]}/{_proto(row[1])}"
        else:
            key = _proto(row[0])
        out.append([key, int(row[-3]), int(row[-2]), int(row[-1])])
    return out


def calls(core: CoreContext) -> list[CallSpec]:
    tz = core.config.zone
    zone_name = core.config.core.timezone
    section = core.config.netflow
    raw_dir = Path(section.raw_dir) if section.raw_dir else core.config.data_dir / "netflow" / "raw"

    async def stream(ctx: CallContext, sql: str, args: Sequence[Any], convert: Callable[[Any], Row]) -> int:
        """Run ``sql`` through a cursor and stream ``convert(row)`` in chunks; the rows sent."""
        sent = 0
        chunk: list[Row] = []
        async with core.pool.acquire() as conn, conn.transaction(readonly=True, isolation="repeatable_read"):
            async for record in conn.cursor(sql, *args, prefetch=CHUNK):
                chunk.append(convert(record))
                sent += 1
                if len(chunk) >= CHUNK:
                    await ctx.stream(chunk)
                    chunk = []
        if chunk:
            await ctx.stream(chunk)
        return sent

    @handler
    async def reports_revenue_daily(ctx: CallContext, since: str, until: str, group: str = "day") -> dict[str, Any]:
        """Revenue per day, service or tariff for the local days [since, until) (ISO dates, at most 3660 days), open periods included; streamed. Rows: key_id, key, accounts, final_amount, provisional_amount, amount, periodic_amount, usage_amount, once_amount. A charge counts on the day its period starts (a once-off fee: the day it was booked), as in reports.revenue. Final amounts can no longer change; provisional ones are the open periods' charges so far (docs/reports.md)."""
        first, last = day_range(since, until)
        group = _choice("day" if group is None else group, "group", tuple(REVENUE_GROUPS))
        args: list[Any] = [local_midnight(first, tz), local_midnight(last, tz), core.now()]
        if group == "day":
            args.append(zone_name)
        total = {"final_amount": 0, "provisional_amount": 0, "amount": 0}

        def convert(r: Any) -> Row:
            row = [r["key_id"], r["key"], r["accounts"], *(_int(r[k]) for k in (
                "final_amount", "provisional_amount", "amount", "periodic_amount", "usage_amount", "once_amount"))]
            for k, v in zip(("final_amount", "provisional_amount", "amount"), row[3:6]):
                total[k] += v
            assert row[3] + row[4] == row[5] == sum(row[6:9]), row   # final + provisional = kinds = amount
            return row

        rows = await stream(ctx, REVENUE_DAILY_SQL(group), args, convert)
        return {"rows": rows, "group": group, "since": first.isoformat(), "until": last.isoformat(), **total}

    @handler
    async def reports_payments(ctx: CallContext, since: str, until: str, group: str = "day") -> dict[str, Any]:
        """Payments per local day, method or operator in the local days [since, until) (ISO dates, at most 3660 days); streamed. Rows: key, payments, paid, cancellations, cancelled, net. A payment counts when and by whom it was taken; a cancellation when and by whom it was cancelled, its amount taken back (net = paid - cancelled)."""
        first, last = day_range(since, until)
        group = _choice("day" if group is None else group, "group", tuple(PAYMENT_GROUPS))
        args: list[Any] = [local_midnight(first, tz), local_midnight(last, tz)]
        if group == "day":
            args.append(zone_name)
        total = {"payments": 0, "paid": 0, "cancellations": 0, "cancelled": 0, "net": 0}

        def convert(r: Any) -> Row:
            row = [r["key"], *(_int(r[k]) for k in total)]
            for k, v in zip(total, row[1:]):
                total[k] += v
            return row

        rows = await stream(ctx, PAYMENTS_SQL(group), args, convert)
        return {"rows": rows, "group": group, "since": first.isoformat(), "until": last.isoformat(), **total}

    @handler
    async def reports_debtors(ctx: CallContext, as_of: str | None = None) -> dict[str, Any]:
        """Accounts whose balance is negative at as_of (an ISO date: the end of that local day, or an ISO time; default now), with the age of their debt; streamed. Rows: account_id, user_id, login, full_name, balance, credit, since, days, bucket. The debt's age counts whole days since the balance last went from zero or more to below zero in the ledger's balance chain; buckets 0-30, 31-60, 61-90 and 90+ days. The result totals each bucket (accounts and the sum of their balances) and all debtors."""
        at = core.now() if as_of is None else _instant(as_of, "as_of", core, end_of_day=True)
        buckets = {name: {"accounts": 0, "balance": 0} for name, _f, _l in AGING}
        total = {"accounts": 0, "balance": 0}

        def convert(r: Any) -> Row:
            days = int(r["days"])
            bucket = bucket_of(days)
            balance = int(r["balance"])
            assert balance < 0, r["account_id"]
            for target in (buckets[bucket], total):
                target["accounts"] += 1
                target["balance"] += balance
            return [r["account_id"], r["user_id"], r["login"], r["full_name"], balance, int(r["credit"]),
                    r["since"], days, bucket]

        rows = await stream(ctx, DEBTORS_SQL, [at], convert)
        return {"rows": rows, "as_of": at, "buckets": [{"bucket": name, **v} for name, v in buckets.items()],
                **total}

    @handler
    async def reports_arpu(ctx: CallContext, month: str) -> dict[str, Any]:
        """Subscribers and ARPU per tariff for a month ("YYYY-MM"); streamed. Rows: tariff_id, name, subscribers, charged, amount, final_amount, arpu. Subscribers: accounts with a link to the tariff in force at some time in the month, not closed before it began. Amount: the charges of periods starting in the month, counted as reports.revenue counts them (final_amount: the part that can no longer change). ARPU = amount / charged accounts, rounded half away from zero to a micro-unit."""
        first = parse_month(month, "month")
        stop = next_month(first)
        total = {"subscribers": 0, "charged": 0, "amount": 0, "final_amount": 0}

        def convert(r: Any) -> Row:
            subscribers, charged, amount, final = (_int(r[k]) for k in ("subscribers", "charged", "amount",
                                                                        "final_amount"))
            for k, v in zip(total, (subscribers, charged, amount, final)):
                total[k] += v
            return [r["tariff_id"], r["name"], subscribers, charged, amount, final, average(amount, charged)]

        rows = await stream(ctx, ARPU_SQL, [local_midnight(first, tz), local_midnight(stop, tz), core.now()], convert)
        # an account charged under two tariffs in the month counts in each: the total's ARPU is over the sum
        return {"rows": rows, "month": first.isoformat()[:7], **total,
                "arpu": average(total["amount"], total["charged"])}

    @handler
    async def reports_churn(ctx: CallContext, since: str, until: str) -> dict[str, Any]:
        """Churn per month for the months from since's to the one before until's ("YYYY-MM", at most 120 months); streamed. Rows: month, active, left, stayed_blocked, churned, churn_bp. Active: accounts opened before the month began and not closed by then. Left: accounts closed in the month (dunning closes an account). Stayed blocked: an operator's or the system's block active the whole month, the account not closed by its end (a subscriber's own block is not churn). churned = left + stayed_blocked; churn_bp = churned / active in basis points."""
        first, stop = parse_month(since, "since"), parse_month(until, "until")
        if not first < stop:
            raise InvalidValue("since must be a month before until")
        months = month_starts(first, stop)
        total = {"left": 0, "stayed_blocked": 0, "churned": 0}

        def convert(r: Any) -> Row:
            active, left, blocked = _int(r["active"]), _int(r["left_"]), _int(r["blocked"])
            for k, v in zip(total, (left, blocked, left + blocked)):
                total[k] += v
            month = r["start"].astimezone(tz).date().isoformat()[:7]
            return [month, active, left, blocked, left + blocked, average((left + blocked) * 10_000, active)]

        rows = await stream(ctx, CHURN_SQL, [[local_midnight(m, tz) for m in months],
                                             [local_midnight(next_month(m), tz) for m in months]], convert)
        return {"rows": rows, "since": months[0].isoformat()[:7], "until": stop.isoformat()[:7], **total}

    @handler
    async def reports_traffic_top(ctx: CallContext, since: str, until: str, class_id: int | None = None,
                                  limit: int = 20) -> dict[str, Any]:
        """The top accounts per traffic class by volume over the local days [since, until) (ISO dates, at most 3660 days) from the daily usage; streamed. Rows: class_id, class, rank, account_id, login, quantity, amount. class_id limits it to one class (-1: session seconds); limit is the number of accounts per class (1..1000)."""
        first, last = day_range(since, until)
        if class_id is not None:
            need_int("class_id", class_id, -1)
        limit = need_int("limit", 20 if limit is None else limit, 1, MAX_TOP)
        total = {"quantity": 0, "amount": 0}

        def convert(r: Any) -> Row:
            row = [r[0], r[1], r[2], r[3], r[4], _int(r[5]), _int(r[6])]
            total["quantity"] += row[5]
            total["amount"] += row[6]
            return row

        rows = await stream(ctx, TRAFFIC_TOP_SQL, [first, last, class_id, limit], convert)
        return {"rows": rows, "since": first.isoformat(), "until": last.isoformat(), **total}

    @handler
    async def reports_flows(ctx: CallContext, account_id: int, since: str, until: str, by: str = "host",
                            limit: int = 20) -> dict[str, Any]:
        """One account's top remote hosts, remote ports or protocols by bytes in [since, until) (ISO dates or times, at most 31 days), from the raw flow store; streamed. Rows: key, bytes, packets, flows (bytes and packets scaled by the sampling interval, as billed). An hour the store does not hold reads as no flows."""
        need_int("account_id", account_id)
        by = _choice("host" if by is None else by, "by", FLOW_BY)
        limit = need_int("limit", 20 if limit is None else limit, 1, MAX_TOP)
        start = _instant(since, "since", core, end_of_day=False)
        stop = _instant(until, "until", core, end_of_day=False)
        if not start < stop:
            raise InvalidValue("since must be before until")
        if stop - start > timedelta(days=FLOW_MAX_DAYS):
            raise InvalidValue(f"the range is longer than {FLOW_MAX_DAYS} days")
        since_ms, until_ms = int(start.timestamp() * 1000), int(stop.timestamp() * 1000)
        rows = await asyncio.to_thread(top_flows, raw_dir, account_id, since_ms, until_ms, by, limit)
        total = {"bytes": sum(r[1] for r in rows), "packets": sum(r[2] for r in rows),
                 "flows": sum(r[3] for r in rows)}
        if rows:    # at most MAX_TOP rows: one chunk
            await ctx.stream(rows)
        return {"rows": len(rows), "account_id": account_id, "by": by, "since": start, "until": stop, **total}

    def spec(name: str, fn: Any, args: dict[str, str], fields: dict[str, str]) -> CallSpec:
        return CallSpec(name, fn, right="reports.read", kinds=ADMIN, streaming=True, bound="stream", result="map",
                        args=args, fields=fields, doc=fn.__doc__ or "")

    money = "money"
    return [
        spec("reports.revenue_daily", reports_revenue_daily, {"since": "str", "until": "str", "group": "str?"},
             {"key_id": "int", "key": "str", "accounts": "int", "final_amount": money, "provisional_amount": money,
              "amount": money, "periodic_amount": money, "usage_amount": money, "once_amount": money}),
        spec("reports.payments", reports_payments, {"since": "str", "until": "str", "group": "str?"},
             {"key": "str", "payments": "int", "paid": money, "cancellations": "int", "cancelled": money,
              "net": money}),
        spec("reports.debtors", reports_debtors, {"as_of": "str?"},
             {"account_id": "int", "user_id": "int", "login": "str", "full_name": "str", "balance": money,
              "credit": money, "since": "time", "days": "int", "bucket": "str", "buckets.balance": money}),
        spec("reports.arpu", reports_arpu, {"month": "str"},
             {"tariff_id": "int", "name": "str", "subscribers": "int", "charged": "int", "amount": money,
              "final_amount": money, "arpu": money}),
        spec("reports.churn", reports_churn, {"since": "str", "until": "str"},
             {"month": "str", "active": "int", "left": "int", "stayed_blocked": "int", "churned": "int",
              "churn_bp": "int"}),
        spec("reports.traffic_top", reports_traffic_top,
             {"since": "str", "until": "str", "class_id": "int?", "limit": "int?"},
             {"class_id": "int", "class": "str", "rank": "int", "account_id": "int", "login": "str",
              "quantity": "int", "amount": money}),
        spec("reports.flows", reports_flows,
             {"account_id": "int", "since": "str", "until": "str", "by": "str?", "limit": "int?"},
             {"key": "str", "bytes": "int", "packets": "int", "flows": "int"}),
    ]
