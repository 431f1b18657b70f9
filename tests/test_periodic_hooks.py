"""The core tells plugins what a periodic run booked: account.charged, period.closed (through the outbox)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from billcore.billing import scheduler
from billcore.billing import tariffs as T
from billcore.billing.ledger import Entry, post_charges
from billcore.billing.periods import Period, cumulative_fee
from billcore.server.calls import CallRegistry
from billcore.common.config import config_from_dict
from billcore.server.context import CoreContext
from billcore.server.core import _outbox, _start_plugins, periodic_once
from tests.test_usage_commit import make_accounts

UTC = timezone.utc
APR = datetime(2024, 4, 1, tzinfo=UTC)
MAY = datetime(2024, 5, 1, tzinfo=UTC)
JUN = datetime(2024, 6, 1, tzinfo=UTC)
FEE = 30_000_000
SETUP = 5_000_000


async def test_periodic_run_fires_account_charged_and_period_closed(tmp_path: Path, pool: asyncpg.Pool,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [APR + timedelta(days=5)]
    config = config_from_dict({"core": {"data_dir": str(tmp_path)}, "periodic": {"batch_size": 1}})
    core = CoreContext(pool, config, now=lambda: clock[0])
    manager = await _start_plugins(core, CallRegistry())
    outbox = _outbox(core)
    heard: list[tuple[str, dict[str, Any]]] = []
    ids: set[int] = set()

    def listener(event: str) -> Any:
        async def on(payload: Mapping[str, Any]) -> None:
            ids.add(payload["event_id"])
            heard.append((event, {k: v for k, v in payload.items() if k != "event_id"}))
        return on

    async def periodic() -> Any:
        result = await periodic_once(core)
        await outbox.dispatch_once()
        while await outbox.deliver_hooks_once():
            pass
        return result

    try:
        async with pool.acquire() as conn:
            setup = await T.create_service(conn, "setup", "once", fee=SETUP)
            monthly = await T.create_service(conn, "m", "periodic", fee=FEE,
                                             period={"kind": "monthly", "anchor": APR.date()},
                                             charge_mode="start")
            tariff = await T.create_tariff(conn, "t", [setup, monthly])
            a, b = await make_accounts(conn, 2)
            async with conn.transaction():
                await post_charges(conn, [Entry(b, 7_000_000, "payment", "seed")], actor="t")
            for acc in (a, b):
                await T.link_tariff(conn, acc, tariff, now=clock[0], tz=UTC, actor="t")
        manager.bus.subscribe("account.charged", listener("account.charged"), owner="charges")
        manager.bus.subscribe("period.closed", listener("period.closed"), owner="periods")

        april = FEE - cumulative_fee(FEE, Period(APR, MAY, 0), APR + timedelta(days=5))
        apr = f"periodic: service {monthly} period {APR.isoformat()}"
        once = f"once: service {setup}"
        first = await periodic()   # one account per batch; the link starts now: the rest of April and the set-up fee
        assert first.charges == 2 and first.once_charges == 2 and first.amount == 2 * (april + SETUP)
        assert heard == [
            ("account.charged", {"account_id": a, "amount": april, "balance": -april, "reason": apr}),
            ("account.charged", {"account_id": a, "amount": SETUP, "balance": -april - SETUP, "reason": once}),
            ("account.charged", {"account_id": b, "amount": april, "balance": 7_000_000 - april, "reason": apr}),
            ("account.charged", {"account_id": b, "amount": SETUP, "balance": 7_000_000 - april - SETUP,
                                 "reason": once}),
        ]

        heard.clear()
        clock[0] = MAY + timedelta(minutes=1)
        run = await periodic()
        assert run.charges == 2 and run.batches == 2
        may = f"periodic: service {monthly} period {MAY.isoformat()}"
        assert heard == [
            ("account.charged", {"account_id": a, "amount": FEE, "balance": -april - SETUP - FEE, "reason": may}),
            ("account.charged", {"account_id": b, "amount": FEE, "balance": 7_000_000 - april - SETUP - FEE,
                                 "reason": may}),
            # once, though both accounts (in two batches) closed April
            ("period.closed", {"period_start": int(APR.timestamp()), "period_end": int(MAY.timestamp())}),
        ]
        async with pool.acquire() as conn:      # the payloads are the ledger's rows
            rows = await conn.fetch("SELECT account_id, -amount AS amount, balance_after FROM ledger"
                                    " WHERE actor = 'periodic' ORDER BY id")
        assert [(r["account_id"], r["amount"], r["balance_after"]) for r in rows[4:]] == [
            (p["account_id"], p["amount"], p["balance"]) for _, p in heard[:2]]

        # Nobody listens to account.charged: the run builds nothing for it.
        heard.clear()
        manager.bus.unsubscribe_owner("charges")
        monkeypatch.setattr(scheduler, "_booked", None)     # calling it would raise
        clock[0] = JUN + timedelta(minutes=1)
        quiet = await periodic()
        assert quiet.charges == 2
        assert len(ids) == 8        # every delivery carried its own event id
        assert await pool.fetchval("SELECT count(*) FROM outbox_events WHERE event = 'account.charged'") == 6
        assert heard == [("period.closed", {"period_start": int(MAY.timestamp()),
                                            "period_end": int(JUN.timestamp())})]
    finally:
        await manager.close()
