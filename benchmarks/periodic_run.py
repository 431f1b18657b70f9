"""A monthly charge run over N accounts: billcore's run_due vs the set-based SQL floor.

Both sides start from copies of one database (N accounts on one tariff with
a monthly fee, charged at period start) and charge the month that begins at
``now``:

* billcore — ``billcore.billing.scheduler.run_due`` (batches of accounts, the
  pure proration per distinct link shape, ``post_charges`` with idempotency
  keys, ``periodic_charges`` bookkeeping, block sync, period close);
* floor — one hand-written statement: ``INSERT INTO ledger … SELECT`` joined
  with the balance ``UPDATE`` (no idempotency record, no blocks).

Both must end with the same total of balances.  Usage::

    python benchmarks/periodic_run.py [--accounts N] [--batch B] [--workers W] [--repeat R] [--tiny]

With ``--repeat`` both sides run R times on fresh copies, alternating, and
the medians are compared: the box is shared, and one pair can be noise.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from _machine import backends_cpu, cpu_model, cpu_used  # noqa: E402

from billcore.billing.scheduler import RunProgress, run_due  # noqa: E402
from billcore.db.migrate import migrate  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
UTC = dt.timezone.utc
NOW = dt.datetime(2024, 4, 1, 0, 5, tzinfo=UTC)
FEE = 25_990_000  # 25.99 a month



def dsn_for(dsn: str, name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit
    return urlunsplit(urlsplit(dsn)._replace(path="/" + name))


async def build_base(server: str, n: int) -> None:
    admin = await asyncpg.connect(server)
    await admin.execute("DROP DATABASE IF EXISTS bench_base")
    await admin.execute("CREATE DATABASE bench_base")
    await admin.close()
    conn = await asyncpg.connect(dsn_for(server, "bench_base"))
    await migrate(conn)
    await conn.execute(
        "INSERT INTO users(login, scram_salt, scram_iterations, scram_stored_key, scram_server_key)"
        " SELECT 'u' || g, '\\x00', 4096, '\\x00', '\\x00' FROM generate_series(1, $1) g", n)
    await conn.execute("INSERT INTO accounts(user_id, credit) SELECT id, 10^12 FROM users ORDER BY id")
    service = await conn.fetchval(
        "INSERT INTO services(name, kind, fee, period_kind, period_anchor, charge_mode)"
        " VALUES ('monthly', 'periodic', $1, 'monthly', '2024-01-01', 'start') RETURNING id", FEE)
    tariff = await conn.fetchval("INSERT INTO tariffs(name) VALUES ('home') RETURNING id")
    await conn.execute("INSERT INTO tariff_services VALUES ($1, $2)", tariff, service)
    await conn.execute(
        "INSERT INTO account_tariffs(account_id, tariff_id, valid_from, created_at, created_by)"
        " SELECT id, $1, '2024-01-01', now(), 'bench' FROM accounts", tariff)
    await conn.execute("VACUUM ANALYZE")
    await conn.close()


async def copy_db(server: str, name: str) -> str:
    admin = await asyncpg.connect(server)
    await admin.execute(f"DROP DATABASE IF EXISTS {name}")
    await admin.execute(f"CREATE DATABASE {name} TEMPLATE bench_base")
    # Both sides start from a clean buffer pool: without this, the side that
    # runs second pays for writing out the first side's dirty pages.
    await admin.execute("CHECKPOINT")
    await admin.close()
    return dsn_for(server, name)


FLOOR_SQL = """
WITH due AS (
    SELECT t.account_id, s.id AS service_id, s.fee FROM account_tariffs t
    JOIN tariff_services ts ON ts.tariff_id = t.tariff_id
    JOIN services s ON s.id = ts.service_id AND s.kind = 'periodic'
    WHERE t.valid_from <= $1 AND (t.valid_to IS NULL OR t.valid_to > $1)
), ins AS (
    INSERT INTO ledger(account_id, amount, balance_after, kind, idem_key, actor, created_at)
    SELECT d.account_id, -d.fee, a.balance - d.fee, 'periodic',
           'floor:' || d.account_id || ':' || d.service_id || ':' || extract(epoch FROM $2::timestamptz),
           'floor', $1
    FROM due d JOIN accounts a ON a.id = d.account_id
    RETURNING account_id, amount
)
UPDATE accounts a SET balance = a.balance + i.amount FROM ins i WHERE a.id = i.account_id
"""


async def run_floor(dsn: str) -> tuple[float, int, float, float]:
    """Returns (wall s, total balance, server CPU s, client CPU s)."""
    conn = await asyncpg.connect(dsn)
    cpu0, client0 = await backends_cpu(conn), time.process_time()
    start = time.perf_counter()
    await conn.execute(FLOOR_SQL, NOW, dt.datetime(2024, 4, 1, tzinfo=UTC))
    elapsed = time.perf_counter() - start
    server_cpu, client_cpu = cpu_used(cpu0, await backends_cpu(conn)), time.process_time() - client0
    total = int(await conn.fetchval("SELECT sum(balance) FROM accounts"))
    await conn.close()
    return elapsed, total, server_cpu, client_cpu


async def run_billcore(dsn: str, n: int, batch: int, workers: int) -> tuple[float, int, float, float]:
    """Returns (wall s, total balance, server CPU s, client CPU s)."""
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=workers + 1)
    async with pool.acquire() as conn:
        cpu0 = await backends_cpu(conn)
    client0 = time.process_time()
    last = [0.0]

    def progress(p: RunProgress) -> None:
        t = time.perf_counter()
        if t - last[0] >= 1.0 or p.accounts_done == p.accounts_total:
            last[0] = t
            print(f"  billcore: {p.accounts_done:>9,}/{p.accounts_total:,} accounts,"
                  f" {p.charges:,} charges, batch {p.batches}", flush=True)

    start = time.perf_counter()
    result = await run_due(pool, NOW, batch_size=batch, workers=workers, progress=progress)
    elapsed = time.perf_counter() - start
    client_cpu = time.process_time() - client0
    async with pool.acquire() as conn:
        server_cpu = cpu_used(cpu0, await backends_cpu(conn))
    total = int(await pool.fetchval("SELECT sum(balance) FROM accounts"))
    await pool.close()
    if result.charges != n:
        raise SystemExit(f"billcore charged {result.charges} accounts, expected {n}")
    return elapsed, total, server_cpu, client_cpu


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--accounts", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=2, help="batches in flight at once")
    ap.add_argument("--repeat", type=int, default=1,
                    help="floor/billcore pairs on fresh copies; the medians are reported")
    ap.add_argument("--note", default="", help="what code this run measured (kept in the history)")
    ap.add_argument("--tiny", action="store_true", help="~1,000 accounts (CI)")
    args = ap.parse_args()
    n = 1_000 if args.tiny else args.accounts
    load_before = [round(x, 2) for x in os.getloadavg()]
    tmp = Path(tempfile.mkdtemp(prefix="billcore-bench-"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver
        server = pgserver.get_server(tmp / "pg", cleanup_mode="stop")
    try:
        uri = server.get_uri()
        print(f"building {n:,} accounts ...", flush=True)
        t0 = time.perf_counter()
        await build_base(uri, n)
        print(f"  built in {time.perf_counter() - t0:.1f} s", flush=True)
        floors: list[float] = []
        cores: list[float] = []
        floor_cpu: list[tuple[float, float]] = []
        core_cpu: list[tuple[float, float]] = []
        for i in range(max(1, args.repeat)):
            floor_s, floor_total, f_server, f_client = await run_floor(await copy_db(uri, "bench_floor"))
            print(f"  floor: {floor_s:.2f} s (server CPU {f_server:.2f} s)", flush=True)
            core_s, core_total, c_server, c_client = await run_billcore(
                await copy_db(uri, "bench_core"), n, args.batch, args.workers)
            print(f"  billcore: {core_s:.2f} s (server CPU {c_server:.2f} s, client CPU {c_client:.2f} s;"
                  f" pair {i + 1}: ratio {core_s / floor_s:.2f})", flush=True)
            if core_total != floor_total or floor_total != -FEE * n:
                raise SystemExit(f"totals differ: billcore {core_total}, floor {floor_total}, expected {-FEE * n}")
            floors.append(floor_s)
            cores.append(core_s)
            floor_cpu.append((f_server, f_client))
            core_cpu.append((c_server, c_client))
    finally:
        server.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    floor_s, core_s = statistics.median(floors), statistics.median(cores)
    ratio = core_s / floor_s
    load_after = [round(x, 2) for x in os.getloadavg()]
    row = {
        "benchmark": "periodic_run", "accounts": n, "batch": args.batch, "workers": args.workers,
        "billcore_seconds": round(core_s, 3), "floor_seconds": round(floor_s, 3),
        "ratio": round(ratio, 2), "billcore_accounts_per_s": round(n / core_s),
        "floor_accounts_per_s": round(n / floor_s), "target_ratio": 2.0,
        "billcore_server_cpu_s": round(statistics.median(c[0] for c in core_cpu), 3),
        "billcore_client_cpu_s": round(statistics.median(c[1] for c in core_cpu), 3),
        "floor_server_cpu_s": round(statistics.median(c[0] for c in floor_cpu), 3),
        "note": args.note, "repeat": len(cores), "billcore_runs": [round(x, 3) for x in cores], "floor_runs": [round(x, 3) for x in floors],
        "machine": {"platform": platform.platform(), "cpu": cpu_model(), "nproc": os.cpu_count(),
                    "python": platform.python_version()},
        "load_average_before": load_before, "load_average_after": load_after,
        "date": dt.datetime.now(UTC).isoformat(timespec="seconds"),
    }
    table = (
        "| accounts | billcore s | floor s | ratio (target ≤ 2) | billcore accounts/s | floor accounts/s |\n"
        "|---:|---:|---:|---:|---:|---:|\n"
        f"| {n:,} | {core_s:.2f} | {floor_s:.2f} | {ratio:.2f} | {n / core_s:,.0f} | {n / floor_s:,.0f} |\n")
    print(table)
    if not args.tiny:
        save(row)


def save(row: dict[str, object]) -> None:
    """Write the latest run and keep every earlier one (``history``, newest first)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "periodic_run.json"
    history: list[dict[str, object]] = []
    if path.exists():
        old = json.loads(path.read_text())
        history = old.pop("history", [])
        history.insert(0, old)
    row = {**row, "history": history[:50]}
    path.write_text(json.dumps(row, indent=2) + "\n")
    lines = [
        "# periodic_run: monthly charge run, billcore vs set-based SQL floor\n",
        "The floor is one hand-written statement: ledger INSERT joined with the balance UPDATE, no",
        "idempotency record, no block sync.  billcore also writes `periodic_charges` (the per-period",
        "compare-and-set record), locks the accounts, checks idempotency keys and syncs system blocks.\n",
        "| date (UTC) | accounts | batch × workers | pairs | billcore s | floor s | ratio (target ≤ 2) | CPU s: billcore server + client / floor server | load avg before → after | note |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    lines.insert(4, "With more than one pair, the seconds are medians and each pair's times are in the JSON.\n")
    for r in [row, *history]:
        la = r.get("load_average_before"), r.get("load_average_after")
        load = " → ".join(f"{x[0]:.2f}" for x in la if x) or "not recorded"
        cpu = (f"{r['billcore_server_cpu_s']:.2f} + {r['billcore_client_cpu_s']:.2f} / {r['floor_server_cpu_s']:.2f}"
               if "floor_server_cpu_s" in r else "not recorded")
        lines.append(f"| {r['date']} | {r['accounts']:,} | {r['batch']:,} × {r['workers']} | {r.get('repeat', 1)} |"
                     f" {r['billcore_seconds']:.2f} | {r['floor_seconds']:.2f} | {r['ratio']:.2f} | {cpu} | {load} |"
                     f" {r.get('note', '')} |")
    m = row["machine"]
    assert isinstance(m, dict)
    lines.append(f"\nMachine of the latest run: {m['platform']} · {m['cpu']} · nproc {m['nproc']} ·"
                 f" Python {m['python']}; embedded PostgreSQL (pgserver).  Load averages are 1-minute"
                 " figures of a shared box: other work ran beside the benchmark.\n")
    (RESULTS / "periodic_run.md").write_text("\n".join(lines))


if __name__ == "__main__":
    asyncio.run(main())
