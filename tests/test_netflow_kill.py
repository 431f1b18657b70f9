"""Kill test: kill -9 workers and the core during a replay; every received byte is charged once.

Default size: 300 000 flows (CI); ``NETFLOW_KILL_FLOWS=1000000`` for the full run. Packets
are built with the exporter builders (v5 and v9, four exporter source ports so both workers
get traffic) and sent over loopback at a bounded rate while a schedule of kills runs.

What is asserted, per account and exactly:
* "received" is what the workers journaled. A watcher hard-links every journal segment
  as soon as it appears (the workers delete segments below their committed watermark),
  so after the run the test decodes the complete journals itself (`JournalReader`,
  `BatchDecoder`, the core's classifier snapshot, `aggregate`) and asserts
  ledger == usage counters == journaled bytes == raw-store bytes;
* sent − received (datagrams that sat in a killed worker's socket queue or in its
  unflushed write buffer at the instant of its kill) is reported, with the kernel's
  receive-buffer drop counts, and is only possible at worker kills.
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
from datetime import datetime, timezone
from pathlib import Path

import asyncpg
import pyarrow.parquet as pq

from billcore.api.netflow_calls import SNAPSHOT_HISTORY
from netflow.batches import BatchDecoder, DecoderState
from netflow.classifier import Classifier, aggregate
from netflow.exporter import ExportClock, FlowSpec, build_v5, build_v9
from netflow.journal import JournalReader, list_segments
from tests.running import pid_alive
from tests.test_netflow_snapshot import snapshot_at
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


class SegmentKeeper(threading.Thread):
    """Hard-links each journal segment of each worker as soon as it exists."""

    def __init__(self, journal_root: Path, keep: Path) -> None:
        super().__init__(daemon=True)
        self.root, self.keep = journal_root, keep
        self.stop = threading.Event()

    def sweep(self) -> None:
        for path in self.root.glob("*/*.nfj"):
            target = self.keep / path.parent.name / path.name
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(path, target)
                except FileNotFoundError:
                    pass  # dropped between glob and link: the contiguity check below fails loudly

    def run(self) -> None:
        while not self.stop.is_set():
            self.sweep()
            time.sleep(0.01)


async def journaled_bytes(dsn: str, keep: Path) -> tuple[dict[int, int], int, int]:
    """Per account: bytes of every packet the workers journaled, decoded and classified as
    the workers do; with the number of packets and flows journaled."""
    conn = await asyncpg.connect(dsn)
    try:
        snapshot, _ = await snapshot_at(conn, datetime.now(timezone.utc) - SNAPSHOT_HISTORY)
    finally:
        await conn.close()
    classifier = Classifier(snapshot)
    per_account: dict[int, int] = {}
    packets = flows_total = 0
    for worker_dir in sorted(p for p in keep.iterdir() if p.is_dir()):
        segments = list_segments(worker_dir)
        assert segments[0][0] == 0, f"journal {worker_dir.name} lost its first segment"
        for (base, path), (nxt, _) in zip(segments, segments[1:]):
            assert base + path.stat().st_size == nxt, f"journal {worker_dir.name}: a segment was not kept"
        decoder = BatchDecoder(DecoderState(), {})
        records = list(JournalReader(worker_dir, 0))
        packets += len(records)
        for k in range(0, len(records), 20_000):
            flows, _ = decoder.decode(records[k:k + 20_000])
            flows_total += len(flows)
            agg = aggregate(flows, classifier.classify(flows))
            for acc, klass, nbytes in zip(agg.account.tolist(), agg.klass.tolist(), agg.bytes.tolist()):
                if acc > 0 and klass > 0:
                    per_account[acc] = per_account.get(acc, 0) + nbytes
    return per_account, packets, flows_total


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
    keep = tmp_path / "journal-kept"
    keeper = SegmentKeeper(tmp_path / "var" / "netflow" / "journal", keep)
    keeper.start()
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
    keeper.stop.set()
    keeper.join()
    keeper.sweep()
    print("\n".join(l for l in log.splitlines() if "serving" in l or "died" in l or "level=error" in l))
    received, packets_received, flows_received = await journaled_bytes(db_dsn, keep)
    raw_bytes: dict[int, int] = {}
    for path in (tmp_path / "var" / "netflow" / "raw").glob("hour=*/*.parquet"):
        t = pq.read_table(path, columns=["account", "bytes"])
        for acc, nbytes in zip(t["account"].to_pylist(), t["bytes"].to_pylist()):
            if acc:
                raw_bytes[acc] = raw_bytes.get(acc, 0) + nbytes
    kernel = sum(int(n) for n in re.findall(r'msg="kernel dropped packets.*?dropped=(\d+)', log))
    total_sent, total_received = sum(sent.values()), sum(received.values())
    print(f"kill test: flows={FLOWS} kills={kills} packets sent={len(packets)} journaled={packets_received} "
          f"flows journaled={flows_received} bytes sent={total_sent} journaled={total_received} "
          f"charged={sum(counters.values())} ledger={sum(ledger.values())} "
          f"gap sent-received: packets={len(packets) - packets_received} flows={FLOWS - flows_received} "
          f"bytes={total_sent - total_received} (kernel receive-buffer drops seen by live workers: {kernel})")
    assert ledger == counters, "ledger and counters disagree"
    assert counters == received, "charged differs from what the workers journaled"
    assert raw_bytes == received, "the raw store differs from what the workers journaled"
    for acc, nbytes in received.items():
        assert nbytes <= sent[acc], "an account received more than it sent"
    # what never reached a journal: only at a worker kill (the packets queued in its
    # socket die with it; with three kills on a loaded CI machine this was 0.2-2.5 %).
    # Not an exactly-once property (that is charged == journaled above), a sanity
    # bound: the workers kept receiving between the kills.
    assert 0 <= packets_received <= len(packets)
    assert total_sent - total_received <= total_sent * 0.10
