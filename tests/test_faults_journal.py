"""Issue 23, parts 2 and 3: a lost, wiped or truncated journal, and a full journal volume.

Real processes (``billcore serve`` with a NetFlow worker on a test database),
real UDP, real files; what is asserted is what an operator compares: the
ledger against the bytes that were sent, and the alarm metrics.

* A journal directory wiped (or replaced by an empty one) under a committed
  watermark: before the fix every new batch counted as already charged
  (ledger short by everything sent after the wipe, ``journal_lag_bytes`` 0, no
  alarm). Now the worker lifts its journal's offsets above the watermark,
  begins a new epoch, and ``netflow_journal_epochs{reason="replaced"}`` says so.
* The same journal truncated below the watermark: ``reason="truncated"``.
* A plain restart on the intact journal: no new epoch, nothing charged twice.
* A 2 MiB tmpfs as the journal volume, filled: the worker stays up (no
  restart), drops are counted as ``disk_full``, and once space returns what
  is sent is charged exactly (ledger == sent − counted drops).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import asyncpg
import numpy as np
import pytest

from netflow.batches import JournalTail
from netflow.checkpoints import plan_resume
from netflow.exporter import ExportClock, FlowSpec, build_v5
from netflow.journal import (
    INDEX_DTYPE, Journal, JournalIdentity, JournalReader, list_segments, packed_address, read_identity,
)
from tests.conftest import need_peer
from tests.test_netflow_worker import bc_port
from tests.test_netflow_worker_support import charged, netflow_core, recent_ms, setup_accounts
from tests.waiting import eventually

ADDRESSES = [f"10.23.0.{i}" for i in range(1, 9)]
PER_PACKET = 30  # v5 flows per datagram


# ---------------------------------------------------------------- pure and file-level


def test_plan_resume_decides_epoch_and_alarm() -> None:
    mine = JournalIdentity("a1")
    # own journal, intact: nothing changes, replay from the watermark
    assert plan_resume(mine, 500, 400, "a1").reason is None
    assert plan_resume(mine, 400, 400, "a1").identity == mine
    # own journal cut below the watermark: a new epoch
    cut = plan_resume(mine, 300, 400, "a1")
    assert cut.reason == "truncated" and cut.identity != mine
    # a journal that is not the counted one (wiped: a fresh identity; another's): replaced
    assert plan_resume(JournalIdentity("b2"), 0, 400, "a1") == plan_resume(JournalIdentity("b2"), 0, 400, "a1")
    assert plan_resume(JournalIdentity("b2"), 0, 400, "a1").reason == "replaced"
    assert plan_resume(None, 900, 400, "a1").reason == "replaced"
    # a source that never committed: its first journal, no alarm
    assert plan_resume(mine, 0, -1, None) == plan_resume(mine, 0, -1, None)
    assert plan_resume(mine, 0, -1, None).reason == "first"
    # from before identities (old database, old journal): adopted when it can be the counted one
    assert plan_resume(None, 500, 400, None).reason == "adopted"
    assert plan_resume(None, 300, 400, None).reason == "truncated"
    # an old database's watermark and a journal with an identity (wiped after the upgrade)
    assert plan_resume(JournalIdentity("c3"), 0, 400, None).reason == "replaced"


def _datagram_blocks(journal: Journal, n: int) -> list[int]:
    return [journal.append(1, "192.0.2.1", 2055, bytes([k]) * 100) for k in range(n)]


def test_lifted_run_continues_above_the_watermark_and_the_tail_skips_the_gap(tmp_path: Path) -> None:
    journal = Journal(tmp_path, segment_bytes=1 << 16)
    identity = journal.identity
    assert identity is not None and read_identity(tmp_path) == identity
    old = _datagram_blocks(journal, 10)
    journal.close()
    reopened = Journal(tmp_path, segment_bytes=1 << 16)
    assert reopened.identity == identity and not reopened.created
    end = reopened.start_run()
    assert end == old[-1]
    early = _datagram_blocks(reopened, 3)  # received before the core answered
    watermark = 10_000_000
    assert reopened.lift_run(watermark) == watermark - end
    late = _datagram_blocks(reopened, 2)
    reopened.close()
    assert early[0] - end + watermark - 0 > watermark
    ends = [r.end for r in JournalReader(tmp_path, 0)]
    assert ends == old + [m - end + watermark for m in early] + late
    assert all(m > watermark for m in ends[10:])
    # the shipper's tail crosses the gap between the old journal and the lifted run
    tail = JournalTail(tmp_path, old[5])
    got = []
    while tail.position < late[-1]:
        batch = tail.read(late[-1], 100)
        got.extend(sorted(set(batch.offsets.tolist())))
    assert len(got) == 4 + 3 + 2 and tail.position == late[-1]


def test_every_segment_gone_means_a_new_identity(tmp_path: Path) -> None:
    with Journal(tmp_path) as journal:
        first = journal.identity
        _datagram_blocks(journal, 3)
    for _, path in list_segments(tmp_path):
        path.unlink()
    again = Journal(tmp_path)
    assert again.created and again.identity != first and read_identity(tmp_path) == again.identity
    again.close()


# ---------------------------------------------------------------- the core's side: epochs beside watermarks


async def test_epochs_compare_and_set_and_a_stale_epoch_cannot_charge(pool: asyncpg.Pool) -> None:
    from datetime import datetime, timezone

    from billcore.common.errors import UsageError
    from billcore.billing.usage import EpochMismatch, begin_epoch, commit_usage, journal_mark

    now = datetime(2025, 3, 4, 12, tzinfo=timezone.utc)
    async with pool.acquire() as conn:
        assert (await journal_mark(conn, "netflow:7")).epoch is None
        first = await begin_epoch(conn, "netflow:7", "aa11", expect=None, reason="first", journal_end=0, now=now)
        assert first is not None and (first.watermark, first.epoch) == (-1, "aa11")
        assert (await commit_usage(conn, "netflow:7", 500, [], now, epoch="aa11")).watermark == 500
        # the same epoch again (a retried call) answers its mark; a stale expectation loses
        assert await begin_epoch(conn, "netflow:7", "aa11", expect=None, reason="first", journal_end=0, now=now) \
            == first.__class__(500, "aa11")
        assert await begin_epoch(conn, "netflow:7", "bb22", expect="zz99", reason="replaced", journal_end=0,
                                 now=now) is None
        moved = await begin_epoch(conn, "netflow:7", "bb22", expect="aa11", reason="replaced", journal_end=0, now=now)
        assert moved is not None and (moved.watermark, moved.epoch) == (500, "bb22")
        # a worker still on the old journal cannot charge into the new epoch
        with pytest.raises(EpochMismatch) as refused:
            await commit_usage(conn, "netflow:7", 900, [], now, epoch="aa11")
        assert refused.value.code == "billing.epoch_mismatch"
        assert (await journal_mark(conn, "netflow:7")).watermark == 500
        # bad input gets a clear refusal
        for bad in ({"epoch": "not hex!"}, {"reason": "because"}, {"journal_end": -1}):
            args = {"epoch": "cc33", "expect": "bb22", "reason": "replaced", "journal_end": 0, **bad}
            with pytest.raises(UsageError):
                await begin_epoch(conn, "netflow:7", args["epoch"], expect=args["expect"], reason=args["reason"],
                                  journal_end=args["journal_end"], now=now)
        rows = await conn.fetch("SELECT epoch, previous, reason, watermark FROM ingest_epochs"
                                " WHERE source = 'netflow:7' ORDER BY began_at, reason")
        assert [tuple(r) for r in rows] == [("aa11", None, "first", -1), ("bb22", "aa11", "replaced", 500)]


# ---------------------------------------------------------------- real processes


def v5_packets(at: int, phase: int, flows_per_address: int) -> tuple[list[bytes], dict[str, int]]:
    """v5 datagrams of ``flows_per_address`` flows per address (bytes differ per phase), and bytes per address."""
    clock = ExportClock(at - 3_600_000, at + 5_000)
    flows, per_addr = [], {}
    for k in range(flows_per_address):
        for n, addr in enumerate(ADDRESSES):
            size = 1000 * phase + 17 * k + n + 40
            flows.append(FlowSpec(addr, "203.0.113.9", 1000 + k % 50, 443, 6, size, 3, at, at + 500))
            per_addr[addr] = per_addr.get(addr, 0) + size
    return build_v5(flows, clock, flow_sequence=phase * 1_000_000), per_addr


def send(port: int, packets: list[bytes], per_second: int = 2000) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        t0 = time.monotonic()
        for k, p in enumerate(packets):
            sock.sendto(p, ("127.0.0.1", port))
            ahead = (k + 1) / per_second - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
    finally:
        sock.close()


async def wait_ledger(dsn: str, expected: dict[int, int], timeout: float = 60.0) -> dict[int, int]:
    """The ledger's traffic charges per account once they equal ``expected`` (or when time runs out)."""
    deadline = time.monotonic() + timeout
    ledger: dict[int, int] = {}
    while time.monotonic() < deadline:
        _, ledger = await charged(dsn)
        if ledger == expected:
            break
        await asyncio.sleep(0.25)
    return ledger


def metrics(bc: object) -> str:
    url = f"http://127.0.0.1:{bc.metrics_port}/metrics"  # type: ignore[attr-defined]
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def metric(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def add(total: dict[int, int], accounts: dict[str, int], per_addr: dict[str, int]) -> None:
    for addr, nbytes in per_addr.items():
        total[accounts[addr]] = total.get(accounts[addr], 0) + nbytes


async def committed(dsn: str) -> tuple[int, str | None]:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow("SELECT watermark, epoch FROM ingest_watermarks WHERE source = 'netflow:0'")
        return int(row[0]), row[1]
    finally:
        await conn.close()


async def test_wiped_and_truncated_journal_under_a_watermark_charge_all_new_traffic(tmp_path: Path,
                                                                                       db_dsn: str) -> None:
    accounts = await setup_accounts(db_dsn, ADDRESSES)
    journal_root = tmp_path / "journal"
    bc = netflow_core(tmp_path, db_dsn, workers=1, journal_dir=str(journal_root), segment_bytes=1 << 16)
    port = bc_port(bc)
    expected: dict[int, int] = {}
    at = recent_ms()

    async def phase(n: int) -> None:
        bc.start()
        try:
            bc.wait_for(r'msg="netflow serving"', timeout=60)
            packets, per_addr = v5_packets(at, n, 300)
            send(port, packets)
            add(expected, accounts, per_addr)
            ledger = await wait_ledger(db_dsn, expected)
            assert ledger == expected, f"phase {n}: ledger {sum(ledger.values())} of {sum(expected.values())} sent"
            phase_metrics[n] = metrics(bc)
            assert "restarting" not in bc.log()
        finally:
            bc.stop()

    phase_metrics: dict[int, str] = {}
    await phase(1)
    mark1, epoch1 = await committed(db_dsn)
    assert mark1 > 0 and epoch1 is not None
    await phase(2)  # a restart on its own intact journal: same epoch, nothing charged twice
    mark2, epoch2 = await committed(db_dsn)
    assert epoch2 == epoch1 and mark2 > mark1
    assert metric(phase_metrics[2], "netflow_journal_epochs_total", reason="replaced") is None

    # an upgrade: a database and a journal from before identities are adopted, nothing charged twice
    (journal_root / "0" / "journal.id").unlink()
    conn = await asyncpg.connect(db_dsn)
    try:
        await conn.execute("UPDATE ingest_watermarks SET epoch = NULL")
        await conn.execute("DELETE FROM ingest_epochs")
    finally:
        await conn.close()
    await phase(5)
    mark5, epoch5 = await committed(db_dsn)
    assert epoch5 not in (None, epoch1) and mark5 > mark2
    assert metric(phase_metrics[5], "netflow_journal_epochs_total", worker="0", reason="adopted") == 1.0
    assert metric(phase_metrics[5], "netflow_journal_epochs_total", reason="replaced") is None
    mark2 = mark5

    # a wiped journal volume (or journal_dir pointed at a new, empty directory)
    shutil.rmtree(journal_root / "0")
    await phase(3)
    mark3, epoch3 = await committed(db_dsn)
    assert epoch3 not in (None, epoch1, epoch5) and mark3 > mark2
    assert metric(phase_metrics[3], "netflow_journal_epochs_total", worker="0", reason="replaced") == 1.0
    assert re.search(r"JOURNAL IS NOT THE ONE THE WATERMARK COUNTS.*reason=replaced", bc.log())

    # the same journal cut below the watermark (newest segments lost, the rest shortened)
    segments = list_segments(journal_root / "0")
    for _, path in segments[1:]:
        path.unlink()
    base, first = segments[0]
    with open(first, "r+b") as f:
        f.truncate(max(0, first.stat().st_size // 2))
    assert base + first.stat().st_size < mark3
    await phase(4)
    mark4, epoch4 = await committed(db_dsn)
    assert epoch4 not in (None, epoch3) and mark4 > mark3
    assert metric(phase_metrics[4], "netflow_journal_epochs_total", worker="0", reason="truncated") == 1.0
    conn = await asyncpg.connect(db_dsn)
    try:
        reasons = [r[0] for r in await conn.fetch(
            "SELECT reason FROM ingest_epochs WHERE source = 'netflow:0' ORDER BY began_at")]
    finally:
        await conn.close()
    assert reasons == ["adopted", "replaced", "truncated"]


# ---------------------------------------------------------------- a full journal volume


@pytest.fixture
def tiny_volume(tmp_path: Path):
    """A 2 MiB tmpfs (root only): skipped with the reason when mount is refused, failed under CI=true."""
    mount = tmp_path / "volume"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    need_peer(done.returncode == 0, f"cannot mount a tmpfs for the journal volume: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(volume: Path, leave: int) -> Path:
    """A filler file that leaves about ``leave`` bytes free on ``volume``."""
    filler = volume / "filler"
    st = os.statvfs(volume)
    free = st.f_bavail * st.f_frsize
    with open(filler, "ab") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def test_a_full_volume_refuses_whole_records_and_the_journal_stays_readable(tiny_volume: Path) -> None:
    from netflow.errors import JournalFull

    journal = Journal(tiny_volume / "j", segment_bytes=1 << 16)
    index = np.zeros(20, INDEX_DTYPE)
    index["length"] = 1400
    payload = bytes(range(200)) * 140
    marks, refused = [], 0
    for _ in range(400):  # 11 MB into 2 MiB
        try:
            marks.append(journal.append_block(1, [packed_address("192.0.2.1")], index.tobytes(), 20, payload))
        except JournalFull:
            refused += 1
    assert marks and refused, (len(marks), refused)
    assert journal.offset == marks[-1]
    # no torn record anywhere: every block written is read back whole, nothing else
    assert [r.end for r in JournalReader(tiny_volume / "j", 0)][::20] == marks
    # space returns: appends go on right after the last whole record
    for _, path in list_segments(tiny_volume / "j")[:-1]:
        path.unlink()
    after = journal.append_block(2, [packed_address("192.0.2.1")], index.tobytes(), 20, payload)
    journal.close()
    tail = [r.end for r in JournalReader(tiny_volume / "j", marks[-1])]
    assert tail == [after] * 20


async def test_full_journal_volume_drops_counted_and_recovers_exactly(tmp_path: Path, db_dsn: str,
                                                                    tiny_volume: Path) -> None:
    accounts = await setup_accounts(db_dsn, ADDRESSES)
    bc = netflow_core(tmp_path, db_dsn, workers=1, journal_dir=str(tiny_volume), segment_bytes=1 << 16,
                      journal_min_free_bytes=1_600_000)
    port = bc_port(bc)
    at = recent_ms()
    expected: dict[int, int] = {}
    with bc:
        bc.wait_for(r'msg="netflow serving"', timeout=60)
        worker_pid = bc.child_pid("netflow")
        packets, per_addr = v5_packets(at, 1, 150)
        send(port, packets)
        add(expected, accounts, per_addr)
        assert await wait_ledger(db_dsn, expected) == expected
        text = metrics(bc)
        assert metric(text, "netflow_journal_disk_low", worker="0") == 0.0
        before = metric(text, "netflow_packets_received_total", worker="0")
        assert before == len(packets)

        # the volume fills (another writer, or the journal itself while the core was away) during a
        # burst of 4.4 MB; every datagram of it is 30 flows of one account, FLOW bytes each
        filler = fill(tiny_volume, 1_200_000)
        flow = 1234
        burst = build_v5([FlowSpec(ADDRESSES[0], "203.0.113.9", 1000, 443, 6, flow, 3, at, at + 500)] * 30 * 3000,
                         ExportClock(at - 3_600_000, at + 5_000), flow_sequence=5_000_000)
        send(port, burst)

        def burst_accounted() -> str | None:
            # every datagram of the burst either journaled or counted as dropped
            text = metrics(bc)
            dropped = metric(text, "netflow_drops_total", worker="0", reason="disk_full") or 0.0
            journaled = (metric(text, "netflow_packets_received_total", worker="0") or 0.0) - before  # type: ignore[operator]
            return text if journaled + dropped >= len(burst) else None

        text = await eventually(burst_accounted, what=f"{len(burst)} datagrams journaled or dropped")
        dropped = metric(text, "netflow_drops_total", worker="0", reason="disk_full")
        journaled = metric(text, "netflow_packets_received_total", worker="0") - before  # type: ignore[operator]
        assert dropped and dropped > 0, "nothing was counted as dropped for a full disk"
        assert journaled + dropped == len(burst), (journaled, dropped, len(burst))
        print(f"full volume: {len(burst)} datagrams sent, {int(journaled)} journaled, "
              f"{int(dropped)} dropped as disk_full")
        assert metric(text, "netflow_journal_disk_full", worker="0") == 1.0
        assert metric(text, "netflow_journal_disk_low", worker="0") == 1.0
        free = metric(text, "netflow_journal_free_bytes", worker="0")
        assert free is not None and free < 1_600_000
        assert "JOURNAL VOLUME FULL" in bc.log() and "JOURNAL VOLUME LOW" in bc.log()
        # what was journaled before the volume filled is charged while it is still full
        expected[accounts[ADDRESSES[0]]] += int(journaled) * 30 * flow
        ledger = await wait_ledger(db_dsn, expected)
        assert ledger == expected, (sum(ledger.values()), sum(expected.values()))

        # space returns: journaling resumes by itself; the worker never restarted
        filler.unlink()
        # part of the scenario: the receiver probes free space at most every PROBE_INTERVAL
        # (0.5 s, netflow.worker) and only on a write; let that interval elapse
        await asyncio.sleep(1.0)
        packets, per_addr = v5_packets(at, 3, 300)
        send(port, packets)
        add(expected, accounts, per_addr)
        ledger = await wait_ledger(db_dsn, expected)
        assert ledger == expected, (sum(ledger.values()), sum(expected.values()))
        text = metrics(bc)
        assert metric(text, "netflow_journal_disk_full", worker="0") == 0.0
        assert metric(text, "netflow_drops_total", worker="0", reason="disk_full") == dropped
        assert metric(text, "netflow_drops_total", worker="0", reason="kernel") in (None, 0.0)
        assert bc.child_pid("netflow") == worker_pid, "the worker restarted"
        assert "restarting" not in bc.log() and "journaling resumed" in bc.log()
