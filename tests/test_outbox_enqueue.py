"""The outbox's first stage: events enqueued inside the causing transaction."""

from __future__ import annotations

import datetime as dt

import asyncpg
import pytest

from billcore.billing.outbox import OutboxEvent, enqueue, enqueue_one
from billcore.common.errors import InvariantViolation

NOW = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.timezone.utc)


async def test_enqueue_keeps_order_and_payload(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn, conn.transaction():
        ids = await enqueue(conn, [OutboxEvent("payment.added", {"amount": 5_000_000, "at": NOW}, 7),
                                   OutboxEvent("account.blocked", {"kind": "system"}, 8)], NOW)
    assert ids[0] is not None and ids[1] is not None and ids[0] < ids[1]
    rows = await pool.fetch("SELECT event, account_id, payload::text AS p, dispatched_at FROM outbox_events ORDER BY id")
    assert [(r["event"], r["account_id"]) for r in rows] == [("payment.added", 7), ("account.blocked", 8)]
    assert rows[0]["p"] == '{"at": "2026-12-07T12:00:00+00:00", "amount": 5000000}'
    assert all(r["dispatched_at"] is None for r in rows)


async def test_dedup_key_enqueues_once(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn, conn.transaction():
        first = await enqueue(conn, [OutboxEvent("fup.quota_reached", {}, 1, "fup:1:2:3"),
                                     OutboxEvent("payment.added", {}, 1),
                                     OutboxEvent("fup.quota_reached", {}, 1, "fup:1:2:3")], NOW)
    assert first[0] is not None and first[1] is not None and first[2] is None
    async with pool.acquire() as conn, conn.transaction():
        assert await enqueue_one(conn, "fup.quota_reached", {}, NOW, account_id=1, dedup_key="fup:1:2:3") is None
    assert await pool.fetchval("SELECT count(*) FROM outbox_events") == 2


async def test_rolled_back_change_leaves_no_event(pool: asyncpg.Pool) -> None:
    with pytest.raises(RuntimeError):
        async with pool.acquire() as conn, conn.transaction():
            await enqueue_one(conn, "payment.added", {"amount": 1}, NOW, account_id=1)
            raise RuntimeError("the causing change failed")
    assert await pool.fetchval("SELECT count(*) FROM outbox_events") == 0


async def test_outside_a_transaction_is_refused(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        with pytest.raises(InvariantViolation):
            await enqueue_one(conn, "payment.added", {}, NOW)
