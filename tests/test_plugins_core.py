"""The core's side of plugins (``billcore.server.core._start_plugins``) on a real database:
operators' settings from the config directory, subscribers' ownership, real
payments, and the block events' balance."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from urfa.errors import CallFailed

from billcore.server.calls import CallRegistry
from billcore.common.config import config_from_dict
from billcore.server.context import CoreContext
from billcore.server.core import _outbox, _start_plugins
from billcore.plugins.loader import PluginManager

from .test_plugins_support import DevKey, caller, copy_first_party, subscriber


@dataclass
class Core:
    core: CoreContext
    registry: CallRegistry
    manager: PluginManager
    published: list[tuple[str, dict[str, Any]]]

    async def deliver(self) -> None:
        """What the core's outbox tasks do after a commit: fan out, then run the hooks."""
        service = self.core.extras["outbox"]
        await service.dispatch_once()
        while await service.deliver_hooks_once():
            pass

    async def call(self, ctx: Any, name: str, /, **args: object) -> Any:
        table = self.registry.snapshot(ctx.principal.kind, ctx.principal.rights)
        try:
            symbol = table.lookup(name)
            with self.registry.in_flight(symbol):
                return await symbol.spec.handler(ctx, **args)
        finally:
            table.close()


@pytest.fixture
async def core(tmp_path: Path, pool: asyncpg.Pool) -> AsyncIterator[Core]:
    data = tmp_path / "data"
    key = DevKey(data / "plugin-keys")
    for name in ("vouchers", "lowbalance"):
        key.sign(copy_first_party(name, data / "plugins"))
    (data / "plugin-config").mkdir(parents=True)
    (data / "plugin-config" / "vouchers.toml").write_text("max_failures = 2\n")
    (data / "plugin-config" / "lowbalance.toml").write_text("threshold = 5_000_000\n")
    config = config_from_dict({"core": {"data_dir": str(data)},
                               "plugins": {"load": ["vouchers", "lowbalance"]}})
    published: list[tuple[str, dict[str, Any]]] = []
    ctx = CoreContext(pool, config, publish=lambda topic, payload: published.append((topic, payload)))
    registry = CallRegistry()
    manager = await _start_plugins(ctx, registry)
    _outbox(ctx)
    yield Core(ctx, registry, manager, published)
    await manager.close()


async def balance(pool: asyncpg.Pool, account_id: int) -> int:
    return int(await pool.fetchval("SELECT balance FROM accounts WHERE id = $1", account_id))


async def test_subscriber_redeems_onto_own_account_through_the_core(core: Core, pool: asyncpg.Pool) -> None:
    admin = caller("admin", 1)
    assert {p["name"]: p["version"] for p in await core.call(admin, "plugins.list")} == {
        "lowbalance": "1.0.0", "vouchers": "1.1.0"}
    assert await pool.fetchval("SELECT count(*) FROM plugin_versions") == 2
    alice, (alice_acc,) = await subscriber(pool, "alice")
    bob, (bob_acc,) = await subscriber(pool, "bob")
    [card] = await core.call(admin, "vouchers.generate", count=1, amount=1_500_000)

    as_alice = caller("user", alice)
    with pytest.raises(CallFailed, match="not your account"):
        await core.call(as_alice, "vouchers.redeem", code=card["code"], account_id=bob_acc)
    done = await core.call(as_alice, "vouchers.redeem", code=card["code"], account_id=alice_acc)
    # A real payment in the ledger, and the hooks heard of it (through the outbox).
    await core.deliver()
    assert await balance(pool, alice_acc) == 1_500_000
    assert await pool.fetchval("SELECT method FROM payments WHERE id = $1", done["payment_id"]) == "voucher"
    [notice] = await core.call(admin, "lowbalance.pending")
    assert (notice["account_id"], notice["balance"], notice["reason"]) == (alice_acc, 1_500_000, "payment")
    assert await balance(pool, bob_acc) == 0

    # vouchers.toml set max_failures = 2: the third failure in a row is refused as such.
    as_bob = caller("user", bob)
    for _ in range(2):
        with pytest.raises(CallFailed, match="unknown voucher code"):
            await core.call(as_bob, "vouchers.redeem", code="2345-6789-ABCD-EFGH", account_id=bob_acc)
    with pytest.raises(CallFailed, match="too many failed redeems"):
        await core.call(as_bob, "vouchers.redeem", code="2345-6789-ABCD-EFGH", account_id=bob_acc)


async def test_block_events_reach_hooks_with_the_balance(core: Core, pool: asyncpg.Pool) -> None:
    from billcore.billing.blocks import set_block

    _, (acc,) = await subscriber(pool, "carol")
    # The block's own transaction enqueued account.blocked with the balance under the lock.
    async with pool.acquire() as conn:
        await set_block(conn, acc, "admin", actor="admin:test#1", reason="debt",
                        now=dt.datetime.now(dt.timezone.utc))
    await core.deliver()
    [notice] = await core.call(caller("admin", 1), "lowbalance.pending")
    assert (notice["account_id"], notice["balance"], notice["reason"]) == (acc, 0, "blocked")


async def test_a_voucher_that_pays_the_debt_lifts_the_block(core: Core, pool: asyncpg.Pool) -> None:
    from billcore.billing.payments import add_payment

    dave, (acc,) = await subscriber(pool, "dave")
    async with pool.acquire() as conn:
        debt = await add_payment(conn, account_id=acc, amount=-700_000, method="correction", actor="admin:test#1")
    assert [c.action for c in debt.block_changes] == ["set"]
    [card] = await core.call(caller("admin", 1), "vouchers.generate", count=1, amount=1_000_000)
    await core.call(caller("user", dave), "vouchers.redeem", code=card["code"], account_id=acc)
    assert await balance(pool, acc) == 300_000
    assert await pool.fetchval("SELECT count(*) FROM blocks WHERE account_id = $1 AND lifted_at IS NULL", acc) == 0
    # RADIUS hears of the lift through the core's "blocks" topic.
    assert [(t, p["account_id"], p["action"]) for t, p in core.published] == [("blocks", acc, "lifted")]
