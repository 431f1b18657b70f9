"""``reports.revenue``: every charge of the range counted once, under the tariff it was charged by, the open
period included and marked provisional, closed periods final; the totals agree with the ledger."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest

from billcore.api import reports, tariffs
from billcore.billing import classification
from billcore.billing import tariffs as T
from billcore.billing.rating import TrafficUsage
from billcore.billing.scheduler import run_due
from billcore.billing.usage import commit_usage
from billcore.common.config import Config
from billcore.server.context import CoreContext
from tests.test_tariffs_api import Ctx
from tests.test_usage_commit import make_accounts
from urfa.errors import CallFailed

UTC = timezone.utc
MAR, APR, MAY = (datetime(2024, m, 1, tzinfo=UTC) for m in (3, 4, 5))
NOW = datetime(2024, 4, 10, 12, tzinfo=UTC)
MB = 1_000_000


async def ledger_charges(conn: asyncpg.Connection, since: datetime, until: datetime) -> int:
    """Micro-units the ledger booked as periodic or traffic charges, as a positive sum."""
    return -int(await conn.fetchval(
        "SELECT coalesce(sum(amount), 0) FROM ledger WHERE kind IN ('periodic', 'traffic')"
        " AND created_at >= $1 AND created_at < $2", since, until))


async def test_open_month_is_provisional_closed_month_final(pool: asyncpg.Pool) -> None:
    core = CoreContext(pool, Config(), now=lambda: NOW)
    fn = {s.name: s.handler for s in [*tariffs.calls(core), *reports.calls(core)]}
    admin = Ctx("admin", 1)
    async with pool.acquire() as conn:
        old, new, moved = await make_accounts(conn, 3)
        inet = await classification.create_class(conn, "inet")
        traffic = await T.create_service(conn, "traffic", "traffic")
        await T.set_rate(conn, traffic, class_id=inet, range_id=None, prepaid=0, unit_size=MB, tiers=[(0, 100)])
        fee = await T.create_service(conn, "fee", "periodic", fee=10_000_000,
                                     period={"kind": "monthly", "anchor": MAR.date()}, charge_mode="start")
        home = await T.create_tariff(conn, "home", [traffic, fee])
        gold = await T.create_tariff(conn, "gold", [traffic])
        # old: since mid-March; moved: home in March, gold from April 3; new: linked mid-April
        await T.link_tariff(conn, old, home, now=MAR + timedelta(days=14), tz=UTC, actor="t")
        await T.link_tariff(conn, moved, home, now=MAR + timedelta(days=1), tz=UTC, actor="t")
    await run_due(pool, MAR + timedelta(days=1))             # the scheduler runs from early March on
    async with pool.acquire() as conn:
        for acc in (old, moved):
            await commit_usage(conn, "w", 1 if acc == old else 2,
                               [TrafficUsage(acc, inet, datetime(2024, 3, 20, tzinfo=UTC), 3 * MB)],
                               datetime(2024, 3, 20, 1, tzinfo=UTC))
    await run_due(pool, APR + timedelta(minutes=5))          # closes March, books April's fees
    async with pool.acquire() as conn:
        await T.link_tariff(conn, moved, gold, now=APR + timedelta(days=2), tz=UTC, actor="t")
        await T.link_tariff(conn, new, home, now=APR + timedelta(days=4), tz=UTC, actor="t")
        await commit_usage(conn, "w", 3, [TrafficUsage(acc, inet, NOW - timedelta(hours=1), 5 * MB)
                                          for acc in (old, new, moved)], NOW)
    await run_due(pool, NOW)                                 # new's April fee, prorated

    # rows by tariff name, the "(total)" row last
    march, april, both = [{r["name"]: r for r in await fn["reports.revenue"](admin, since=a, until=b)}
                          for a, b in ((MAR, APR), (APR, MAY), (MAR, MAY))]
    async with pool.acquire() as conn:
        booked_march = await ledger_charges(conn, MAR, APR)
        booked_all = await ledger_charges(conn, MAR, MAY)
        fee_new = await conn.fetchval("SELECT charged FROM periodic_charges WHERE account_id = $1", new)
        fee_moved = await conn.fetchval("SELECT charged FROM periodic_charges WHERE account_id = $1"
                                        " AND period_start = $2", moved, APR)
        fee_march = await conn.fetchval("SELECT sum(charged) FROM periodic_charges WHERE period_start = $1", MAR)

    # March is closed: all of it final (old's prorated March fee was booked on April 1, for March)
    total = march.pop("(total)")
    assert total["provisional_amount"] == 0
    assert total["final_amount"] == total["amount"] == 2 * 300 + fee_march > booked_march > 0
    assert total["usage_amount"] == 2 * 300 and total["periodic_amount"] == fee_march
    assert list(march) == ["home"] and march["home"]["accounts"] == 2 and march["home"]["amount"] == total["amount"]

    # April is open: its charges so far are there, provisional; the new subscriber counts
    by_name = dict(april)
    april_total = by_name.pop("(total)")
    assert set(by_name) == {"home", "gold"}
    assert april_total["final_amount"] == 0
    assert by_name["home"]["usage_amount"] == 2 * 500           # old and new
    assert by_name["home"]["accounts"] == 3              # and moved, by its April fee
    assert by_name["home"]["periodic_amount"] == 10_000_000 + fee_new + fee_moved
    assert 0 < fee_new < 10_000_000 and 0 < fee_moved < fee_new
    # moved changed tariff on April 3: its April traffic is gold's, counted once; its April fee (for the
    # two days on home, the rest refunded) stays home's
    assert (by_name["gold"]["usage_amount"], by_name["gold"]["periodic_amount"], by_name["gold"]["accounts"]) == (500, 0, 1)
    assert april_total["provisional_amount"] == april_total["amount"] == \
        by_name["home"]["amount"] + by_name["gold"]["amount"]

    # any range: the two months together are the sum of each; and the ledger agrees to the micro-unit
    both_total = both["(total)"]
    assert both_total["amount"] == total["amount"] + april_total["amount"] == booked_all
    assert (both_total["final_amount"], both_total["provisional_amount"]) == (total["final_amount"],
                                                                              april_total["provisional_amount"])
    with pytest.raises(CallFailed):
        await fn["reports.revenue"](admin, since=APR, until=APR)


async def test_once_off_fees_are_revenue_and_charges(pool: asyncpg.Pool) -> None:
    """A connection fee is booked once: final at once, in the revenue of the range it was booked in and
    in reports.charges (which left once-off fees out)."""
    core = CoreContext(pool, Config(), now=lambda: NOW)
    fn = {s.name: s.handler for s in reports.calls(core)}
    async with pool.acquire() as conn:
        (acc,) = await make_accounts(conn, 1)
        setup = await T.create_service(conn, "connection", "once", fee=25_000_000)
        tariff = await T.create_tariff(conn, "with setup", [setup])
        await run_due(pool, APR + timedelta(days=1))
        await T.link_tariff(conn, acc, tariff, now=APR + timedelta(days=5), tz=UTC, actor="t")
    await run_due(pool, NOW)
    async with pool.acquire() as conn:
        assert await ledger_charges(conn, APR, MAY) == 0    # a once-off fee is booked as a charge, not periodic
        booked = -await conn.fetchval("SELECT sum(amount) FROM ledger WHERE account_id = $1", acc)
    assert booked == 25_000_000
    rows = {r["name"]: r for r in await fn["reports.revenue"](Ctx("admin", 1), since=APR, until=MAY)}
    assert rows["with setup"]["once_amount"] == rows["with setup"]["final_amount"] == 25_000_000
    assert rows["(total)"]["amount"] == 25_000_000 and rows["(total)"]["provisional_amount"] == 0
    admin = Ctx("admin", 1)
    result = await fn["reports.charges"](admin, since=APR, until=MAY)
    assert result["rows"] == 1 and admin.chunks[0][0][0] == setup and admin.chunks[0][0][2:] == [1, 25_000_000]


async def test_a_range_without_charges_is_a_zero_total(pool: asyncpg.Pool) -> None:
    """No charge in the range (a new system, a range before it began): one (total) row of zeros, not a
    failure (the grand-total row's sum over no rows is NULL)."""
    core = CoreContext(pool, Config(), now=lambda: NOW)
    fn = {s.name: s.handler for s in reports.calls(core)}
    for since in (datetime(1, 1, 1, tzinfo=UTC), APR):
        rows = await fn["reports.revenue"](Ctx("admin", 1), since=since, until=MAY)
        assert [(r["name"], r["amount"], r["final_amount"], r["provisional_amount"]) for r in rows] \
            == [("(total)", 0, 0, 0)]


async def test_revenue_is_one_statement_fast_on_many_accounts(pool: asyncpg.Pool) -> None:
    """50 000 accounts with usage and a fee: one set-wise statement, whatever the account count."""
    n = 50_000
    async with pool.acquire() as conn:
        inet = await classification.create_class(conn, "inet")
        traffic = await T.create_service(conn, "traffic", "traffic")
        fee = await T.create_service(conn, "fee", "periodic", fee=1_000_000,
                                     period={"kind": "monthly", "anchor": MAR.date()}, charge_mode="start")
        home = await T.create_tariff(conn, "home", [traffic, fee])
        await conn.execute(
            "INSERT INTO users(id, login, scram_salt, scram_iterations, scram_stored_key, scram_server_key)"
            " SELECT i, 'u' || i, '\\x00', 4096, '\\x00', '\\x00' FROM generate_series(1, $1) i", n)
        await conn.execute("INSERT INTO accounts(id, user_id) SELECT i, i FROM generate_series(1, $1) i", n)
        await conn.execute(
            "INSERT INTO account_tariffs(account_id, tariff_id, valid_from, created_at, created_by)"
            " SELECT i, $2, $3, $3, 't' FROM generate_series(1, $1) i", n, home, APR + timedelta(days=3))
        # the charge tables as the rating and the scheduler leave them (the ledger is not read by the report)
        await conn.execute(
            "INSERT INTO usage_counters(account_id, service_id, class_id, range_id, period_start, quantity,"
            " charged, updated_at) SELECT i, $2, $3, 0, $4, i, i % 1000, $5 FROM generate_series(1, $1) i",
            n, traffic, inet, APR, NOW)
        await conn.execute(
            "INSERT INTO periodic_charges(account_id, service_id, period_start, period_end, charged, revision,"
            " updated_at) SELECT i, $2, $3, $4, 900000, 1, $5 FROM generate_series(1, $1) i", n, fee, APR, MAY, NOW)
        await conn.execute("ANALYZE")
    core = CoreContext(pool, Config(), now=lambda: NOW)
    fn = {s.name: s.handler for s in reports.calls(core)}
    started = time.perf_counter()
    result: list[dict[str, Any]] = await fn["reports.revenue"](Ctx("admin", 1), since=APR, until=MAY)
    seconds = time.perf_counter() - started
    usage = sum(i % 1000 for i in range(1, n + 1))
    assert result[-1] == {"tariff_id": None, "name": "(total)", "final_amount": 0,
                          "provisional_amount": usage + n * 900_000, "amount": usage + n * 900_000, "accounts": n,
                          "periodic_amount": n * 900_000, "usage_amount": usage, "once_amount": 0}
    assert result[0]["name"] == "home" and result[0]["amount"] == result[-1]["amount"]
    print(f"reports.revenue over {n} accounts ({2 * n} charges): {seconds:.2f} s")
    assert seconds < 20
