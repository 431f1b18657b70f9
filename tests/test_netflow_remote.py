"""A remote collector (``python -m netflow``) charges through a core over URFA/TCP."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import asyncpg

from billcore.server.principals import SERVICE_RIGHTS, create_system_login
from netflow.exporter import ExportClock, build_ipfix, build_v5, build_v9
from tests.conftest import free_port
from tests.running import BillcoreProcess
from tests.test_netflow_worker import expected_bytes, flows_for
from tests.test_netflow_worker_support import recent_ms, setup_accounts, wait_charged

ADDRESSES = [f"10.60.0.{i}" for i in range(1, 11)]


async def wait_log(path: Path, pattern: str, count: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if len(re.findall(pattern, text)) >= count:
            return text
        await asyncio.sleep(0.1)
    raise AssertionError(f"no {count}x {pattern!r} in:\n{text}")


async def test_remote_collector_charges_through_the_core_over_tcp(tmp_path: Path, db_dsn: str) -> None:
    accounts = await setup_accounts(db_dsn, ADDRESSES)
    password = "collector secret"
    conn = await asyncpg.connect(db_dsn)
    try:
        await create_system_login(conn, "collector-t", password, SERVICE_RIGHTS["netflow"])
    finally:
        await conn.close()
    secret = tmp_path / "collector.password"
    secret.write_text(password + "\n")
    at = recent_ms()
    clock = ExportClock(at - 3_600_000, at + 5000)
    batches = [flows_for(ADDRESSES, 1500, seed, at) for seed in (11, 12, 13)]
    want = expected_bytes([f for b in batches for f in b], accounts)
    port = free_port(socket.SOCK_DGRAM)
    log_path = tmp_path / "collector.log"
    with BillcoreProcess(tmp_path, dsn=db_dsn) as bc:  # netflow off in the core: the collector is remote
        bc.wait_for(r'msg="core serving"', timeout=60)
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "netflow", "--core", f"127.0.0.1:{bc.urfa_port}", "--login", "collector-t",
                 "--password-file", str(secret), "--port", str(port), "--host", "127.0.0.1", "--workers", "2",
                 "--journal-dir", str(tmp_path / "journal"), "--raw-dir", str(tmp_path / "raw"), "--id", "t",
                 "--fsync-interval", "0.05", "--ship-interval", "0.2"],
                stdout=log, stderr=subprocess.STDOUT, cwd=str(Path(__file__).resolve().parent.parent))
        try:
            await wait_log(log_path, r"netflow serving", 2, timeout=60)
            for k, packets in enumerate((build_v5(batches[0], clock), build_v9(batches[1], clock, source_id=4),
                                         build_ipfix(batches[2], at // 1000 + 5, domain=2))):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.bind(("127.0.0.1", 0))
                    for p in packets:
                        s.sendto(p, ("127.0.0.1", port))
            got = await wait_charged(db_dsn, want, timeout=60)
            assert got == want
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, log_path.read_text()
    conn = await asyncpg.connect(db_dsn)
    try:
        marks = {r[0]: r[1] for r in await conn.fetch("SELECT source, watermark FROM ingest_watermarks")}
    finally:
        await conn.close()
    # both collector workers are under their own names (one that got no traffic has only its
    # journal's epoch, at watermark -1), one at least committed, and the journal is where they say
    assert set(marks) <= {"netflow:t-0", "netflow:t-1"} and any(m > 0 for m in marks.values())
    for source, mark in marks.items():
        assert (mark > 0 or mark == -1) and (tmp_path / "journal" / source.split(":")[1]).is_dir()
    assert list((tmp_path / "raw").glob("hour=*/*.parquet")), "raw flows are kept by the collector"
    assert os.path.exists(log_path)
