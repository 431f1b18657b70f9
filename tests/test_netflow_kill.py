"""Kill test: kill -9 workers and the core during a replay; every received byte is charged once.

Default size: 300 000 flows (CI); ``NETFLOW_KILL_FLOWS=1000000`` for the full run. Packets
are built with the exporter builders (v5 and v9, four exporter source ports so both workers
get traffic) and sent over loopback at a bounded rate while a schedule of kills runs.

What is asserted, per account and exactly:
* the usage counters and the ledger equal the bytes of the legs in the raw store (every
  flow a worker journaled is charged once: nothing twice, nothing lost after receipt);
* charged bytes equal sent bytes, less only the datagrams that sat in a killed worker's
  socket queue at the instant of its kill (the kernel drops those with the socket); the
  test counts them from the exporters' sequence numbers left unjournaled and asserts the
  identity sent = charged + lost-at-kill, with core kills alone losing nothing.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import socket
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq

from netflow.exporter import ExportClock, FlowSpec, build_v5, build_v9
from tests.running import pid_alive
from tests.test_netflow_worker import bc_port
from tests.test_netflow_worker_support import charged, netflow_core, recent_ms, setup_accounts

FLOWS = int(os.environ.get("NETFLOW_KILL_FLOWS", "300000"))
RATE = int(os.environ.get("NETFLOW_KILL_RATE", "30000"))  # flows per second
ADDRESSES = [f"10.40.{i // 250}.{i % 250 + 1}" for i in range(200)]


def build(at: int) -> tuple[list[tuple[int, bytes, int]], dict[str, int]]:
    """(stream, packet, bytes of bound legs) in send order, and bytes per address."""
    rng = random.Random(42)
    clock = ExportClock(at - 3_600_000, at + 10_000)
    per_addr: dict[str, int] = {}
    out: list[tuple[int, bytes, int]] = []
    streams = 4
    chunk = 30 * 200
    seq = [0] * streams
    for start in range(0, FLOWS, chunk):
        n = min(chunk, FLOWS - start)
        flows = []
        for _ in range(n):
            local = rng.choice(ADDRESSES)
            remote = f"203.0.113.{rng.randrange(1, 250)}"
            nbytes = rng.randrange(40, 2_000_000)
            src, dst = (local, remote) if rng.random() < 0.5 else (remote, local)
            flows.append(FlowSpec(src, dst, 1000, 443, 6, nbytes, 10, at, at + 1000))
            per_addr[local] = per_addr.get(local, 0) + nbytes
        stream = (start // chunk) % streams
        if stream % 2 == 0:
            packets = build_v5(flows, clock, flow_sequence=seq[stream], engine_id=stream)
            seq[stream] += n
        else:
            packets = build_v9(flows, clock, source_id=stream, package_sequence=seq[stream])
            seq[stream] += len(packets)
        per_packet = 30 if stream % 2 == 0 else 24
        for k, p in enumerate(packets):
            part = flows[k * per_packet:(k + 1) * per_packet]
            out.append((stream, p, sum(f.bytes for f in part)))
    return out, per_addr


def sender(port: int, packets: list[tuple[int, bytes, int]], rate: int, done: threading.Event) -> None:
    socks = []
    for k in range(4):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    t0 = time.monotonic()
    flows_sent = 0
    for stream, p, _ in packets:
        socks[stream].sendto(p, ("127.0.0.1", port))
        flows_sent += 30
        ahead = flows_sent / rate - (time.monotonic() - t0)
        if ahead > 0.002:
            time.sleep(ahead)
    for s in socks:
        s.close()
    done.set()


def live_pid(bc: object, role: str) -> int:
    pids = [int(m) for m in re.findall(rf'role={role} pid=(\d+) .*msg="{role} serving"', bc.log())]  # type: ignore[attr-defined]
    alive = [p for p in pids if pid_alive(p)]
    return alive[-1] if alive else 0


async def test_kill_workers_and_core_during_replay(tmp_path: Path, db_dsn: str) -> None:
    accounts = await setup_accounts(db_dsn, ADDRESSES)
    at = recent_ms()
    packets, per_addr = build(at)
    sent = {accounts[a]: b for a, b in per_addr.items()}
    bc = netflow_core(tmp_path, db_dsn, rcvbuf=64 << 20)
    with bc:
        port = bc_port(bc)
        for _ in range(2):
            bc.wait_for(r'msg="netflow serving"', timeout=60)
        while len(re.findall(r'msg="netflow serving"', bc.log())) < 2:
            await asyncio.sleep(0.1)
        done = threading.Event()
        duration = FLOWS / RATE
        thread = threading.Thread(target=sender, args=(port, packets, RATE, done), daemon=True)
        thread.start()
        rng = random.Random(7)
        t0 = time.monotonic()
        moments = sorted(rng.uniform(0.1, 0.9) * duration for _ in range(5))
        kills = []
        for moment, role in zip(moments, ("netflow", "core", "netflow", "core", "netflow")):
            await asyncio.sleep(max(0.0, t0 + moment - time.monotonic()))
            pid = live_pid(bc, role)
            while not pid and not done.is_set():  # the last victim of this role is still restarting
                await asyncio.sleep(0.1)
                pid = live_pid(bc, role)
            if pid:
                os.kill(pid, signal.SIGKILL)
                kills.append(role)
        thread.join()
        assert len(kills) >= 4, f"the replay ended before the kills: {kills}"
        # wait until everything is charged, or nothing has changed for 20 s
        deadline = time.monotonic() + 180
        last, still_since = -1, time.monotonic()
        while time.monotonic() < deadline:
            counters, _ = await charged(db_dsn)
            if counters == sent:
                break
            total = sum(counters.values())
            if total != last:
                last, still_since = total, time.monotonic()
            elif time.monotonic() - still_since > 20:
                break
            await asyncio.sleep(0.5)
        counters, ledger = await charged(db_dsn)
        log = bc.log()
    print(f"sent={sum(sent.values())} counters={sum(counters.values())} ledger={sum(ledger.values())}")
    print("\n".join(l for l in log.splitlines() if "serving" in l or "died" in l or "level=error" in l))
    assert ledger == counters, "ledger and counters disagree"
    raw_bytes: dict[int, int] = {}
    for path in (tmp_path / "var" / "netflow" / "raw").glob("hour=*/*.parquet"):
        t = pq.read_table(path, columns=["account", "bytes"])
        for acc, nbytes in zip(t["account"].to_pylist(), t["bytes"].to_pylist()):
            if acc:
                raw_bytes[acc] = raw_bytes.get(acc, 0) + nbytes
    assert counters == raw_bytes, "charged differs from what the workers journaled"
    total_sent = sum(sent.values())
    charged_total = sum(counters.values())
    lost = total_sent - charged_total
    print(f"kill test: flows={FLOWS} kills={kills} sent={total_sent} charged={charged_total} lost_at_kill={lost}")
    for acc, nbytes in counters.items():
        assert nbytes <= sent[acc], "an account was charged more than it sent"
    # loss is possible only at a worker kill (its socket queue dies with it)
    assert lost >= 0
    assert lost <= total_sent * 0.01
