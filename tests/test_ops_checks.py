"""The operator checks ``billcore verify`` adds: overlapping IPs, counters
against charges, watermarks that go backwards."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import asyncpg

from billcore.billing import classification
from billcore.billing.rating import TrafficUsage
from billcore.billing.usage import commit_usage
from billcore.ops.checks import extra_checks
from tests.test_usage_commit import setup_traffic

NOW = datetime(2024, 4, 10, 12, tzinfo=timezone.utc)


async def test_clean_database_has_no_problems(db_dsn: str, tmp_path: Path) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        s = await setup_traffic(conn, accounts=2)
        await classification.add_binding(conn, s["accounts"][0], "10.0.0.0/24", valid_from=NOW)
        await classification.add_binding(conn, s["accounts"][1], "10.0.1.0/24", valid_from=NOW)
        await commit_usage(conn, "w0", 5, [TrafficUsage(s["accounts"][0], s["inet"], NOW, 7_000_000)], NOW)
        await commit_usage(conn, "w0", 9, [TrafficUsage(s["accounts"][0], s["inet"], NOW, 3_000_000),
                                           TrafficUsage(s["accounts"][1], s["inet"], NOW, 9_000_000)], NOW)
        assert await conn.fetchval("SELECT sum(charged) FROM usage_counters") > 0   # something to compare
        assert await extra_checks(conn, state_file=tmp_path / "w.json", now=NOW) == []
    finally:
        await conn.close()


async def test_overlapping_ip_bindings_are_reported(db_dsn: str) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        s = await setup_traffic(conn, accounts=2)
        a, b = s["accounts"]
        first = await classification.add_binding(conn, a, "10.0.0.0/24", valid_from=NOW)
        # an expired binding of the same prefix is no overlap
        await classification.add_binding(conn, b, "10.0.0.0/24", valid_from=NOW - timedelta(days=9),
                            valid_to=NOW - timedelta(days=1))
        assert await extra_checks(conn, now=NOW) == []
        name = await conn.fetchval("SELECT conname FROM pg_constraint WHERE conrelid = 'ip_bindings'::regclass"
                                   " AND contype = 'x'")
        await conn.execute(f"ALTER TABLE ip_bindings DROP CONSTRAINT {name}")
        second = await classification.add_binding(conn, b, "10.0.0.128/25", valid_from=NOW + timedelta(hours=1))
        problems = await extra_checks(conn, now=NOW)
        assert [(p.check, p.account_id) for p in problems] == [("ip_overlap", None), ("ip_overlap", a)]
        assert f"binding {first} (10.0.0.0/24) overlaps binding {second} (10.0.0.128/25, account {b})" \
            in str(problems[1])
    finally:
        await conn.close()


async def test_counters_that_disagree_with_charges(db_dsn: str) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        s = await setup_traffic(conn)
        account = s["accounts"][0]
        await commit_usage(conn, "w0", 1, [TrafficUsage(account, s["inet"], NOW, 9_000_000)], NOW)
        charged = await conn.fetchval("SELECT sum(charged) FROM usage_counters")
        await conn.execute("UPDATE usage_counters SET charged = charged - 1")
        (problem,) = await extra_checks(conn, now=NOW)
        assert (problem.check, problem.account_id) == ("counters", account)
        assert problem.detail == f"usage counters say {charged - 1} charged, the ledger has {charged}"
    finally:
        await conn.close()


async def test_watermarks_going_backwards_or_vanishing(db_dsn: str, tmp_path: Path) -> None:
    state = tmp_path / "var" / "verify-watermarks.json"
    conn = await asyncpg.connect(db_dsn)
    try:
        s = await setup_traffic(conn)
        account = s["accounts"][0]
        await commit_usage(conn, "netflow-0", 500, [TrafficUsage(account, s["inet"], NOW, 1)], NOW)
        await commit_usage(conn, "netflow-1", 70, [TrafficUsage(account, s["inet"], NOW, 1)], NOW)
        assert await extra_checks(conn, state_file=state, now=NOW) == []        # remembers 500 and 70
        assert await extra_checks(conn, state_file=state, now=NOW) == []        # same values: fine
        # an older backup restored over the database: the offsets fall back
        await conn.execute("UPDATE ingest_watermarks SET watermark = 120 WHERE source = 'netflow-0'")
        await conn.execute("DELETE FROM ingest_watermarks WHERE source = 'netflow-1'")
        problems = [str(p) for p in await extra_checks(conn, state_file=state, now=NOW)]
        assert problems == [
            "watermark: database: netflow-0: watermark went backwards, 500 -> 120"
            " (a restored older database? the journal replays from here)",
            "watermark: database: netflow-1: watermark row disappeared (was 70)"]
        # still reported on the next run: the state keeps the highest value seen
        assert len(await extra_checks(conn, state_file=state, now=NOW)) == 2
        # without a state file only sanity is checked
        await conn.execute("UPDATE ingest_watermarks SET updated_at = $1", NOW + timedelta(days=1))
        (future,) = await extra_checks(conn, now=NOW)
        assert "in the future" in str(future)
    finally:
        await conn.close()
