"""NetFlow flows/s with zero loss: billcore beside nfdump's nfcapd and pmacct's nfacctd.

Every target is fed the same precomputed replay (v5: 30 flows a packet, v9:
24 flows a packet plus its template) by ``--senders`` processes that pace
their share in 1 ms bursts from several source ports. For each target and
version the send rate steps up (``--rates``, flows/s); a step is lossless
when what the target kept equals what was sent, exactly:

* **billcore** — a real ``billcore serve`` (supervisor, core, 2 netflow
  workers, embedded PostgreSQL): received → journaled → decoded →
  classified → rated → committed. Kept = bytes in the usage counters (and
  the ledger: 1 micro-unit per byte) after the step settles, so a flow counts
  only once it is charged;
* **nfcapd** — stores flows to its file; kept = ``nfdump -r FILE -I`` flows;
* **nfacctd** — pmacct with the print plugin (csv, aggregate by protocol,
  refreshed every second, appended); kept = the sum of its BYTES.

The highest lossless rate of each is reported, with billcore's ratio to
nfcapd's, and the CPU seconds each billcore process class spent per million
flows at that rate (where the time goes). ``--tiny`` runs two small steps.

    python benchmarks/netflow_ingest.py [--tiny] [--seconds S] [--rates 250000,500000,...] [--senders K]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ADDRESSES = [f"10.70.{i // 250}.{i % 250 + 1}" for i in range(500)]
POOL_FLOWS = 60_000  # distinct flows in the replay, cycled


# -- the replay ---------------------------------------------------------------------------


Slice = tuple[list[bytes], list[int], list[int]]  # packets, flows per packet, bytes per packet


def build_replay(version: int, at_ms: int, senders: int) -> list[Slice]:
    """One slice of packets per sender; a v9 slice opens with its template (each sender is
    its own exporter port, so each worker it hashes to learns the template)."""
    import random

    from netflow.exporter import ExportClock, FlowSpec, build_v5, build_v9

    rng = random.Random(version)
    flows = []
    for _ in range(POOL_FLOWS):
        local = rng.choice(ADDRESSES)
        remote = f"203.0.113.{rng.randrange(1, 250)}"
        src, dst = (local, remote) if rng.random() < 0.5 else (remote, local)
        flows.append(FlowSpec(src, dst, rng.randrange(1024, 65535), 443, 6, rng.randrange(40, 1_000_000),
                              rng.randrange(1, 1000), at_ms, at_ms + 1000))
    clock = ExportClock(at_ms - 3_600_000, at_ms + 5000)
    per = 30 if version == 5 else 24
    share = len(flows) // senders // per * per
    out = []
    for k in range(senders):
        part = flows[k * share:(k + 1) * share]
        packets = build_v5(part, clock, engine_id=k) if version == 5 else build_v9(part, clock, source_id=9)
        chunks = [part[j * per:(j + 1) * per] for j in range(len(packets))]
        out.append((packets, [len(c) for c in chunks], [sum(f.bytes for f in c) for c in chunks]))
    return out


def _sender(k: int, port: int, packets: list[bytes], rate_pps: float, seconds: float, start_at: float,
            out: Any) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    s.bind(("127.0.0.1", 0))
    s.connect(("127.0.0.1", port))
    send = s.send
    n = len(packets)
    total = int(rate_pps * seconds)
    burst = max(1, int(rate_pps / 1000))
    sent = i = errors = 0
    while time.time() < start_at:
        time.sleep(0.0005)
    t0 = time.perf_counter()
    while sent < total and errors < 1_000_000:
        due = min(total, int((time.perf_counter() - t0) * rate_pps) + burst)
        while sent < due:
            try:
                send(packets[i])
            except OSError:  # ENOBUFS / refused: not sent, not counted
                errors += 1
                continue
            sent += 1
            i = i + 1 if i + 1 < n else 0
        ahead = sent / rate_pps - (time.perf_counter() - t0)
        if ahead > 0.0005:
            time.sleep(ahead)
    out.put((k, sent, time.perf_counter() - t0, errors))
    s.close()


def send_step(port: int, slices: list[Slice], flows_per_s: float, seconds: float) -> dict[str, Any]:
    """Send ``flows_per_s`` for ``seconds``, one process per slice; exactly what went out."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    start_at = time.time() + 0.3
    procs = []
    for k, (packets, counts, _) in enumerate(slices):
        pps = flows_per_s / (sum(counts) / len(packets)) / len(slices)
        procs.append(ctx.Process(target=_sender, args=(k, port, packets, pps, seconds, start_at, q)))
    for p in procs:
        p.start()
    results = [q.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join()
    flows = nbytes = 0
    for k, sent, _, _ in results:
        packets, counts, sizes = slices[k]
        whole, rest = divmod(sent, len(packets))
        flows += whole * sum(counts) + sum(counts[:rest])
        nbytes += whole * sum(sizes) + sum(sizes[:rest])
    elapsed = max(r[2] for r in results)
    return {"flows": flows, "bytes": nbytes, "packets": sum(r[1] for r in results), "seconds": round(elapsed, 3),
            "rate": flows / elapsed if elapsed else 0.0, "send_errors": sum(r[3] for r in results)}


# -- CPU accounting -------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def process_classes(names: dict[str, list[int]]) -> dict[str, float]:
    return {k: sum(cpu_seconds(p) for p in pids) for k, pids in names.items()}


def postgres_pids(data_dir: Path) -> list[int]:
    """The embedded PostgreSQL of this run: its postmaster (by data dir) and its children."""
    parent: dict[int, int] = {}
    master = None
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if master is None and str(data_dir) in (d / "cmdline").read_bytes().decode(errors="replace"):
                if (d / "comm").read_text().strip() == "postgres":
                    master = int(d.name)
        except (OSError, ValueError, IndexError):
            continue
    return [] if master is None else [master] + [p for p, pp in parent.items() if pp == master]


# -- targets ----------------------------------------------------------------------------------


class Billcore:
    name = "billcore"

    def __init__(self, tmp: Path, server_dsn: str, pg_dir: Path) -> None:
        self.tmp, self.server_dsn, self.pg_dir = tmp, server_dsn, pg_dir

    def __enter__(self) -> Billcore:
        import asyncpg

        from billcore.db.migrate import migrate
        from tests.conftest import free_port, with_database
        from tests.running import BillcoreProcess
        from tests.test_netflow_worker_support import setup_accounts

        async def prepare() -> str:
            conn = await asyncpg.connect(self.server_dsn)
            await conn.execute("DROP DATABASE IF EXISTS netflow_bench")
            await conn.execute("CREATE DATABASE netflow_bench")
            await conn.close()
            dsn = with_database(self.server_dsn, "netflow_bench")
            conn = await asyncpg.connect(dsn)
            await migrate(conn)
            await conn.close()
            await setup_accounts(dsn, ADDRESSES)
            return dsn

        self.dsn = asyncio.run(prepare())
        self.port = free_port(socket.SOCK_DGRAM)
        workdir = self.tmp / "billcore"
        workdir.mkdir()
        self.bc = BillcoreProcess(workdir, dsn=self.dsn, netflow={
            "enabled": True, "host": "127.0.0.1", "port": self.port, "workers": 2, "rcvbuf": 256 << 20,
            "fsync_interval": 0.2, "ship_interval": 0.5})
        self.bc.__enter__()
        deadline = time.monotonic() + 90
        while len(re.findall(r'msg="netflow serving"', self.bc.log())) < 2:
            if time.monotonic() > deadline:
                raise RuntimeError("billcore netflow workers did not start:\n" + self.bc.log()[-3000:])
            time.sleep(0.1)
        return self

    def __exit__(self, *exc: object) -> None:
        self.bc.__exit__(None, None, None)

    def pids(self) -> dict[str, list[int]]:
        log = self.bc.log()
        workers = [int(p) for p in re.findall(r'role=netflow pid=(\d+) .*msg="netflow serving"', log)]
        core = [int(p) for p in re.findall(r'role=core pid=(\d+) .*msg="core serving"', log)]
        return {"netflow workers": workers, "core": core, "postgresql": postgres_pids(self.pg_dir)}

    def charged(self) -> tuple[int, int]:
        import asyncpg

        async def read() -> tuple[int, int]:
            conn = await asyncpg.connect(self.dsn)
            try:
                q = int(await conn.fetchval("SELECT coalesce(sum(quantity), 0) FROM usage_counters"))
                m = int(await conn.fetchval("SELECT coalesce(-sum(amount), 0) FROM ledger WHERE kind = 'traffic'"))
                return q, m
            finally:
                await conn.close()

        return asyncio.run(read())

    def step(self, version: int, replay: Any, rate: float, seconds: float, senders: int) -> dict[str, Any]:
        before_q, before_m = self.charged()
        cpu0 = process_classes(self.pids())
        sent = send_step(self.port, replay, rate, seconds)
        t_sent = time.monotonic()
        # settle: charged == sent, or no progress for 10 s (a journal backlog is still charged:
        # only what never reached a journal is lost)
        last, since = -1, time.monotonic()
        q = m = 0
        while True:
            q, m = self.charged()
            got = q - before_q
            if got == sent["bytes"]:
                break
            if got != last:
                last, since = got, time.monotonic()
            elif time.monotonic() - since > 10:
                break
            time.sleep(0.2)
        settle = time.monotonic() - t_sent
        cpu1 = process_classes(self.pids())
        kept = q - before_q
        mflows = sent["flows"] / 1e6
        return {**sent, "kept_bytes": kept, "ledger_bytes": m - before_m, "lost_bytes": sent["bytes"] - kept,
                "lossless": kept == sent["bytes"] and m - before_m == kept, "settle_s": round(settle, 2),
                "cpu_s_per_mflow": {k: round((cpu1[k] - cpu0.get(k, 0)) / mflows, 3) for k in cpu1} if mflows else {}}


class Nfcapd:
    name = "nfcapd"

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp

    def __enter__(self) -> Nfcapd:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def step(self, version: int, replay: Any, rate: float, seconds: float, senders: int) -> dict[str, Any]:
        from tests.conftest import free_port

        store = Path(tempfile.mkdtemp(dir=self.tmp, prefix="nfcapd"))
        port = free_port(socket.SOCK_DGRAM)
        proc = subprocess.Popen(["nfcapd", "-b", "127.0.0.1", "-p", str(port), "-w", str(store), "-t", "3600",
                                 "-B", str(256 << 20)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            sent = send_step(port, replay, rate, seconds)
            time.sleep(1.0)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        files = [p for p in store.rglob("nfcapd.*") if p.is_file() and "current" not in p.name]
        kept = 0
        for f in files:
            out = subprocess.run(["nfdump", "-r", str(f), "-I"], capture_output=True, text=True, timeout=60).stdout
            m = re.search(r"^Flows:\s*(\d+)", out, re.M)
            kept += int(m.group(1)) if m else 0
        shutil.rmtree(store, ignore_errors=True)
        return {**sent, "kept_flows": kept, "lost_flows": sent["flows"] - kept, "lossless": kept == sent["flows"]}


class Nfacctd:
    name = "nfacctd"

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp

    def __enter__(self) -> Nfacctd:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def step(self, version: int, replay: Any, rate: float, seconds: float, senders: int) -> dict[str, Any]:
        from tests.conftest import free_port

        work = Path(tempfile.mkdtemp(dir=self.tmp, prefix="nfacctd"))
        port = free_port(socket.SOCK_DGRAM)
        out = work / "out.csv"
        conf = work / "nfacctd.conf"
        conf.write_text("\n".join([
            "daemonize: false", "nfacctd_ip: 127.0.0.1", f"nfacctd_port: {port}",
            f"nfacctd_pipe_size: {256 << 20}", "plugins: print", "aggregate: proto",
            "print_output: csv", f"print_output_file: {out}", "print_output_file_append: true",
            "print_refresh_time: 1", "plugin_pipe_size: 134217728", "plugin_buffer_size: 65536", ""]))
        proc = subprocess.Popen(["nfacctd", "-f", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(1.0)
            sent = send_step(port, replay, rate, seconds)
            time.sleep(3.0)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        kept = 0
        if out.exists():
            for line in out.read_text().splitlines():
                parts = line.split(",")
                if parts and parts[-1].isdigit() and not line.startswith("PROTO"):
                    kept += int(parts[-1])
        shutil.rmtree(work, ignore_errors=True)
        return {**sent, "kept_bytes": kept, "lost_bytes": sent["bytes"] - kept, "lossless": kept == sent["bytes"]}


# -- report ----------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = m.group(1).strip() if m else cpu
    return {"platform": platform.platform(), "cpu": cpu, "nproc": os.cpu_count(),
            "python": platform.python_version(), "load_avg_before": os.getloadavg()}


def versions_of_peers() -> dict[str, str]:
    out = {}
    for name, cmd in (("nfcapd", ["nfcapd", "-V"]), ("nfacctd", ["nfacctd", "-V"])):
        with contextlib.suppress(Exception):
            text = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            out[name] = (text.stdout + text.stderr).strip().splitlines()[0]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="two small steps (CI)")
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per step")
    ap.add_argument("--rates", default="250000,500000,1000000,1500000,2000000,3000000,4000000",
                    help="flows/s steps, ascending")
    ap.add_argument("--senders", type=int, default=2)
    ap.add_argument("--targets", default="billcore,nfcapd,nfacctd")
    ap.add_argument("--versions", default="5,9")
    args = ap.parse_args()
    if args.tiny:
        args.seconds, args.rates, args.senders = 1.0, "50000,200000", 1
    rates = [float(r) for r in args.rates.split(",")]
    wanted = args.targets.split(",")
    peers_missing = [t for t in ("nfcapd", "nfacctd") if t in wanted and not shutil.which(t)]
    for t in peers_missing:
        print(f"{t} is not installed: skipped", flush=True)
        wanted.remove(t)
    info = machine()
    from billcore.db.embedded import EmbeddedPostgres
    from tests.test_netflow_worker_support import recent_ms

    at = recent_ms(5)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with tempfile.TemporaryDirectory(prefix="netflow-bench-") as tmpdir, contextlib.ExitStack() as stack:
        tmp = Path(tmpdir)
        targets: list[Any] = []
        if "billcore" in wanted:
            pg = EmbeddedPostgres(tmp / "pgserver")
            dsn = pg.start()
            stack.callback(pg.stop)
            targets.append(stack.enter_context(Billcore(tmp, dsn, tmp / "pgserver")))
        if "nfcapd" in wanted:
            targets.append(Nfcapd(tmp))
        if "nfacctd" in wanted:
            targets.append(Nfacctd(tmp))
        for version in [int(v) for v in args.versions.split(",")]:
            replay = build_replay(version, at, args.senders)
            for target in targets:
                steps = results.setdefault(target.name, {}).setdefault(f"v{version}", [])
                misses = 0
                for rate in rates:
                    r = target.step(version, replay, rate, args.seconds, args.senders)
                    r["asked_rate"] = rate
                    steps.append(r)
                    lost = r.get("lost_bytes", r.get("lost_flows"))
                    print(f"{target.name:8} v{version} asked {rate / 1e6:5.2f}M flows/s sent {r['rate'] / 1e6:5.2f}M "
                          f"({r['flows']} flows) lost {lost} {'lossless' if r['lossless'] else 'LOSS'}", flush=True)
                    misses = 0 if r["lossless"] else misses + 1
                    if misses >= 2:
                        break
    summary: dict[str, dict[str, Any]] = {}
    for name, by_version in results.items():
        for version, steps in by_version.items():
            ok = [s for s in steps if s["lossless"]]
            best = max(ok, key=lambda s: s["rate"]) if ok else None
            summary.setdefault(name, {})[version] = {
                "max_lossless_flows_per_s": round(best["rate"]) if best else 0,
                "cpu_s_per_mflow": best.get("cpu_s_per_mflow") if best else None}
    ratios = {}
    for version in (f"v{v}" for v in args.versions.split(",")):
        base = summary.get("nfcapd", {}).get(version, {}).get("max_lossless_flows_per_s")
        mine = summary.get("billcore", {}).get(version, {}).get("max_lossless_flows_per_s")
        if base and mine is not None:
            ratios[version] = round(mine / base, 3)
    info.update({"load_avg_after": os.getloadavg(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                 "peers": versions_of_peers(), "seconds_per_step": args.seconds, "senders": args.senders,
                 "rates": rates})
    report = {"machine": info, "summary": summary, "billcore_to_nfcapd": ratios, "steps": results}
    lines = ["| target | version | highest lossless rate (flows/s) | billcore ÷ nfcapd |", "| --- | --- | --- | --- |"]
    for name, by_version in summary.items():
        for version, s in by_version.items():
            ratio = ratios.get(version, "") if name == "billcore" else ""
            lines.append(f"| {name} | {version} | {s['max_lossless_flows_per_s']:,} | {ratio} |")
    table = "\n".join(lines)
    print(table)
    for version, s in summary.get("billcore", {}).items():
        print(f"billcore {version} CPU seconds per million flows at its best rate: {s['cpu_s_per_mflow']}")
    if not args.tiny:
        out = ROOT / "benchmarks" / "results"
        out.mkdir(parents=True, exist_ok=True)
        (out / "netflow_ingest.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (out / "netflow_ingest.md").write_text(
            "# NetFlow ingest: highest lossless rate\n\n"
            f"{info['date']} · {info['platform']} · {info['cpu']} · {info['nproc']} CPUs · "
            f"load {info['load_avg_before']} → {info['load_avg_after']} · {args.seconds} s per step, "
            f"{args.senders} sender processes · {info['peers']}\n\n" + table + "\n\n"
            "billcore: bytes in the usage counters (== ledger) equal bytes sent; nfcapd: flows in its file; "
            "nfacctd: bytes in its print output. CPU seconds per million flows at billcore's best rate: "
            + json.dumps({v: s["cpu_s_per_mflow"] for v, s in summary.get("billcore", {}).items()}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
