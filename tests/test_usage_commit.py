"""Exactly-once usage commit through the real database: counters, ledger, watermark."""

from __future__ import annotations

import asyncio
from datetime import date, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billcore.billing import accounts
from billcore.billing import classification
from billcore.billing import tariffs as T
from billcore.common.errors import InvariantViolation
from billcore.common.money import GB
from billcore.billing.rating import CounterKey, SessionUsage, TrafficUsage, rate
from billcore.billing.usage import NO_WATERMARK, commit_usage, usage_key, watermark

UTC = timezone.utc
NOW = datetime(2024, 3, 20, 12, tzinfo=UTC)
T0 = datetime(2024, 3, 1, tzinfo=UTC)
PREPAID = 1_000
BORDER = 5_000
# 2 micro per byte up to BORDER beyond prepaid, then 1 micro per 3 bytes
TIERS = [(0, 2), (BORDER, 1)]
UNIT = 1


async def make_accounts(conn: asyncpg.Connection, n: int) -> list[int]:
    ids = []
    for _ in range(n):
        user = await conn.fetchval(
            "INSERT INTO users(login, scram_salt, scram_iterations, scram_stored_key, scram_server_key)"
            " VALUES ('u' || nextval('users_id_seq'), '\\x00', 4096, '\\x00', '\\x00') RETURNING id")
        ids.append(await conn.fetchval(
            "INSERT INTO accounts(user_id, credit) VALUES ($1, 10^15) RETURNING id", user))
    return ids


async def setup_traffic(conn: asyncpg.Connection, accounts: int = 1) -> dict[str, Any]:
    """Accounts on a tariff with one traffic service: class 'inet' prepaid+tiers, 'local' free."""
    inet = await classification.create_class(conn, "inet")
    local = await classification.create_class(conn, "local", position=-1)
    service = await T.create_service(conn, "traffic", "traffic")
    await T.set_rate(conn, service, class_id=inet, range_id=None, prepaid=PREPAID, unit_size=3,
                     tiers=[(0, 6), (BORDER, 1)])
    await T.set_rate(conn, service, class_id=local, range_id=None, prepaid=0, unit_size=GB,
                     tiers=[(0, 0)])
    tariff = await T.create_tariff(conn, "home", [service])
    ids = await make_accounts(conn, accounts)
    for account in ids:
        await T.link_tariff(conn, account, tariff, now=T0, tz=UTC, actor="test")
    return {"inet": inet, "local": local, "service": service, "tariff": tariff, "accounts": ids}


def cost(total: int) -> int:
    """The meter above, by hand: 2 micro/byte for BORDER bytes over prepaid, then 1/3."""
    billable = max(0, total - PREPAID)
    first = min(billable, BORDER)
    return (first * 6 + max(0, billable - BORDER) * 1) // 3


async def balance(conn: asyncpg.Connection, account: int) -> int:
    return int(await conn.fetchval("SELECT balance FROM accounts WHERE id = $1", account))


async def test_commit_charges_and_advances_watermark(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        s = await setup_traffic(conn)
        account = s["accounts"][0]
        assert await watermark(conn, "w1") == NO_WATERMARK
        batch = [TrafficUsage(account, s["inet"], NOW - timedelta(hours=1), 4_000),
                 TrafficUsage(account, s["local"], NOW - timedelta(hours=1), 10 * GB)]
        res = await commit_usage(conn, "w1", 10, batch, NOW)
        assert not res.duplicate and res.watermark == 10 and res.rejected == ()
        assert res.charged == cost(4_000) == 6_000
        assert await balance(conn, account) == -6_000
        assert res.charges == ((account, 6_000, -6_000),), "what the batch.rated hook reports"
        assert await watermark(conn, "w1") == 10
        # the same batch again, and an older one: nothing changes
        for mark in (10, 3):
            again = await commit_usage(conn, "w1", mark, batch, NOW)
            assert again.duplicate and again.charged == 0 and again.watermark == 10 and again.charges == ()
        assert await balance(conn, account) == -6_000
        rows = await conn.fetch("SELECT class_id, quantity, charged FROM usage_counters ORDER BY class_id")
        assert [tuple(r) for r in rows] == [(s["inet"], 4_000, 6_000), (s["local"], 10 * GB, 0)]
        daily = await conn.fetch("SELECT class_id, day, quantity, amount FROM usage_daily ORDER BY class_id")
        assert [tuple(r) for r in daily] == [(s["inet"], date(2024, 3, 20), 4_000, 6_000),
                                            (s["local"], date(2024, 3, 20), 10 * GB, 0)]
        # another source has its own watermark
        other = await commit_usage(conn, "w2", 1, batch[:1], NOW)
        assert not other.duplicate and other.charged == cost(8_000) - cost(4_000)


async def test_rejected_usage_is_returned_and_rollback_books_nothing(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        s = await setup_traffic(conn)
        account = s["accounts"][0]
        unknown_class = s["inet"] + 1000
        batch = [TrafficUsage(account, unknown_class, NOW, 100),
                 TrafficUsage(999_999, s["inet"], NOW, 100),
                 TrafficUsage(account, s["inet"], NOW + timedelta(hours=1), 100)]
        res = await commit_usage(conn, "w", 1, batch, NOW)
        assert sorted(r.reason for r in res.rejected) == ["future", "no_rate", "unknown_account"]
        assert res.charged == 0 and res.watermark == 1

        # a failure inside the transaction rolls back counters, ledger and watermark
        await conn.execute("ALTER TABLE usage_daily ADD CONSTRAINT tiny CHECK (quantity < 50)")
        with pytest.raises(asyncpg.CheckViolationError):
            await commit_usage(conn, "w", 2, [TrafficUsage(account, s["inet"], NOW, 5_000)], NOW)
        assert await watermark(conn, "w") == 1
        assert await balance(conn, account) == 0
        assert await conn.fetchval("SELECT count(*) FROM usage_counters") == 0


async def test_time_usage_is_split_at_period_border(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        service = await T.create_service(conn, "dialup", "time", session_limit=86_400)
        # 3.60 per hour = 1000 micro per second; first 600 s prepaid each period
        await T.set_rate(conn, service, class_id=None, range_id=None, prepaid=600, unit_size=3_600,
                         tiers=[(0, 3_600_000)])
        tariff = await T.create_tariff(conn, "dial", [service])
        (account,) = await make_accounts(conn, 1)
        await T.link_tariff(conn, account, tariff, now=T0 - timedelta(days=40), tz=UTC, actor="t")
        start = datetime(2024, 2, 29, 23, 30, tzinfo=UTC)   # 30 min in Feb, 30 min in March
        res = await commit_usage(conn, "radius", 1, [SessionUsage(account, start, 3_600)],
                                 datetime(2024, 3, 1, 1, tzinfo=UTC))
        assert res.rejected == ()
        assert res.charged == 2 * (1_800 - 600) * 1_000
        periods = await conn.fetchval("SELECT count(*) FROM usage_counters WHERE class_id = -1")
        assert periods == 2


async def test_concurrent_commits_of_one_source_charge_once(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        s = await setup_traffic(conn)
    account = s["accounts"][0]
    batch = [TrafficUsage(account, s["inet"], NOW, 3_000)]

    async def send() -> bool:
        async with pool.acquire() as c:
            return (await commit_usage(c, "w", 7, batch, NOW)).duplicate

    results = await asyncio.gather(*(send() for _ in range(6)))
    assert sorted(results) == [False] + [True] * 5
    async with pool.acquire() as conn:
        assert await balance(conn, account) == -cost(3_000)


async def test_sources_creating_the_same_counters_at_once_add_up(pool: asyncpg.Pool) -> None:
    """Two or more sources (two workers) whose first batches create the same counters at
    the same time: the counter holds the sum and the ledger the meter's price of the sum."""
    async with pool.acquire() as conn:
        s = await setup_traffic(conn, accounts=24)
    sources, rounds = 4, 3
    per_round = len(s["accounts"]) // rounds

    async def send(source: int, accounts: list[int]) -> None:
        batch = [TrafficUsage(a, s["inet"], NOW, 1_000 + 700 * source) for a in accounts]
        async with pool.acquire() as c:
            res = await commit_usage(c, f"netflow:{source}", 1 + accounts[0], batch, NOW)
        assert not res.duplicate and res.rejected == ()

    for r in range(rounds):  # each round creates fresh counters from every source at once
        accounts = s["accounts"][r * per_round:(r + 1) * per_round]
        await asyncio.gather(*(send(k, accounts) for k in range(sources)))
    total = sum(1_000 + 700 * k for k in range(sources))
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT account_id, quantity, charged FROM usage_counters ORDER BY 1")
        assert [(r["account_id"], r["quantity"], r["charged"]) for r in rows] == \
            [(a, total, cost(total)) for a in s["accounts"]]
        for account in s["accounts"]:
            assert await balance(conn, account) == -cost(total)


quantities = st.lists(st.integers(0, 4 * BORDER), min_size=1, max_size=12)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=quantities, cuts=st.lists(st.integers(1, 12), max_size=6), resend=st.lists(st.integers(0, 20), max_size=4))
async def test_split_batches_charge_what_one_batch_charges(
        pool: asyncpg.Pool, parts: list[int], cuts: list[int], resend: list[int]) -> None:
    """Any cut of the usage into commits (plus re-sends) books exactly cost(total)."""
    async with pool.acquire() as conn:
        await conn.execute("TRUNCATE usage_counters, usage_daily, ingest_watermarks, ledger CASCADE")
        await conn.execute("UPDATE accounts SET balance = 0")
        s = await conn.fetchrow("SELECT (SELECT id FROM traffic_classes WHERE name = 'inet') AS inet,"
                                " (SELECT min(id) FROM accounts) AS account")
        if s["inet"] is None:
            made = await setup_traffic(conn)
            s = {"inet": made["inet"], "account": made["accounts"][0]}
        usage = [TrafficUsage(s["account"], s["inet"], NOW - timedelta(hours=i % 5), q)
                 for i, q in enumerate(parts)]
        bounds = sorted({0, len(usage), *(c for c in cuts if c < len(usage))})
        batches = [usage[a:b] for a, b in zip(bounds, bounds[1:])]
        for mark, batch in enumerate(batches, start=1):
            await commit_usage(conn, "prop", mark * 10, batch, NOW)
            for back in resend:  # a restarted worker re-sends something already committed
                j = back % mark  # batch index 0..mark-1, committed at watermark (j + 1) * 10
                assert (await commit_usage(conn, "prop", (j + 1) * 10, batches[j], NOW)).duplicate
        total = sum(parts)
        assert await balance(conn, s["account"]) == -cost(total)
        assert await conn.fetchval("SELECT coalesce(sum(amount), 0) FROM ledger") == -cost(total)
        row = await conn.fetchrow("SELECT quantity, charged FROM usage_counters WHERE class_id = $1", s["inet"])
        assert (row["quantity"], row["charged"]) == (total, cost(total))


@pytest.mark.parametrize("total", [PREPAID - 1, PREPAID, PREPAID + 1, PREPAID + BORDER - 1,
                                   PREPAID + BORDER, PREPAID + BORDER + 1, PREPAID + BORDER + 3])
async def test_prepaid_and_tier_borders_exactly(pool: asyncpg.Pool, total: int) -> None:
    async with pool.acquire() as conn:
        s = await setup_traffic(conn)
        account = s["accounts"][0]
        # reach the border in two steps: one byte short, then the rest
        first = max(0, total - 1)
        await commit_usage(conn, "b", 1, [TrafficUsage(account, s["inet"], NOW, first)], NOW)
        await commit_usage(conn, "b", 2, [TrafficUsage(account, s["inet"], NOW, total - first)], NOW)
        assert await balance(conn, account) == -cost(total)
    expected = {PREPAID - 1: 0, PREPAID: 0, PREPAID + 1: 2, PREPAID + BORDER - 1: 2 * (BORDER - 1),
                PREPAID + BORDER: 2 * BORDER, PREPAID + BORDER + 1: 2 * BORDER,
                PREPAID + BORDER + 3: 2 * BORDER + 1}
    assert cost(total) == expected[total]


async def test_commit_books_what_rate_books(pool: asyncpg.Pool) -> None:
    """commit_usage resolves once and rates against the locked counters: its ledger rows
    (order, keys, references, running balances), counters and daily totals are exactly
    what the pure ``rate`` gives for the same batch, batch after batch."""
    tz = ZoneInfo("Europe/Berlin")
    async with pool.acquire() as conn:
        s = await setup_traffic(conn, accounts=4)
        await accounts.edit_account(conn, s["accounts"][3], actor="test", unlimited=True)
        midnight = datetime(2024, 3, 19, 23, tzinfo=UTC)  # 00:00 Berlin: batches cross a local day
        usage = [TrafficUsage(a, klass, midnight + timedelta(hours=h), 700 * (a + h + 3) + 3 * klass)
                 for a in s["accounts"] for klass in (s["inet"], s["local"]) for h in (-2, -1, 0, 1)]
        usage.append(TrafficUsage(s["accounts"][0], s["inet"] + 1000, midnight, 5))  # no rate
        batches = [usage[i::3] for i in range(3)]
        for mark, batch in enumerate(batches, start=1):
            since = min(u.at for u in batch)
            book = await T.load_book(conn, sorted({u.account_id for u in batch}), tz=tz, since=since, until=NOW)
            stored = {CounterKey(r["account_id"], r["service_id"], r["class_id"], r["range_id"], r["period_start"]):
                      r["quantity"] for r in await conn.fetch("SELECT * FROM usage_counters")}
            expected = rate(batch, stored, book, NOW)
            balances = {r["id"]: r["balance"] for r in await conn.fetch("SELECT id, balance FROM accounts")}
            last = await conn.fetchval("SELECT coalesce(max(id), 0) FROM ledger")

            res = await commit_usage(conn, "w", mark, batch, NOW, tz=tz, actor="netflow:w")

            rows = [tuple(r) for r in await conn.fetch(
                "SELECT account_id, amount, kind, idem_key, reference, balance_after, actor FROM ledger"
                " WHERE id > $1 ORDER BY id", last)]
            want = []
            for e in expected.entries:
                balances[e.account_id] -= e.amount
                want.append((e.account_id, -e.amount, "traffic", usage_key("w", mark, e.key), f"usage w@{mark}",
                             balances[e.account_id], "netflow:w"))
            assert rows == want
            assert (res.charged, res.entries, res.counters, res.rejected) == \
                (expected.total, len(expected.entries), len(expected.counters), expected.rejected)
            counters = {CounterKey(r["account_id"], r["service_id"], r["class_id"], r["range_id"], r["period_start"]):
                        r["quantity"] for r in await conn.fetch("SELECT * FROM usage_counters")}
            assert counters == {**stored, **expected.counters}
        daily = await conn.fetch("SELECT account_id, class_id, sum(quantity) q, sum(amount) m FROM usage_daily"
                                 " GROUP BY 1, 2 ORDER BY 1, 2")
        rated = [u for u in usage if u.klass != s["inet"] + 1000]
        assert {(r["account_id"], r["class_id"]): r["q"] for r in daily} == {
            (a, k): sum(u.bytes for u in rated if (u.account_id, u.klass) == (a, k))
            for a in s["accounts"] for k in (s["inet"], s["local"])}
        assert sum(r["m"] for r in daily) == -await conn.fetchval("SELECT sum(amount) FROM ledger")
        assert len(await conn.fetch("SELECT DISTINCT day FROM usage_daily")) == 2


async def test_a_change_between_batches_is_rated_by_the_next_batch(pool: asyncpg.Pool) -> None:
    """Every batch reads the tariffs anew: the unlimited flag, a new price and a tariff
    switch made between two batches apply to the very next one."""
    async with pool.acquire() as conn:
        s = await setup_traffic(conn)
        account = s["accounts"][0]
        hour = NOW - timedelta(hours=2)

        async def send(mark: int, nbytes: int, at: datetime = hour) -> int:
            res = await commit_usage(conn, "w", mark, [TrafficUsage(account, s["inet"], at, nbytes)], NOW)
            assert res.rejected == ()
            return res.charged

        assert await send(1, 3_000) == cost(3_000)
        await accounts.edit_account(conn, account, actor="test", unlimited=True)
        assert await send(2, 1_000) == 0                       # counted, not charged
        await accounts.edit_account(conn, account, actor="test", unlimited=False)
        assert await send(3, 1_000) == cost(5_000) - cost(4_000)
        await T.set_rate(conn, s["service"], class_id=s["inet"], range_id=None, prepaid=0, unit_size=1,
                         tiers=[(0, 10)])                         # 10 micro per byte from now on
        assert await send(4, 100) == 10 * 5_100 - 10 * 5_000    # the counter, priced by the new meter
        cheap = await T.create_service(conn, "cheap", "traffic")
        await T.set_rate(conn, cheap, class_id=s["inet"], range_id=None, prepaid=0, unit_size=1, tiers=[(0, 1)])
        switch = NOW - timedelta(minutes=90)
        await T.link_tariff(conn, account, await T.create_tariff(conn, "cheap", [cheap]), now=switch, tz=UTC,
                            actor="test")
        assert await send(5, 200, at=NOW - timedelta(minutes=30)) == 200  # the new service's own counter
        rows = await conn.fetch("SELECT service_id, quantity FROM usage_counters ORDER BY service_id")
        assert [tuple(r) for r in rows] == [(s["service"], 5_100), (cheap, 200)]


async def test_usage_keys_booked_under_a_lowered_watermark_stop_the_batch(pool: asyncpg.Pool) -> None:
    """Usage keys name (source, watermark): if they are in the ledger although the committed
    watermark is below (an operator lowered it by hand), the batch books nothing."""
    async with pool.acquire() as conn:
        s = await setup_traffic(conn)
        account = s["accounts"][0]
        batch = [TrafficUsage(account, s["inet"], NOW - timedelta(hours=1), 4_000)]
        await commit_usage(conn, "w", 10, batch, NOW)
        await conn.execute("UPDATE ingest_watermarks SET watermark = 5 WHERE source = 'w'")
        before = await conn.fetch("SELECT * FROM usage_counters")
        with pytest.raises(InvariantViolation, match="already booked"):
            await commit_usage(conn, "w", 10, batch, NOW)
        assert await watermark(conn, "w") == 5
        assert await balance(conn, account) == -cost(4_000)
        assert await conn.fetch("SELECT * FROM usage_counters") == before
        assert await conn.fetchval("SELECT count(*) FROM ledger") == 1
