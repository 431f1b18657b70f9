"""The HTTP/JSON API against URFA: the same two calls, the same concurrency, in one run.

A real ``billcore serve`` (supervisor, core, the ``httpapi`` edge, the
embedded PostgreSQL). The core gets the subscribers to read and to pay
into; an operator of group ``cashiers`` logs in over URFA, and a token of
the same group is made with ``tokens.create``, so both sides run with the
same rights and the same call table. Two calls:

* ``users.get`` — a cheap read (one user and their accounts);
* ``payments.add`` — a payment of 1.00 with a fresh ``external_id`` (over
  HTTP the ``Idempotency-Key`` header carries it): a ledger write, one
  PostgreSQL transaction each.

Each request reads or pays into one of ``--subscribers`` subscribers
(default 500), spread over them, as a payment gateway pays into many
accounts at once (payments into one account wait for each other's row
lock: that would measure the lock, not the API). At the end the balances
add up to exactly 1.00 per payment made, on both sides.

The load generator is this script's own process (uvloop). Each side has
``--concurrency`` workers (default 16, as a CRM's or a payment gateway's
worker pool), each sending one request after the other on its own
connection: HTTP/1.1 keep-alive connections to the edge (aiohttp,
``limit`` = the concurrency), or URFA connections, one call in flight each
(no pipelining, so both sides wait for each answer the same way). The
HTTP path is longer by design — client → edge (JSON, token, problem
mapping) → URFA → core — so the ratio HTTP/URFA is the price of that
edge; it is measured in the same run, the sides alternating per repeat,
the median repeat kept. The API's rate limit is raised for the run
(``rate``/``burst`` 10⁹): it would otherwise be what is measured.

Besides wall-clock requests/s and p50/p99 latency, the run reads the CPU
time of the core and of the edge (``/proc/PID/stat``) around each
measurement and reports CPU-milliseconds per request: on a shared 2-core
box the figure that depends least on who else runs. The load average is
recorded before and after.

    python benchmarks/http_api.py           # full run, writes results/http_api.{json,md}
    python benchmarks/http_api.py --tiny    # a few hundred requests, one repeat (CI)
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _machine import machine, publish, tree_commit  # noqa: E402

import aiohttp  # noqa: E402
import uvloop  # noqa: E402

from urfa.client import Client, connect  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
ROOT_PW = "bench-root-pw-1"
CASHIER = ("bench-cashier", "bench-cashier-pw-1")
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(msg, flush=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def pick(subscribers: list[tuple[int, int]], worker: int, n: int) -> tuple[int, int]:
    """The subscriber request ``n`` of ``worker`` reads or pays: spread, so that payments rarely wait
    for one another's account row (a gateway pays into many accounts at once)."""
    return subscribers[(worker * 7919 + n * 104729) % len(subscribers)]


def has_httpapi() -> bool:
    return importlib.util.find_spec("httpapi") is not None


# -- one measured run ---------------------------------------------------------------------

Request = Callable[[int, int], Awaitable[None]]     # (worker, n) -> one request, raises on failure


async def drive(request: Request, concurrency: int, total: int, pids: dict[str, int]) -> dict[str, Any]:
    """``total`` requests by ``concurrency`` workers, each one after the other; timings and CPU."""
    per_worker = max(1, total // concurrency)
    latencies: list[float] = []

    async def worker(w: int) -> None:
        for n in range(per_worker):
            t = time.perf_counter()
            await request(w, n)
            latencies.append(time.perf_counter() - t)

    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - t0
    cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
    ordered = sorted(latencies)
    n = len(ordered)
    return {"requests": n, "seconds": round(elapsed, 3), "per_s": round(n / elapsed),
            "p50_ms": round(percentile(ordered, 0.5) * 1000, 2), "p99_ms": round(percentile(ordered, 0.99) * 1000, 2),
            "cpu_ms_per_request": {name: round(1000 * s / n, 3) for name, s in cpu.items()}}


class UrfaSide:
    """``concurrency`` URFA connections of the cashier operator, one call in flight each."""

    def __init__(self, port: int, subscribers: list[tuple[int, int]]) -> None:
        self.port, self.subscribers = port, subscribers
        self.clients: list[Client] = []

    async def open(self, concurrency: int) -> None:
        for _ in range(concurrency - len(self.clients)):
            client = await connect("127.0.0.1", self.port)
            await client.login("admin", *CASHIER)
            self.clients.append(client)

    async def close(self) -> None:
        for client in self.clients:
            await client.close()

    def read(self) -> Request:
        async def one(w: int, n: int) -> None:
            user_id = pick(self.subscribers, w, n)[0]
            user = await self.clients[w].call("users.get", {"user_id": user_id})
            assert user["id"] == user_id
        return one

    def pay(self, tag: str) -> Request:
        async def one(w: int, n: int) -> None:
            paid = await self.clients[w].call("payments.add", {
                "account_id": pick(self.subscribers, w, n)[1], "amount": 1_000_000, "method": "online",
                "external_id": f"urfa-{tag}-{w}-{n}"})
            assert paid["created"] is True
        return one


class HttpSide:
    """keep-alive HTTP/1.1 connections to the API with the cashier token."""

    def __init__(self, base: str, token: str, subscribers: list[tuple[int, int]]) -> None:
        self.base, self.subscribers = base, subscribers
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.http: aiohttp.ClientSession | None = None

    async def open(self, concurrency: int) -> None:
        if self.http is not None:
            await self.http.close()
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency, force_close=False),
                                          headers=self.headers)

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()

    async def _post(self, name: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
        assert self.http is not None
        async with self.http.post(f"{self.base}/api/v1/calls/{name}", json=body, headers=headers) as response:
            answer = await response.json(content_type=None)
            if response.status != 200:
                raise RuntimeError(f"{name}: HTTP {response.status} {answer}")
            return answer

    def read(self) -> Request:
        async def one(w: int, n: int) -> None:
            user_id = pick(self.subscribers, w, n)[0]
            user = await self._post("users.get", {"user_id": user_id})
            assert user["id"] == user_id
        return one

    def pay(self, tag: str) -> Request:
        async def one(w: int, n: int) -> None:
            paid = await self._post("payments.add", {"account_id": pick(self.subscribers, w, n)[1], "amount": "1.00",
                                                     "method": "online"},
                                    {"Idempotency-Key": f"http-{tag}-{w}-{n}"})
            assert paid["created"] is True
        return one


# -- the stack ------------------------------------------------------------------------------


async def prepare(admin: Client, count: int) -> tuple[list[tuple[int, int]], str | None]:
    """The subscribers (user id, account id), the cashier operator and (with the API) a cashier token."""
    subscribers = []
    for i in range(count):
        user = await admin.call("users.create", {"login": f"bench-sub-{i}", "password": "bench-sub-pw-1",
                                                 "full_name": f"Bench Subscriber {i}"})
        subscribers.append((int(user["id"]), int(user["basic_account_id"])))
    await admin.call("operators.create", {"login": CASHIER[0], "password": CASHIER[1], "groups": ["cashiers"],
                                          "full_name": "Bench cashier"})
    token = None
    if has_httpapi():
        made = await admin.call("tokens.create", {"name": "bench-cashier", "groups": ["cashiers"]})
        token = made["token"]
    return subscribers, token


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from tests.conftest import free_port
    from tests.running import BillcoreProcess
    from tests.test_e2e_core import billcore_cli

    api = has_httpapi()
    port = free_port()
    sections: dict[str, dict[str, Any]] = {"periodic": {"enabled": False}}
    if api:
        sections["httpapi"] = {"enabled": True, "host": "127.0.0.1", "port": port, "rate": 1e9, "burst": 10**9}
    bc = BillcoreProcess(work, dsn="", **sections)
    bc.start()
    admin: Client | None = None
    urfa: UrfaSide | None = None
    http: HttpSide | None = None
    try:
        pids: dict[str, int] = {"loader": os.getpid()}
        bc.wait_for(r'role=core .*msg="core serving"', timeout=args.startup_timeout)
        pids["core"] = bc.child_pid("core")
        if api:
            bc.wait_for(r'role=httpapi .*msg="httpapi serving"', timeout=args.startup_timeout)
            pids["httpapi"] = bc.child_pid("httpapi")
        made = billcore_cli(bc.config_path, "admin", "create", "bench-root", "--password-env", "PW",
                            env={"PW": ROOT_PW})
        if made.returncode != 0:
            raise RuntimeError(made.stderr)
        admin = await connect("127.0.0.1", bc.urfa_port)
        await admin.login("admin", "bench-root", ROOT_PW)
        subscribers, token = await prepare(admin, args.subscribers)
        urfa = UrfaSide(bc.urfa_port, subscribers)
        await urfa.open(args.concurrency)
        sides: dict[str, Any] = {"urfa": urfa}
        if token is not None:
            http = HttpSide(f"http://127.0.0.1:{port}", token, subscribers)
            await http.open(args.concurrency)
            sides["http"] = http
        else:
            log("httpapi/ is not in this tree: only the URFA half runs")
        # warm both paths (the edge's token session, the core's prepared statements)
        for side in sides.values():
            await drive(side.read(), args.concurrency, args.warmup, pids)
            await drive(side.pay("warm"), args.concurrency, args.warmup, pids)
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {call: {s: [] for s in sides} for call in ("read", "pay")}
        for rep in range(args.repeat):
            order = list(sides) if rep % 2 == 0 else list(reversed(sides))
            for call in ("read", "pay"):
                for name in order:
                    side = sides[name]
                    request = side.read() if call == "read" else side.pay(f"r{rep}")
                    r = await drive(request, args.concurrency, args.requests, pids)
                    r["loadavg_1m"] = round(os.getloadavg()[0], 2)
                    runs[call][name].append(r)
                    log(f"  {call:4} {name:4} rep {rep}: {r['per_s']:,} req/s  p50 {r['p50_ms']} ms  "
                        f"p99 {r['p99_ms']} ms  cpu ms/req {r['cpu_ms_per_request']}")
        # the ledger saw every payment once: the sum is what both sides paid
        balance = 0
        for _, account_id in subscribers:
            balance += (await admin.call("accounts.get", {"account_id": account_id}))["balance"]
        paid = sum(r["requests"] for call in ("pay",) for side in runs[call].values() for r in side)
        warm = sum(max(1, args.warmup // args.concurrency) * args.concurrency for _ in sides)
        if balance != (paid + warm) * 1_000_000:
            raise RuntimeError(f"balance {balance} after {paid + warm} payments of 1.00")
    finally:
        for side in (urfa, http):
            if side is not None:
                await side.close()
        if admin is not None:
            await admin.close()
        try:
            bc.stop(timeout=60)
        except Exception:
            bc.__exit__(None, None, None)
    calls: dict[str, Any] = {}
    for call, label in (("read", "users.get"), ("pay", "payments.add")):
        row: dict[str, Any] = {"call": label}
        for name, reps in runs[call].items():
            row[name] = sorted(reps, key=lambda r: r["per_s"])[len(reps) // 2]      # the median repeat
            row[f"{name}_runs_per_s"] = [r["per_s"] for r in reps]
        if "http" in row:
            row["ratio_per_s"] = round(row["http"]["per_s"] / row["urfa"]["per_s"], 3)
            row["ratio_p99"] = round(row["http"]["p99_ms"] / row["urfa"]["p99_ms"], 2)
            # each repeat's two sides ran back to back: their ratio sees the same load on the box
            pairs = list(zip(runs[call]["http"], runs[call]["urfa"]))
            row["ratio_per_s_paired_median"] = round(statistics.median(h["per_s"] / u["per_s"] for h, u in pairs), 3)
            row["ratio_p99_paired_median"] = round(statistics.median(h["p99_ms"] / u["p99_ms"] for h, u in pairs), 2)
            # CPU per request of the whole path: core + edge over HTTP, the core alone over URFA
            cpu_http = statistics.median(h["cpu_ms_per_request"]["core"] + h["cpu_ms_per_request"]["httpapi"]
                                         for h, _ in pairs)
            cpu_urfa = statistics.median(u["cpu_ms_per_request"]["core"] for _, u in pairs)
            row["cpu_ms_per_request_http_path"] = round(cpu_http, 3)
            row["cpu_ms_per_request_urfa_path"] = round(cpu_urfa, 3)
            row["cpu_ratio"] = round(cpu_http / cpu_urfa, 2)
        calls[call] = row
    return {"http_half": token is not None, "calls": calls, "payments_booked": paid + warm}


def markdown(report: dict[str, Any]) -> str:
    info = report["machine"]
    lines = [
        "# HTTP/JSON API against URFA: a cheap read and a payment", "",
        f"{info['date']} · {info['cpu']} · nproc {info['nproc']} · load average before {info['loadavg']}, "
        f"after {report['loadavg_after']} · Python {info['python']} · code at {report['commit']}"
        + (f" ({report['note']})" if report["note"] else ""), "",
        f"`billcore serve` (core, `httpapi` edge, embedded PostgreSQL) on this machine; the load generator in one "
        f"uvloop process beside it. {report['concurrency']} workers per side, each one request after the other on "
        f"its own connection (HTTP/1.1 keep-alive to the edge; URFA, one call in flight); {report['requests']:,} "
        f"requests per measurement spread over {report['subscribers']} subscribers, {report['repeat']} repeats with the sides alternating, the median repeat shown. "
        "Same rights on both sides (a `cashiers` operator over URFA, a `cashiers` token over HTTP). "
        "*CPU ms/req*: CPU time of the core, of the edge and of the load generator (an aiohttp client, or the URFA "
        "client) per request, independent of the other load on the box. "
        "The API's rate limit is raised for the run.", "",
        "| call | side | req/s | p50 ms | p99 ms | core CPU ms/req | edge CPU ms/req | load generator CPU ms/req "
        "| load 1m |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["calls"].values():
        for side in ("urfa", "http"):
            if side not in row:
                continue
            r = row[side]
            cpu = r["cpu_ms_per_request"]
            lines.append(f"| `{row['call']}` | {side.upper()} | {r['per_s']:,} | {r['p50_ms']} | {r['p99_ms']} | "
                         f"{cpu.get('core', 0)} | {cpu.get('httpapi', '–') if side == 'http' else '–'} | "
                         f"{cpu.get('loader', '–')} | {r['loadavg_1m']} |")
    lines += ["", "| call | HTTP/URFA requests/s (medians) | same, median of each repeat's pair | HTTP/URFA p99 "
              "(medians) | same, paired | CPU ms/req HTTP path (core + edge) / URFA (core) |",
              "|---|---:|---:|---:|---:|---:|"]
    for row in report["calls"].values():
        if "ratio_per_s" in row:
            lines.append(f"| `{row['call']}` | {row['ratio_per_s']:.0%} | {row['ratio_per_s_paired_median']:.0%} | "
                         f"{row['ratio_p99']}× | {row['ratio_p99_paired_median']}× | "
                         f"{row['cpu_ms_per_request_http_path']} / {row['cpu_ms_per_request_urfa_path']} = "
                         f"{row['cpu_ratio']}× |")
    if not report["http_half"]:
        lines += ["", "The HTTP half did not run: this tree has no `httpapi/`."]
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=4000, help="requests per measurement")
    ap.add_argument("--concurrency", type=int, default=16, help="workers (connections) per side")
    ap.add_argument("--repeat", type=int, default=5, help="measurements per call and side; the median is kept")
    ap.add_argument("--warmup", type=int, default=400, help="requests per call and side before measuring")
    ap.add_argument("--subscribers", type=int, default=500, help="subscribers read and paid into, at random")
    ap.add_argument("--startup-timeout", type=float, default=180.0)
    ap.add_argument("--tiny", action="store_true", help="CI: 200 requests, 4 workers, one repeat")
    ap.add_argument("--out", default=str(RESULTS / "http_api"), help="results go to OUT.json and OUT.md")
    ap.add_argument("--note", default="", help="what this run measured (kept in the results)")
    args = ap.parse_args()
    if args.tiny:
        args.requests, args.concurrency, args.repeat, args.warmup, args.subscribers = 200, 4, 1, 40, 20
    info = machine()
    log(f"machine: {info['cpu']}, {info['nproc']} CPUs, load average {info['loadavg']}")
    # the embedded PostgreSQL runs as its own user and must reach its data directory (see tests/console_stack.py)
    work = Path(tempfile.mkdtemp(prefix="billcore-http-bench-"))
    try:
        result = uvloop.run(run(args, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"benchmark": "http_api", "machine": info, "loadavg_after": [round(x, 2) for x in os.getloadavg()],
              "requests": args.requests, "subscribers": args.subscribers, "concurrency": args.concurrency, "repeat": args.repeat,
              "warmup": args.warmup, "tiny": args.tiny, "commit": tree_commit(), "note": args.note, **result}
    publish(report, markdown(report), Path(args.out), args.tiny)
    return 0


if __name__ == "__main__":
    sys.exit(main())
