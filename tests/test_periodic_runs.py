"""Periodic charge runs against the real database: idempotent, restartable, exact."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billcore.billing import tariffs as T
from billcore.billing.periods import Period, cumulative_fee
from billcore.billing.scheduler import RunProgress, run_due
from tests.test_usage_commit import make_accounts

UTC = timezone.utc
APR = datetime(2024, 4, 1, tzinfo=UTC)
MAY = datetime(2024, 5, 1, tzinfo=UTC)
FEE_A = 30_000_000      # 30.00 a month
FEE_B = 45_500_001
MONTH = {"kind": "monthly", "anchor": date(2024, 1, 1)}


class Crash(Exception):
    pass


async def plan(conn: asyncpg.Connection, fee: int, name: str, mode: str = "start") -> int:
    service = await T.create_service(conn, name, "periodic", fee=fee, period=MONTH, charge_mode=mode)
    return await T.create_tariff(conn, name, [service])


async def balances(conn: asyncpg.Connection) -> dict[int, int]:
    return {r["id"]: r["balance"] for r in await conn.fetch("SELECT id, balance FROM accounts")}


async def fresh(conn: asyncpg.Connection) -> None:
    await conn.execute("TRUNCATE periodic_runs, periodic_clock, periodic_charges, once_charges, period_summaries,"
                       " account_tariffs, blocks, ledger CASCADE")
    await conn.execute("UPDATE accounts SET balance = 0")


async def test_monthly_fee_is_charged_once_per_period(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        tariff = await plan(conn, FEE_A, "basic")
        accounts = await make_accounts(conn, 3)
        for a in accounts:
            await T.link_tariff(conn, a, tariff, now=APR - timedelta(days=3), tz=UTC, actor="t")
    first = await run_due(pool, APR - timedelta(days=3))       # March: 3 days of 31
    march = FEE_A - FEE_A * 28 // 31   # cum(Apr 1) - cum(Mar 29): telescoping, floor at the start
    assert first.charges == 3 and first.amount == 3 * march
    seen: list[RunProgress] = []
    second = await run_due(pool, APR + timedelta(hours=1), progress=seen.append)
    assert second.charges == 3 and second.amount == 3 * FEE_A
    assert seen[-1].accounts_done == seen[-1].accounts_total == 3
    again = await run_due(pool, APR + timedelta(hours=2))
    assert again.charges == 0 and again.amount == 0
    async with pool.acquire() as conn:
        assert set((await balances(conn)).values()) == {-(march + FEE_A)}
        rows = await conn.fetch("SELECT kind, count(*) AS n FROM ledger GROUP BY kind")
        assert {r["kind"]: r["n"] for r in rows} == {"periodic": 6}


@pytest.mark.parametrize("workers", [1, 2])
async def test_restart_between_batches_charges_nobody_twice(pool: asyncpg.Pool, workers: int) -> None:
    async with pool.acquire() as conn:
        tariff = await plan(conn, FEE_A, "basic")
        accounts = await make_accounts(conn, 23)
        for a in accounts:
            await T.link_tariff(conn, a, tariff, now=datetime(2024, 1, 1, tzinfo=UTC), tz=UTC, actor="t")
    await run_due(pool, APR - timedelta(days=1))

    def crash_after_three(p: RunProgress) -> None:
        if p.batches == 3:
            raise Crash()

    with pytest.raises(Crash):
        await run_due(pool, APR + timedelta(minutes=5), batch_size=4, workers=workers,
                      progress=crash_after_three)
    async with pool.acquire() as conn:
        charged = sum(1 for b in (await balances(conn)).values() if b < -FEE_A)
        # three batches of four got April; with two workers a fourth may have committed too
        assert charged == 12 if workers == 1 else charged in (12, 16)
    finish = await run_due(pool, APR + timedelta(minutes=6), batch_size=4, workers=workers)
    assert finish.charges == 23 - charged and finish.since == APR - timedelta(days=1)
    async with pool.acquire() as conn:
        assert set((await balances(conn)).values()) == {-2 * FEE_A}
        assert await conn.fetchval("SELECT count(*) FROM ledger WHERE created_at >= $1", APR) == 23


async def test_mid_period_tariff_change_prorates_old_and_new(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        old = await plan(conn, FEE_A, "old")
        new = await plan(conn, FEE_B, "new")
        (account,) = await make_accounts(conn, 1)
        await T.link_tariff(conn, account, old, now=APR, tz=UTC, actor="t")
    await run_due(pool, APR)
    change = APR + timedelta(days=10, seconds=12_345)
    async with pool.acquire() as conn:
        await T.link_tariff(conn, account, new, now=change, tz=UTC, actor="t")
        history = await T.tariff_history(conn, account)
        assert [(h["tariff_id"], h["valid_from"], h["valid_to"]) for h in history] == [
            (old, APR, change), (new, change, None)]
    await run_due(pool, change + timedelta(seconds=1))
    await run_due(pool, MAY + timedelta(seconds=1))
    period = Period(APR, MAY, 0)
    expected = cumulative_fee(FEE_A, period, change) + FEE_B - cumulative_fee(FEE_B, period, change)
    async with pool.acquire() as conn:
        # April: old part + new part; May has begun, so May's fee (mode start) on the new tariff
        assert (await balances(conn))[account] == -expected - FEE_B
        amounts = [r["amount"] for r in await conn.fetch("SELECT amount FROM ledger ORDER BY id")]
        assert amounts[0] == -FEE_A and amounts[1] == FEE_A - cumulative_fee(FEE_A, period, change)
    assert (await run_due(pool, MAY + timedelta(hours=1))).amount == 0


async def test_link_at_next_period_and_once_off_fee_and_blocks(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        setup = await T.create_service(conn, "setup", "once", fee=5_000_000)
        monthly = await T.create_service(conn, "m", "periodic", fee=FEE_A, period=MONTH, charge_mode="start")
        tariff = await T.create_tariff(conn, "t", [setup, monthly])
        (account,) = await make_accounts(conn, 1)
        await conn.execute("UPDATE accounts SET credit = 0 WHERE id = $1", account)
        link = await T.link_tariff(conn, account, tariff, now=APR + timedelta(days=5), tz=UTC,
                                   start="next_period", actor="t")
        assert link["valid_from"] == MAY
    nothing = await run_due(pool, APR + timedelta(days=6))
    assert nothing.charges == 0 and nothing.once_charges == 0
    run = await run_due(pool, MAY + timedelta(minutes=1))
    assert run.charges == 1 and run.once_charges == 1 and run.amount == FEE_A + 5_000_000
    assert [c.action for c in run.block_changes] == ["set"]
    again = await run_due(pool, MAY + timedelta(minutes=2))
    assert again.once_charges == 0 and again.amount == 0
    async with pool.acquire() as conn:
        assert await conn.fetchval(
            "SELECT count(*) FROM blocks WHERE account_id = $1 AND kind = 'system' AND lifted_at IS NULL",
            account) == 1


async def test_period_close_writes_one_summary_per_account(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        tariff = await plan(conn, FEE_A, "basic")
        accounts = await make_accounts(conn, 2)
        for a in accounts:
            await T.link_tariff(conn, a, tariff, now=APR, tz=UTC, actor="t")
    await run_due(pool, APR)
    first = await run_due(pool, MAY + timedelta(hours=1))
    assert first.periods_closed == 2
    assert (await run_due(pool, MAY + timedelta(hours=2))).periods_closed == 0
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT period_start, period_end, periodic_amount FROM period_summaries")
        assert {(r["period_start"], r["period_end"], r["periodic_amount"]) for r in rows} == {
            (APR, MAY, FEE_A)}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(crash_at=st.integers(1, 5), batch=st.integers(1, 4), change=st.integers(1, 30 * 86_400 - 1),
       fee_a=st.integers(0, 10**12), fee_b=st.integers(0, 10**12))
async def test_property_restart_and_change_sum_exactly(
        pool: asyncpg.Pool, crash_at: int, batch: int, change: int, fee_a: int, fee_b: int) -> None:
    async with pool.acquire() as conn:
        await fresh(conn)
        await conn.execute("UPDATE services SET fee = $1 WHERE name = 'pa'", fee_a)
        await conn.execute("UPDATE services SET fee = $1 WHERE name = 'pb'", fee_b)
        old = await conn.fetchval("SELECT id FROM tariffs WHERE name = 'pa'")
        if old is None:
            old, _ = await plan(conn, fee_a, "pa"), await plan(conn, fee_b, "pb")
            await make_accounts(conn, 7)
        new = await conn.fetchval("SELECT id FROM tariffs WHERE name = 'pb'")
        accounts = [r["id"] for r in await conn.fetch("SELECT id FROM accounts ORDER BY id")]
        at = APR + timedelta(seconds=change)
        for a in accounts:
            await T.link_tariff(conn, a, old, now=APR, tz=UTC, actor="t")
            await T.link_tariff(conn, a, new, now=at, tz=UTC, actor="t")   # history known in advance

    def crash(p: RunProgress) -> None:
        if p.batches == crash_at:
            raise Crash()

    await run_due(pool, APR + timedelta(seconds=1), batch_size=batch)
    try:
        await run_due(pool, MAY + timedelta(seconds=5), batch_size=batch, workers=2, progress=crash)
    except Crash:
        pass
    await run_due(pool, MAY + timedelta(seconds=6), batch_size=batch)
    await run_due(pool, MAY + timedelta(seconds=7), batch_size=batch)
    period = Period(APR, MAY, 0)
    expected = (cumulative_fee(fee_a, period, at) + fee_b - cumulative_fee(fee_b, period, at)
                + fee_b)  # April prorated, plus May in full on the new tariff (mode start)
    async with pool.acquire() as conn:
        assert set((await balances(conn)).values()) == {-expected}
