"""The monthly invoice run over N accounts, as a ratio to one set-based SQL statement producing the same lines.

One run, one database, the same month's ledger rows:

* **floor** — ONE hand-written statement: ``INSERT INTO scratch SELECT …
  GROUP BY`` of the month's charge rows per account and what they charge for
  (``ledger_charge_kind/service/class``) — the invoice lines' figures and
  nothing else: no numbers, no VAT, no descriptions, no chain, no outbox;
* **billcore** — ``billcore.billing.invoices.run``: every account in id
  order, ``--batch`` per transaction, each batch one statement writing the
  invoices (numbered under the series lock, customer snapshot), their lines
  (VAT, descriptions, quantities from ``usage_daily``), the chains, plus the
  outbox events.

Both must give the same line rows (count and sum).  The floor runs first:
it writes nothing billcore reads.  The figure is billcore's wall time over
the floor's (target ≤ 2).

Databases::

    python benchmarks/invoice_run.py [--accounts N] [--batch B] [--tiny]
        an embedded PostgreSQL seeded with N accounts and a month of charges
        (a monthly fee, traffic every few days with its usage_daily rows, a
        once-off fee for one in ten, a payment)
    python benchmarks/invoice_run.py --dsn postgresql://… [--month 2026-03] [--in-place]
        an existing database with accounts and ledger rows; by default each pair
        works on a copy (CREATE DATABASE … TEMPLATE, so no other session may be
        connected to it) that is dropped afterwards, --in-place runs on the
        database itself (the invoices stay: documents are immutable).  The month
        defaults to the one of the latest ledger row.
    --repeat R: R pairs on fresh copies, medians reported (a shared box is noisy).

Results: printed, and (not ``--tiny``) benchmarks/results/invoice_run-N.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _machine import backends_cpu, cpu_used, machine, publish, tree_commit  # noqa: E402

from billcore.billing import invoices  # noqa: E402
from billcore.db.migrate import migrate  # noqa: E402

OUT = ROOT / "benchmarks" / "results"
UTC = dt.timezone.utc
MONTH = dt.datetime(2026, 3, 1, tzinfo=UTC)
GRACE = dt.timedelta(hours=1)

FLOOR_SQL = """
INSERT INTO bench_floor_lines(account_id, line_kind, service_id, class_id, total)
SELECT account_id, ledger_charge_kind(kind, idem_key), ledger_charge_service(kind, idem_key),
       ledger_charge_class(kind, idem_key), -sum(amount)
  FROM ledger
 WHERE created_at >= $1 AND created_at < $2
   AND kind IN ('periodic', 'traffic', 'charge', 'charge_reversal') AND idem_key NOT LIKE 'credit_note:%'
 GROUP BY 1, 2, 3, 4
"""


def with_db(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path="/" + name))


async def seed(dsn: str, n: int, traffic_rows: int) -> None:
    """N accounts with a month (MONTH) of charges, set-based, balances consistent with the ledger."""
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
        await conn.execute(
            "INSERT INTO users(login, full_name, address, email, scram_salt, scram_iterations, scram_stored_key,"
            " scram_server_key) SELECT 'u' || g, 'Subscriber ' || g, 'Street ' || g, 'u' || g || '@example.org',"
            " '\\x00', 4096, '\\x00', '\\x00' FROM generate_series(1, $1) g", n)
        await conn.execute("INSERT INTO accounts(user_id, is_basic, vat_bp, credit) SELECT id, true, 2000, 10^12"
                           " FROM users ORDER BY id")
        fee = await conn.fetchval(
            "INSERT INTO services(name, kind, fee, period_kind, period_anchor, charge_mode)"
            " VALUES ('Monthly fee', 'periodic', 25990000, 'monthly', '2026-01-01', 'start') RETURNING id")
        net = await conn.fetchval("INSERT INTO services(name, kind) VALUES ('Internet', 'traffic') RETURNING id")
        once = await conn.fetchval("INSERT INTO services(name, kind, fee) VALUES ('Router', 'once', 3000000)"
                                   " RETURNING id")
        klass = await conn.fetchval("INSERT INTO traffic_classes(name) VALUES ('World') RETURNING id")
        epoch = int(MONTH.timestamp())
        step = max(1, 30 // max(1, traffic_rows))
        # rows per account: payment (day 0), monthly fee (day 0), traffic every `step` days, a once-off fee
        # for one account in ten; keys in the real formats
        await conn.execute(f"""
            CREATE TEMP TABLE seed_rows AS
            SELECT a.id AS account_id, 50000000::bigint AS amount, 'payment' AS kind,
                   'pay:' || a.id AS idem_key, $1::timestamptz + interval '1 hour' AS created_at
              FROM accounts a
            UNION ALL
            SELECT a.id, -25990000, 'periodic', 'periodic:' || a.id || ':{fee}:{epoch}:r0',
                   $1::timestamptz + interval '2 hours' FROM accounts a
            UNION ALL
            SELECT a.id, -(100000 + (a.id * 7919 + d) % 900000), 'traffic',
                   'usage:nf1:' || d || ':' || a.id || ':{net}:{klass}:0:{epoch}',
                   $1::timestamptz + d * interval '1 day' + interval '3 hours'
              FROM accounts a, generate_series(0, {traffic_rows - 1}) d0, LATERAL (SELECT d0 * {step} AS d) x
            UNION ALL
            SELECT a.id, -3000000, 'charge', 'once:' || a.id || ':{once}:' || a.id,
                   $1::timestamptz + interval '5 days' FROM accounts a WHERE a.id % 10 = 0
        """, MONTH)
        await conn.execute("""
            INSERT INTO ledger(account_id, amount, balance_after, kind, reference, idem_key, actor, created_at)
            SELECT account_id, amount,
                   sum(amount) OVER (PARTITION BY account_id ORDER BY created_at, idem_key), kind, '', idem_key,
                   'bench', created_at
              FROM seed_rows ORDER BY account_id, created_at, idem_key""")
        await conn.execute("UPDATE accounts a SET balance = s.total FROM (SELECT account_id, sum(amount) AS total"
                           " FROM seed_rows GROUP BY 1) s WHERE s.account_id = a.id")
        await conn.execute(f"""
            INSERT INTO usage_daily(account_id, class_id, day, quantity, amount)
            SELECT account_id, {klass}, (created_at AT TIME ZONE 'UTC')::date, -amount * 1000, -amount
              FROM seed_rows WHERE kind = 'traffic'""")
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()


async def pick_month(conn: asyncpg.Connection, month: str | None) -> tuple[dt.datetime, dt.datetime]:
    if month:
        start = dt.datetime.strptime(month, "%Y-%m").replace(tzinfo=UTC)
    else:
        last = await conn.fetchval("SELECT max(created_at) FROM ledger")
        if last is None:
            raise SystemExit("the database has no ledger rows")
        start = last.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (start + dt.timedelta(days=32)).replace(day=1)
    return start, end


async def run_floor(conn: asyncpg.Connection, start: dt.datetime,
                    end: dt.datetime) -> tuple[float, float, int, int]:
    """(wall s, server CPU s, line rows, their sum)."""
    await conn.execute("DROP TABLE IF EXISTS bench_floor_lines")
    await conn.execute("CREATE TABLE bench_floor_lines(account_id bigint, line_kind text, service_id bigint,"
                       " class_id bigint, total bigint)")
    await conn.execute("CHECKPOINT")
    cpu0 = await backends_cpu(conn)
    t0 = time.perf_counter()
    await conn.execute(FLOOR_SQL, start, end, timeout=None)
    elapsed = time.perf_counter() - t0
    cpu = cpu_used(cpu0, await backends_cpu(conn))
    rows, total = await conn.fetchrow("SELECT count(*), coalesce(sum(total), 0)::bigint FROM bench_floor_lines")
    await conn.execute("DROP TABLE bench_floor_lines")
    return elapsed, cpu, int(rows), int(total)


async def run_billcore(dsn: str, start: dt.datetime, end: dt.datetime, batch: int,
                       workers: int) -> tuple[float, float, float, Any, int, int]:
    """(wall s, server CPU s, client CPU s, the run's result, line rows, their sum)."""
    pool = await asyncpg.create_pool(dsn, min_size=workers + 1, max_size=workers + 1, command_timeout=None)
    try:
        async with pool.acquire() as conn:
            # accounts without a period of their own are monthly from the 1st (UTC here): the range is the month
            odd = await conn.fetchval("SELECT count(*) FROM account_periods")
            if odd:
                print(f"  note: {odd:,} account(s) have periods of their own; their ranges follow them", flush=True)
            await conn.execute("CHECKPOINT")
            cpu0 = await backends_cpu(conn)
        client0 = time.process_time()
        last = [time.perf_counter()]

        async def progress(result: invoices.RunResult, account: int) -> None:
            t = time.perf_counter()
            if t - last[0] >= 5:
                last[0] = t
                print(f"  billcore: up to account {account:,}", flush=True)

        t0 = time.perf_counter()
        result = await invoices.run(pool, end + GRACE + dt.timedelta(minutes=1), GRACE, series="BENCH", tz=UTC,
                                    batch_size=batch, workers=workers, until=end, progress=progress)
        elapsed = time.perf_counter() - t0
        client = time.process_time() - client0
        async with pool.acquire() as conn:
            cpu = cpu_used(cpu0, await backends_cpu(conn))
            rows, total = await conn.fetchrow(
                "SELECT count(*), coalesce(sum(l.total), 0)::bigint FROM invoice_lines l"
                " JOIN invoices i ON i.id = l.invoice_id WHERE i.series = 'BENCH' AND i.kind = 'invoice'"
                " AND i.period_end = $1", end)
        return elapsed, cpu, client, result, int(rows), int(total)
    finally:
        await pool.close()


async def measure(dsn: str, month: str | None, batch: int, workers: int) -> dict[str, Any]:
    """One pair on ``dsn``: the floor, then billcore's run (which writes the invoices)."""
    conn = await asyncpg.connect(dsn)
    try:
        start, end = await pick_month(conn, month)
        accounts = int(await conn.fetchval("SELECT count(*) FROM accounts"))
        ledger_rows = int(await conn.fetchval("SELECT count(*) FROM ledger WHERE created_at >= $1 AND created_at < $2",
                                              start, end))
        print(f"month {start:%Y-%m}: {accounts:,} accounts, {ledger_rows:,} ledger rows", flush=True)
        floor_s, floor_cpu, floor_rows, floor_total = await run_floor(conn, start, end)
        print(f"  floor: {floor_s:.2f} s (server CPU {floor_cpu:.2f} s), {floor_rows:,} line rows", flush=True)
    finally:
        await conn.close()
    core_s, core_cpu, client_cpu, result, core_rows, core_total = await run_billcore(dsn, start, end, batch, workers)
    print(f"  billcore: {core_s:.2f} s (server CPU {core_cpu:.2f} s, client CPU {client_cpu:.2f} s),"
          f" {result.issued:,} invoices, {core_rows:,} line rows: ratio {core_s / floor_s:.2f}", flush=True)
    if (core_rows, core_total) != (floor_rows, floor_total):
        raise SystemExit(f"the line rows differ: billcore {core_rows} rows / {core_total},"
                         f" floor {floor_rows} / {floor_total} (an account already invoiced for this month?)")
    return {"month": f"{start:%Y-%m}", "accounts": accounts, "ledger_rows": ledger_rows, "invoices": result.issued,
            "line_rows": core_rows, "lines_total": core_total, "floor_seconds": floor_s, "billcore_seconds": core_s,
            "floor_server_cpu_s": floor_cpu, "billcore_server_cpu_s": core_cpu, "billcore_client_cpu_s": client_cpu,
            "batch": batch, "workers": workers}


async def copy_of(admin_dsn: str, source: str, name: str) -> None:
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{source}"', timeout=None)
    finally:
        await admin.close()


async def drop(admin_dsn: str, name: str) -> None:
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def pairs(admin_dsn: str, source: str, month: str | None, batch: int, workers: int,
                repeat: int) -> dict[str, Any]:
    """``repeat`` pairs, each on a fresh copy of ``source``; the medians, and every pair's figures."""
    runs = []
    copy = f"{source}_invoice_bench"
    for i in range(repeat):
        await copy_of(admin_dsn, source, copy)
        try:
            runs.append(await measure(with_db(admin_dsn, copy), month, batch, workers))
        finally:
            await drop(admin_dsn, copy)
    med = {k: statistics.median(r[k] for r in runs) for k in
           ("floor_seconds", "billcore_seconds", "floor_server_cpu_s", "billcore_server_cpu_s",
            "billcore_client_cpu_s")}
    row = {**runs[0], **{k: round(v, 3) for k, v in med.items()}}
    row["ratio"] = round(med["billcore_seconds"] / med["floor_seconds"], 2)
    row["cpu_ratio"] = (round((med["billcore_server_cpu_s"] + med["billcore_client_cpu_s"]) / med["floor_server_cpu_s"], 2)
                        if med["floor_server_cpu_s"] else None)
    row["invoices_per_s"] = round(row["invoices"] / med["billcore_seconds"])
    row["repeat"] = repeat
    row["pairs"] = [{"billcore_s": round(r["billcore_seconds"], 3), "floor_s": round(r["floor_seconds"], 3)}
                    for r in runs]
    return row


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--accounts", type=int, default=100_000, help="accounts to seed (embedded database)")
    ap.add_argument("--traffic-rows", type=int, default=10, help="traffic ledger rows per account in the month")
    ap.add_argument("--batch", type=int, default=5000, help="accounts per transaction ([invoices] batch_size)")
    ap.add_argument("--workers", type=int, default=2, help="batches in flight at once ([invoices] workers)")
    ap.add_argument("--dsn", help="an existing database with accounts and ledger rows")
    ap.add_argument("--month", help="YYYY-MM to invoice (with --dsn; default: the latest ledger row's)")
    ap.add_argument("--in-place", action="store_true", help="with --dsn: run on the database itself, not a copy")
    ap.add_argument("--repeat", type=int, default=1, help="pairs, each on a fresh copy; medians are reported")
    ap.add_argument("--note", default="", help="what this run measured (kept in the results)")
    ap.add_argument("--tiny", action="store_true", help="~500 accounts (CI)")
    args = ap.parse_args()
    load_before = [round(x, 2) for x in os.getloadavg()]
    tmp: Path | None = None
    server: Any = None
    try:
        if args.dsn:
            conn = await asyncpg.connect(args.dsn)
            await migrate(conn)   # the schema of this tree (0020 and its functions)
            await conn.close()
            if args.in_place:
                row = await measure(args.dsn, args.month, args.batch, args.workers)
                row.update(ratio=round(row["billcore_seconds"] / row["floor_seconds"], 2), repeat=1,
                           invoices_per_s=round(row["invoices"] / row["billcore_seconds"]),
                           cpu_ratio=None, database="given (--dsn), in place")
            else:
                source = urlsplit(args.dsn).path.lstrip("/")
                admin = with_db(args.dsn, "template1" if source == "postgres" else "postgres")
                row = await pairs(admin, source, args.month, args.batch, args.workers, args.repeat)
                row["database"] = "given (--dsn), a copy per pair"
        else:
            n = 500 if args.tiny else args.accounts
            tmp = Path(tempfile.mkdtemp(prefix="billcore-invbench-"))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import pgserver
                server = pgserver.get_server(tmp / "pg", cleanup_mode="stop")
            admin = with_db(server.get_uri(), "postgres")
            conn = await asyncpg.connect(admin)
            await conn.execute("CREATE DATABASE invoice_bench_base")
            await conn.close()
            print(f"seeding {n:,} accounts with a month of charges ...", flush=True)
            t0 = time.perf_counter()
            await seed(with_db(admin, "invoice_bench_base"), n, args.traffic_rows)
            print(f"  seeded in {time.perf_counter() - t0:.1f} s", flush=True)
            row = await pairs(admin, "invoice_bench_base", f"{MONTH:%Y-%m}", args.batch, args.workers, args.repeat)
            row["database"] = "embedded (pgserver), seeded"
    finally:
        if server is not None:
            server.cleanup()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    report = {"benchmark": "invoice_run", **row, "target_ratio": 2.0, "note": args.note, "commit": tree_commit(),
              "machine": machine(), "load_average_before": load_before,
              "load_average_after": [round(x, 2) for x in os.getloadavg()]}
    text = (
        "# invoice_run: the monthly invoice run vs one set-based statement producing the same lines\n\n"
        "| month | accounts | ledger rows | invoices | line rows | billcore s | floor s | ratio (target ≤ 2)"
        " | CPU ratio | invoices/s | batch × workers | pairs |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        f"| {row['month']} | {row['accounts']:,} | {row['ledger_rows']:,} | {row['invoices']:,} |"
        f" {row['line_rows']:,} | {row['billcore_seconds']:.2f} | {row['floor_seconds']:.2f} | {row['ratio']:.2f} |"
        f" {row['cpu_ratio'] if row['cpu_ratio'] is not None else 'n/a'} | {row['invoices_per_s']:,} |"
        f" {row['batch']:,} × {row['workers']} | {row['repeat']} |\n\n"
        "The floor is one INSERT … SELECT … GROUP BY of the month's charge rows into a scratch table; billcore's"
        " run writes the invoices, their lines, the chains and the outbox events, numbered under the series"
        " lock, in batches (workers batches at once: they read their lines in parallel and take turns to write). CPU ratio: billcore's server + client CPU seconds over the floor's server CPU"
        " seconds (steadier than wall time on a shared box). With more than one pair the seconds are medians.\n\n"
        f"Database: {row['database']}. Machine: {report['machine']['cpu']}, nproc {report['machine']['nproc']},"
        f" load average {load_before[0]:.2f} → {report['load_average_after'][0]:.2f} (1 min; a shared box),"
        f" {report['machine']['date']}, commit {report['commit']}. {args.note}\n")
    publish(report, text, OUT / f"invoice_run-{row['accounts']}", args.tiny)


if __name__ == "__main__":
    asyncio.run(main())
