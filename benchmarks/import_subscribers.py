"""Importing N subscribers: ``billcore import`` vs a plain COPY of the same rows.

Both sides start from a fresh migrated database (embedded PostgreSQL) with
one tariff, and load the same N subscribers — user, basic account with an
opening balance, an opening ledger row when the balance is not zero, a
tariff link and one static IP each:

* billcore — ``billcore.ops.importer.import_file`` on a generated CSV file:
  parsing, every validation (money, logins, duplicates, IP overlaps in the
  file and against the database, tariffs), COPY in one transaction, system
  blocks, invariant checks, audit row;
* floor — the rows already built in memory, COPYed into the same tables in
  one transaction: no parsing, no checks.

Passwords are pre-hashed ``SCRAM-SHA-256$…`` verifiers (random keys: the
import only parses them).  Cleartext passwords cost one PBKDF2 each at the
normal 100,000 iterations; that cost is measured separately on a sample,
through the importer's process pool, and extrapolated to N.

    python benchmarks/import_subscribers.py [--subscribers N] [--sample S] [--tiny]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import ipaddress
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from _machine import cpu_model as cpu_name  # noqa: E402

from billcore.db.migrate import migrate  # noqa: E402
from billcore.ops.importer import (  # noqa: E402
    Progress, compute_verifiers, import_file, iter_csv_rows,
)
from billcore.common.money import format_money  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
UTC = dt.timezone.utc
NOW = dt.datetime(2024, 5, 1, tzinfo=UTC)




def dsn_for(dsn: str, name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit
    return urlunsplit(urlsplit(dsn)._replace(path="/" + name))


def subscribers(n: int, seed: int = 1) -> list[dict[str, str]]:
    rng = random.Random(seed)
    b64 = lambda k: base64.b64encode(rng.randbytes(k)).decode()  # noqa: E731
    base = int(ipaddress.ip_address("10.0.0.0"))
    rows = []
    for i in range(n):
        balance = rng.randrange(-50_000_000, 2_000_000_000)  # −50 … 2000, micro-units
        rows.append({
            "login": f"sub{i:07d}", "password": f"SCRAM-SHA-256$100000:{b64(16)}${b64(32)}:{b64(32)}",
            "full_name": f"Subscriber {i}", "email": f"sub{i}@example.net", "phone": f"+7900{i:07d}",
            "address": f"Street {i % 977}, {i % 113}", "external_id": f"utm-{i}",
            "balance": format_money(balance) if balance else "0", "credit": "10" if i % 3 else "0",
            "tariff": "Home", "ips": str(ipaddress.ip_address(base + i)),
        })
    return rows


async def fresh_db(server: str, name: str) -> str:
    admin = await asyncpg.connect(server)
    await admin.execute(f"DROP DATABASE IF EXISTS {name}")
    await admin.execute(f"CREATE DATABASE {name}")
    await admin.close()
    dsn = dsn_for(server, name)
    conn = await asyncpg.connect(dsn)
    await migrate(conn)
    await conn.execute("INSERT INTO tariffs(name) VALUES ('Home')")
    await conn.close()
    return dsn


PHASES: dict[str, float] = {}


async def run_billcore(dsn: str, path: Path) -> tuple[float, int]:
    conn = await asyncpg.connect(dsn)
    start = time.perf_counter()
    report = await import_file(conn, path, progress_stream=sys.stderr, now=NOW)
    elapsed = time.perf_counter() - start
    total = int(await conn.fetchval("SELECT sum(balance) FROM accounts"))
    await conn.close()
    PHASES.update({k: round(v, 2) for k, v in report.phases.items()})
    print(f"  billcore: {report.summary()}; phases {PHASES}", flush=True)
    return elapsed, total


async def run_floor(dsn: str, rows: list[dict[str, str]]) -> tuple[float, int]:
    from billcore.common.money import parse_money
    from urfa.scram import Verifier

    conn = await asyncpg.connect(dsn)
    tariff = await conn.fetchval("SELECT id FROM tariffs WHERE name = 'Home'")
    users, accounts, ledger, links, ips = [], [], [], [], []
    for i, r in enumerate(rows, start=1):
        v = Verifier.from_text(r["password"])
        balance = parse_money(r["balance"])
        users.append((i, r["login"], r["full_name"], r["email"], r["phone"], r["address"], r["external_id"],
                      v.salt, v.iterations, v.stored_key, v.server_key))
        accounts.append((i, i, True, balance, parse_money(r["credit"])))
        if balance:
            ledger.append((i, balance, balance, "correction", f"floor:{i}", "floor", NOW))
        links.append((i, tariff, NOW, NOW, "floor"))
        ips.append((i, ipaddress.ip_network(r["ips"]), "static", "floor", NOW))
    start = time.perf_counter()
    async with conn.transaction():
        await conn.copy_records_to_table("users", records=users, columns=[
            "id", "login", "full_name", "email", "phone", "address", "external_id",
            "scram_salt", "scram_iterations", "scram_stored_key", "scram_server_key"])
        await conn.copy_records_to_table("accounts", records=accounts,
                                         columns=["id", "user_id", "is_basic", "balance", "credit"])
        await conn.copy_records_to_table("ledger", records=ledger, columns=[
            "account_id", "amount", "balance_after", "kind", "idem_key", "actor", "created_at"])
        await conn.copy_records_to_table("account_tariffs", records=links, columns=[
            "account_id", "tariff_id", "valid_from", "created_at", "created_by"])
        await conn.copy_records_to_table("ip_bindings", records=ips, columns=[
            "account_id", "prefix", "kind", "source", "valid_from"])
    elapsed = time.perf_counter() - start
    total = int(await conn.fetchval("SELECT sum(balance) FROM accounts"))
    await conn.close()
    return elapsed, total


def cleartext_rate(sample: int) -> float:
    """Verifiers per second at the normal iteration count, through the importer's pool."""
    passwords = [f"password-{i}" for i in range(sample)]
    workers = os.cpu_count() or 1
    progress = Progress(sys.stderr, "passwords", sample)
    start = time.perf_counter()
    compute_verifiers(passwords, workers=workers, progress=progress)
    progress.finish()
    return sample / (time.perf_counter() - start)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subscribers", type=int, default=100_000)
    ap.add_argument("--sample", type=int, default=2_000, help="cleartext passwords to time")
    ap.add_argument("--tiny", action="store_true", help="1,000 subscribers, 100 passwords (CI)")
    args = ap.parse_args()
    n = 1_000 if args.tiny else args.subscribers
    sample = 100 if args.tiny else args.sample
    tmp = Path(tempfile.mkdtemp(prefix="billcore-bench-"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver
        server = pgserver.get_server(tmp / "pg", cleanup_mode="stop")
    try:
        uri = server.get_uri()
        rows = subscribers(n)
        path = tmp / "subscribers.csv"
        with path.open("w") as f:
            f.writelines(iter_csv_rows(rows))
        print(f"{n:,} subscribers, {path.stat().st_size / 1e6:.1f} MB of CSV", flush=True)
        floor_s, floor_total = await run_floor(await fresh_db(uri, "bench_floor"), rows)
        print(f"  floor: {floor_s:.2f} s", flush=True)
        core_s, core_total = await run_billcore(await fresh_db(uri, "bench_core"), path)
        if core_total != floor_total:
            raise SystemExit(f"totals differ: billcore {core_total}, floor {floor_total}")
    finally:
        server.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    rate = cleartext_rate(sample)
    ratio = core_s / floor_s
    row = {
        "benchmark": "import_subscribers", "subscribers": n,
        "billcore_seconds": round(core_s, 3), "floor_seconds": round(floor_s, 3), "ratio": round(ratio, 2),
        "billcore_subscribers_per_s": round(n / core_s), "floor_subscribers_per_s": round(n / floor_s),
        "target_seconds_for_100k": 60.0,
        "cleartext_sample": sample, "cleartext_verifiers_per_s": round(rate, 1),
        "cleartext_extra_seconds_for_n": round(n / rate, 1), "billcore_phases_seconds": PHASES,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "machine": {"platform": platform.platform(), "cpu": cpu_name(), "nproc": os.cpu_count(),
                    "python": platform.python_version()},
        "date": dt.datetime.now(UTC).isoformat(timespec="seconds"),
    }
    table = (
        "| subscribers | billcore s | floor (COPY) s | ratio | billcore subscribers/s | floor subscribers/s |\n"
        "|---:|---:|---:|---:|---:|---:|\n"
        f"| {n:,} | {core_s:.2f} | {floor_s:.2f} | {ratio:.2f} | {n / core_s:,.0f} | {n / floor_s:,.0f} |\n\n"
        f"billcore phases (s): {', '.join(f'{k} {v:.2f}' for k, v in PHASES.items())}."
        f" Load average after the run: {', '.join(f'{x:.2f}' for x in os.getloadavg())}"
        " (the machine is shared; the floor suffers the same load).\n\n"
        f"Cleartext passwords: {rate:,.1f} SCRAM verifiers/s (100,000 PBKDF2 iterations, {os.cpu_count()}"
        f" processes, sample of {sample:,}) — {n / rate:,.0f} s more for {n:,} cleartext passwords.\n")
    print(table)
    if not args.tiny:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "import_subscribers.json").write_text(json.dumps(row, indent=2) + "\n")
        m = row["machine"]
        (RESULTS / "import_subscribers.md").write_text(
            "# import_subscribers: billcore import vs plain COPY of the same rows\n\n"
            f"{row['date']} · {m['platform']} · {m['cpu']} · nproc {m['nproc']} · Python {m['python']}\n\n"
            "CSV with pre-hashed SCRAM verifiers, opening balances, a tariff and a static IP per subscriber;"
            " embedded PostgreSQL (pgserver). Target: 100,000 subscribers in under 60 s.\n\n" + table)


if __name__ == "__main__":
    asyncio.run(main())
