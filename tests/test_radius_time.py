"""RADIUS time through the tariff engine, against a real PostgreSQL.

The operator's zone is Europe/Berlin (UTC+1 in these winter dates); the
tariff's time service costs DAY per hour in any range and NIGHT per hour in
the night range (22:00–06:00 local).  Expected amounts are computed by hand:
each (time range, accounting period) counter is charged
floor(seconds × price / 3600) on its cumulative seconds.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from billcore.billing.tariffs import create_service, create_tariff, create_time_range, link_tariff, set_rate
from billcore.db.migrate import discover, migrate
from billcore.radius.accounting import apply_accounting, usage_source
from billcore.radius.authorize import authorize
from billcore.radius.nas import add_link, add_nas
from billcore.radius.records import AccountingResult, Decision, read_access_request, read_accounting_record
from billcore.radius.secrets import SecretStore
from tests.test_radius_core import make_account

TZ = ZoneInfo("Europe/Berlin")
NAS = "10.0.0.1"
DAY = 1_000_003     # micro-units per hour: prices that do not divide evenly, so the floor shows
NIGHT = 500_001


def local(day: int, hour: int, minute: int = 0, second: int = 0, month: int = 3) -> dt.datetime:
    return dt.datetime(2025, month, day, hour, minute, second, tzinfo=TZ)


@pytest.fixture
def store(tmp_path: Path) -> SecretStore:
    return SecretStore(SecretStore.load_or_create_key(tmp_path / "secret.key"))


async def night_range(conn: asyncpg.Connection) -> int:
    return await create_time_range(conn, "night", priority=1, windows=[
        {"weekdays": list(range(7)), "start_minute": 22 * 60, "end_minute": 6 * 60}])


async def time_service(conn: asyncpg.Connection, name: str, *, day: int | None, night: int | None,
                       night_id: int | None = None, prepaid: int = 0, session_limit: int | None = None,
                       max_sessions: int | None = None) -> int:
    """A time service: ``day`` per hour in any range, ``night`` per hour in the night range."""
    service = await create_service(conn, name, "time", session_limit=session_limit, max_sessions=max_sessions)
    if day is not None:
        await set_rate(conn, service, class_id=None, range_id=None, prepaid=prepaid, unit_size=3600,
                       tiers=[(0, day)])
    if night is not None:
        await set_rate(conn, service, class_id=None, range_id=night_id, prepaid=0, unit_size=3600,
                       tiers=[(0, night)])
    return service


async def on_tariff(conn: asyncpg.Connection, account_id: int, services: list[int], since: dt.datetime,
                    name: str = "dialup") -> int:
    tariff = await create_tariff(conn, f"{name}-{account_id}", services)
    await link_tariff(conn, account_id, tariff, now=since, tz=TZ, actor="test")
    return tariff


async def subscriber(conn: asyncpg.Connection, store: SecretStore, login: str, balance: int, *,
                     credit: int = 0, max_sessions: int = 1, session_limit: int | None = None) -> int:
    acc = await make_account(conn, login, balance=balance, credit=credit)
    await add_link(conn, store, account_id=acc, login=login, password="pw", max_sessions=max_sessions,
                   session_limit=session_limit)
    return acc


async def auth(conn: asyncpg.Connection, store: SecretStore, login: str, now: dt.datetime) -> Decision:
    request = read_access_request({"nas": NAS, "login": login, "method": "pap", "password": b"pw"})
    async with conn.transaction():
        return await authorize(conn, store, request, now, tz=TZ)


def timeout(decision: Decision) -> int | str | None:
    assert decision.accept, decision
    return decision.attribute("Session-Timeout")


async def acct(conn: asyncpg.Connection, status: str, sid: str, at: dt.datetime, session_time: int = 0,
               login: str = "alice", now: dt.datetime | None = None) -> AccountingResult:
    """An Accounting-Request stamped ``at`` (Event-Timestamp), handled at ``now`` (default ``at``)."""
    record = {"nas": NAS, "status": status, "session_id": sid, "login": login, "event_time": at.timestamp(),
              "session_time": session_time}
    async with conn.transaction():
        return await apply_accounting(conn, read_accounting_record(record), now or at, tz=TZ)


async def balance(conn: asyncpg.Connection, account_id: int) -> int:
    return int(await conn.fetchval("SELECT balance FROM accounts WHERE id = $1", account_id))


async def counters(conn: asyncpg.Connection, account_id: int) -> list[tuple[int, dt.datetime, int, int]]:
    rows = await conn.fetch("SELECT range_id, period_start, quantity, charged FROM usage_counters"
                            " WHERE account_id = $1 ORDER BY period_start, range_id", account_id)
    return [(r["range_id"], r["period_start"], r["quantity"], r["charged"]) for r in rows]


async def test_a_session_across_the_day_night_border_is_charged_exactly_once(
        pool: asyncpg.Pool, store: SecretStore) -> None:
    async with pool.acquire() as conn:
        nas_id = await add_nas(conn, store, name="mt1", address=NAS, secret="x")
        night = await night_range(conn)
        service = await time_service(conn, "dialup", day=DAY, night=NIGHT, night_id=night)
        acc = await subscriber(conn, store, "alice", 10_000_000)
        await on_tariff(conn, acc, [service], local(1, 0))
        start = local(3, 21, 50)
        await acct(conn, "start", "S1", start)
        await acct(conn, "interim", "S1", local(3, 21, 59, 59), 599)
        assert await balance(conn, acc) == 10_000_000 - 166_389            # floor(599 × 1000003 / 3600)
        await acct(conn, "interim", "S1", local(3, 22, 10, 34), 1234)      # 600 s of day, 634 of night
        day_part, night_part = 166_667, 88_055                              # floor(600 × DAY/3600), floor(634 × NIGHT/3600)
        assert await balance(conn, acc) == 10_000_000 - day_part - night_part
        # the NAS retransmits, then an older Interim arrives late: neither charges
        await acct(conn, "interim", "S1", local(3, 22, 10, 34), 1234, now=local(3, 22, 10, 40))
        await acct(conn, "interim", "S1", local(3, 22, 5), 900, now=local(3, 22, 11))
        assert await balance(conn, acc) == 10_000_000 - day_part - night_part
        stop = await acct(conn, "stop", "S1", local(3, 22, 56, 40), 4000)   # 600 day + 3400 night
        await acct(conn, "stop", "S1", local(3, 22, 56, 40), 4000, now=local(3, 22, 57))
        total = 166_667 + 472_223                                           # floor(3400 × NIGHT/3600) = 472223
        assert await balance(conn, acc) == 10_000_000 - total
        assert await conn.fetchval("SELECT sum(amount) FROM ledger WHERE account_id = $1", acc) == -total
        # one ledger row per counter that moved in a commit: 599 (day), 1234 (day, night), 4000 (night)
        assert await conn.fetchval("SELECT count(*) FROM ledger WHERE account_id = $1 AND amount < 0", acc) == 4
        march = local(1, 0).astimezone(dt.timezone.utc)
        assert await counters(conn, acc) == [(0, march, 600, 166_667), (night, march, 3400, 472_223)]
        assert await conn.fetchval("SELECT charged FROM radius_sessions WHERE session_id = 'S1'") == total
        # the ended session keeps its watermark on its row; its ingest_watermarks row is gone
        assert await conn.fetchval("SELECT charged_time FROM radius_sessions WHERE session_id = 'S1'") == 4000
        assert await conn.fetchval("SELECT count(*) FROM ingest_watermarks WHERE source = $1",
                                   usage_source(nas_id, "S1")) == 0
        # the session's own events are kept
        assert stop.hooks[0].event == "session.stopped"
        days = await conn.fetch("SELECT quantity FROM usage_daily WHERE account_id = $1 AND class_id = -1", acc)
        assert sum(r["quantity"] for r in days) == 4000


async def test_a_session_across_a_period_border_is_cut_per_period(pool: asyncpg.Pool, store: SecretStore) -> None:
    async with pool.acquire() as conn:
        await add_nas(conn, store, name="mt1", address=NAS, secret="x")
        night = await night_range(conn)
        service = await time_service(conn, "dialup", day=DAY, night=NIGHT, night_id=night)
        acc = await subscriber(conn, store, "alice", 10_000_000)
        await on_tariff(conn, acc, [service], local(1, 0, month=2))
        # 23:30 on 28 February to 00:30 on 1 March (local): night on both sides of the month border
        await acct(conn, "start", "S1", local(28, 23, 30, month=2))
        await acct(conn, "stop", "S1", local(1, 0, 30), 3600)
        # each month's counter floors on its own: 2 × floor(1800 × NIGHT/3600) = 2 × 250000,
        # where one counter of 3600 s would have been 500001
        assert await balance(conn, acc) == 10_000_000 - 500_000
        feb, march = (local(1, 0, month=m).astimezone(dt.timezone.utc) for m in (2, 3))
        assert await counters(conn, acc) == [(night, feb, 1800, 250_000), (night, march, 1800, 250_000)]


async def test_session_timeout_walks_across_the_price_border(pool: asyncpg.Pool, store: SecretStore) -> None:
    async with pool.acquire() as conn:
        await add_nas(conn, store, name="mt1", address=NAS, secret="x")
        night = await night_range(conn)
        service = await time_service(conn, "dialup", day=3_600_000, night=1_800_000, night_id=night)  # 1000 / 500 a s
        acc = await subscriber(conn, store, "alice", 2_000_000, credit=2_000_000)
        await conn.execute(
            "INSERT INTO promised_payments(account_id, amount, period, taken_at, expires_at, taken_by)"
            " VALUES ($1, 500499, '2025-03-01', $2, $3, 'test')", acc, local(1, 0), local(10, 0))
        await on_tariff(conn, acc, [service], local(1, 0))
        # money left 4 500 499 at 21:00: one day hour (3 600 000), then 900 499 at night buys 1800 s
        # (1801 s would cost 900 500); at the day price alone it would have been 4500 s
        assert timeout(await auth(conn, store, "alice", local(3, 21))) == 3600 + 1800
        # at night the whole amount is spent at the night price, until 06:00 and beyond
        assert timeout(await auth(conn, store, "alice", local(3, 23))) == 9000
        # the service's session limit caps it, and the link's own when lower
        await conn.execute("UPDATE services SET session_limit = 5000 WHERE id = $1", service)
        assert timeout(await auth(conn, store, "alice", local(3, 21))) == 5000
        await conn.execute("UPDATE radius_links SET session_limit = 4000")
        assert timeout(await auth(conn, store, "alice", local(3, 21))) == 4000


async def test_session_timeout_counts_prepaid_time_already_used(pool: asyncpg.Pool, store: SecretStore) -> None:
    async with pool.acquire() as conn:
        await add_nas(conn, store, name="mt1", address=NAS, secret="x")
        service = await time_service(conn, "dialup", day=3_600_000, night=None, prepaid=600)
        acc = await subscriber(conn, store, "alice", 0)
        await on_tariff(conn, acc, [service], local(1, 0))
        # no money, but 600 prepaid seconds this month
        assert timeout(await auth(conn, store, "alice", local(3, 12))) == 600
        await acct(conn, "start", "S1", local(3, 12))
        await acct(conn, "stop", "S1", local(3, 12, 3, 20), 200)
        assert await balance(conn, acc) == 0
        assert timeout(await auth(conn, store, "alice", local(3, 13))) == 400
        # a new month brings new prepaid time
        assert timeout(await auth(conn, store, "alice", local(1, 12, month=4))) == 600


async def test_refused_when_the_money_left_buys_no_time_now(pool: asyncpg.Pool, store: SecretStore) -> None:
    async with pool.acquire() as conn:
        await add_nas(conn, store, name="mt1", address=NAS, secret="x")
        night = await night_range(conn)
        free_nights = await time_service(conn, "free-nights", day=3_600_000, night=0, night_id=night)
        nights_only = await time_service(conn, "nights-only", day=None, night=1_800_000, night_id=night)
        alice = await subscriber(conn, store, "alice", 0)
        await on_tariff(conn, alice, [free_nights], local(1, 0))
        bob = await subscriber(conn, store, "bob", 20_000_000)
        await on_tariff(conn, bob, [nights_only], local(1, 0))
        refused = await auth(conn, store, "alice", local(3, 21))
        assert not refused.accept and refused.reason == "no money left for time"
        # at night time is free until 06:00; there the money left (none) buys nothing more
        assert timeout(await auth(conn, store, "alice", local(3, 23))) == 7 * 3600
        # no price in the current range: time is not sold now, whatever the balance
        assert (await auth(conn, store, "bob", local(3, 12))).reason == "no time price now"
        # from 22:00 bob's money (enough for 11 night hours) buys the night up to 06:00
        # only: time in the day range cannot be sold, so the walk ends there
        assert timeout(await auth(conn, store, "bob", local(3, 22))) == 8 * 3600


async def test_max_sessions_of_the_time_service_counts_every_link(pool: asyncpg.Pool, store: SecretStore) -> None:
    async with pool.acquire() as conn:
        await add_nas(conn, store, name="mt1", address=NAS, secret="x")
        service = await time_service(conn, "dialup", day=3_600_000, night=None, max_sessions=2)
        acc = await subscriber(conn, store, "alice", 10_000_000, max_sessions=3)
        await add_link(conn, store, account_id=acc, login="alice2", password="pw", max_sessions=3)
        await on_tariff(conn, acc, [service], local(1, 0))
        now = local(3, 12)
        await acct(conn, "start", "S1", now)
        assert (await auth(conn, store, "alice2", now)).accept
        await acct(conn, "start", "S2", now, login="alice2")
        # each link allows 3, the service 2 for the account: the lower wins
        assert (await auth(conn, store, "alice", now)).reason == "too many sessions"
        assert (await auth(conn, store, "alice2", now)).reason == "too many sessions"
        await acct(conn, "stop", "S2", local(3, 12, 1), 60, login="alice2")
        assert (await auth(conn, store, "alice", local(3, 12, 1))).accept
        # and the link's own limit when it is the lower one
        await conn.execute("UPDATE radius_links SET max_sessions = 1 WHERE login = 'alice'")
        assert (await auth(conn, store, "alice", local(3, 12, 1))).reason == "too many sessions"


async def test_time_rating_cannot_place_is_charged_later_not_lost(pool: asyncpg.Pool, store: SecretStore) -> None:
    async with pool.acquire() as conn:
        nas_id = await add_nas(conn, store, name="mt1", address=NAS, secret="x")
        night = await night_range(conn)
        service = await time_service(conn, "dialup", day=None, night=1_800_000, night_id=night)
        acc = await subscriber(conn, store, "alice", 10_000_000)
        await on_tariff(conn, acc, [service], local(1, 0))
        await acct(conn, "start", "S1", local(3, 21, 50))
        # 600 s of day (no price yet) and 60 s of night: nothing is committed, the watermark stays
        await acct(conn, "interim", "S1", local(3, 22, 1), 660)
        assert await balance(conn, acc) == 10_000_000
        assert await conn.fetchval("SELECT count(*) FROM ingest_watermarks WHERE source = $1",
                                   usage_source(nas_id, "S1")) == 0
        # the operator adds the day price: the next record charges the whole session once
        await set_rate(conn, service, class_id=None, range_id=None, prepaid=0, unit_size=3600, tiers=[(0, 3_600_000)])
        await acct(conn, "stop", "S1", local(3, 22, 2), 720)
        assert await balance(conn, acc) == 10_000_000 - 600_000 - 60_000   # 600 s × 1000, 120 s × 500


async def test_a_tariff_change_mid_session_charges_each_part_on_its_service(
        pool: asyncpg.Pool, store: SecretStore) -> None:
    async with pool.acquire() as conn:
        await add_nas(conn, store, name="mt1", address=NAS, secret="x")
        cheap = await time_service(conn, "cheap", day=1_800_000, night=None)
        dear = await time_service(conn, "dear", day=7_200_000, night=None)
        acc = await subscriber(conn, store, "alice", 100_000_000)
        await on_tariff(conn, acc, [cheap], local(1, 0), name="cheap")
        await acct(conn, "start", "S1", local(3, 10))
        await acct(conn, "interim", "S1", local(3, 10, 10), 600)
        await on_tariff(conn, acc, [dear], local(3, 10, 20, 0) + dt.timedelta(microseconds=500_000), name="dear")
        await acct(conn, "stop", "S1", local(3, 11), 3600)
        # 1200 s at 500 a second before the switch (10:20:00, whole second), 2400 s at 2000 after
        assert await balance(conn, acc) == 100_000_000 - 600_000 - 4_800_000
        rows = await conn.fetch("SELECT service_id, quantity FROM usage_counters WHERE account_id = $1"
                                " ORDER BY service_id", acc)
        assert [(r["service_id"], r["quantity"]) for r in rows] == [(cheap, 1200), (dear, 2400)]


async def test_accounts_without_a_time_service_are_not_time_based(pool: asyncpg.Pool, store: SecretStore) -> None:
    async with pool.acquire() as conn:
        await add_nas(conn, store, name="mt1", address=NAS, secret="x")
        acc = await subscriber(conn, store, "alice", 0)
        assert timeout(await auth(conn, store, "alice", local(3, 12))) is None
        await acct(conn, "start", "S1", local(3, 12))
        await acct(conn, "stop", "S1", local(3, 13), 3600)
        assert await balance(conn, acc) == 0
        assert await conn.fetchval("SELECT count(*) FROM ingest_watermarks") == 0
        # an unlimited account with a time service: counted, not charged, no timeout from money
        service = await time_service(conn, "dialup", day=3_600_000, night=None)
        await on_tariff(conn, acc, [service], local(3, 14))
        await conn.execute("UPDATE accounts SET unlimited = true WHERE id = $1", acc)
        assert timeout(await auth(conn, store, "alice", local(3, 15))) is None
        await acct(conn, "start", "S2", local(3, 15))
        await acct(conn, "stop", "S2", local(3, 16), 3600)
        assert await balance(conn, acc) == 0
        assert [c[2] for c in await counters(conn, acc)] == [3600]


def test_a_long_session_id_makes_a_bounded_source() -> None:
    assert usage_source(7, "S1") == "radius:7:S1"
    long = usage_source(7, "x" * 253)
    assert len(long) <= 128 and long.startswith("radius:7:sha256:") and long != usage_source(7, "x" * 252)


async def test_migration_0007_refuses_links_that_still_carry_a_price(empty_db_dsn: str) -> None:
    conn = await asyncpg.connect(empty_db_dsn)
    try:
        before = [m for m in discover() if m.version < 7]
        await migrate(conn, before)
        acc = await make_account(conn, "u1")
        await conn.execute("INSERT INTO radius_links(account_id, login, password_enc, price_per_hour)"
                           " VALUES ($1, 'alice', '\\x00', 3600000)", acc)
        with pytest.raises(asyncpg.ObjectNotInPrerequisiteStateError, match="price_per_hour"):
            await migrate(conn)
        assert await conn.fetchval("SELECT max(version) FROM schema_migrations") == 6
        await conn.execute("UPDATE radius_links SET price_per_hour = 0")
        assert 7 in [m.version for m in await migrate(conn)]
        assert await conn.fetchval("SELECT count(*) FROM information_schema.columns"
                                   " WHERE table_name = 'radius_links' AND column_name = 'price_per_hour'") == 0
    finally:
        await conn.close()
