"""netflow.submit in the core: int64 columns in, one commit_usage per call, on a real PostgreSQL."""

from __future__ import annotations

from array import array
from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest

from billcore.api.netflow_calls import COLUMNS, calls
from billcore.common.config import Config
from billcore.server.context import CoreContext
from tests.test_netflow_worker_support import setup_accounts
from urfa.errors import CallFailed

UTC = timezone.utc


def columns(rows: list[tuple[int, ...]]) -> dict[str, bytes]:
    """(account, klass, direction, hour_ms, bytes, packets, flows) rows as the worker sends them."""
    return {name: array("q", [r[i] for r in rows]).tobytes() for i, name in enumerate(COLUMNS)}


async def test_submit_sums_directions_and_duplicates_and_books_once(pool: asyncpg.Pool, db_dsn: str) -> None:
    ids = list((await setup_accounts(db_dsn, ["10.0.0.1", "10.0.0.2", "10.0.0.3"])).values())
    async with pool.acquire() as conn:
        inet = await conn.fetchval("SELECT id FROM traffic_classes WHERE name = 'inet'")
        nowhere = await conn.fetchval("INSERT INTO traffic_classes(name) VALUES ('unpriced') RETURNING id")
    now = datetime.now(UTC).replace(minute=30, second=0, microsecond=0)
    hours = [int((now - timedelta(hours=h)).replace(minute=0).timestamp() * 1000) for h in (1, 0)]
    published: list[tuple[str, dict[str, Any]]] = []
    core = CoreContext(pool, Config(), publish=lambda t, p: published.append((t, p)), now=lambda: now)
    submit = next(c for c in calls(core) if c.name == "netflow.submit").handler
    rows = [(a, inet, d, h, 1_000 * a + 10 * d + n, 3, 1)
            for a in ids for d in (0, 1) for h in hours for n in (0, 1)]  # a row twice: they add up
    rows.append((ids[0], nowhere, 0, hours[1], 77, 1, 1))

    res = await submit(None, worker="w1", watermark=4096, **columns(rows))
    billed = sum(r[4] for r in rows if r[1] == inet)
    assert res == {"watermark": 4096, "duplicate": False, "charged": billed, "rejected": 1, "rejected_bytes": 77}
    again = await submit(None, worker="w1", watermark=4096, **columns(rows))
    assert again["duplicate"] and again["charged"] == 0
    async with pool.acquire() as conn:
        counters = {r["account_id"]: r["quantity"] for r in await conn.fetch("SELECT * FROM usage_counters")}
        assert counters == {a: sum(r[4] for r in rows if r[0] == a and r[1] == inet) for a in ids}
        ledger = await conn.fetch("SELECT account_id, amount, idem_key FROM ledger ORDER BY id")
        assert [(r["account_id"], -r["amount"]) for r in ledger] == [(a, counters[a]) for a in ids]
        assert all(r["idem_key"].startswith("usage:netflow:w1:4096:") for r in ledger)
        assert await conn.fetchval("SELECT watermark FROM ingest_watermarks WHERE source = 'netflow:w1'") == 4096


async def test_submit_names_the_first_bad_row(pool: asyncpg.Pool) -> None:
    core = CoreContext(pool, Config())
    submit = next(c for c in calls(core) if c.name == "netflow.submit").handler
    good = (5, 1, 0, 3_600_000, 100, 1, 1)
    for bad, text in [((0, 1, 0, 3_600_000, 100, 1, 1), "account 0, class 1, bytes 100"),
                      ((5, -2, 0, 3_600_000, 100, 1, 1), "account 5, class -2, bytes 100"),
                      ((5, 1, 0, 3_600_000, -1, 1, 1), "account 5, class 1, bytes -1"),
                      ((6, 1, 0, -1, 100, 1, 1), "account 6, class 1, bytes 100")]:
        with pytest.raises(CallFailed, match=f"bad aggregate row: {text}"):
            await submit(None, worker="w1", watermark=1, **columns([good, bad, (0, 0, 0, -1, -1, 0, 0)]))
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM ingest_watermarks") == 0
