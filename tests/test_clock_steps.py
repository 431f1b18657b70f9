"""Issue 23, part 4: wall-clock steps of ±1 hour, on a driven clock (``now`` passed in).

The rule (docs/operations.md, "Clock"): billing time never runs backwards.

* `BillingClock` (the core's ``now``): after a backward step it goes on from
  where it was, at (nearly) the real rate; a forward step is followed, and
  once corrected slews back; every step is counted.
* Periodic runs: a run behind the last one books nothing and refunds nothing;
  a forward step charges early, once; nothing is skipped or closed twice.
* RADIUS time: a session whose core clock steps back is charged exactly its
  seconds (before: its pieces were refused as "future", and a Stop while the
  clock was behind was never charged).
* NetFlow batches: the hour bucket that begins while the clock is behind is
  charged (before: refused as "future", the watermark passed it: lost to billing).
"""

from __future__ import annotations

import datetime as dt
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest
from prometheus_client import REGISTRY

from billcore.billing import classification
from billcore.billing import tariffs as T
from billcore.billing.clock import SLEW, BillingClock, clock_floor
from billcore.billing.periods import Period, cumulative_fee
from billcore.billing.rating import TrafficUsage
from billcore.billing.scheduler import RunProgress, run_due
from billcore.billing.usage import commit_usage
from billcore.radius.nas import add_nas
from tests.test_radius_time import (  # noqa: F401 - store is a fixture
    DAY, NAS, acct, balance, on_tariff, store, subscriber, time_service,
)
from tests.test_usage_commit import make_accounts

UTC = timezone.utc
HOUR = timedelta(hours=1)


class DrivenClock:
    """A wall clock the test sets and a monotonic clock it advances."""

    def __init__(self, wall: datetime) -> None:
        self.wall = wall
        self.mono = 1_000.0

    def pass_(self, seconds: float) -> None:
        """Real time passes: both clocks move."""
        self.wall += timedelta(seconds=seconds)
        self.mono += seconds

    def step(self, delta: timedelta) -> None:
        """The wall clock alone jumps."""
        self.wall += delta

    def billing(self) -> BillingClock:
        return BillingClock(lambda: self.wall, lambda: self.mono)


def steps(direction: str) -> float:
    return REGISTRY.get_sample_value("billcore_clock_steps_total", {"direction": direction}) or 0.0


# ---------------------------------------------------------------- the clock itself


def test_billing_time_never_runs_backwards_and_follows_real_time_after_a_backward_step() -> None:
    real = datetime(2025, 3, 3, 10, 50, tzinfo=UTC)
    d = DrivenClock(real)
    clock = d.billing()
    backward = steps("backward")
    assert clock.now() == real
    d.pass_(600)
    real += timedelta(seconds=600)
    d.step(-HOUR)
    seen = [clock.now()]
    assert seen[0] == real  # the step happened this instant: billing time does not follow it
    assert steps("backward") == backward + 1
    for _ in range(80):  # 80 minutes with the wall clock an hour behind
        d.pass_(60)
        real += timedelta(seconds=60)
        seen.append(clock.now())
    assert seen == sorted(seen)
    lag = (real - seen[-1]).total_seconds()
    assert 0 <= lag <= 80 * 60 * SLEW + 1e-6  # within 1 % of real time: far inside rating's 5 min skew
    assert REGISTRY.get_sample_value("billcore_clock_behind_seconds") == (seen[-1] - d.wall).total_seconds()


def test_a_forward_step_is_followed_and_slews_back_once_corrected() -> None:
    real = datetime(2025, 3, 3, 22, 30, tzinfo=UTC)
    d = DrivenClock(real)
    clock = d.billing()
    forward = steps("forward")
    clock.now()
    d.pass_(60)
    d.step(HOUR)
    assert clock.now() == real + timedelta(seconds=60) + HOUR  # indistinguishable from a long pause: followed
    assert steps("forward") == forward + 1
    d.pass_(60)
    d.step(-HOUR)  # corrected
    values = []
    for _ in range(200):
        values.append(clock.now())
        d.pass_(3_600)
    assert values == sorted(values)
    assert values[-1] == d.wall - timedelta(seconds=3_600)  # caught up with the wall clock (then tracks it)


# ---------------------------------------------------------------- periodic runs


MAR = datetime(2024, 3, 1, tzinfo=UTC)
MARCH = Period(MAR, datetime(2024, 4, 1, tzinfo=UTC), 0)
FEE = 31_000_007  # a month, charged day by day


def through_day(day: int) -> int:
    """What a daily-charged month owes once day ``day`` of March has begun (charged to its end)."""
    return cumulative_fee(FEE, MARCH, MAR + timedelta(days=day))


async def ledger_rows(conn: asyncpg.Connection, account: int) -> list[int]:
    return [r[0] for r in await conn.fetch(
        "SELECT amount FROM ledger WHERE account_id = $1 AND kind = 'periodic' ORDER BY id", account)]


async def test_periodic_runs_across_clock_steps_never_refund_double_or_skip(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        service = await T.create_service(conn, "daily", "periodic", fee=FEE,
                                         period={"kind": "monthly", "anchor": dt.date(2024, 1, 1)},
                                         charge_mode="daily")
        tariff = await T.create_tariff(conn, "daily", [service])
        (account,) = await make_accounts(conn, 1)
        await T.link_tariff(conn, account, tariff, now=MAR, tz=UTC, actor="t")

    first = await run_due(pool, MAR + timedelta(days=1, minutes=30))  # 2 March 00:30
    assert first.amount == through_day(2)
    # the wall clock steps back an hour: 1 March 23:30 again
    back = await run_due(pool, MAR + timedelta(days=1, minutes=30) - HOUR)
    assert (back.charges, back.amount, back.clock_behind) == (0, 0, 3600.0)
    assert (await run_due(pool, MAR + timedelta(days=1, minutes=35))).amount == 0
    assert (await run_due(pool, MAR + timedelta(days=2, minutes=10))).amount == through_day(3) - through_day(2)
    # a forward step: 3 March 23:10 read as 4 March 00:10 charges day 4 early, once
    early = await run_due(pool, MAR + timedelta(days=3, minutes=10))
    assert early.amount == through_day(4) - through_day(3)
    corrected = await run_due(pool, MAR + timedelta(days=2, hours=23, minutes=15))
    assert (corrected.charges, corrected.amount) == (0, 0)
    assert (await run_due(pool, MAR + timedelta(days=3, minutes=20))).amount == 0
    assert (await run_due(pool, MAR + timedelta(days=4, minutes=5))).amount == through_day(5) - through_day(4)
    # across the period's end, with a step back over it: March closes once, April is not skipped
    await run_due(pool, MAR + timedelta(days=30, hours=23, minutes=50))
    april = await run_due(pool, datetime(2024, 4, 1, 0, 30, tzinfo=UTC))
    assert april.periods_closed == 1
    again = await run_due(pool, datetime(2024, 3, 31, 23, 40, tzinfo=UTC))
    assert (again.charges, again.amount, again.periods_closed) == (0, 0, 0)
    async with pool.acquire() as conn:
        rows = await ledger_rows(conn, account)
        assert all(amount < 0 for amount in rows), f"a refund was booked: {rows}"
        april = Period(datetime(2024, 4, 1, tzinfo=UTC), datetime(2024, 5, 1, tzinfo=UTC), 0)
        april_day_one = cumulative_fee(FEE, april, datetime(2024, 4, 2, tzinfo=UTC))
        assert -sum(rows) == FEE + april_day_one
        assert await conn.fetchval("SELECT count(*) FROM period_summaries WHERE account_id = $1", account) == 1


async def test_a_run_that_crashed_then_reruns_under_a_clock_stepped_back_refunds_nothing(
        pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        service = await T.create_service(conn, "daily", "periodic", fee=FEE,
                                         period={"kind": "monthly", "anchor": dt.date(2024, 1, 1)},
                                         charge_mode="daily")
        tariff = await T.create_tariff(conn, "daily", [service])
        accounts = await make_accounts(conn, 6)
        for a in accounts:
            await T.link_tariff(conn, a, tariff, now=MAR, tz=UTC, actor="t")

    class Crash(Exception):
        pass

    def crash_after_one(p: RunProgress) -> None:
        if p.batches == 1:
            raise Crash()

    with pytest.raises(Crash):  # 2 March 00:30: the first two accounts are charged through 2 March
        await run_due(pool, MAR + timedelta(days=1, minutes=30), batch_size=2, progress=crash_after_one)
    rerun = await run_due(pool, MAR + timedelta(days=1, minutes=30) - HOUR, batch_size=2)  # the core restarts
    assert rerun.amount == 4 * through_day(2)
    await run_due(pool, MAR + timedelta(days=2, minutes=10), batch_size=2)
    async with pool.acquire() as conn:
        for a in accounts:
            rows = await ledger_rows(conn, a)
            assert all(amount < 0 for amount in rows), f"a refund was booked: {rows}"
            assert -sum(rows) == through_day(3)


# ---------------------------------------------------------------- RADIUS time


def local(hour: int, minute: int, second: int = 0) -> datetime:
    return datetime(2025, 3, 4, hour, minute, second, tzinfo=UTC)


async def session_started_at_ten(conn: asyncpg.Connection, store, d: DrivenClock,  # noqa: F811
                                 clock: BillingClock) -> tuple[int, datetime]:
    """Alice on a time tariff (DAY per hour) starts session S1 at 10:00 (a minute after ``d`` reads 9:59)."""
    await add_nas(conn, store, name="mt1", address=NAS, secret="x")
    service = await time_service(conn, "dialup", day=DAY, night=None)
    acc = await subscriber(conn, store, "alice", 10_000_000)
    await on_tariff(conn, acc, [service], local(0, 0))
    d.pass_(60)
    start = local(10, 0)
    await acct(conn, "start", "S1", start, now=clock.now())
    return acc, start


async def test_radius_session_time_is_charged_exactly_when_the_core_restarts_with_its_clock_behind(
        pool: asyncpg.Pool, store) -> None:  # noqa: F811
    """Interims every 4 minutes; at minute 20 the core's wall clock steps back an hour and the core
    restarts (its BillingClock starts from the latest time the database holds)."""
    d = DrivenClock(local(9, 59))
    clock = d.billing()
    async with pool.acquire() as conn:
        acc, start = await session_started_at_ten(conn, store, d, clock)
        for k in range(1, 13):  # 48 minutes
            d.pass_(240)
            if k == 6:
                d.step(-HOUR)
                clock = BillingClock(lambda: d.wall, lambda: d.mono, floor=await clock_floor(pool))
            await acct(conn, "stop" if k == 12 else "interim", "S1", start + timedelta(minutes=4 * k), 240 * k,
                       now=clock.now())
        assert await balance(conn, acc) == 10_000_000 - 2880 * DAY // 3600
        assert await conn.fetchval("SELECT charged FROM radius_sessions WHERE session_id = 'S1'") == 2880 * DAY // 3600


async def test_radius_session_time_with_long_interims_under_the_core_billing_clock(
        pool: asyncpg.Pool, store) -> None:  # noqa: F811
    """Interims every 15 minutes (longer than rating's 5 min of skew) and a Stop while the wall clock
    is an hour behind: charged exactly through the core's BillingClock; then a forward step."""
    d = DrivenClock(local(9, 59))
    clock = d.billing()
    async with pool.acquire() as conn:
        acc, start = await session_started_at_ten(conn, store, d, clock)
        d.pass_(600)
        d.step(-HOUR)
        for k in range(1, 5):  # the NAS's clock is right: its Event-Timestamps are real time
            d.pass_(900 if k > 1 else 300)
            await acct(conn, "stop" if k == 4 else "interim", "S1", start + timedelta(minutes=15 * k), 900 * k,
                       now=clock.now())
        assert await balance(conn, acc) == 10_000_000 - 3600 * DAY // 3600
        # a second session while the wall clock is an hour ahead: nothing twice
        d.step(2 * HOUR)
        second = start + timedelta(hours=2)
        await acct(conn, "start", "S2", second, now=clock.now())
        for k in range(1, 4):
            d.pass_(600)
            await acct(conn, "stop" if k == 3 else "interim", "S2", second + timedelta(minutes=10 * k), 600 * k,
                       now=clock.now())
            await acct(conn, "interim", "S2", second + timedelta(minutes=10 * k), 600 * k, now=clock.now())
        assert await balance(conn, acc) == 10_000_000 - 3600 * DAY // 3600 - 1800 * DAY // 3600


# ---------------------------------------------------------------- NetFlow batches


async def test_netflow_hour_that_begins_while_the_clock_is_behind_is_charged(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        inet = await classification.create_class(conn, "inet")
        service = await T.create_service(conn, "traffic", "traffic")
        await T.set_rate(conn, service, class_id=inet, range_id=None, prepaid=0, unit_size=1, tiers=[(0, 1)])
        tariff = await T.create_tariff(conn, "per-byte", [service])
        (account,) = await make_accounts(conn, 1)
        await T.link_tariff(conn, account, tariff, now=datetime(2020, 1, 1, tzinfo=UTC), tz=UTC, actor="t")
        d = DrivenClock(datetime(2025, 3, 4, 10, 50, tzinfo=UTC))
        clock = d.billing()
        sent = charged = 0
        mark = 0
        for minute in range(0, 60, 2):  # a batch every 2 minutes, from 10:50 to 11:48 real time
            if minute == 4:
                d.step(-HOUR)  # 10:54 reads 9:54
            real = datetime(2025, 3, 4, 10, 50, tzinfo=UTC) + timedelta(minutes=minute)
            bucket = real.replace(minute=0, second=0)  # the exporter's clock is right
            mark += 1000
            result = await commit_usage(conn, "netflow:0", mark, [TrafficUsage(account, inet, bucket, 10_000 + minute)],
                                        clock.now(), epoch=None)
            assert not result.rejected, f"{real:%H:%M}: {result.rejected[0].reason}"
            sent += 10_000 + minute
            charged += result.charged
            d.pass_(120)
        assert charged == sent
        assert await conn.fetchval("SELECT sum(quantity) FROM usage_counters WHERE account_id = $1", account) == sent
