"""The reports over a real URFA service and a real PostgreSQL: who may call them, and a report over 50 000
debtors streamed in bounded chunks while the core's memory stays flat."""

from __future__ import annotations

import datetime as dt
import tracemalloc
from collections.abc import AsyncIterator

import asyncpg
import pytest

from billcore.billing import accounts
from billcore.server.principals import create_admin
from tests.test_notify_calls import PW, Live
from urfa.errors import CallFailed
from urfa.scram import make_verifier

N = 50_000
REPORTS = {
    "reports.revenue_daily": {"since": "2024-01-01", "until": "2024-02-01"},
    "reports.payments": {"since": "2024-01-01", "until": "2024-02-01"},
    "reports.debtors": {},
    "reports.arpu": {"month": "2024-01"},
    "reports.churn": {"since": "2024-01", "until": "2024-03"},
    "reports.traffic_top": {"since": "2024-01-01", "until": "2024-02-01"},
    "reports.flows": {"account_id": 1, "since": "2024-01-01", "until": "2024-01-02"},
}


@pytest.fixture
async def live(pool: asyncpg.Pool) -> AsyncIterator[Live]:
    core = await Live(pool).start()
    async with pool.acquire() as conn:
        await create_admin(conn, "reader", PW, ["accountants"])
        await accounts.create_user(conn, "ivan", make_verifier(PW, iterations=4096))
    yield core
    await core.stop()


async def test_rights_a_cashier_and_a_subscriber_are_refused(live: Live) -> None:
    reader = await live.login("admin", "reader")
    cashier = await live.login("admin", "cashier")
    subscriber = await live.login("user", "ivan")
    for name, args in REPORTS.items():
        stream = reader.stream(name, args)
        async for _chunk in stream:
            pass
        assert stream.result["rows"] >= 0, name
        for who in (cashier, subscriber):
            with pytest.raises(CallFailed) as caught:
                async for _chunk in who.stream(name, args):
                    pass
            assert caught.value.code == "not_in_table", (name, caught.value)
    # a wrong argument over the wire: the clear code, not internal
    with pytest.raises(CallFailed) as caught:
        async for _chunk in reader.stream("reports.payments", {"since": "2024-02-01", "until": "2024-01-01"}):
            pass
    assert caught.value.code == "billing.invalid" and "internal" not in caught.value.message


async def test_fifty_thousand_debtors_stream_in_chunks(live: Live) -> None:
    at = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    async with live.pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO users(login, full_name, scram_salt, scram_iterations, scram_stored_key, scram_server_key)"
            " SELECT 'd' || g, 'Debtor number ' || g, '\\x00', 4096, '\\x00', '\\x00' FROM generate_series(1, $1) g", N)
        await conn.execute("INSERT INTO accounts(user_id, balance) SELECT id, -(id % 1000 + 1) * 1000000 FROM users"
                           " WHERE login LIKE 'd%'")
        # one charge each, on one of 200 days: every bucket is filled
        await conn.execute(
            "INSERT INTO ledger(account_id, amount, balance_after, kind, idem_key, actor, created_at)"
            " SELECT a.id, a.balance, a.balance, 'correction', 'seed:' || a.id, 'test',"
            " $1::timestamptz + (a.id % 200) * interval '1 day' FROM accounts a WHERE a.balance < 0", at)
        want = await conn.fetchval("SELECT sum(balance) FROM accounts WHERE balance < 0")
    reader = await live.login("admin", "reader")
    chunks = rows = 0
    tracemalloc.start()
    try:
        stream = reader.stream("reports.debtors", {"as_of": "2024-07-31"})
        async for chunk in stream:
            assert 0 < len(chunk) <= 1000
            chunks += 1
            rows += len(chunk)
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    result = stream.result
    assert rows == result["rows"] == result["accounts"] == N and chunks >= N // 1000
    assert result["balance"] == want
    assert sum(b["accounts"] for b in result["buckets"]) == N and all(b["accounts"] > 0 for b in result["buckets"])
    # the whole answer as Python rows would take far more than this: the core held a chunk at a time
    # (about 2 MB measured; the rows alone, held as Python lists, would be some 30 MB)
    assert peak < 10_000_000, peak
