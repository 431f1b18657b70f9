"""Fair usage: quota crossings → CoA-Requests per second, against the raw CoA ceiling.

Theory of operation
-------------------
N accounts, each with a RADIUS login, one open session on the NAS simulator
(radius/nas_sim.py, loopback UDP) and a traffic tariff with a 100 MB quota.
Three figures:

* ``crossing``: one usage batch (``commit_usage``) that takes every account
  over its quota — rating, counters, ledger, the crossing check, N throttle
  rows and N ``fup.quota_reached`` events in one transaction; crossings/s;
* ``coa``: for every event, what the radius process does on delivery
  (``radius.rate_state``'s query, then ``rate_apply.apply_session_rate``:
  one CoA-Request, answered by the simulator), ``concurrency`` at a time;
  CoA/s end to end, each account checked to have had exactly one CoA with
  Mikrotik-Rate-Limit;
* ``ceiling``: the same N CoA-Requests with ``send_dynauth`` alone (no
  database), the client's and simulator's own limit; ``ratio`` = coa/ceiling.

The simulator shares the event loop with the sender (one core): the ceiling
measures both.  ``run(accounts, concurrency)`` is the function; ``--tiny``
is CI's size and writes no result files.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from _machine import machine, publish, tree_commit  # noqa: E402

from billcore.billing import fup  # noqa: E402
from billcore.billing.rating import TrafficUsage  # noqa: E402
from billcore.billing.usage import commit_usage  # noqa: E402
from billcore.db.migrate import migrate  # noqa: E402
from radius.coa import send_dynauth, session_attributes  # noqa: E402
from radius.nas_sim import NasSimulator  # noqa: E402
from radius.process import RadiusSettings  # noqa: E402
from radius.rate_apply import apply_session_rate  # noqa: E402
from radius.server import Nas, NasTable, load_dictionary  # noqa: E402

UTC = dt.timezone.utc
NOW = dt.datetime(2025, 3, 10, 12, tzinfo=UTC)
MB = 1_000_000
SECRET = b"bench-secret"
RESULTS = ROOT / "benchmarks" / "results" / "fup_coa"


async def build(conn: asyncpg.Connection, n: int, nas_port: int) -> int:
    """N accounts on a quota'd traffic tariff, each with a link and an open session; the class id."""
    await migrate(conn)
    klass = await conn.fetchval("INSERT INTO traffic_classes(name) VALUES ('inet') RETURNING id")
    service = await conn.fetchval("INSERT INTO services(name, kind) VALUES ('traffic', 'traffic') RETURNING id")
    await conn.execute("INSERT INTO service_rates(service_id, class_id, prepaid, unit_size, tier_starts, tier_prices)"
                       " VALUES ($1, $2, 0, $3, '{0}', '{1}')", service, klass, MB)
    tariff = await conn.fetchval("INSERT INTO tariffs(name) VALUES ('home') RETURNING id")
    await conn.execute("INSERT INTO tariff_services VALUES ($1, $2)", tariff, service)
    await conn.execute(
        "INSERT INTO users(login, scram_salt, scram_iterations, scram_stored_key, scram_server_key)"
        " SELECT 'u' || g, '\\x00', 4096, '\\x00', '\\x00' FROM generate_series(1, $1) g", n)
    await conn.execute("INSERT INTO accounts(user_id, balance) SELECT id, 10^12 FROM users ORDER BY id")
    await conn.execute("INSERT INTO account_tariffs(account_id, tariff_id, valid_from, created_at, created_by)"
                       " SELECT id, $1, '2025-01-01', now(), 'bench' FROM accounts", tariff)
    nas = await conn.fetchval(
        "INSERT INTO radius_nas(name, address, secret_enc, coa_port, kind) VALUES ('sim', '127.0.0.1', '\\x00', $1,"
        " 'mikrotik') RETURNING id", nas_port)
    await conn.execute(
        "INSERT INTO radius_links(account_id, login, password_enc, rate_limit)"
        " SELECT a.id, u.login, '\\x00', '10M/20M' FROM accounts a JOIN users u ON u.id = a.user_id")
    await conn.execute(
        "INSERT INTO radius_sessions(nas_id, session_id, account_id, link_id, login, started_at, updated_at)"
        " SELECT $1, 'S' || l.account_id, l.account_id, l.id, l.login, $2, $2 FROM radius_links l", nas, NOW)
    async with conn.transaction():
        profile = await fup.profile_set(conn, "slow", 2000, 512)
        await fup.quota_set(conn, service, None, 100 * MB, profile)
    await conn.execute("VACUUM ANALYZE")
    return int(klass)


async def run(accounts: int, concurrency: int = 64) -> dict[str, Any]:
    """Build, cross every quota, deliver every CoA; the figures (see the module comment)."""
    dictionary = load_dictionary()
    tmp = Path(tempfile.mkdtemp(prefix="billcore-fup-"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver
        server = pgserver.get_server(tmp / "pg", cleanup_mode="stop")
    sim = NasSimulator(SECRET, dictionary)
    port = await sim.start()
    try:
        conn = await asyncpg.connect(server.get_uri())
        klass = await build(conn, accounts, port)
        ids = [int(r[0]) for r in await conn.fetch("SELECT id FROM accounts ORDER BY id")]
        sim.sessions.update({f"S{i}": f"u{i}" for i in ids})
        hour = NOW - dt.timedelta(hours=1)
        batch = [TrafficUsage(i, klass, hour, 150 * MB) for i in ids]

        t0 = time.perf_counter()
        result = await commit_usage(conn, "bench", 1, batch, NOW)
        crossing_s = time.perf_counter() - t0
        assert not result.duplicate
        events = await conn.fetch("SELECT account_id FROM outbox_events WHERE event = 'fup.quota_reached'")
        assert len(events) == accounts, f"{len(events)} crossings for {accounts} accounts"

        pool = await asyncpg.create_pool(server.get_uri(), min_size=1, max_size=8)
        table = NasTable([Nas("127.0.0.1", SECRET, "sim", coa_port=port)])
        settings = RadiusSettings(coa_timeout=2.0)
        gate = asyncio.Semaphore(concurrency)

        async def deliver(account_id: int) -> bool:
            async with gate:
                async with pool.acquire() as c:
                    sessions = await fup.rate_state(c, account_id, NOW)
                return all([await apply_session_rate(s, table, settings, dictionary) for s in sessions])

        t0 = time.perf_counter()
        done = await asyncio.gather(*(deliver(int(e["account_id"])) for e in events))
        coa_s = time.perf_counter() - t0
        assert all(done)
        applied = {sid: len(v) for sid, v in sim.applied.items()}
        assert len(applied) == accounts and set(applied.values()) == {1}, "not exactly one CoA per account"
        await pool.close()

        async def raw(i: int) -> None:
            async with gate:
                attrs = session_attributes({"login": f"u{i}", "session_id": f"S{i}"})
                await send_dynauth("127.0.0.1", port, SECRET, "coa", attrs + [("Mikrotik-Rate-Limit", "512k/2M")],
                                   dictionary, timeout=2.0)

        t0 = time.perf_counter()
        await asyncio.gather(*(raw(i) for i in ids))
        ceiling_s = time.perf_counter() - t0
        await conn.close()
    finally:
        sim.close()
        server.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"benchmark": "fup_coa", "accounts": accounts, "concurrency": concurrency,
            "crossing_seconds": round(crossing_s, 3), "crossings_per_s": round(accounts / crossing_s),
            "coa_seconds": round(coa_s, 3), "coa_per_s": round(accounts / coa_s),
            "ceiling_seconds": round(ceiling_s, 3), "ceiling_coa_per_s": round(accounts / ceiling_s),
            "ratio": round(ceiling_s / coa_s, 2), "commit": tree_commit(), "machine": machine()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--accounts", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--tiny", action="store_true", help="200 accounts (CI), no result files")
    args = ap.parse_args()
    n = 200 if args.tiny else args.accounts
    report = asyncio.run(run(n, args.concurrency))
    text = ("| accounts | crossings/s (one batch) | CoA/s end to end | raw CoA/s (ceiling) | ratio |\n"
            "|---:|---:|---:|---:|---:|\n"
            f"| {n:,} | {report['crossings_per_s']:,} | {report['coa_per_s']:,} | {report['ceiling_coa_per_s']:,}"
            f" | {report['ratio']:.2f} |\n")
    publish(report, text, RESULTS, args.tiny)


if __name__ == "__main__":
    main()
