"""The outbox's second stage on a real PostgreSQL: dispatch, claims and
leases, done, failed with backoff, dead letters, retry, stats and pruning."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import asyncpg
import pytest

from billcore.billing.outbox import OutboxEvent, enqueue
from billcore.billing.outbox_delivery import (
    DeliveryPolicy, NewDelivery, StoredEvent, backoff, claim, dispatch, done, failed, list_deliveries, prune,
    retry, stats,
)
from billcore.common.errors import InvariantViolation
from billcore.db.rows import DbConnection

NOW = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.timezone.utc)
POLICY = DeliveryPolicy(max_attempts=3, backoff_base=10.0, backoff_cap=25.0)


async def to_test(conn: DbConnection, events: Sequence[StoredEvent], now: dt.datetime) -> list[NewDelivery]:
    return [NewDelivery(e.id, "test", f"t{e.account_id}", {"n": e.payload.get("n")}) for e in events]


async def _events(pool: asyncpg.Pool, n: int) -> list[int]:
    async with pool.acquire() as conn, conn.transaction():
        ids = await enqueue(conn, [OutboxEvent("payment.added", {"n": i}, i) for i in range(n)], NOW)
    return [i for i in ids if i is not None]


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [backoff(a, 10, 25) for a in (1, 2, 3, 4)] == [10, 20, 25, 25]
    assert backoff(500, 1, 7200) == 7200
    with pytest.raises(InvariantViolation):
        backoff(0, 10, 25)


async def test_dispatch_fans_out_once_in_id_order(pool: asyncpg.Pool) -> None:
    ids = await _events(pool, 3)
    async with pool.acquire() as conn:
        first = await dispatch(conn, [to_test, to_test], NOW, limit=2)   # a router asked twice adds nothing
        second = await dispatch(conn, [to_test], NOW)
        third = await dispatch(conn, [to_test], NOW)
    assert (first.events, first.deliveries, first.channels) == (2, 2, ("test",))
    assert (second.events, second.deliveries) == (1, 1)
    assert third.events == 0
    rows = await pool.fetch("SELECT event_id, target, message->>'n' AS n FROM outbox_deliveries ORDER BY id")
    assert [(r["event_id"], r["target"], r["n"]) for r in rows] == [(ids[i], f"t{i}", str(i)) for i in range(3)]


async def test_claim_lease_done_and_expiry(pool: asyncpg.Pool) -> None:
    await _events(pool, 2)
    async with pool.acquire() as conn:
        await dispatch(conn, [to_test], NOW)
        got = await claim(conn, "test", 10, 60, NOW)
        assert [c.attempt for c in got] == [1, 1] and got[0].payload == {"n": 0} and got[0].event == "payment.added"
        assert await claim(conn, "test", 10, 60, NOW + dt.timedelta(seconds=59)) == []   # leased
        assert await claim(conn, "other", 10, 60, NOW) == []
        assert await done(conn, [got[0].id], NOW, channels=["other"]) == 0             # not the caller's channel
        assert await done(conn, [got[0].id], NOW) == 1
        assert await done(conn, [got[0].id], NOW) == 0                                 # once
        # the deliverer of the second died: its lease runs out, it is claimable again
        again = await claim(conn, "test", 10, 60, NOW + dt.timedelta(seconds=60))
    assert [(c.id, c.attempt) for c in again] == [(got[1].id, 2)]


async def test_failed_backs_off_then_dies_and_retry_revives(pool: asyncpg.Pool) -> None:
    await _events(pool, 1)
    async with pool.acquire() as conn:
        await dispatch(conn, [to_test], NOW)
        t = NOW
        (c,) = await claim(conn, "test", 1, 60, t)
        r1 = await failed(conn, c.id, "timeout", t, POLICY)
        assert r1 is not None and r1.state == "pending" and r1.next_at == t + dt.timedelta(seconds=10)
        assert await claim(conn, "test", 1, 60, t + dt.timedelta(seconds=9)) == []
        (c,) = await claim(conn, "test", 1, 60, t + dt.timedelta(seconds=10))
        r2 = await failed(conn, c.id, "timeout", t, POLICY)
        assert r2 is not None and r2.next_at == t + dt.timedelta(seconds=20)
        (c,) = await claim(conn, "test", 1, 60, t + dt.timedelta(seconds=20))
        r3 = await failed(conn, c.id, "x" * 5000, t, POLICY)
        assert r3 is not None and r3.state == "dead" and r3.attempts == 3
        assert await failed(conn, c.id, "again", t, POLICY) is None                     # dead is final
        assert await claim(conn, "test", 1, 60, t + dt.timedelta(days=1)) == []
        (row,) = await list_deliveries(conn, state="dead")
        assert len(row["last_error"]) == 1000
        assert await retry(conn, [c.id, 999999], t) == [c.id]
        (c2,) = await claim(conn, "test", 1, 60, t)
        assert c2.attempt == 1
        perm = await failed(conn, c2.id, "no such address", t, POLICY, permanent=True)
        assert perm is not None and perm.state == "dead"


async def test_stats_and_prune_keep_the_dead(pool: asyncpg.Pool) -> None:
    await _events(pool, 3)
    async with pool.acquire() as conn:
        s0 = await stats(conn, NOW + dt.timedelta(seconds=30))
        assert s0.undispatched == 3 and s0.oldest_undispatched_age == 30
        await dispatch(conn, [to_test], NOW)
        a, b, c = await claim(conn, "test", 10, 60, NOW)
        await done(conn, [a.id], NOW)
        await failed(conn, b.id, "gone", NOW, POLICY, permanent=True)
        s = await stats(conn, NOW + dt.timedelta(seconds=5))
        assert {(x.state, x.count) for x in s.channels} == {("delivered", 1), ("dead", 1), ("pending", 1)}
        assert [x.oldest_age for x in s.channels if x.state == "pending"] == [5]
        assert (await prune(conn, NOW + dt.timedelta(days=29), 30)).deliveries == 0
        later = await prune(conn, NOW + dt.timedelta(days=31), 30)
    assert (later.deliveries, later.events) == (1, 1)
    assert await pool.fetchval("SELECT count(*) FROM outbox_deliveries") == 2
    assert await pool.fetchval("SELECT count(*) FROM outbox_events") == 2
