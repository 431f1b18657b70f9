"""Shared pieces of the NetFlow end-to-end tests (no tests of its own).

``netflow_core`` is a real ``billcore serve`` (supervisor, core, N netflow
workers) on a test database.
"""

from __future__ import annotations

import asyncio
import socket
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import asyncpg

from billcore.billing import classification
from billcore.billing import tariffs as T
from tests.conftest import free_port
from tests.running import BillcoreProcess

UTC = timezone.utc
PRICE = 1  # micro-units per byte: charged money equals bytes



def netflow_core(tmp_path: Path, dsn: str, **netflow: Any) -> BillcoreProcess:
    port = netflow.pop("port", None) or free_port(socket.SOCK_DGRAM)
    settings = {"enabled": True, "host": "127.0.0.1", "port": port, "workers": 2, "fsync_interval": 0.05,
                "ship_interval": 0.2, "segment_bytes": 1 << 20, **netflow}
    return BillcoreProcess(tmp_path, dsn=dsn, netflow=settings, supervisor={"restart_backoff_initial": 0.1,
                                                                           "restart_backoff_max": 0.5})


async def setup_accounts(dsn: str, addresses: list[str]) -> dict[str, int]:
    """One account per address (a /32 or /128 binding), all on a tariff that charges
    PRICE micro-units per byte of class 'inet' (every flow)."""
    conn = await asyncpg.connect(dsn)
    try:
        inet = await classification.create_class(conn, "inet")
        await classification.add_rule(conn, inet)  # no criteria: every leg of a bound address
        service = await T.create_service(conn, "traffic", "traffic")
        await T.set_rate(conn, service, class_id=inet, range_id=None, prepaid=0, unit_size=1, tiers=[(0, PRICE)])
        tariff = await T.create_tariff(conn, "per-byte", [service])
        since = datetime(2020, 1, 1, tzinfo=UTC)
        out = {}
        for addr in addresses:
            user = await conn.fetchval(
                "INSERT INTO users(login, scram_salt, scram_iterations, scram_stored_key, scram_server_key)"
                " VALUES ('u' || nextval('users_id_seq'), '\\x00', 4096, '\\x00', '\\x00') RETURNING id")
            account = await conn.fetchval("INSERT INTO accounts(user_id, credit) VALUES ($1, 10^15) RETURNING id", user)
            await T.link_tariff(conn, account, tariff, now=since, tz=UTC, actor="test")
            prefix = f"{addr}/128" if ":" in addr else f"{addr}/32"
            await classification.add_binding(conn, account, prefix, valid_from=since)
            out[addr] = account
        return out
    finally:
        await conn.close()


async def charged(dsn: str) -> tuple[dict[int, int], dict[int, int]]:
    """Per account: bytes in the usage counters, and micro-units charged in the ledger."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        counters = {r[0]: int(r[1]) for r in await conn.fetch(
            "SELECT account_id, sum(quantity) FROM usage_counters GROUP BY 1")}
        ledger = {r[0]: -int(r[1]) for r in await conn.fetch(
            "SELECT account_id, sum(amount) FROM ledger WHERE kind = 'traffic' GROUP BY 1")}
        await conn.execute("COMMIT")
        return counters, ledger
    finally:
        await conn.close()


async def wait_charged(dsn: str, expected: dict[int, int], timeout: float, bc: BillcoreProcess | None = None
                       ) -> dict[int, int]:
    """Poll until the counters equal ``expected`` (or time runs out); the last counters."""
    deadline = time.monotonic() + timeout
    counters: dict[int, int] = {}
    while time.monotonic() < deadline:
        counters, _ = await charged(dsn)
        if counters == expected:
            return counters
        await asyncio.sleep(0.25)
    return counters


def recent_ms(minutes_ago: int = 10) -> int:
    """An epoch-ms time inside the current hour's neighbourhood, safely in the past."""
    return int((datetime.now(UTC) - timedelta(minutes=minutes_ago)).timestamp() * 1000)
