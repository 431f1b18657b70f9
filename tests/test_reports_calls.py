"""The operator reports (billcore.api.report_calls) on a real PostgreSQL: seeded charges, payments, ledgers,
blocks and usage whose answers are known, each figure asserted exactly; wrong arguments answer
``billing.invalid``; revenue by day adds up to reports.revenue."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest

from billcore.api import report_calls, reports
from billcore.billing import classification
from billcore.billing import tariffs as T
from billcore.billing.ledger import Entry, post_charges
from billcore.billing.payments import add_payment, cancel_payment
from billcore.billing.reports_sql import average, bucket_of, month_starts
from billcore.common.config import Config
from billcore.server.context import CoreContext
from tests.test_tariffs_api import Ctx
from tests.test_usage_commit import make_accounts
from urfa.errors import CallFailed

UTC = timezone.utc
MAR, APR, MAY = (datetime(2024, m, 1, tzinfo=UTC) for m in (3, 4, 5))
NOW = datetime(2024, 4, 10, 12, tzinfo=UTC)
M = 1_000_000


def handlers(pool: asyncpg.Pool, now: datetime = NOW) -> dict[str, Any]:
    core = CoreContext(pool, Config(), now=lambda: now)
    return {s.name: s.handler for s in [*reports.calls(core), *report_calls.calls(core)]}


async def run(fn: Any, **args: Any) -> tuple[list[list[Any]], dict[str, Any]]:
    """The streamed rows and the summary of one report call."""
    ctx = Ctx("admin", 1)
    summary = await fn(ctx, **args)
    rows = [row for chunk in ctx.chunks for row in chunk]
    assert summary["rows"] == len(rows)
    return rows, summary


async def link(conn: asyncpg.Connection, account: int, tariff: int, since: datetime) -> int:
    return int(await conn.fetchval(
        "INSERT INTO account_tariffs(account_id, tariff_id, valid_from, created_at, created_by)"
        " VALUES ($1, $2, $3, $3, 'test') RETURNING id", account, tariff, since))


async def seed_revenue(conn: asyncpg.Connection) -> dict[str, int]:
    """A on home (a monthly fee and traffic), B on gold (traffic and a connection fee); March closed,
    April open (the scheduler last ran on April 10)."""
    a, b, c = await make_accounts(conn, 3)
    inet = await classification.create_class(conn, "inet")
    traffic = await T.create_service(conn, "traffic", "traffic")
    await T.set_rate(conn, traffic, class_id=inet, range_id=None, prepaid=0, unit_size=M, tiers=[(0, 100)])
    fee = await T.create_service(conn, "fee", "periodic", fee=10 * M,
                                 period={"kind": "monthly", "anchor": MAR.date()}, charge_mode="start")
    setup = await T.create_service(conn, "setup", "once", fee=25 * M)
    home = await T.create_tariff(conn, "home", [fee, traffic])
    gold = await T.create_tariff(conn, "gold", [traffic, setup])
    await link(conn, a, home, MAR)
    b_link = await link(conn, b, gold, MAR)
    await link(conn, c, home, MAR + timedelta(days=20))       # a subscriber with no charge in March
    await conn.executemany(
        "INSERT INTO periodic_charges(account_id, service_id, period_start, period_end, charged, revision,"
        " updated_at) VALUES ($1, $2, $3, $4, $5, 1, $3)", [(a, fee, MAR, APR, 10 * M), (a, fee, APR, MAY, 10 * M)])
    await conn.execute("INSERT INTO periodic_runs VALUES ('periodic', $1, $1, 1, 1, 0)", NOW)
    await conn.executemany(
        "INSERT INTO usage_counters(account_id, service_id, class_id, range_id, period_start, quantity, charged,"
        " updated_at) VALUES ($1, $2, $3, 0, $4, 1, $5, $4)",
        [(a, traffic, inet, MAR, 300), (b, traffic, inet, MAR, 500), (b, traffic, inet, APR, 700)])
    await conn.executemany(
        "INSERT INTO period_summaries VALUES ($1, $2, $3, 0, 0, 0, 0, $3)", [(a, MAR, APR), (b, MAR, APR)])
    await conn.execute("INSERT INTO once_charges VALUES ($1, $2, $3, $4, $5)",
                       b, setup, b_link, 25 * M, MAR + timedelta(days=14, hours=9))
    return {"a": a, "b": b, "c": c, "home": home, "gold": gold, "fee": fee, "traffic": traffic, "setup": setup}


async def test_revenue_by_day_service_and_tariff(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        ids = await seed_revenue(conn)
    fn = handlers(pool)["reports.revenue_daily"]
    # key, accounts, final, provisional, amount, periodic, usage, once
    rows, summary = await run(fn, since="2024-03-01", until="2024-05-01", group="day")
    assert [r[1:] for r in rows] == [
        ["2024-03-01", 2, 10 * M + 800, 0, 10 * M + 800, 10 * M, 800, 0],
        ["2024-03-15", 1, 25 * M, 0, 25 * M, 0, 0, 25 * M],
        ["2024-04-01", 2, 0, 10 * M + 700, 10 * M + 700, 10 * M, 700, 0],
    ]
    assert (summary["final_amount"], summary["provisional_amount"], summary["amount"]) == \
        (35 * M + 800, 10 * M + 700, 45 * M + 1500)

    rows, _ = await run(fn, since="2024-03-01", until="2024-05-01", group="tariff")
    assert [r[:6] for r in rows] == [
        [ids["gold"], "gold", 1, 25 * M + 500, 700, 25 * M + 1200],
        [ids["home"], "home", 1, 10 * M + 300, 10 * M, 20 * M + 300],
    ]
    rows, _ = await run(fn, since="2024-03-01", until="2024-05-01", group="service")
    assert [(r[0], r[1], r[5]) for r in rows] == [
        (ids["fee"], "fee", 20 * M), (ids["setup"], "setup", 25 * M), (ids["traffic"], "traffic", 1500)]

    # the same charges as reports.revenue, to the micro-unit
    total = (await handlers(pool)["reports.revenue"](Ctx("admin", 1), since=MAR, until=MAY))[-1]
    assert (total["amount"], total["final_amount"]) == (summary["amount"], summary["final_amount"])
    # a range with nothing: no rows, zero sums
    rows, summary = await run(fn, since="2023-01-01", until="2023-02-01")
    assert rows == [] and summary["amount"] == 0 and summary["group"] == "day"


async def test_payments_by_day_method_and_operator(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        (acc,) = await make_accounts(conn, 1)
        at = datetime(2024, 3, 1, 10, tzinfo=UTC)
        await add_payment(conn, account_id=acc, amount=100 * M, method="cash", actor="anna", now=at)
        card = await add_payment(conn, account_id=acc, amount=50 * M, method="card", actor="anna",
                                 now=at + timedelta(hours=2))
        await add_payment(conn, account_id=acc, amount=30 * M, method="bank", actor="boris", now=at + timedelta(days=1))
        await cancel_payment(conn, card.payment_id, actor="boris", reason="twice", now=at + timedelta(days=2))
        await add_payment(conn, account_id=acc, amount=7 * M, method="cash", actor="anna", now=at - timedelta(days=1))
    fn = handlers(pool)["reports.payments"]
    # key, payments, paid, cancellations, cancelled, net
    rows, summary = await run(fn, since="2024-03-01", until="2024-04-01", group="day")
    assert rows == [["2024-03-01", 2, 150 * M, 0, 0, 150 * M], ["2024-03-02", 1, 30 * M, 0, 0, 30 * M],
                    ["2024-03-03", 0, 0, 1, 50 * M, -50 * M]]
    assert [summary[k] for k in ("payments", "paid", "cancellations", "cancelled", "net")] == \
        [3, 180 * M, 1, 50 * M, 130 * M]
    rows, _ = await run(fn, since="2024-03-01", until="2024-04-01", group="method")
    assert rows == [["bank", 1, 30 * M, 0, 0, 30 * M], ["card", 1, 50 * M, 1, 50 * M, 0],
                    ["cash", 1, 100 * M, 0, 0, 100 * M]]
    rows, _ = await run(fn, since="2024-03-01", until="2024-04-01", group="operator")
    assert rows == [["anna", 2, 150 * M, 0, 0, 150 * M], ["boris", 1, 30 * M, 1, 50 * M, -20 * M]]


async def ledger_rows(conn: asyncpg.Connection, account: int, moves: list[tuple[str, int]]) -> None:
    """Post (ISO day, amount in whole units) rows to an account's ledger, in order."""
    async with conn.transaction():
        for n, (day, amount) in enumerate(moves):
            await post_charges(conn, [Entry(account, amount * M, "correction", f"t:{account}:{n}")], actor="test",
                               now=datetime.fromisoformat(day).replace(tzinfo=UTC))


async def test_debtors_age_from_when_the_balance_last_went_negative(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        d1, d2, d3, d4, good, later = await make_accounts(conn, 6)
        await ledger_rows(conn, d1, [("2024-06-20", -10)])
        await ledger_rows(conn, d2, [("2024-03-01", 50), ("2024-04-01", -100), ("2024-05-01", 60),
                                     ("2024-05-15", -30), ("2024-06-01", -5)])
        await ledger_rows(conn, d3, [("2024-01-01", -70)])
        await ledger_rows(conn, d4, [("2024-04-15", -1)])
        await ledger_rows(conn, good, [("2024-01-01", -5), ("2024-02-01", 10)])
        await ledger_rows(conn, later, [("2024-07-05", -10)])
    fn = handlers(pool, now=datetime(2024, 8, 1, tzinfo=UTC))["reports.debtors"]
    rows, summary = await run(fn, as_of="2024-06-30")        # the end of June 30th
    # account_id, user_id, login, full_name, balance, credit, since, days, bucket
    got = {r[0]: (r[4], r[6].date().isoformat(), r[7], r[8]) for r in rows}
    assert got == {d1: (-10 * M, "2024-06-20", 11, "0-30"), d2: (-25 * M, "2024-05-15", 47, "31-60"),
                   d3: (-70 * M, "2024-01-01", 182, "90+"), d4: (-1 * M, "2024-04-15", 77, "61-90")}
    assert [r[0] for r in rows] == sorted(got)
    assert {b["bucket"]: (b["accounts"], b["balance"]) for b in summary["buckets"]} == {
        "0-30": (1, -10 * M), "31-60": (1, -25 * M), "61-90": (1, -1 * M), "90+": (1, -70 * M)}
    assert (summary["accounts"], summary["balance"]) == (4, -106 * M)
    # earlier: d2 was in credit on May 10, d1 and d4 had no debt yet
    rows, _ = await run(fn, as_of="2024-05-10")
    assert {r[0]: r[7] for r in rows} == {d3: 131, d4: 26}
    # now (August 1st): the later debtor is in, aged 27 days
    rows, _ = await run(fn)
    assert {r[0]: r[7] for r in rows}[later] == 27


async def test_arpu_per_tariff(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        ids = await seed_revenue(conn)
        (gone,) = await make_accounts(conn, 1)
        await link(conn, gone, ids["home"], datetime(2024, 1, 1, tzinfo=UTC))
        await conn.execute("UPDATE accounts SET status = 'closed' WHERE id = $1", gone)
        await conn.execute("INSERT INTO dunning_steps VALUES ($1, 1, 'closed', -5, $2)", gone,
                           datetime(2024, 2, 10, tzinfo=UTC))
    fn = handlers(pool)["reports.arpu"]
    # tariff_id, name, subscribers, charged, amount, final_amount, arpu
    rows, summary = await run(fn, month="2024-03")
    assert rows == [[ids["home"], "home", 2, 1, 10 * M + 300, 10 * M + 300, 10 * M + 300],
                    [ids["gold"], "gold", 1, 1, 25 * M + 500, 25 * M + 500, 25 * M + 500]]
    assert (summary["subscribers"], summary["charged"], summary["amount"], summary["arpu"]) == \
        (3, 2, 35 * M + 800, 17 * M + 500_400)
    rows, _ = await run(fn, month="2024-04")                 # April is open: amounts provisional
    assert [(r[1], r[4], r[5]) for r in rows] == [("home", 10 * M, 0), ("gold", 700, 0)]


async def test_churn_counts_left_and_stayed_blocked(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        a1, a2, a3, a4, a5 = await make_accounts(conn, 5)
        await conn.execute("UPDATE accounts SET created_at = '2023-12-01Z'")
        await conn.execute("UPDATE accounts SET created_at = '2024-02-15Z' WHERE id = $1", a5)
        await conn.execute("UPDATE accounts SET status = 'closed' WHERE id = $1", a1)
        await conn.execute("INSERT INTO dunning_steps VALUES ($1, 1, 'closed', -5, '2024-02-10Z')", a1)
        await conn.executemany(
            "INSERT INTO blocks(account_id, kind, set_at, set_by, lifted_at, lifted_by) VALUES ($1, $2, $3, 't', $4, $5)",
            [(a2, "admin", datetime(2023, 12, 20, tzinfo=UTC), None, None),
             (a3, "system", datetime(2024, 1, 5, tzinfo=UTC), datetime(2024, 3, 10, tzinfo=UTC), "t"),
             (a4, "user", datetime(2023, 12, 1, tzinfo=UTC), None, None),
             (a1, "system", datetime(2023, 12, 20, tzinfo=UTC), None, None)])
    fn = handlers(pool)["reports.churn"]
    rows, summary = await run(fn, since="2024-01", until="2024-04")
    # month, active, left, stayed_blocked, churned, churn_bp
    assert rows == [["2024-01", 4, 0, 2, 2, 5000], ["2024-02", 4, 1, 2, 3, 7500], ["2024-03", 4, 0, 1, 1, 2500]]
    assert (summary["left"], summary["stayed_blocked"], summary["churned"]) == (1, 5, 6)


async def test_traffic_top_per_class(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        x, y, z = await make_accounts(conn, 3)
        inet = await classification.create_class(conn, "inet")
        local = await classification.create_class(conn, "local")
        await conn.executemany(
            "INSERT INTO usage_daily VALUES ($1, $2, $3, $4, $5)",
            [(x, inet, date(2024, 3, 1), 100, 10), (x, inet, date(2024, 3, 2), 100, 10),
             (y, inet, date(2024, 3, 1), 150, 15), (z, inet, date(2024, 3, 1), 50, 5),
             (z, inet, date(2024, 4, 1), 10_000, 1000),                      # outside the range
             (z, local, date(2024, 3, 3), 7, 0), (x, -1, date(2024, 3, 3), 3600, 0)])
    fn = handlers(pool)["reports.traffic_top"]
    rows, summary = await run(fn, since="2024-03-01", until="2024-04-01", limit=2)
    # class_id, class, rank, account_id, login, quantity, amount
    assert [[r[0], r[1], r[2], r[3], r[5], r[6]] for r in rows] == [
        [-1, "(session time)", 1, x, 3600, 0],
        [inet, "inet", 1, x, 200, 20], [inet, "inet", 2, y, 150, 15],
        [local, "local", 1, z, 7, 0]]
    rows, summary = await run(fn, since="2024-03-01", until="2024-04-01", class_id=inet, limit=10)
    assert [r[3] for r in rows] == [x, y, z] and summary["quantity"] == 400 and summary["amount"] == 40


@pytest.mark.parametrize("name, args", [
    ("reports.revenue_daily", {"since": "2024-03-01", "until": "2024-03-01"}),
    ("reports.revenue_daily", {"since": "2024-04-01", "until": "2024-03-01"}),
    ("reports.revenue_daily", {"since": "2024-3-1", "until": "2024-04-01"}),
    ("reports.revenue_daily", {"since": "2000-01-01", "until": "2030-01-01"}),
    ("reports.revenue_daily", {"since": "2024-03-01", "until": "2024-04-01", "group": "year"}),
    ("reports.payments", {"since": "yesterday", "until": "2024-04-01"}),
    ("reports.payments", {"since": "2024-03-01", "until": "2024-04-01", "group": "day; DROP TABLE payments"}),
    ("reports.debtors", {"as_of": "2024-13-45"}),
    ("reports.arpu", {"month": "2024-13"}),
    ("reports.churn", {"since": "2024-05", "until": "2024-05"}),
    ("reports.churn", {"since": "2000-01", "until": "2030-01"}),
    ("reports.traffic_top", {"since": "2024-03-01", "until": "2024-04-01", "limit": 0}),
    ("reports.traffic_top", {"since": "2024-03-01", "until": "2024-04-01", "limit": 100_000}),
    ("reports.flows", {"account_id": 1, "since": "2024-03-01", "until": "2024-05-01"}),
    ("reports.flows", {"account_id": 1, "since": "2024-03-02", "until": "2024-03-01"}),
    ("reports.flows", {"account_id": 1, "since": "2024-03-01", "until": "2024-03-02", "by": "country"}),
    ("reports.flows", {"account_id": 0, "since": "2024-03-01", "until": "2024-03-02"}),
])
async def test_bad_arguments_are_invalid_not_internal(pool: asyncpg.Pool, name: str, args: dict[str, Any]) -> None:
    with pytest.raises(CallFailed) as caught:
        await handlers(pool)[name](Ctx("admin", 1), **args)
    assert caught.value.code == "billing.invalid", caught.value


def test_pure_rules() -> None:
    assert [bucket_of(d) for d in (0, 30, 31, 60, 61, 90, 91, 5000)] == \
        ["0-30", "0-30", "31-60", "31-60", "61-90", "61-90", "90+", "90+"]
    assert [average(a, n) for a, n in ((10, 4), (10, 3), (11, 2), (-11, 2), (5, 0), (2, 3), (1, 3))] == \
        [3, 3, 6, -6, 0, 1, 0]
    assert month_starts(date(2024, 11, 15), date(2025, 2, 1)) == [date(2024, 11, 1), date(2024, 12, 1),
                                                                  date(2025, 1, 1)]
