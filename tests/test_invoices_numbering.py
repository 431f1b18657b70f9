"""Gapless numbering of invoices and credit notes under concurrent issuers and a ``kill -9``.

Several connections issue at once (the monthly run in batches, invoices on
demand, credit notes); a process running the run is killed with SIGKILL in
the middle.  After each: per (series, year) the count of documents equals
the highest number equals ``invoice_series.last_no``, no account has two
invoices over the same range, and ``billcore verify`` finds nothing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg

from billcore.billing import invoices
from billcore.billing.verify import verify
from tests.test_invoices import APRIL, GRACE, MARCH, TZ, charge, new_account, services

ROOT = Path(__file__).resolve().parents[1]


async def numbering(conn: asyncpg.Connection) -> list[tuple[str, int, int, int, int]]:
    rows = await conn.fetch(
        "SELECT s.series, s.year, s.last_no, count(i.id) AS n, coalesce(max(i.number), 0) AS top,"
        " count(DISTINCT i.number) AS distinct_n FROM invoice_series s"
        " LEFT JOIN invoices i ON i.series = s.series AND i.year = s.year GROUP BY 1, 2, 3 ORDER BY 1, 2")
    for row in rows:
        assert row["n"] == row["top"] == row["last_no"] == row["distinct_n"], dict(row)
    return [tuple(row) for row in rows]


async def seed(conn: asyncpg.Connection, n: int) -> list[int]:
    svc = await services(conn)
    accs = []
    for i in range(n):
        acc = await new_account(conn)
        accs.append(acc)
        await charge(conn, acc, "periodic", 100_000_000 + i, MARCH + dt.timedelta(days=1), svc)
        await charge(conn, acc, "traffic", 1_000 + i, MARCH + dt.timedelta(days=2), svc)
        await charge(conn, acc, "traffic", 2_000 + i, APRIL + dt.timedelta(days=2), svc)
    return accs


async def test_concurrent_issuers_leave_no_gap_and_no_duplicate(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        accs = await seed(conn, 40)
    now = APRIL + dt.timedelta(days=3)

    async def run_part(part: list[int]) -> None:
        async with pool.acquire() as conn:
            for i in range(0, len(part), 3):
                await invoices.run_batch(conn, part[i:i + 3], now, GRACE, series="INV", tz=TZ)

    async def on_demand(part: list[int]) -> None:
        async with pool.acquire() as conn:
            for acc in part:
                try:
                    await invoices.issue(conn, acc, None, now, actor="t", now=now, series="INV", tz=TZ)
                except (invoices.NothingToInvoice, invoices.RangeRefused):
                    pass

    async def whole_run(workers: int) -> None:
        await invoices.run(pool, now, GRACE, series="INV", tz=TZ, batch_size=4, workers=workers)

    # the run in four overlapping slices, two whole runs with batches in flight, and operators invoicing
    # the same accounts on demand, all at once
    await asyncio.gather(run_part(accs[0:20]), run_part(accs[10:30]), run_part(accs[20:40]),
                         on_demand(accs[::-1]), on_demand(accs[5:35]), run_part(accs), whole_run(3),
                         whole_run(2))
    async with pool.acquire() as conn:
        ids = [r["id"] for r in await conn.fetch("SELECT id FROM invoices WHERE kind = 'invoice' ORDER BY id")]

        async def credits(part: list[int]) -> None:
            async with pool.acquire() as c:
                for invoice_id in part:
                    try:
                        await invoices.credit(c, invoice_id, "goodwill", [{"line_no": 1, "total": 1_000_000}],
                                              actor="t", now=now, series="CN", tz=TZ)
                    except invoices.CreditRefused:
                        pass

        await asyncio.gather(*(credits(ids[k::2]) for k in range(2)), credits(ids[::3]), credits(ids[::-1]))
        assert [r[0] for r in await numbering(conn)] == ["CN", "INV"]
        # every account's chain starts at March and runs on without a gap or an overlap: by the run
        # (March) and on demand (the rest, or March and April at once when it came first)
        for acc in accs:
            covered = await conn.fetch("SELECT period_start, period_end FROM invoices WHERE account_id = $1"
                                       " AND kind = 'invoice' ORDER BY period_start", acc)
            assert covered[0]["period_start"] == MARCH and covered[-1]["period_end"] in (APRIL, now)
            assert all(a["period_end"] == b["period_start"] for a, b in zip(covered, covered[1:]))
        assert await verify(conn, now) == []


KILLED_RUN = """
import asyncio, datetime as dt, sys
from zoneinfo import ZoneInfo
import asyncpg
from billcore.billing import invoices

async def main(dsn):
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    now = dt.datetime(2026, 4, 3, tzinfo=dt.timezone.utc)
    async def progress(result, last):
        print(last, flush=True)
    await invoices.run(pool, now, dt.timedelta(hours=1), series="INV", tz=ZoneInfo("Europe/Moscow"),
                       batch_size=2, progress=progress)
    print("finished", flush=True)

asyncio.run(main(sys.argv[1]))
"""


async def test_a_run_killed_mid_way_leaves_no_gap_and_the_next_run_finishes_it(db_dsn: str) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        accs = await seed(conn, 120)
        # make each batch slow enough to be caught in the middle: an invoice.issued trigger that sleeps
        await conn.execute(
            "CREATE FUNCTION slow_issue() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN PERFORM pg_sleep(0.02); RETURN NEW; END $$;"
            " CREATE TRIGGER slow_issue BEFORE INSERT ON invoices FOR EACH ROW EXECUTE FUNCTION slow_issue()")
        proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, db_dsn], cwd=ROOT, stdout=subprocess.PIPE,
                                text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        committed_batches = 0
        while committed_batches < 10 and time.monotonic() < deadline:  # some batches committed, many to go
            line = await asyncio.to_thread(proc.stdout.readline)
            assert line and line.strip() != "finished", "the run ended before it could be killed"
            committed_batches += 1
        await asyncio.sleep(0.03)                                   # into the next batch's transaction
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL
        # the server ends the killed session's transaction: wait until it is gone
        for _ in range(200):
            if not await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                                       " AND pid <> pg_backend_pid() AND state <> 'idle'"):
                break
            await asyncio.sleep(0.05)
        done = await conn.fetchval("SELECT count(*) FROM invoices")
        assert 0 < done < len(accs), done
        await numbering(conn)
        assert await verify(conn) == []

        # the next run invoices exactly what the killed one did not commit
        pool = await asyncpg.create_pool(db_dsn, min_size=1, max_size=2)
        try:
            result = await invoices.run(pool, dt.datetime(2026, 4, 3, tzinfo=dt.timezone.utc), GRACE,
                                        series="INV", tz=TZ, batch_size=7)
        finally:
            await pool.close()
        assert result.issued == len(accs) - done
        await numbering(conn)
        assert await conn.fetchval("SELECT count(DISTINCT account_id) FROM invoices") == len(accs)
        assert await verify(conn) == []
    finally:
        await conn.close()
