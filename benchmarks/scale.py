"""What N subscribers cost one machine: build a database of N, then time what operators run.

The build is set-based SQL (``INSERT … SELECT generate_series``) plus COPY
for the RADIUS logins, whose passwords are sealed in Python with the same
key file ``billcore serve`` reads.  For every subscriber ``i`` (0-based):

* a user ``sub{i:06d}`` (name, phone, e-mail, address, contract number
  ``C-{i:07d}`` as ``external_id``), its basic account, linked from the
  history's first month to a tariff with a monthly fee and a per-megabyte
  traffic service;
* a static IP binding ``10.x.y.z/32`` (``--bindings`` of them, default N)
  and a RADIUS login with the same name (password ``pw-{i:06d}-x``, as
  benchmarks/radius_auth.py sends);
* ``--months`` of ledger history, month by month for every account, as a
  real ledger interleaves accounts: a payment (with its ``payments`` row),
  the monthly fee, and a traffic charge (``usage:`` key) that the month's
  ``usage_counters`` row matches;
* ``--usage-days`` of ``usage_daily`` rows (one per account and day);
* what the operator's list filters on: 4 % of the subscribers in debt
  (``DEBTOR_EVERY``; the others pay ahead), 3 % with an active admin block,
  5 % online (an open RADIUS session on the bench NAS at their address), 2 %
  on the tariff 'business' instead of 'home'.  (Blocked and online logins are
  refused by RADIUS: the Access-Accept rate counts them as not accepted.)

Then it measures, each step with a timeout, and reports what failed
(``--steps`` picks some of them: verify, search, subscribers, serve, monthly,
backup):

1. ``billcore verify`` (the CLI, as cron runs it);
2. a search by part of a login (``users.search``'s query, the median of
   several substrings) and the plan it used;
2b. the subscriber list (``subscribers.search``'s count, page and rows):
   ``--searches`` random searches per filter combination, p50/p95/max and
   the plans of the slowest;
3. ``billcore serve``: start-up until the NetFlow worker's first flow from a
   bound address is charged (a timeout here is a cliff: the classifier
   snapshot did not load), an account card over URFA (``users.get``,
   ``accounts.get``, ``accounts.history``), the RADIUS Access-Accept rate
   over N logins, and the resident memory of every process;
4. a monthly periodic run (``run_due``) over every account;
5. ``billcore backup`` and ``billcore restore`` into an empty database.

Usage::

    python benchmarks/scale.py [--subscribers N] [--months M] [--usage-days D] [--tiny]
                               [--step-timeout S] [--workdir DIR] [--build-only]
                               [--steps verify,search,...] [--searches K]

``--tiny`` is CI's run: N=50,000, 2 months, 2 days (still past the
classifier snapshot's old ~38,000-binding cliff).  Results go to
benchmarks/results/scale.json and scale.md unless ``--tiny``.  Exit status
1 when any step failed or timed out.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import shutil
import socket
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _machine import machine  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
UTC = dt.timezone.utc
FEE = 25_990_000          # 25.99 a month
PER_MB = 100_000          # 0.10 per 10^6 bytes
CHUNK = 100_000           # rows per build statement: progress, and no statement runs for minutes
NAS_SECRET = b"bench-secret"   # radius_auth.SECRET
ADMIN = ("bench", "bench-admin-pw")


def log(msg: str) -> None:
    print(msg, flush=True)


def month_start(d: dt.datetime, back: int = 0) -> dt.datetime:
    y, m = d.year, d.month - back
    while m <= 0:
        y, m = y - 1, m + 12
    return dt.datetime(y, m, 1, tzinfo=UTC)


def dsn_for(dsn: str, name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit
    return urlunsplit(urlsplit(dsn)._replace(path="/" + name))


# -- build ---------------------------------------------------------------------------

USERS_SQL = """
INSERT INTO users(id, login, full_name, email, phone, address, external_id,
                  scram_salt, scram_iterations, scram_stored_key, scram_server_key, created_at)
SELECT g + 1, 'sub' || lpad(g::text, 6, '0'),
       (ARRAY['Ivan','Maria','Olga','Petr','Anna','Sergei','Elena','Dmitri','Irina','Pavel'])[g % 10 + 1]
         || ' ' || (ARRAY['Smirnov','Ivanova','Kuznetsov','Popova','Sokolov','Lebedeva','Kozlov',
                          'Novikova','Morozov','Volkova','Orlov','Zaitseva'])[(g / 10) % 12 + 1],
       'sub' || g || '@example.net',
       '+7 9' || lpad(((g::bigint * 7919) % 1000000000)::text, 9, '0'),
       'Lenina st. ' || (g % 300 + 1) || ', apt. ' || (g / 300 % 200 + 1),
       'C-' || lpad(g::text, 7, '0'),
       $3, $4, $5, $6, $7
FROM generate_series($1::bigint, $2::bigint - 1) g"""

# A debtor (every DEBTOR_EVERY-th subscriber) pays each month's fee only, so
# its balance is -(months × usage charge); everyone else pays the fee and
# twice the usage, so theirs is +(months × usage charge).  SIGN(g) is that ±1.
DEBTOR_EVERY = 25          # 4 % in debt
BLOCKED_EVERY = 33         # 3 % with an active admin block (g % 33 = 1)
ONLINE_EVERY = 20          # 5 % online: an open RADIUS session (g % 20 = 2)
SIGN = f"(CASE WHEN g % {DEBTOR_EVERY} = 0 THEN -1 ELSE 1 END)"
USAGE = "(1000 * (g % 97 + 1))"

ACCOUNTS_SQL = f"""
INSERT INTO accounts(id, user_id, is_basic, balance, credit, created_at)
SELECT g + 1, g + 1, true, $3::bigint * {SIGN} * {USAGE}, 1000000000, $4
FROM generate_series($1::bigint, $2::bigint - 1) g"""

# every BUSINESS_EVERY-th subscriber is on the tariff 'business' (same services): a tariff filter
# that finds a few, beside 'home' that finds nearly everyone
BUSINESS_EVERY = 50        # 2 % (g % 50 = 7)
TARIFFS_SQL = f"""
INSERT INTO account_tariffs(account_id, tariff_id, valid_from, created_at, created_by)
SELECT g + 1, CASE WHEN g % {BUSINESS_EVERY} = 7 THEN $5::bigint ELSE $3::bigint END, $4, $4, 'scale-bench'
FROM generate_series($1::bigint, $2::bigint - 1) g"""

BINDINGS_SQL = """
INSERT INTO ip_bindings(account_id, prefix, kind, source, valid_from)
SELECT g + 1, ('10.' || (g >> 16) || '.' || ((g >> 8) & 255) || '.' || (g & 255) || '/32')::cidr,
       'static', 'static', $3
FROM generate_series($1::bigint, $2::bigint - 1) g"""

# ledger ids are computed, so the payments rows can point at theirs; month m
# takes ids [base, base + 3N): payments, fees, traffic charges of every account
LEDGER_SQL = f"""
INSERT INTO ledger(id, account_id, amount, balance_after, kind, reference, idem_key, actor, created_at)
SELECT $3::bigint + k * $5 + g + 1, g + 1,
       CASE k WHEN 0 THEN $6::bigint + (1 + {SIGN}) * {USAGE} WHEN 1 THEN -$6::bigint ELSE -{USAGE} END,
       $7::bigint * {SIGN} * {USAGE} + CASE k WHEN 0 THEN $6::bigint + (1 + {SIGN}) * {USAGE}
                                             WHEN 1 THEN (1 + {SIGN}) * {USAGE} ELSE {SIGN} * {USAGE} END,
       (ARRAY['payment','periodic','traffic'])[k + 1], '',
       (ARRAY['bench-pay:','bench-fee:','usage:bench:'])[k + 1] || $8::text || ':' || lpad(g::text, 7, '0'),
       'scale-bench', $4::timestamptz + k * interval '1 hour'
FROM generate_series($1::bigint, $2::bigint - 1) g, generate_series(0, 2) k
ORDER BY k, g"""

PAYMENTS_SQL = f"""
INSERT INTO payments(account_id, amount, method, operator, created_at, ledger_id)
SELECT g + 1, $4 + (1 + {SIGN}) * {USAGE}, 'bank', 'scale-bench', $5, $3::bigint + g + 1
FROM generate_series($1::bigint, $2::bigint - 1) g"""

COUNTERS_SQL = """
INSERT INTO usage_counters(account_id, service_id, class_id, range_id, period_start, quantity, charged, updated_at)
SELECT g + 1, $3, $4, 0, $5, 10000 * (g % 97 + 1), 1000 * (g % 97 + 1), $5
FROM generate_series($1::bigint, $2::bigint - 1) g"""

DAILY_SQL = """
INSERT INTO usage_daily(account_id, class_id, day, quantity, amount)
SELECT g + 1, $3, $4, 300 * (g % 97 + 1), 30 * (g % 97 + 1)
FROM generate_series($1::bigint, $2::bigint - 1) g"""


BLOCKS_SQL = f"""
INSERT INTO blocks(account_id, kind, reason, set_at, set_by)
SELECT g + 1, 'admin', 'scale-bench', $3, 'scale-bench'
FROM generate_series($1::bigint, $2::bigint - 1) g WHERE g % {BLOCKED_EVERY} = 1"""

# open sessions on the bench NAS, one per online subscriber, at its static address
SESSIONS_SQL = f"""
INSERT INTO radius_sessions(nas_id, session_id, account_id, link_id, login, framed_ip, started_at, updated_at)
SELECT $3, 'bench-' || g, g + 1, g + 1, 'sub' || lpad(g::text, 6, '0'),
       ('10.' || (g >> 16) || '.' || ((g >> 8) & 255) || '.' || (g & 255))::inet,
       $4::timestamptz - (g % 600) * interval '1 minute', $4
FROM generate_series($1::bigint, $2::bigint - 1) g WHERE g % {ONLINE_EVERY} = 2"""


async def chunked(conn: asyncpg.Connection, what: str, sql: str, n: int, *args: Any,
                  chunk: int = CHUNK, total: list[float] | None = None) -> None:
    """Run ``sql`` over [0, n) in chunks, printing progress about every 2 s."""
    t0 = last = time.perf_counter()
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        await conn.execute(sql, lo, hi, *args)
        now = time.perf_counter()
        if now - last >= 2.0 or hi == n:
            last = now
            log(f"  build: {what} {hi:,}/{n:,} ({now - t0:.1f} s)")


async def count(conn: asyncpg.Connection, table: str) -> int:
    return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))


async def catalogue(conn: asyncpg.Connection) -> tuple[int, int, int, int, int]:
    """The traffic class, the monthly and traffic services and the tariffs 'home' and 'business' (made once)."""
    internet = await conn.fetchval("SELECT id FROM traffic_classes WHERE name = 'internet'")
    if internet is not None:
        business = await conn.fetchval("SELECT id FROM tariffs WHERE name = 'business'")
        if business is None:   # a database built before 'business' existed
            business = await conn.fetchval("INSERT INTO tariffs(name) VALUES ('business') RETURNING id")
            await conn.execute("INSERT INTO tariff_services SELECT $1, service_id FROM tariff_services t"
                               " JOIN tariffs f ON f.id = t.tariff_id WHERE f.name = 'home'", business)
        return (internet, await conn.fetchval("SELECT id FROM services WHERE name = 'monthly'"),
                await conn.fetchval("SELECT id FROM services WHERE name = 'traffic'"),
                await conn.fetchval("SELECT id FROM tariffs WHERE name = 'home'"), business)
    internet = await conn.fetchval("INSERT INTO traffic_classes(name) VALUES ('internet') RETURNING id")
    await conn.execute("INSERT INTO traffic_class_rules(class_id, remote_net) VALUES ($1, '0.0.0.0/0')", internet)
    fee_service = await conn.fetchval(
        "INSERT INTO services(name, kind, fee, period_kind, period_anchor, charge_mode)"
        " VALUES ('monthly', 'periodic', $1, 'monthly', '2000-01-01', 'start') RETURNING id", FEE)
    traffic = await conn.fetchval("INSERT INTO services(name, kind) VALUES ('traffic', 'traffic') RETURNING id")
    await conn.execute("INSERT INTO service_rates(service_id, class_id, unit_size, tier_starts, tier_prices)"
                       " VALUES ($1, $2, 1000000, '{0}', $3)", traffic, internet, [PER_MB])
    tariff = await conn.fetchval("INSERT INTO tariffs(name) VALUES ('home') RETURNING id")
    business = await conn.fetchval("INSERT INTO tariffs(name) VALUES ('business') RETURNING id")
    await conn.execute("INSERT INTO tariff_services VALUES ($1, $3), ($1, $4), ($2, $3), ($2, $4)",
                       tariff, business, fee_service, traffic)
    return internet, fee_service, traffic, tariff, business


async def build(dsn: str, args: argparse.Namespace, key: bytes, now: dt.datetime) -> dict[str, float]:
    """Create the database; returns seconds per stage."""
    from billcore.db.migrate import migrate
    from billcore.radius.secrets import SecretStore
    from radius_auth import login, password
    from urfa.scram import make_verifier

    n, months = args.subscribers, args.months
    nbind = min(n, args.bindings if args.bindings is not None else n)
    first = month_start(now, months)
    stages: dict[str, float] = {}
    conn = await asyncpg.connect(dsn)
    try:
        t = time.perf_counter()
        await migrate(conn)
        # foreign keys are right by construction here; checking 100M of them costs the build hours
        await conn.execute("SET session_replication_role = replica")
        await conn.execute("SET maintenance_work_mem = '512MB'")
        # the search index is built once after the load (a bulk GIN build),
        # not row by row: 10x faster
        if await count(conn, "users") < n:
            search_index = await conn.fetchval("SELECT pg_get_indexdef('users_search_grams'::regclass)")
            await conn.execute("DROP INDEX users_search_grams")
        internet, fee_service, traffic, tariff, business = await catalogue(conn)
        v = make_verifier("bench-user-pw")
        if await count(conn, "users") < n:
            await chunked(conn, "users", USERS_SQL, n, v.salt, v.iterations, v.stored_key, v.server_key, first)
            log("  build: the users' search index")
            await conn.execute(search_index)
        if await count(conn, "accounts") < n:
            await chunked(conn, "accounts", ACCOUNTS_SQL, n, months, first)
        if await count(conn, "account_tariffs") < n:
            await chunked(conn, "tariff links", TARIFFS_SQL, n, tariff, first, business)
        stages["users, accounts, tariff links"] = time.perf_counter() - t

        t = time.perf_counter()
        if await count(conn, "ip_bindings") < nbind:
            await chunked(conn, "ip bindings", BINDINGS_SQL, nbind, first)
        stages["ip bindings"] = time.perf_counter() - t

        t = time.perf_counter()
        store = SecretStore(key)
        if await count(conn, "radius_links") < n:
            await conn.execute("INSERT INTO radius_nas(name, address, secret_enc, require_message_authenticator)"
                               " VALUES ('bench', '127.0.0.1', $1, true)", store.seal(NAS_SECRET))
            t0 = last = time.perf_counter()
            for lo in range(0, n, CHUNK):
                hi = min(n, lo + CHUNK)
                await conn.copy_records_to_table(
                    "radius_links", columns=["id", "account_id", "login", "password_enc", "interim_interval"],
                    records=[(i + 1, i + 1, login(i), store.seal(password(i).encode()), 300) for i in range(lo, hi)])
                if time.perf_counter() - last >= 2.0 or hi == n:
                    last = time.perf_counter()
                    log(f"  build: radius logins {hi:,}/{n:,} ({last - t0:.1f} s)")
        stages["radius logins"] = time.perf_counter() - t

        t = time.perf_counter()
        # what the console's filters find: blocked, online (see *_EVERY)
        if not await count(conn, "blocks"):
            await chunked(conn, "blocks", BLOCKS_SQL, n, first)
        if not await count(conn, "radius_sessions"):
            nas = await conn.fetchval("SELECT id FROM radius_nas WHERE name = 'bench'")
            await chunked(conn, "open RADIUS sessions", SESSIONS_SQL, n, nas, now)
        stages["blocks, open sessions"] = time.perf_counter() - t

        t = time.perf_counter()
        for m in range(months):
            start = month_start(now, months - m)
            base = 3 * n * m
            if await conn.fetchval("SELECT count(*) FROM ledger WHERE idem_key = $1", f"bench-pay:{start:%Y%m}:0000000"):
                continue  # a resumed build: this month is in
            log(f"  build: ledger month {m + 1}/{months} ({start:%Y-%m})")
            # the ledger chunks take the 3 kinds of row together: fewer rows per chunk
            await chunked(conn, f"ledger {start:%Y-%m}", LEDGER_SQL, n, base, start, n, FEE, m,
                          f"{start:%Y%m}", chunk=CHUNK // 2)
            await chunked(conn, f"payments {start:%Y-%m}", PAYMENTS_SQL, n, base, FEE, start)
            await chunked(conn, f"usage counters {start:%Y-%m}", COUNTERS_SQL, n, traffic, internet, start)
        await conn.execute("SELECT setval('ledger_id_seq', $1)", max(1, 3 * n * months))
        # a build resumed with other --months: the balances follow the ledger
        balance = (f"$1::bigint * (CASE WHEN (id - 1) % {DEBTOR_EVERY} = 0 THEN -1 ELSE 1 END)"
                   " * (1000 * ((id - 1) % 97 + 1))")
        await conn.execute(f"UPDATE accounts SET balance = {balance} WHERE balance <> {balance}", months)
        stages["ledger, payments, counters"] = time.perf_counter() - t

        t = time.perf_counter()
        for d in range(args.usage_days):
            day = (now - dt.timedelta(days=args.usage_days - d)).date()
            if await conn.fetchval("SELECT count(*) FROM usage_daily WHERE account_id = 1 AND day = $1", day):
                continue
            await chunked(conn, f"usage day {d + 1}/{args.usage_days} {day}", DAILY_SQL, n, internet, day)
        stages["daily usage"] = time.perf_counter() - t

        t = time.perf_counter()
        for seq, table in (("users_id_seq", "users"), ("accounts_id_seq", "accounts"),
                           ("radius_links_id_seq", "radius_links")):
            await conn.execute(f"SELECT setval('{seq}', (SELECT coalesce(max(id), 1) FROM {table}))")
        await conn.execute("RESET session_replication_role")
        log("  build: VACUUM ANALYZE (statistics and visibility maps, as autovacuum would leave them)")
        await conn.execute("VACUUM ANALYZE")
        stages["vacuum analyze"] = time.perf_counter() - t
        sizes = await conn.fetch(
            "SELECT relname, n_live_tup, pg_total_relation_size(relid) AS bytes FROM pg_stat_user_tables"
            " ORDER BY pg_total_relation_size(relid) DESC LIMIT 8")
        for r in sizes:
            log(f"  {r['relname']:>20}: {r['n_live_tup']:>13,} rows {r['bytes'] / 2**20:>9,.0f} MiB")
        stages["database MiB"] = await conn.fetchval("SELECT pg_database_size(current_database())") / 2**20
    finally:
        await conn.close()
    return stages


# -- steps ---------------------------------------------------------------------------


class Steps:
    """Runs each measurement with a deadline; a failure is recorded, not raised."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.results: dict[str, Any] = {}
        self.failures: list[str] = []

    async def run(self, name: str, fn: Callable[[], Awaitable[dict[str, Any]]], timeout: float | None = None) -> None:
        log(f"-- {name}")
        t = time.perf_counter()
        try:
            out = await asyncio.wait_for(fn(), timeout or self.timeout)
        except (asyncio.TimeoutError, TimeoutError) as exc:
            # an inner limit (one command's) says which; the step's own says nothing
            out = {"error": str(exc) or f"timed out after {timeout or self.timeout:.0f} s"}
        except Exception as exc:  # a benchmark reports every failure and goes on to the next step
            out = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        out.setdefault("seconds", round(time.perf_counter() - t, 3))
        self.results[name] = out
        if "error" in out:
            self.failures.append(name)
            log(f"   FAILED: {out['error']}")
        else:
            log("   " + ", ".join(f"{k}={v}" for k, v in out.items() if not isinstance(v, (dict, list))))


async def cli(config: Path, *argv: str, timeout: float) -> tuple[int, str, float]:
    """Run ``billcore -c config ARGV``; (exit status, output, seconds)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("BILLCORE_CONFIG", None)
    t = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "billcore.cli", "-c", str(config), *argv, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except (asyncio.TimeoutError, TimeoutError):
        proc.kill()
        await proc.wait()
        raise TimeoutError(f"billcore {' '.join(argv)} did not finish in {timeout:.0f} s") from None
    return proc.returncode or 0, out.decode(errors="replace"), time.perf_counter() - t


async def step_verify(config: Path, timeout: float) -> dict[str, Any]:
    rc, out, seconds = await cli(config, "verify", timeout=timeout)
    if rc != 0:
        raise RuntimeError(f"billcore verify exit {rc}: {out[-1500:]}")
    return {"seconds": round(seconds, 2), "output": out.strip().splitlines()[-1:]}


async def step_search(dsn: str, n: int) -> dict[str, Any]:
    from billcore.billing.accounts import search_query, search_users

    conn = await asyncpg.connect(dsn)
    try:
        # parts of logins spread over the range: 5 digits match ~10 users, 4 digits ~100
        picks = [(n * k) // 7 + 3 for k in range(1, 7)]
        texts = [f"{i:06d}"[1:6] for i in picks] + [f"{i:06d}"[2:6] for i in picks]
        await search_users(conn, texts[0])
        times, totals = [], []
        for text in texts:
            t = time.perf_counter()
            found = await search_users(conn, text, limit=50)
            times.append((time.perf_counter() - t) * 1000)
            totals.append(found["total"])
            if not found["users"]:
                raise RuntimeError(f"searching {text!r} found nobody")
        where, params = search_query(texts[0], False, None)
        plan = [r[0] for r in await conn.fetch(f"EXPLAIN SELECT id FROM users WHERE {where} ORDER BY id LIMIT 50",
                                              *params)]
        if any("Seq Scan" in line for line in plan):
            raise RuntimeError("the search scans every user:\n" + "\n".join(plan))
        return {"median_ms": round(statistics.median(times), 1), "max_ms": round(max(times), 1),
                "texts": texts, "ms": [round(x, 1) for x in times], "totals": totals,
                "plan": plan[:8]}
    finally:
        await conn.close()


def subscriber_filters(n: int, tariffs: dict[str, int]) -> dict[str, Callable[[random.Random], dict[str, Any]]]:
    """The subscriber list's filter combinations, each drawing one search (what the build made: names
    cycle over 10 first names, 4 % debtors, 3 % blocked, 5 % online, 2 % on 'business')."""
    def some(rng: random.Random) -> int:
        return rng.randrange(n)

    def narrow(rng: random.Random) -> dict[str, Any]:   # the debts of 1..97 thousandths: a 2-step slice
        low = -1000 * rng.randrange(2, 98)
        return {"balance_min": low, "balance_max": low + 1000}

    names = ["ivan", "olga", "smirnov", "petr", "elena", "volkova"]
    return {
        "no filter": lambda rng: {},
        "text: 5 digits of a login": lambda rng: {"text": f"{some(rng):06d}"[1:]},
        "text: a first or last name": lambda rng: {"text": rng.choice(names)},
        "text: a contract number": lambda rng: {"text": f"C-{some(rng):07d}"},
        "text: an account id": lambda rng: {"text": str(some(rng) + 1)},
        "text: an IP address": lambda rng: {"text": "10.{}.{}.{}".format(*(lambda i: (i >> 16, (i >> 8) & 255,
                                                                                      i & 255))(some(rng)))},
        "tariff (2 % on it)": lambda rng: {"tariff_id": tariffs["business"]},
        "tariff (98 % on it)": lambda rng: {"tariff_id": tariffs["home"]},
        "blocked": lambda rng: {"blocked": True},
        "not blocked": lambda rng: {"blocked": False},
        "online": lambda rng: {"online": True},
        "offline": lambda rng: {"online": False},
        "debtors": lambda rng: {"debtors": True},
        "balance range (narrow)": narrow,
        "balance range (wide)": lambda rng: {"balance_min": 0, "balance_max": 50_000},
        "blocked + online": lambda rng: {"blocked": True, "online": True},
        "debtors + online (none match)": lambda rng: {"debtors": True, "online": True},
        "tariff 2 % + online (none match)": lambda rng: {"tariff_id": tariffs["business"], "online": True},
        "tariff 98 % + blocked + debtors": lambda rng: {"tariff_id": tariffs["home"], "blocked": True,
                                                        "debtors": True},
        "name + debtors + offline": lambda rng: {"text": rng.choice(names), "debtors": True, "online": False},
        "name + tariff 2 % + not blocked + range": lambda rng: {"text": rng.choice(names), "tariff_id":
                                                                tariffs["business"], "blocked": False,
                                                                **narrow(rng)},
    }


async def step_subscribers(dsn: str, n: int, per_filter: int) -> dict[str, Any]:
    """subscribers.search's query (the first 1,001 matches, the page, its rows), ``per_filter`` random
    searches of each filter combination (a page of 50, mostly the first, some further on): p50/p95/max
    in ms, and the plans PostgreSQL ran for the slowest (EXPLAIN ANALYZE)."""
    from billcore.billing.subscribers import (
        MAX_COUNTED, SubscriberFilter, page_statement, plan_query, planned, search_subscribers,
    )

    conn = await asyncpg.connect(dsn)
    try:
        tariffs = {row["name"]: row["id"] for row in await conn.fetch("SELECT id, name FROM tariffs")}
        now = dt.datetime.now(UTC)
        rng = random.Random(16)
        out: dict[str, Any] = {}
        for name, draw in subscriber_filters(n, tariffs).items():
            times: list[float] = []
            totals: list[int] = []
            slowest: tuple[float, dict[str, Any], int] = (0.0, {}, 0)
            for k in range(per_filter):
                wanted, offset = draw(rng), rng.choice((0, 0, 0, 50, 250))
                t = time.perf_counter()
                found = await search_subscribers(conn, SubscriberFilter.of(wanted), now, limit=50, offset=offset)
                ms = (time.perf_counter() - t) * 1000
                times.append(ms)
                totals.append(found["total"])
                if ms > slowest[0]:
                    slowest = (ms, wanted, offset)
            times.sort()
            plans = {}
            async with conn.transaction():
                query = await plan_query(conn, SubscriberFilter.of(slowest[1]), now)
                async with planned(conn):
                    for what, (sql, sql_args) in (
                            ("first matches", page_statement(query, limit=MAX_COUNTED + 1)),
                            ("page", page_statement(query, limit=50, offset=slowest[2]))):
                        plans[what] = [row[0] for row in await conn.fetch(f"EXPLAIN (ANALYZE) {sql}", *sql_args)]
            out[name] = {"starts_from": query.driver, "p50_ms": round(times[len(times) // 2], 1), "p95_ms": round(times[int(len(times) * .95)], 1),
                         "max_ms": round(times[-1], 1), "searches": per_filter,
                         "total_median": sorted(totals)[len(totals) // 2], "slowest": slowest[1], "plans": plans}
            log(f"   {name:<42} p50 {out[name]['p50_ms']:>7.1f} ms  p95 {out[name]['p95_ms']:>7.1f} ms"
                f"  max {out[name]['max_ms']:>7.1f} ms  total~{out[name]['total_median']} ({query.driver})")
        worst = max(out.values(), key=lambda figures: figures["p95_ms"])
        return {"filters": out, "worst_p95_ms": worst["p95_ms"]}
    finally:
        await conn.close()


def rss_by_process(root_pid: int) -> dict[str, int]:
    """Resident KiB of a process tree, by name (``name pid``)."""
    out: dict[str, int] = {}
    pending = [root_pid]
    seen = set()
    while pending:
        pid = pending.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        rss = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        role = next((c.decode() for c in cmd if c.startswith(b"--role") or c in (b"core", b"radius", b"netflow")), "")
        out[f"{Path(cmd[0].decode() or '?').name} {role} {pid}".replace("  ", " ")] = rss
        pending.extend(int(c) for c in children)
    return out


def postgres_rss(pgdata: Path) -> dict[str, int]:
    """Resident KiB of the embedded PostgreSQL's processes (postmaster and children)."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return {}
    return rss_by_process(pid)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def first_flow_charged(dsn: str, flow_port: int, account: int, started: float,
                             timeout: float) -> dict[str, Any]:
    """Send v5 flows from ``account``'s address until its counters move; seconds since ``started``."""
    from netflow.exporter import ExportClock, FlowSpec, build_v5

    i = account - 1
    ip = f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}"
    conn = await asyncpg.connect(dsn)
    try:
        before = await conn.fetchval("SELECT coalesce(sum(quantity), 0) FROM usage_counters WHERE account_id = $1",
                                     account)
        deadline = time.monotonic() + timeout
        sent = 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            while time.monotonic() < deadline:
                now_ms = int(time.time() * 1000)
                flow = FlowSpec(ip, "198.51.100.7", 50000, 443, 6, 1_000_000, 700, now_ms - 200, now_ms - 100)
                for p in build_v5([flow], ExportClock(now_ms - 3_600_000, now_ms)):
                    s.sendto(p, ("127.0.0.1", flow_port))
                sent += 1
                await asyncio.sleep(0.5)
                after = await conn.fetchval(
                    "SELECT coalesce(sum(quantity), 0) FROM usage_counters WHERE account_id = $1", account)
                if after > before:
                    return {"seconds": round(time.perf_counter() - started, 2), "packets_sent": sent,
                            "bytes_charged": int(after - before)}
        raise TimeoutError(f"no flow charged {timeout:.0f} s after start ({sent} packets sent from {ip}):"
                           " the NetFlow worker never classified the address (classifier snapshot not loaded?)")
    finally:
        await conn.close()


async def account_card(port: int, n: int) -> dict[str, Any]:
    from urfa.client import connect

    admin = await connect("127.0.0.1", port)
    try:
        await admin.login("admin", *ADMIN)
        times = []
        for k in range(1, 21):
            account = (n * k) // 21 + 1
            t = time.perf_counter()
            user = await admin.call("users.get", {"user_id": account})
            view = await admin.call("accounts.get", {"account_id": user["accounts"][0]["id"]})
            await admin.call("accounts.history", {"account_id": view["id"], "limit": 20})
            times.append((time.perf_counter() - t) * 1000)
        return {"median_ms": round(statistics.median(times), 1), "max_ms": round(max(times), 1)}
    finally:
        await admin.close()


def radius_rate(port: int, n: int, seconds: float) -> dict[str, Any]:
    """PAP Access-Accepts/s with radius_auth.py's loader (one NAS address: the one registered above)."""
    import radius_auth

    load = argparse.Namespace(senders=2, inflight=256, users=n, ports=32, nas=1)
    none: Callable[[], dict[str, float]] = dict
    radius_auth.measure("pap", port, argparse.Namespace(**{**vars(load), "senders": 1, "inflight": 128}),
                        0.5, 20_000, none)  # warm-up
    r = radius_auth.measure("pap", port, load, seconds, 30_000, none)
    return {"access_accept_per_s": round(r["per_s"]), "accepts": r["answers"],
            "not_accepted": r["not_accept"], "lost": r["lost"]}


async def serve_steps(steps: Steps, work: Path, dsn: str, args: argparse.Namespace) -> None:
    """Start ``billcore serve`` (NetFlow + RADIUS on) and measure what needs it running."""
    from billcore.server.principals import create_admin
    from tests.running import BillcoreProcess

    n = args.subscribers
    conn = await asyncpg.connect(dsn)
    try:
        if not await conn.fetchval("SELECT count(*) FROM admins WHERE login = $1", ADMIN[0]):
            await create_admin(conn, ADMIN[0], ADMIN[1], ["superusers"])
    finally:
        await conn.close()
    flow_port, auth_port = free_udp_port(), free_udp_port()
    bc = BillcoreProcess(
        work, dsn="", core={"data_dir": str(work / "var")},
        # the monthly run is measured on its own (step 4); left on, the
        # scheduler would charge N accounts during the start-up measurement
        periodic={"enabled": False},
        radius={"enabled": True, "host": "127.0.0.1", "auth_port": auth_port, "acct_port": free_udp_port(),
                "max_inflight": 4096},
        netflow={"enabled": True, "host": "127.0.0.1", "port": flow_port, "workers": 1,
                 "fsync_interval": 0.05, "ship_interval": 0.2})
    started = time.perf_counter()
    bc.start()
    assert bc.proc is not None
    try:
        async def core_up() -> dict[str, Any]:
            for _ in range(600):
                if "core connected" in bc.log() and 'msg="NAS table loaded"' in bc.log():
                    return {"seconds_since_start": round(time.perf_counter() - started, 2)}
                if bc.proc is not None and bc.proc.poll() is not None:
                    raise RuntimeError(f"billcore serve exited: {bc.log()[-2000:]}")
                await asyncio.sleep(0.5)
            raise TimeoutError("the RADIUS process did not load its NAS table")

        await steps.run("RADIUS connected to the core, NAS table loaded", core_up,
                        timeout=args.startup_timeout + 30)
        account = n // 2 + 1 if args.bindings is None or args.bindings > n // 2 else 1
        await steps.run("start-up until the first flow is charged",
                        lambda: first_flow_charged(dsn, flow_port, account, started, args.startup_timeout),
                        timeout=args.startup_timeout + 30)
        failed = steps.results["start-up until the first flow is charged"]
        if "error" in failed:  # say why: the NetFlow worker's or the core's last complaint
            why = [line for line in bc.log().splitlines() if "level=error" in line and "netflow" in line]
            if why:  # the core's side (why it refused) and the worker's
                failed["error"] += "; last NetFlow errors: " + " | ".join(w[-250:] for w in why[-2:])

        await steps.run("account card over URFA", lambda: account_card(bc.urfa_port, n))
        await steps.run("RADIUS Access-Request rate",
                        lambda: asyncio.to_thread(radius_rate, auth_port, n, args.radius_seconds),
                        timeout=args.radius_seconds + 300)
        rss = rss_by_process(bc.proc.pid)
        pg = postgres_rss(work / "var" / "pg")
        steps.results["resident memory KiB"] = {"billcore": rss, "postgresql": pg,
                                                "billcore_total": sum(rss.values()),
                                                "postgresql_total": sum(pg.values())}
        log(f"   resident memory: billcore {sum(rss.values()) / 1024:,.0f} MiB "
            f"({', '.join(f'{k}: {v / 1024:,.0f}' for k, v in rss.items())}); "
            f"PostgreSQL {sum(pg.values()) / 1024:,.0f} MiB over {len(pg)} processes (shared buffers counted per process)")
    finally:
        bc.stop(timeout=60)


async def monthly_run(dsn: str, n: int) -> dict[str, Any]:
    from billcore.billing.scheduler import RunProgress, run_due

    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=3)
    last = [0.0]

    def progress(p: RunProgress) -> None:
        if time.perf_counter() - last[0] >= 2.0 or p.accounts_done == p.accounts_total:
            last[0] = time.perf_counter()
            log(f"   monthly run: {p.accounts_done:,}/{p.accounts_total:,} accounts, {p.charges:,} charges")

    try:
        t = time.perf_counter()
        result = await run_due(pool, dt.datetime.now(UTC), batch_size=10_000, workers=2, progress=progress)
        seconds = time.perf_counter() - t
    finally:
        await pool.close()
    if result.charges == n:
        return {"seconds": round(seconds, 2), "charges": result.charges, "accounts_per_s": round(n / seconds)}
    # A reused --workdir: an earlier run charged this period already, and this run is the pass a
    # restarted run makes (every account checked, nothing booked twice). Report it as that.
    conn = await asyncpg.connect(dsn)
    try:
        charged = await conn.fetchval(
            "SELECT count(DISTINCT p.account_id) FROM periodic_charges p JOIN services s ON s.id = p.service_id"
            " WHERE s.name = 'monthly' AND p.period_start <= now() AND p.period_end > now()")
    finally:
        await conn.close()
    if charged != n:
        raise RuntimeError(f"the monthly run booked {result.charges} charges for {n} accounts "
                           f"({charged} charged for this period before)")
    return {"seconds": round(seconds, 2), "charges": result.charges, "already_charged": charged - result.charges,
            "accounts_per_s": round(n / seconds),
            "pass": "re-run: this period was charged by an earlier run on this database"}


async def backup_restore(config: Path, work: Path, server_dsn: str, timeout: float) -> dict[str, Any]:
    out = work / "scale-backup.tar"
    rc, text, backup_s = await cli(config, "backup", "--out", str(out), timeout=timeout)
    if rc != 0:
        raise RuntimeError(f"billcore backup exit {rc}: {text[-1500:]}")
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute("DROP DATABASE IF EXISTS scale_restore")
        await conn.execute("CREATE DATABASE scale_restore")
    finally:
        await conn.close()
    restore_config = work / "restore.toml"
    restore_config.write_text(config.read_text().replace('dsn = ""', f'dsn = "{dsn_for(server_dsn, "scale_restore")}"'))
    # a restore rebuilds every index (the bindings' GiST exclusion index is most of it: 7-9 min at a
    # million bindings), so it gets twice a step's time
    rc, text, restore_s = await cli(restore_config, "restore", str(out), timeout=2 * timeout)
    if rc != 0:
        raise RuntimeError(f"billcore restore exit {rc}: {text[-1500:]}")
    size = out.stat().st_size
    out.unlink()
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute("DROP DATABASE scale_restore")
    finally:
        await conn.close()
    return {"backup_s": round(backup_s, 2), "restore_s": round(restore_s, 2), "backup_MiB": round(size / 2**20, 1),
            "seconds": round(backup_s + restore_s, 2)}


# -- main ------------------------------------------------------------------------------


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from billcore.db.embedded import EmbeddedPostgres
    from billcore.radius.secrets import SecretStore
    from tests.running import BillcoreProcess

    steps = Steps(args.step_timeout)
    # the config ``billcore serve``/``verify``/``backup`` read: embedded PostgreSQL in work/var/pg
    config = BillcoreProcess(work, dsn="", core={"data_dir": str(work / "var")}).config_path
    (work / "var").mkdir(parents=True, exist_ok=True)
    key = SecretStore.load_or_create_key(work / "var" / "secret.key")
    pg = EmbeddedPostgres(work / "var")
    dsn = await asyncio.to_thread(pg.start)
    try:
        now = dt.datetime.now(UTC)
        conn = await asyncpg.connect(dsn)
        # complete when the build's last step (statistics) ran: else build, or resume
        built = (await conn.fetchval("SELECT to_regclass('public.users') IS NOT NULL")
                 and await conn.fetchval("SELECT last_analyze IS NOT NULL FROM pg_stat_user_tables"
                                         " WHERE relname = 'usage_daily'"))
        await conn.close()
        if built:
            log(f"reusing the database in {work}")
        else:
            log(f"building {args.subscribers:,} subscribers, {args.months} months of ledger,"
                f" {args.usage_days} days of daily usage in {work} ...")
            t = time.perf_counter()
            stages = await build(dsn, args, key, now)
            steps.results["build"] = {"seconds": round(time.perf_counter() - t, 1),
                                      **{k: round(v, 1) for k, v in stages.items()}}
            log(f"   built in {steps.results['build']['seconds']} s")
        conn = await asyncpg.connect(dsn)
        counts = {t: await conn.fetchval(f"SELECT count(*) FROM {t}")
                  for t in ("users", "ip_bindings", "radius_links", "ledger", "usage_daily")}
        await conn.close()
        steps.results["rows"] = counts
        log(f"   rows: {counts}")
        if args.build_only:
            return {"failures": steps.failures, **steps.results}
        wanted = set(args.steps.split(","))
        if "verify" in wanted:
            await steps.run("billcore verify", lambda: step_verify(config, args.step_timeout))
        if "search" in wanted:
            await steps.run("search by part of a login", lambda: step_search(dsn, args.subscribers))
        if "subscribers" in wanted:
            await steps.run("subscriber list filters", lambda: step_subscribers(dsn, args.subscribers, args.searches),
                            timeout=3 * args.step_timeout)
        if "serve" in wanted:
            await serve_steps(steps, work, dsn, args)
        if "monthly" in wanted:
            await steps.run("monthly periodic run", lambda: monthly_run(dsn, args.subscribers))
        if "backup" in wanted:
            await steps.run("backup and restore", lambda: backup_restore(config, work, dsn, args.step_timeout),
                            timeout=3 * args.step_timeout + 60)
    finally:
        await asyncio.to_thread(pg.stop)
    return {"failures": steps.failures, **steps.results}


STEPS = ("verify", "search", "subscribers", "serve", "monthly", "backup")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subscribers", type=int, default=1_000_000)
    ap.add_argument("--bindings", type=int, default=None, help="static IP bindings (default: one per subscriber)")
    ap.add_argument("--months", type=int, default=12, help="months of ledger history (3 rows per account a month)")
    ap.add_argument("--usage-days", type=int, default=365, help="days of usage_daily rows (one per account a day)")
    ap.add_argument("--step-timeout", type=float, default=600.0, help="seconds any one step may take")
    ap.add_argument("--startup-timeout", type=float, default=300.0,
                    help="seconds from `billcore serve` to the first charged flow")
    ap.add_argument("--radius-seconds", type=float, default=8.0)
    ap.add_argument("--workdir", help="keep the database here (reused when it is already built)")
    ap.add_argument("--build-only", action="store_true", help="stop after the build (with --workdir, to measure later)")
    ap.add_argument("--steps", default=",".join(STEPS),
                    help=f"the measurements to run, comma-separated (default all: {','.join(STEPS)})")
    ap.add_argument("--searches", type=int, default=300,
                    help="random searches per filter combination of the subscriber list")
    ap.add_argument("--tiny", action="store_true", help="CI: 50,000 subscribers, 2 months, 2 days; no results written")
    ap.add_argument("--note", default="", help="what this run measured (kept in the results)")
    args = ap.parse_args()
    if args.tiny:
        args.subscribers, args.months, args.usage_days = 50_000, 2, 2
        args.step_timeout, args.startup_timeout, args.radius_seconds = 240.0, 120.0, 2.0
        args.searches = 20
    if set(args.steps.split(",")) - set(STEPS):
        ap.error(f"--steps: known steps are {','.join(STEPS)}")
    info = machine()
    log(f"machine: {info['cpu']}, {info['nproc']} CPUs, load average {info['loadavg']}")
    if args.workdir:
        work = Path(args.workdir).absolute()
        work.mkdir(parents=True, exist_ok=True)
        temporary = False
    else:
        work = Path(tempfile.mkdtemp(prefix="billcore-scale-"))
        temporary = True
    t = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = asyncio.run(run(args, work))
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    report = {"benchmark": "scale", "subscribers": args.subscribers, "months": args.months,
              "usage_days": args.usage_days, "note": args.note, "machine": info,
              "loadavg_after": [round(x, 2) for x in os.getloadavg()],
              "total_seconds": round(time.perf_counter() - t, 1), **report}
    print_table(report)
    if not args.tiny and not args.build_only and set(args.steps.split(",")) == set(STEPS):
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "scale.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (RESULTS / "scale.md").write_text(markdown(report))
    elif not args.tiny and not args.build_only and not temporary:   # some steps: beside the database
        (work / f"scale-{args.steps.replace(',', '-')}.json").write_text(
            json.dumps(report, indent=2, default=str) + "\n")
    if report["failures"]:
        log(f"FAILED: {', '.join(report['failures'])}")
        return 1
    return 0


def rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    def get(step: str, key: str, fmt: str) -> str:
        r = report.get(step, {})
        if "error" in r:
            return "FAILED: " + r["error"]
        return fmt.format(r[key]) if key in r else "—"

    mem = report.get("resident memory KiB", {})
    out = [("build (set-based SQL + COPY)", get("build", "seconds", "{:,.0f} s")),
           ("database size", get("build", "database MiB", "{:,.0f} MiB")),
           ("`billcore verify`", get("billcore verify", "seconds", "{:.1f} s")),
           ("search by part of a login (median)", get("search by part of a login", "median_ms", "{:.1f} ms")),
           ("subscriber list, worst filter combination (p95 of a page of 50)",
            get("subscriber list filters", "worst_p95_ms", "{:.1f} ms")),
           ("`billcore serve` start until RADIUS is connected to the core",
            get("RADIUS connected to the core, NAS table loaded", "seconds_since_start", "{:.1f} s")),
           ("`billcore serve` start until the first flow is charged",
            get("start-up until the first flow is charged", "seconds", "{:.1f} s")),
           ("account card over URFA (median)", get("account card over URFA", "median_ms", "{:.1f} ms")),
           ("RADIUS Access-Accept/s", get("RADIUS Access-Request rate", "access_accept_per_s", "{:,}")),
           ("monthly periodic run" + (" (a re-run pass: this period was charged before)"
                                      if report.get("monthly periodic run", {}).get("pass") else ""),
            get("monthly periodic run", "seconds", "{:.1f} s")),
           ("`billcore backup`", get("backup and restore", "backup_s", "{:.1f} s")),
           ("`billcore restore`", get("backup and restore", "restore_s", "{:.1f} s")),
           ("backup file", get("backup and restore", "backup_MiB", "{:,.0f} MiB"))]
    if mem:
        out.append(("resident memory, billcore processes", f"{mem['billcore_total'] / 1024:,.0f} MiB"))
        out.append(("resident memory, PostgreSQL processes", f"{mem['postgresql_total'] / 1024:,.0f} MiB"))
    return out


def print_table(report: dict[str, Any]) -> None:
    log(f"\n{report['subscribers']:,} subscribers, rows {report.get('rows')}")
    for what, value in rows(report):
        log(f"  {what:55s} {value}")


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"# scale — {m['date']}", "",
             f"Machine: {m['platform']}, {m['cpu']}, {m['nproc']} CPUs, Python {m['python']}; load average "
             f"{m['loadavg']} before, {report['loadavg_after']} after (a shared machine). {report['note']}", "",
             f"{report['subscribers']:,} subscribers; rows: {report.get('rows')}; {report['months']} months of "
             f"ledger, {report['usage_days']} days of daily usage.", "",
             "| what | cost |", "| --- | ---: |"]
    lines += [f"| {what} | {value} |" for what, value in rows(report)]
    if report["failures"]:
        lines += ["", f"Failed: {', '.join(report['failures'])}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
