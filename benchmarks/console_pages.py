"""The console's search and card pages at ISP scale, side by side with the bare SQL they need.

A real ``billcore serve`` (supervisor, core, console; the embedded
PostgreSQL) over a database of N subscribers built by benchmarks/scale.py
(``--workdir`` reuses one: 1,000,000 subscribers in /work/bigdb). An
operator logs in to the console over HTTP the way the login page's script
does (SCRAM computed on the client side), and the load generator then
asks, one request after the other (no concurrency to hide latency behind),
as a browser would:

* ``/subscribers?…`` — search texts and filters drawn at random from what
  the data holds: a part of a login, a surname, a full name, part of a
  phone number, an e-mail, a contract number, an account id, an IP
  address, an address; alone or with a tariff, debtors, a balance range,
  blocked, online; and filters without text;
* ``/subscribers/{user_id}`` — the card of a random subscriber.

Every response is read to its last byte. The **bare SQL** of a request is
the very statements the core ran for it: each page is requested once with
PostgreSQL's statement log on (``log_min_duration_statement = 0``), the
``execute`` lines of the core's own connections (the PostgreSQL backends at
the far end of the core process's sockets: the database may serve others
meanwhile) and their parameters are read back from the log, and
the benchmark runs them itself on direct asyncpg connections, as prepared
statements with the same parameters (``PREPARE``/``EXECUTE``), each to its
last row. The core may run a page's calls at once on several of its pool
connections, so the statements each of its connections ran are replayed in
their order on a connection of their own, all connections at once: the
least time those queries take (one after the other on one connection is
reported too). So the ratio page/SQL is what the console, URFA and the
core add on top of the database for that page, and is not flattered.

Each measured request and its SQL replay run back to back, in random
order (neither always gets the other's warm cache). The figures: p50 and
p95 of each, and the ratio of the page's to the SQL's. Targets (issue 16):
page p95 ≤ 150 ms and ≤ 3× the SQL's.

    python benchmarks/console_pages.py --workdir /work/bigdb   # the 1M run: results/console_pages.{json,md}
    python benchmarks/console_pages.py --tiny                 # 2,000 subscribers built in a temp dir (CI)
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _machine import machine, publish, tree_commit  # noqa: E402

from billcore.common.money import format_money  # noqa: E402
from tests.process_view import unix_peer_owners  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
OPERATOR = ("bench-console", "bench-console-pw")
TARGET_P95_MS = 150.0
REPLAY_CONNECTIONS = 10           # as many as the core's pool may use at once ([database] pool_max)
TARGET_RATIO = 3.0
FIRST_NAMES = ["Ivan", "Maria", "Olga", "Petr", "Anna", "Sergei", "Elena", "Dmitri", "Irina", "Pavel"]
SURNAMES = ["Smirnov", "Ivanova", "Kuznetsov", "Popova", "Sokolov", "Lebedeva", "Kozlov", "Novikova", "Morozov",
            "Volkova", "Orlov", "Zaitseva"]


def log(msg: str) -> None:
    print(msg, flush=True)


# -- what to ask --------------------------------------------------------------------


def search_texts(n: int, rng: random.Random) -> str:
    """One search text of the kinds an operator types, about subscriber ``i`` of scale.py's data."""
    i = rng.randrange(n)
    kind = rng.choice(["login", "login part", "surname", "full name", "phone", "email", "contract", "account",
                       "ip", "address"])
    if kind == "login":
        return f"sub{i:06d}"
    if kind == "login part":
        return f"sub{i:06d}"[: rng.choice([7, 8])]
    if kind == "surname":
        return rng.choice(SURNAMES)
    if kind == "full name":
        return f"{FIRST_NAMES[i % 10]} {SURNAMES[(i // 10) % 12]}"
    if kind == "phone":
        return f"{(i * 7919) % 1_000_000_000:09d}"[-7:]
    if kind == "email":
        return f"sub{i}@example.net"
    if kind == "contract":
        return f"C-{i:07d}"
    if kind == "account":
        return str(i + 1)
    if kind == "ip":
        return f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}"
    return f"Lenina st. {i % 300 + 1}"


def search_query(n: int, tariff_ids: list[int], balances: list[int], rng: random.Random) -> dict[str, str]:
    """The search page's query string, as its form sends it: a text, filters, or both (a balance
    range around a balance the data holds)."""
    query: dict[str, str] = {}
    shape = rng.random()
    if shape < 0.7:
        query["q"] = search_texts(n, rng)
    if shape >= 0.5:
        filters = rng.sample(["tariff", "debtors", "balance", "blocked", "online"], rng.choice([1, 1, 2]))
        if "tariff" in filters:
            query["tariff"] = str(rng.choice(tariff_ids))
        if "debtors" in filters:
            query["debtors"] = "1"
        if "balance" in filters:
            balance = rng.choice(balances)
            query["balance_min"], query["balance_max"] = format_money(balance - 5_000), format_money(balance + 5_000)
        if "blocked" in filters:
            query["blocked"] = rng.choice(["yes", "no"])
        if "online" in filters:
            query["online"] = "1"
    return query


# -- the statements the core ran, from PostgreSQL's own log ---------------------------

_ENTRY = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? \S+ \[(\d+)\] ", re.M)
_EXECUTE = re.compile(r"LOG:  duration: [\d.]+ ms  (?:execute [^:]+|statement): (.*)", re.S)
_PARAMS = re.compile(r"DETAIL:  parameters: (.*)", re.S)
_PARAM = re.compile(r"\$(\d+) = (NULL|'(?:[^']|'')*')")
# not the page's queries: transaction control, and the reset asyncpg's pool sends when a connection goes back
# not the page's queries: transaction control, the reset asyncpg's pool sends when a connection goes
# back, and asyncpg's one-off type introspection on a connection's first use of a type
_QUIET = ("BEGIN", "COMMIT", "ROLLBACK", "SET ", "RESET ", "SHOW ", "LISTEN", "UNLISTEN", "SELECT PG_NOTIFY",
          "SELECT PG_ADVISORY_UNLOCK_ALL()", "WITH RECURSIVE TYPEINFO_TREE", "SELECT CURRENT_SETTING('JIT')",
          "SELECT SET_CONFIG('JIT'")


@dataclass(frozen=True, slots=True)
class Statement:
    sql: str
    params: tuple[str, ...]         # SQL literals as the log shows them: '42', 'O''Brien', NULL
    backend: str                    # the server process (one of the core's pool connections) that ran it


class StatementLog:
    """Turns the embedded PostgreSQL's statement logging on and reads back what the core executed."""

    def __init__(self, pgdata: Path) -> None:
        self.path = pgdata / "log"

    async def switch(self, conn: asyncpg.Connection, on: bool) -> None:
        if on:
            await conn.execute("ALTER SYSTEM SET log_min_duration_statement = 0")
            await conn.execute("ALTER SYSTEM SET log_parameter_max_length = -1")
        else:
            await conn.execute("ALTER SYSTEM RESET log_min_duration_statement")
            await conn.execute("ALTER SYSTEM RESET log_parameter_max_length")
        await conn.execute("SELECT pg_reload_conf()")

    def mark(self) -> int:
        return self.path.stat().st_size

    def since(self, offset: int, backends: set[int]) -> list[Statement]:
        """What ``backends`` (the core's connections) executed since ``offset`` of the log: the
        database may serve others meanwhile, and their statements are not this page's."""
        with open(self.path, "rb") as file:
            file.seek(offset)
            text = file.read().decode(errors="replace")
        heads = list(_ENTRY.finditer(text))
        found: list[Statement] = []
        waiting: dict[str, int] = {}     # backend pid -> its execute whose parameters come next
        for head, following in zip(heads, heads[1:] + [None]):
            pid = head.group(1)
            body = text[head.end():following.start() if following else len(text)]
            if int(pid) not in backends:
                continue
            executed = _EXECUTE.match(body)
            params = _PARAMS.match(body)
            if executed:
                waiting.pop(pid, None)
                sql = executed.group(1).strip()
                if not " ".join(sql.split()).upper().startswith(_QUIET):
                    waiting[pid] = len(found)
                    found.append(Statement(sql, (), pid))
            elif params and pid in waiting:
                at = waiting.pop(pid)
                values = {int(m.group(1)): m.group(2) for m in _PARAM.finditer(params.group(1))}
                found[at] = Statement(found[at].sql, tuple(values[k] for k in sorted(values)), pid)
            else:
                waiting.pop(pid, None)           # a parse or bind: the next DETAIL is not an execute's
        return found


_PLACEHOLDER = re.compile(r"\$(\d+)")


def preparable(sql: str) -> bool:
    """Whether SQL's PREPARE takes the statement (it takes no EXPLAIN)."""
    return not sql.lstrip().upper().startswith("EXPLAIN")


class BareSql:
    """Runs captured statements on direct connections, prepared once on each, every one to its last row.

    The core may run a page's calls at once on several pool connections; the statements one of its
    connections ran are a sequence, and sequences of different connections may have overlapped. So
    ``run`` replays each connection's sequence on a connection of its own, all at once: the least
    time those queries can take (``run_in_order`` also times them one after the other)."""

    def __init__(self, conns: list[asyncpg.Connection]) -> None:
        self.conns = conns
        self.names: dict[str, str] = {}

    async def prepare(self, statements: list[Statement]) -> None:
        for statement in statements:
            if statement.sql not in self.names and preparable(statement.sql):
                name = f"bench_{len(self.names)}"
                for conn in self.conns:
                    await conn.execute(f"PREPARE {name} AS {statement.sql}")
                self.names[statement.sql] = name

    def _text(self, statement: Statement) -> str:
        if not preparable(statement.sql):       # EXPLAIN (the core's estimates): the values written in
            return _PLACEHOLDER.sub(lambda m: statement.params[int(m.group(1)) - 1], statement.sql)
        args = f"({', '.join(statement.params)})" if statement.params else ""
        return f"EXECUTE {self.names[statement.sql]}{args}"

    async def _sequence(self, conn: asyncpg.Connection, texts: list[str]) -> None:
        for text in texts:
            await conn.fetch(text)

    async def run(self, statements: list[Statement]) -> float:
        """Seconds for every backend's sequence, the sequences at once."""
        sequences: dict[str, list[str]] = {}
        for statement in statements:
            sequences.setdefault(statement.backend, []).append(self._text(statement))
        lanes: list[list[str]] = [[] for _ in self.conns]
        for n, texts in enumerate(sequences.values()):
            lanes[n % len(lanes)].extend(texts)
        t = time.perf_counter()
        await asyncio.gather(*(self._sequence(conn, texts) for conn, texts in zip(self.conns, lanes) if texts))
        return time.perf_counter() - t

    async def run_in_order(self, statements: list[Statement]) -> float:
        """Seconds for all of them one after the other on one connection."""
        texts = [self._text(statement) for statement in statements]
        t = time.perf_counter()
        await self._sequence(self.conns[0], texts)
        return time.perf_counter() - t


# -- the console, as a browser uses it -------------------------------------------------


@dataclass
class Sample:
    path: str
    statements: list[Statement] = field(default_factory=list)


async def timed_get(http: aiohttp.ClientSession, url: str) -> float:
    t = time.perf_counter()
    async with http.get(url, allow_redirects=False) as response:
        await response.read()
        if response.status != 200:
            raise RuntimeError(f"GET {url}: HTTP {response.status}")
    return time.perf_counter() - t


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(http: aiohttp.ClientSession, url: str, sql: BareSql, statement_log: StatementLog,
                  core_pid: int, paths: list[str], warmup: int, rng: random.Random) -> dict[str, Any]:
    """Capture each path's statements, then time page and SQL back to back in random order."""
    samples = [Sample(path) for path in paths]
    await statement_log.switch(sql.conns[0], True)
    try:
        for sample in samples:
            mark = statement_log.mark()
            await timed_get(http, url + sample.path)
            # the core's pool connections now (the pool opens more as it needs them)
            sample.statements = statement_log.since(mark, unix_peer_owners(core_pid))
    finally:
        await statement_log.switch(sql.conns[0], False)
    empty = [s.path for s in samples if not s.statements]
    if empty:
        raise RuntimeError(f"no SQL captured for {len(empty)} pages, e.g. {empty[0]}")
    for sample in samples:
        await sql.prepare(sample.statements)
    for sample in samples[:warmup]:
        await timed_get(http, url + sample.path)
        await sql.run(sample.statements)
    page_ms, sql_ms, in_order_ms = [], [], []
    for sample in samples:
        if rng.random() < 0.5:
            page = await timed_get(http, url + sample.path)
            bare = await sql.run(sample.statements)
        else:
            bare = await sql.run(sample.statements)
            page = await timed_get(http, url + sample.path)
        page_ms.append(page * 1000)
        sql_ms.append(bare * 1000)
        in_order_ms.append(await sql.run_in_order(sample.statements) * 1000)
    p50, p95 = statistics.median(page_ms), percentile(page_ms, 0.95)
    s50, s95 = statistics.median(sql_ms), percentile(sql_ms, 0.95)
    return {"requests": len(samples), "page_p50_ms": round(p50, 1), "page_p95_ms": round(p95, 1),
            "page_max_ms": round(max(page_ms), 1), "sql_p50_ms": round(s50, 2), "sql_p95_ms": round(s95, 2),
            "sql_in_order_p50_ms": round(statistics.median(in_order_ms), 2),
            "sql_in_order_p95_ms": round(percentile(in_order_ms, 0.95), 2),
            "ratio_p50": round(p50 / s50, 2), "ratio_p95": round(p95 / s95, 2),
            "statements_per_page": round(statistics.mean(len(s.statements) for s in samples), 1),
            "connections_per_page": round(statistics.mean(len({st.backend for st in s.statements})
                                                          for s in samples), 1),
            "statements_example": [s.sql[:300] for s in samples[0].statements],
            "slowest": [{"path": samples[i].path, "page_ms": round(page_ms[i], 1), "sql_ms": round(sql_ms[i], 1)}
                        for i in sorted(range(len(samples)), key=lambda i: -page_ms[i])[:8]],
            "meets_target": p95 <= TARGET_P95_MS and p95 / s95 <= TARGET_RATIO}


# -- the run ---------------------------------------------------------------------------------


async def ensure_database(work: Path, n: int) -> None:
    """Build scale.py's database of ``n`` subscribers in ``work`` unless one is there."""
    import scale
    from billcore.db.embedded import EmbeddedPostgres
    from billcore.radius.secrets import SecretStore

    (work / "var").mkdir(parents=True, exist_ok=True)
    key = SecretStore.load_or_create_key(work / "var" / "secret.key")
    pg = EmbeddedPostgres(work / "var")
    dsn = await asyncio.to_thread(pg.start)
    try:
        conns = [await asyncpg.connect(dsn) for _ in range(REPLAY_CONNECTIONS)]
        conn = conns[0]
        try:
            built = (await conn.fetchval("SELECT to_regclass('public.users') IS NOT NULL")
                     and await conn.fetchval("SELECT last_analyze IS NOT NULL FROM pg_stat_user_tables"
                                             " WHERE relname = 'usage_daily'"))
        finally:
            await conn.close()
        if not built:
            log(f"building {n:,} subscribers in {work}")
            args = argparse.Namespace(subscribers=n, months=1, usage_days=2, bindings=None)
            await scale.build(dsn, args, key, dt.datetime.now(dt.timezone.utc))
    finally:
        await asyncio.to_thread(pg.stop)


async def make_operator(dsn: str) -> None:
    from billcore.server.principals import create_admin

    conn = await asyncpg.connect(dsn)
    try:
        if not await conn.fetchval("SELECT count(*) FROM admins WHERE login = $1", OPERATOR[0]):
            await create_admin(conn, OPERATOR[0], OPERATOR[1], ["superusers"])
    finally:
        await conn.close()


async def run(args: argparse.Namespace, work: Path, serve_dir: Path) -> dict[str, Any]:
    from tests.conftest import free_port
    from tests.console_harness import ConsoleBrowser
    from tests.process_view import environ_of
    from tests.running import BillcoreProcess

    await ensure_database(work, args.subscribers)
    port = free_port()
    # the config lives beside, not in, the database's directory: the builder's config stays as it was
    bc = BillcoreProcess(serve_dir, dsn="", core={"data_dir": str(work / "var")}, periodic={"enabled": False},
                         console={"enabled": True, "host": "127.0.0.1", "port": port, "cookie_secure": False})
    bc.start()
    try:
        bc.wait_for(r'role=console .*msg="console serving"', timeout=args.startup_timeout)
        bc.wait_for(r'role=core .*msg="core serving"', timeout=args.startup_timeout)
        core_pid = bc.child_pid("core")
        dsn = environ_of(core_pid)["BILLCORE_DSN"]
        await make_operator(dsn)
        conns = [await asyncpg.connect(dsn) for _ in range(REPLAY_CONNECTIONS)]
        conn = conns[0]
        try:
            n = int(await conn.fetchval("SELECT count(*) FROM users"))
            tariff_ids = [row[0] for row in await conn.fetch("SELECT id FROM tariffs ORDER BY id")]
            balances = [row[0] for row in await conn.fetch("SELECT DISTINCT balance FROM accounts LIMIT 500")]
            rng = random.Random(args.seed)
            url = f"http://127.0.0.1:{port}"
            searches = [f"/subscribers?{urlencode(search_query(n, tariff_ids, balances, rng))}"
                        for _ in range(args.requests)]
            cards = [f"/subscribers/{rng.randrange(1, n + 1)}" for _ in range(args.requests)]
            browser = ConsoleBrowser(url)
            try:
                # the login page's SCRAM steps, the proof computed here: the console never sees the password
                await browser.login(*OPERATOR)
                http = browser.http
                sql = BareSql(conns)
                statement_log = StatementLog(work / "var" / "pg")
                log(f"-- search page: {len(searches)} requests")
                search = await measure(http, url, sql, statement_log, core_pid, searches, args.warmup, rng)
                log(f"   {search}")
                log(f"-- card page: {len(cards)} requests")
                card = await measure(http, url, sql, statement_log, core_pid, cards, args.warmup, rng)
                log(f"   {card}")
            finally:
                await browser.close()
        finally:
            for each in conns:
                await each.close()
    finally:
        bc.stop(timeout=60)
    return {"subscribers": n, "search": search, "card": card,
            "search_examples": searches[:8], "card_examples": cards[:3]}


def markdown(report: dict[str, Any]) -> str:
    info = report["machine"]
    lines = [
        "# Console pages at scale: search and card, against the bare SQL they need", "",
        f"{info['date']} · {info['cpu']} · nproc {info['nproc']} · load average before {info['loadavg']}, "
        f"after {report['loadavg_after']} · Python {info['python']} · {report['subscribers']:,} subscribers · "
        f"code at {report['commit']}" + (f" ({report['note']})" if report["note"] else ""), "",
        "Sequential HTTP requests through a logged-in console (`billcore serve`, embedded PostgreSQL), random "
        "search texts and filters, random cards; the SQL columns run the statements the core executed for each "
        "page (read back from PostgreSQL's statement log) directly with asyncpg, each core connection's "
        "sequence on its own connection, at once (*SQL in order*: all on one connection, one after the other). "
        f"Target: page p95 ≤ {TARGET_P95_MS:.0f} ms and ≤ {TARGET_RATIO:.0f}× the SQL.", "",
        "| page | requests | page p50 ms | page p95 ms | SQL p50 ms | SQL p95 ms | p50 ratio | p95 ratio "
        "| SQL in order p50 / p95 ms | statements (connections) | target met |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name in ("search", "card"):
        r = report[name]
        lines.append(f"| {name} | {r['requests']} | {r['page_p50_ms']} | {r['page_p95_ms']} | {r['sql_p50_ms']} "
                     f"| {r['sql_p95_ms']} | {r['ratio_p50']}× | {r['ratio_p95']}× "
                     f"| {r['sql_in_order_p50_ms']} / {r['sql_in_order_p95_ms']} "
                     f"| {r['statements_per_page']} ({r['connections_per_page']}) "
                     f"| {'yes' if r['meets_target'] else 'no'} |")
    lines += ["", "Search URLs drawn (first few): " + ", ".join(f"`{p}`" for p in report["search_examples"]), "",
              "Slowest searches (page ms / its SQL ms): " + ", ".join(
                  f"`{row['path']}` {row['page_ms']:,.0f} / {row['sql_ms']:,.0f}" for row in report["search"]["slowest"]),
              ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", help="a database built by benchmarks/scale.py --workdir (reused as it is)")
    ap.add_argument("--subscribers", type=int, default=1_000_000, help="subscribers to build when there is none")
    ap.add_argument("--requests", type=int, default=400, help="measured requests per page")
    ap.add_argument("--warmup", type=int, default=30, help="requests per page before measuring")
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument("--startup-timeout", type=float, default=300.0)
    ap.add_argument("--tiny", action="store_true", help="CI: 2,000 subscribers in a temporary directory, 30 requests")
    ap.add_argument("--out", default=str(RESULTS / "console_pages"), help="results go to OUT.json and OUT.md")
    ap.add_argument("--note", default="", help="what this run measured (kept in the results)")
    args = ap.parse_args()
    if args.tiny:
        args.subscribers, args.requests, args.warmup, args.workdir = 2_000, 30, 5, None
    info = machine()
    log(f"machine: {info['cpu']}, {info['nproc']} CPUs, load average {info['loadavg']}")
    temporary = Path(tempfile.mkdtemp(prefix="billcore-console-bench-"))
    work = Path(args.workdir).absolute() if args.workdir else temporary / "db"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = asyncio.run(run(args, work, temporary))
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    report = {"benchmark": "console_pages", "machine": info, "loadavg_after": [round(x, 2) for x in os.getloadavg()],
              "requests": args.requests, "warmup": args.warmup, "seed": args.seed, "tiny": args.tiny,
              "commit": tree_commit(), "note": args.note, **result}
    publish(report, markdown(report), Path(args.out), args.tiny)
    return 0


if __name__ == "__main__":
    sys.exit(main())
