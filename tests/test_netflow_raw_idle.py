"""Raw Parquet flows on an idle collector: ``raw_flush_interval`` is a promise on time, not on the next packet."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pyarrow.parquet as pq

from billcore.common.rawflows import HOUR_MS, hour_dir
from netflow.exporter import ExportClock, build_v5
from netflow.rawstore import RawWriter
from tests.test_netflow_rawstore_speed import HOUR0, make_flows, make_legs
from tests.test_netflow_worker import ACCOUNTS_V4, bc_port, expected_bytes, flows_for, send
from tests.test_netflow_worker_support import netflow_core, recent_ms, setup_accounts, wait_charged


def finished(root: Path) -> list[Path]:
    return sorted(root.glob("hour=*/*.parquet"))


def test_tick_flushes_a_window_whose_time_is_up(tmp_path: Path) -> None:
    writer = RawWriter(tmp_path, "0", retention_days=0, flush_interval=30.0)
    flows = make_flows(500, seed=1)
    legs = make_legs(flows, seed=2)
    writer.add_legs(flows, legs, 0, 4096, now=100.0)
    assert not writer.tick_due(now=129.9)
    writer.tick(now=129.9)
    assert finished(tmp_path) == [] and writer.watermark() is None
    # no further batch comes; the worker's idle loop ticks
    assert writer.tick_due(now=130.0)
    writer.tick(now=130.0)
    files = finished(tmp_path)
    assert [p.name for p in files] == [f"w0-{0:020d}-{4096:020d}.parquet"]
    assert pq.read_table(files[0]).num_rows == len(legs.flow)
    assert writer.watermark() == 4096
    assert not writer.tick_due(now=1e9)            # nothing waits: nothing to do


def test_tick_applies_retention_without_traffic(tmp_path: Path) -> None:
    old = hour_dir(tmp_path, HOUR0)
    old.mkdir(parents=True)
    (old / "w9-x.parquet").write_bytes(b"")
    writer = RawWriter(tmp_path, "0", retention_days=1)
    wall = HOUR0 / 1000 + 3 * 86400
    assert writer.tick_due(now=0.0, wall=wall)
    writer.tick(now=0.0, wall=wall)
    assert not old.exists()
    recent = hour_dir(tmp_path, HOUR0 + 2 * 86400 * 1000 + HOUR_MS)
    recent.mkdir(parents=True)
    # retention runs at most hourly; an hour later it runs again and keeps what is young enough
    assert not writer.tick_due(now=0.0, wall=wall + 60)
    writer.tick(now=0.0, wall=wall + 3601)
    assert recent.exists()


async def test_idle_worker_writes_parquet_after_the_interval(tmp_path: Path, db_dsn: str) -> None:
    """One burst, then silence: the legs are in a finished Parquet file within raw_flush_interval (+ a tick),
    while the collector still runs."""
    accounts = await setup_accounts(db_dsn, ACCOUNTS_V4)
    at = recent_ms()
    flows = flows_for(ACCOUNTS_V4, 500, 7, at)
    bc = netflow_core(tmp_path, db_dsn, workers=1, raw_flush_interval=1.0)
    raw = tmp_path / "var" / "netflow" / "raw"
    with bc:
        port = bc_port(bc)
        bc.wait_for(r'msg="netflow serving"', timeout=60)
        send(port, build_v5(flows, ExportClock(at - 3_600_000, at + 5000)), 40011)
        want = expected_bytes(flows, accounts)
        assert await wait_charged(db_dsn, want, timeout=60) == want
        charged_at = time.monotonic()
        while not finished(raw) and time.monotonic() - charged_at < 20:
            await asyncio.sleep(0.1)
        files = finished(raw)
        waited = time.monotonic() - charged_at
        assert files, "no Parquet file while the collector is idle"
        print(f"idle collector: Parquet written {waited:.2f} s after the batch was charged (interval 1 s)")
        # the window is 1 s and the idle loop ticks every second; the rest is slack for a loaded machine
        assert waited < 10, f"the raw window was written {waited:.1f} s after the batch, interval 1 s"
        per_account: dict[int, int] = {}
        for path in files:
            t = pq.read_table(path)
            for acc, nbytes in zip(t["account"].to_pylist(), t["bytes"].to_pylist()):
                if acc:
                    per_account[acc] = per_account.get(acc, 0) + nbytes
        assert per_account == want
