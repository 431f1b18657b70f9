"""Every second charged, once: sessions ended by the stale sweep and by
Accounting-On/Off, then a late Stop; and the bounded watermark table.
Against a real PostgreSQL, through ``apply_accounting`` and ``sweep`` as the
core runs them.

Prices and zone as in ``test_radius_time`` (Europe/Berlin; DAY per hour in
any range, NIGHT per hour 22:00–06:00); each (range, period) counter is
charged floor(seconds × price / 3600) on its cumulative seconds, so the
expected amounts below are those floors, computed by hand.
"""

from __future__ import annotations

import datetime as dt

import asyncpg
import pytest

from billcore.radius import accounting
from billcore.radius.accounting import apply_accounting, sweep, usage_source
from billcore.radius.nas import add_link, add_nas, delete_link
from billcore.radius.records import AccountingResult, read_accounting_record
from billcore.radius.secrets import SecretStore
from billcore.radius.sessions import WATERMARK_HORIZON
from billcore.billing.tariffs import set_rate
from billcore.db.migrate import discover, migrate
from tests.test_radius_core import make_account
from tests.test_radius_time import (  # noqa: F401  (store is a fixture)
    DAY, NAS, NIGHT, TZ, acct, balance, counters, local, night_range, on_tariff, store, subscriber, time_service,
)

MARCH = local(1, 0).astimezone(dt.timezone.utc)
T_START, T_END = local(3, 10), local(3, 10, 15)
FEB = local(1, 0, month=2).astimezone(dt.timezone.utc)


async def nas_event(conn: asyncpg.Connection, status: str, at: dt.datetime, now: dt.datetime | None = None
                    ) -> AccountingResult:
    record = read_accounting_record({"nas": NAS, "status": status, "event_time": at.timestamp()})
    async with conn.transaction():
        return await apply_accounting(conn, record, now or at, tz=TZ)


async def close(conn: asyncpg.Connection, path: str, at: dt.datetime) -> None:
    """End the open sessions by ``path`` at ``at``: the sweep runs then (timeout one hour)."""
    if path == "stale":
        async with conn.transaction():
            assert (await sweep(conn, at, dt.timedelta(hours=1), tz=TZ)).closed == 1
    else:
        assert (await nas_event(conn, path, at)).closed == 1


async def ledger(conn: asyncpg.Connection, acc: int) -> int:
    return int(await conn.fetchval("SELECT coalesce(sum(amount), 0) FROM ledger WHERE account_id = $1", acc))


async def marks(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM ingest_watermarks WHERE source LIKE 'radius:%'"))


# what each close charges up to (seconds), and where: a session 21:50:00 .. with an Interim at
# 21:59:59 (599 s, all day); the Off comes at 22:10:34 (1234 s: 600 day, 634 night)
CLOSE_AT = {"stale": local(3, 23, 30), "on": local(3, 22, 30), "off": local(3, 22, 10, 34)}
KNOWN = {"stale": 599, "on": 599, "off": 1234}
CHARGED = {"stale": 166_389, "on": 166_389, "off": 166_667 + 88_055}   # floor(599 DAY/3600); + floor(634 NIGHT/3600)
ENDED = {"stale": local(3, 21, 59, 59), "on": local(3, 22, 30), "off": local(3, 22, 10, 34)}


@pytest.mark.parametrize("late", ["larger", "equal"])
@pytest.mark.parametrize("path", ["stale", "on", "off"])
async def test_a_closed_session_is_charged_to_its_last_known_time_and_a_late_stop_only_above_it(
        pool: asyncpg.Pool, store: SecretStore, path: str, late: str) -> None:
    async with pool.acquire() as conn:
        nas_id = await add_nas(conn, store, name="mt1", address=NAS, secret="x")
        night = await night_range(conn)
        service = await time_service(conn, "dialup", day=DAY, night=NIGHT, night_id=night)
        acc = await subscriber(conn, store, "alice", 10_000_000)
        await on_tariff(conn, acc, [service], local(1, 0))
        await acct(conn, "start", "S1", local(3, 21, 50))
        await acct(conn, "interim", "S1", local(3, 21, 59, 59), 599)
        assert await balance(conn, acc) == 10_000_000 - 166_389
        assert await marks(conn) == 1                       # one row while the session is open
        await close(conn, path, CLOSE_AT[path])
        row = await conn.fetchrow("SELECT ended_at, end_reason, charged, charged_time FROM radius_sessions")
        assert row["end_reason"] == {"stale": "stale", "on": "accounting-on", "off": "accounting-off"}[path]
        assert row["ended_at"] == ENDED[path]
        assert (row["charged"], row["charged_time"]) == (CHARGED[path], KNOWN[path])
        assert await balance(conn, acc) == 10_000_000 - CHARGED[path]
        assert await ledger(conn, acc) == -CHARGED[path]
        assert await marks(conn) == 0                       # the ended session's watermark is its row
        # the NAS sends the Stop later (a link cut off, a buffered Stop after a reboot)
        stop_time = 4000 if late == "larger" else KNOWN[path]
        out = await acct(conn, "stop", "S1", local(3, 22, 56, 40), stop_time, now=local(3, 23, 45))
        assert out.ended and out.session is not None
        # ... and again, and an older Interim: neither charges
        await acct(conn, "stop", "S1", local(3, 22, 56, 40), stop_time, now=local(3, 23, 46))
        await acct(conn, "interim", "S1", local(3, 21, 58, 20), 500, now=local(3, 23, 47))
        if late == "larger":   # 600 s of day, 3400 of night in all
            total = 166_667 + 472_223
            assert await counters(conn, acc) == [(0, MARCH, 600, 166_667), (night, MARCH, 3400, 472_223)]
        else:
            total = CHARGED[path]
            assert await counters(conn, acc) == (
                [(0, MARCH, 599, 166_389)] if path != "off" else [(0, MARCH, 600, 166_667), (night, MARCH, 634, 88_055)])
        assert await balance(conn, acc) == 10_000_000 - total
        assert await ledger(conn, acc) == -total
        row = await conn.fetchrow("SELECT ended_at, charged, charged_time, session_time FROM radius_sessions")
        assert (row["charged"], row["charged_time"]) == (total, max(stop_time, KNOWN[path]))
        assert row["ended_at"] == ENDED[path]               # it stays ended where it ended
        assert row["session_time"] == max(stop_time, 599)
        assert await marks(conn) == 0
        assert await conn.fetchval("SELECT count(*) FROM ingest_watermarks WHERE source = $1",
                                   usage_source(nas_id, "S1")) == 0


# a night session 23:30 on 28 February .., an Interim at 23:59:59 (1799 s, all February);
# the Off at 00:10:00 (2400 s: 1800 in February, 600 in March)
P_CLOSE_AT = {"stale": local(1, 2, 0), "on": local(1, 0, 20), "off": local(1, 0, 10)}
P_KNOWN = {"stale": 1799, "on": 1799, "off": 2400}
P_CHARGED = {"stale": 249_861, "on": 249_861, "off": 250_000 + 83_333}


@pytest.mark.parametrize("late", ["larger", "equal"])
@pytest.mark.parametrize("path", ["stale", "on", "off"])
async def test_across_a_period_border_each_period_gets_its_own_seconds(
        pool: asyncpg.Pool, store: SecretStore, path: str, late: str) -> None:
    async with pool.acquire() as conn:
        await add_nas(conn, store, name="mt1", address=NAS, secret="x")
        night = await night_range(conn)
        service = await time_service(conn, "dialup", day=DAY, night=NIGHT, night_id=night)
        acc = await subscriber(conn, store, "alice", 10_000_000)
        await on_tariff(conn, acc, [service], local(1, 0, month=2))
        await acct(conn, "start", "S1", local(28, 23, 30, month=2))
        await acct(conn, "interim", "S1", local(28, 23, 59, 59, month=2), 1799)
        assert await balance(conn, acc) == 10_000_000 - 249_861             # floor(1799 NIGHT/3600)
        await close(conn, path, P_CLOSE_AT[path])
        assert await ledger(conn, acc) == -P_CHARGED[path]
        stop_time = 3600 if late == "larger" else P_KNOWN[path]
        await acct(conn, "stop", "S1", local(1, 0, 30), stop_time, now=local(1, 3))
        await acct(conn, "stop", "S1", local(1, 0, 30), stop_time, now=local(1, 3, 1))
        if late == "larger":   # each month's counter floors on its own: 2 × floor(1800 NIGHT/3600)
            total = 500_000
            assert await counters(conn, acc) == [(night, FEB, 1800, 250_000), (night, MARCH, 1800, 250_000)]
        else:
            total = P_CHARGED[path]
        assert await balance(conn, acc) == 10_000_000 - total
        assert await ledger(conn, acc) == -total
        assert await conn.fetchval("SELECT charged FROM radius_sessions") == total


async def test_the_sweep_charges_seconds_no_interim_could(pool: asyncpg.Pool, store: SecretStore) -> None:
    """Seconds rating could not place at the Interim (no day price yet) are
    charged by the close once the price is there — today's code left them to a
    next record that never came."""
    async with pool.acquire() as conn:
        await add_nas(conn, store, name="mt1", address=NAS, secret="x")
        night = await night_range(conn)
        service = await time_service(conn, "dialup", day=None, night=1_800_000, night_id=night)
        acc = await subscriber(conn, store, "alice", 10_000_000)
        await on_tariff(conn, acc, [service], local(1, 0))
        await acct(conn, "start", "S1", local(3, 21, 50))
        await acct(conn, "interim", "S1", local(3, 22, 1), 660)               # 600 s day: no price
        assert await balance(conn, acc) == 10_000_000
        await set_rate(conn, service, class_id=None, range_id=None, prepaid=0, unit_size=3600, tiers=[(0, 3_600_000)])
        async with conn.transaction():
            swept = await sweep(conn, local(3, 23, 30), dt.timedelta(hours=1), tz=TZ)
        assert swept.closed == 1
        assert await ledger(conn, acc) == -(600_000 + 30_000)                 # 600 s × 1000, 60 s × 500
        await acct(conn, "stop", "S1", local(3, 22, 2), 720, now=local(3, 23, 40))
        assert await ledger(conn, acc) == -(600_000 + 60_000)
        assert await balance(conn, acc) == 10_000_000 - 660_000


async def test_the_watermark_table_holds_open_sessions_only(pool: asyncpg.Pool, store: SecretStore) -> None:
    async with pool.acquire() as conn:
        await add_nas(conn, store, name="mt1", address=NAS, secret="x")
        service = await time_service(conn, "dialup", day=3_600_000, night=None)   # 1000 a second
        acc = await subscriber(conn, store, "alice", 10**12, max_sessions=1000)
        await on_tariff(conn, acc, [service], local(1, 0))
        n = 300
        t0 = local(3, 10)
        for i in range(n):
            await acct(conn, "start", f"S{i}", t0)
            await acct(conn, "interim", f"S{i}", t0 + dt.timedelta(seconds=60), 60)
        assert await marks(conn) == n                                         # one per open session
        for i in range(n):
            await acct(conn, "stop", f"S{i}", t0 + dt.timedelta(seconds=100 + i), 100 + i)
        assert await marks(conn) == 0                                         # bounded: none once they ended
        total = sum(100 + i for i in range(n)) * 1000
        assert await ledger(conn, acc) == -total
        rows = await conn.fetchval("SELECT count(*) FROM ledger WHERE account_id = $1", acc)
        # every Interim and Stop replayed (a NAS re-sending its buffer): nothing charged, no row kept
        for i in range(n):
            await acct(conn, "interim", f"S{i}", t0 + dt.timedelta(seconds=60), 60, now=local(3, 12))
            await acct(conn, "stop", f"S{i}", t0 + dt.timedelta(seconds=100 + i), 100 + i, now=local(3, 12))
        assert await ledger(conn, acc) == -total
        assert await conn.fetchval("SELECT count(*) FROM ledger WHERE account_id = $1", acc) == rows
        assert await marks(conn) == 0


async def test_a_deleted_links_sessions_are_not_charged_again_and_the_horizon_prunes(
        pool: asyncpg.Pool, store: SecretStore) -> None:
    async with pool.acquire() as conn:
        await add_nas(conn, store, name="mt1", address=NAS, secret="x")
        service = await time_service(conn, "dialup", day=3_600_000, night=None)
        acc = await subscriber(conn, store, "alice", 10**9, max_sessions=2)
        await on_tariff(conn, acc, [service], local(1, 0))
        await acct(conn, "start", "S1", local(3, 10))
        await acct(conn, "stop", "S1", local(3, 10, 10), 600)
        await acct(conn, "start", "S2", local(3, 11))
        await acct(conn, "interim", "S2", local(3, 11, 5), 300)
        assert await ledger(conn, acc) == -900_000
        link = await conn.fetchval("SELECT id FROM radius_links WHERE login = 'alice'")
        async with conn.transaction():
            await delete_link(conn, link, local(3, 11, 6), force=True)
        assert await conn.fetchval("SELECT count(*) FROM radius_sessions") == 0
        assert await marks(conn) == 2                 # the deleted sessions' charged seconds, kept
        # the login comes back; the NAS replays both sessions' records: nothing is charged twice
        await add_link(conn, store, account_id=acc, login="alice", password="pw", max_sessions=2)
        for _ in range(2):
            await acct(conn, "stop", "S1", local(3, 10, 10), 600, now=local(3, 12))
            await acct(conn, "stop", "S2", local(3, 11, 5), 300, now=local(3, 12))
        assert await ledger(conn, acc) == -900_000
        # ... but seconds above them are charged: S2 ran 60 s more than its last Interim said
        await acct(conn, "stop", "S2", local(3, 11, 6), 360, now=local(3, 12))
        assert await ledger(conn, acc) == -960_000
        # the replays' sessions hold the charged seconds now; their rows went when they ended
        assert await marks(conn) == 0
        assert [r["charged_time"] for r in await conn.fetch(
            "SELECT charged_time FROM radius_sessions ORDER BY session_id")] == [600, 360]
        # the link goes again; past the horizon the sweep prunes the kept rows,
        # and a record that old of a session billcore no longer has is ignored and counted
        link = await conn.fetchval("SELECT id FROM radius_links WHERE login = 'alice'")
        async with conn.transaction():
            await delete_link(conn, link, local(3, 12, 1))
        assert await marks(conn) == 2
        async with conn.transaction():
            assert (await sweep(conn, local(3, 13), dt.timedelta(hours=1), tz=TZ)).pruned == 0   # within it
        later = local(3, 12) + WATERMARK_HORIZON + dt.timedelta(days=1)
        async with conn.transaction():
            swept = await sweep(conn, later, dt.timedelta(hours=1), tz=TZ)
        assert swept.pruned == 2 and await marks(conn) == 0
        await add_link(conn, store, account_id=acc, login="alice", password="pw", max_sessions=2)
        before = accounting.STALE_RECORDS._value.get()
        out = await acct(conn, "stop", "S1", local(3, 10, 10), 600, now=later)
        assert out.ignored == "older than the horizon" and accounting.STALE_RECORDS._value.get() == before + 1
        assert await ledger(conn, acc) == -960_000
        assert await conn.fetchval("SELECT count(*) FROM radius_sessions") == 0


async def test_a_close_of_many_sessions_charges_each_its_own_and_what_cannot_be_placed_waits(
        pool: asyncpg.Pool, store: SecretStore) -> None:
    """Accounting-Off over two sessions of one account (two rounds of the
    set-based close) and one of another whose day time has no price:
    its round is undone and charged session by session — the priced sessions
    in full, the unpriced one not at all until a later record brings it."""
    async with pool.acquire() as conn:
        await add_nas(conn, store, name="mt1", address=NAS, secret="x")
        night = await night_range(conn)
        nights_only = await time_service(conn, "nights-only", day=None, night=1_800_000, night_id=night)
        priced = await time_service(conn, "priced", day=3_600_000, night=1_800_000, night_id=night)
        alice = await subscriber(conn, store, "alice", 10**9, max_sessions=2)
        bob = await subscriber(conn, store, "bob", 10**9)
        await on_tariff(conn, alice, [priced], local(1, 0), name="priced")
        await on_tariff(conn, bob, [nights_only], local(1, 0), name="nights")
        await acct(conn, "start", "A1", local(3, 21, 0))
        await acct(conn, "start", "A2", local(3, 21, 30))
        await acct(conn, "start", "B1", local(3, 21, 40), login="bob")
        await acct(conn, "interim", "B1", local(3, 21, 50), 600, login="bob")          # day: no price yet
        assert await ledger(conn, bob) == 0
        assert (await nas_event(conn, "off", local(3, 22, 10))).closed == 3
        # A1: 3600 s day + 600 s night; A2: 1800 s day + 600 s night; one day counter, one night counter
        assert await ledger(conn, alice) == -((3600 + 1800) * 1000 + 1200 * 500)
        charged = {r["session_id"]: (r["charged"], r["charged_time"]) for r in await conn.fetch(
            "SELECT session_id, charged, charged_time FROM radius_sessions")}
        assert charged["A1"][1] == 4200 and charged["A2"][1] == 2400
        assert charged["A1"][0] + charged["A2"][0] == 5400 * 1000 + 1200 * 500
        assert charged["B1"] == (0, 0)                            # its 20 day minutes have no price: nothing
        assert await ledger(conn, bob) == 0
        # the operator prices the day; the NAS's buffered Stop then charges the whole session once
        await set_rate(conn, nights_only, class_id=None, range_id=None, prepaid=0, unit_size=3600,
                       tiers=[(0, 3_600_000)])
        await acct(conn, "stop", "B1", local(3, 22, 10), 1800, login="bob", now=local(3, 22, 30))
        assert await ledger(conn, bob) == -(1200 * 1000 + 600 * 500)
        assert await marks(conn) == 0


async def test_migration_0022_moves_watermarks_onto_sessions(empty_db_dsn: str) -> None:
    conn = await asyncpg.connect(empty_db_dsn)
    try:
        await migrate(conn, [m for m in discover() if m.version < 22])
        acc = await make_account(conn, "u1")
        nas = await conn.fetchval("INSERT INTO radius_nas(name, address, secret_enc) VALUES ('n', '10.0.0.1', '\\x00')"
                                  " RETURNING id")
        link = await conn.fetchval("INSERT INTO radius_links(account_id, login, password_enc)"
                                   " VALUES ($1, 'alice', '\\x00') RETURNING id", acc)
        long_id = "x" * 200
        for sid, ended in (("open", None), ("done", T_END), (long_id, T_END), ("free", T_END)):
            await conn.execute(
                "INSERT INTO radius_sessions(nas_id, session_id, account_id, link_id, login, started_at, updated_at,"
                " ended_at, session_time) VALUES ($1, $2, $3, $4, 'alice', $5, $5, $6, 900)",
                nas, sid, acc, link, T_START, ended)
        for sid, mark in (("open", 600), ("done", 900), (long_id, 700)):
            await conn.execute("INSERT INTO ingest_watermarks VALUES ($1, $2, $3)", usage_source(nas, sid), mark, T_START)
        await conn.execute("INSERT INTO ingest_watermarks VALUES ('radius:99:gone', 5, $1), ('netflow:w1', 7, $1)",
                           T_START)
        assert 22 in [m.version for m in await migrate(conn)]
        rows = await conn.fetch("SELECT session_id, charged_time FROM radius_sessions")
        assert {r["session_id"]: r["charged_time"] for r in rows} == {"open": 600, "done": 900, long_id: 700, "free": 0}
        # the rows of ended sessions are gone; the open one's, a deleted session's and NetFlow's stay
        assert sorted(r[0] for r in await conn.fetch("SELECT source FROM ingest_watermarks")) == sorted(
            [usage_source(nas, "open"), "radius:99:gone", "netflow:w1"])
    finally:
        await conn.close()
