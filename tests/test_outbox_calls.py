"""The outbox's URFA calls on a real database, through the call registry's
rights: each edge claims only its own channels, operators look and retry,
bad input answers a clear code, and the core's dispatcher fans out with the
hook and radius routers."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import asyncpg
import pytest

from billcore.api import outbox_calls
from billcore.billing.blocks import set_block
from billcore.billing.payments import add_payment
from billcore.common.config import config_from_dict
from billcore.plugins.hooks import HookBus
from billcore.server.calls import CallRegistry
from billcore.server.context import CoreContext
from billcore.server.outbox_service import OutboxService, hook_router, radius_router
from billcore.server.principals import SERVICE_RIGHTS
from tests.test_plugins_support import subscriber
from urfa.errors import CallFailed

T0 = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.timezone.utc)


class World:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.clock = [T0]
        self.published: list[tuple[str, dict[str, Any]]] = []
        config = config_from_dict({"outbox": {"max_attempts": 2, "backoff_base": 5.0, "backoff_cap": 60.0}})
        self.core = CoreContext(pool, config, publish=lambda t, p: self.published.append((t, p)),
                                now=lambda: self.clock[0])
        self.bus = HookBus(timeout=1.0)
        self.service = OutboxService(pool, config.outbox, [radius_router, hook_router(self.bus)], self.bus,
                                     self.core.publish, self.core.now)
        self.core.extras["outbox"] = self.service
        self.registry = CallRegistry()
        self.registry.register_all(outbox_calls.calls(self.core))

    async def call(self, kind: str, login: str, rights: frozenset[str], name: str, **args: Any) -> Any:
        table = self.registry.snapshot(kind, rights)
        try:
            symbol = table.lookup(name)
            ctx = SimpleNamespace(principal=SimpleNamespace(kind=kind, login=login, id=1, rights=rights), ip="")
            return await symbol.spec.handler(ctx, **args)
        finally:
            table.close()

    async def as_radius(self, name: str, **args: Any) -> Any:
        return await self.call("system", "radius", SERVICE_RIGHTS["radius"], name, **args)

    async def as_operator(self, name: str, rights: frozenset[str] = frozenset({"*"}), **args: Any) -> Any:
        return await self.call("admin", "root", rights, name, **args)


@pytest.fixture
async def world(pool: asyncpg.Pool) -> World:
    return World(pool)


async def test_routers_fan_out_and_radius_claims_only_its_channel(world: World, pool: asyncpg.Pool) -> None:
    heard: list[dict[str, Any]] = []

    async def on_block(payload: Mapping[str, Any]) -> None:
        heard.append(dict(payload))

    world.bus.subscribe("account.blocked", on_block, owner="watcher")
    _, (acc,) = await subscriber(pool, "alice")
    async with pool.acquire() as conn:
        change = await set_block(conn, acc, "admin", actor="admin:root#1", reason="test", now=T0)
        await add_payment(conn, account_id=acc, amount=1_000_000, method="cash", actor="t", now=T0)
    assert change is not None
    result = await world.service.dispatch_once()
    # payment.added: nobody subscribes and no router takes it; account.blocked: a hook and a Disconnect
    assert (result.events, result.deliveries, result.channels) == (2, 2, ("hook", "radius"))
    assert ("outbox", {"channels": ["hook", "radius"]}) in world.published

    [d] = await world.as_radius("outbox.claim", channel="radius")
    assert (d["event"], d["message"], d["attempt"], d["account_id"]) == (
        "account.blocked", {"action": "disconnect", "account_id": acc}, 1, acc)
    assert d["payload"]["balance"] == 0 and d["payload"]["block_id"] == change.block_id
    with pytest.raises(CallFailed) as refused:
        await world.as_radius("outbox.claim", channel="email")
    assert refused.value.code == "forbidden"
    with pytest.raises(CallFailed) as refused:
        await world.as_radius("outbox.claim", channel="Not a channel")
    assert refused.value.code == "billing.invalid"
    # the hook delivery is the core's: a radius login cannot acknowledge it
    hook_id = await pool.fetchval("SELECT id FROM outbox_deliveries WHERE channel = 'hook'")
    assert (await world.as_radius("outbox.done", ids=[hook_id])) == {"done": 0}
    assert (await world.as_radius("outbox.done", ids=[d["id"]])) == {"done": 1}
    assert await world.service.deliver_hooks_once() == 1
    assert [(p["account_id"], p["event_id"], p["at"]) for p in heard] == [(acc, d["event_id"], T0.isoformat())]


async def test_failed_backs_off_dies_and_an_operator_retries(world: World, pool: asyncpg.Pool) -> None:
    _, (acc,) = await subscriber(pool, "bob")
    async with pool.acquire() as conn:
        await set_block(conn, acc, "admin", actor="admin:root#1", now=T0)
    await world.service.dispatch_once()
    [d] = await world.as_radius("outbox.claim", channel="radius", lease=30)
    first = await world.as_radius("outbox.failed", id=d["id"], error="NAS timeout")
    assert (first["state"], first["attempts"], first["next_at"]) == ("pending", 1, T0 + dt.timedelta(seconds=5))
    assert await world.as_radius("outbox.claim", channel="radius") == []      # backing off
    world.clock[0] = T0 + dt.timedelta(seconds=5)
    [again] = await world.as_radius("outbox.claim", channel="radius")
    assert again["attempt"] == 2
    last = await world.as_radius("outbox.failed", id=d["id"], error="NAS timeout")
    assert (last["state"], last["next_at"]) == ("dead", None)                  # max_attempts = 2
    with pytest.raises(CallFailed) as gone:
        await world.as_radius("outbox.failed", id=d["id"], error="again")
    assert gone.value.code == "core.unknown"

    [dead] = await world.as_operator("outbox.list", state="dead")
    assert (dead["id"], dead["last_error"], dead["attempts"]) == (d["id"], "NAS timeout", 2)
    stats = await world.as_operator("outbox.stats")
    assert stats["undispatched"] == 0
    assert {"channel": "radius", "state": "dead", "count": 1, "oldest_age": None} in stats["channels"]
    # support reads (*.read) and retries (outbox.write); a cashier neither
    support = frozenset({"*.read", "outbox.write"})
    assert (await world.as_operator("outbox.retry", rights=support, ids=[d["id"], 10**9])) == {"retried": [d["id"]]}
    with pytest.raises(Exception) as not_allowed:
        await world.as_operator("outbox.retry", rights=frozenset({"payments.*"}), ids=[d["id"]])
    assert type(not_allowed.value).__name__ == "NotInTable"
    assert await pool.fetchval("SELECT count(*) FROM audit_log WHERE action = 'outbox.retry'") == 1
    [revived] = await world.as_radius("outbox.claim", channel="radius")
    assert revived["attempt"] == 1


@pytest.mark.parametrize("name, args", [
    ("outbox.claim", {"channel": "radius", "limit": 0}),
    ("outbox.claim", {"channel": "radius", "limit": 1001}),
    ("outbox.claim", {"channel": "radius", "lease": 3601}),
    ("outbox.claim", {"channel": 7}),
    ("outbox.done", {"ids": []}),
    ("outbox.done", {"ids": ["1"]}),
    ("outbox.done", {"ids": list(range(1, 1002))}),
    ("outbox.failed", {"id": 0, "error": "x"}),
    ("outbox.failed", {"id": 1, "error": 5}),
    ("outbox.failed", {"id": 1, "error": "x", "permanent": "yes"}),
    ("outbox.list", {"state": "lost"}),
    ("outbox.list", {"event": "DROP TABLE"}),
    ("outbox.list", {"limit": 1001}),
    ("outbox.retry", {"ids": "all"}),
])
async def test_bad_input_answers_a_clear_code(world: World, name: str, args: dict[str, Any]) -> None:
    with pytest.raises(CallFailed) as refused:
        if name in ("outbox.list", "outbox.retry"):
            await world.as_operator(name, **args)
        else:
            await world.as_radius(name, **args)
    assert refused.value.code == "billing.invalid", refused.value


async def test_an_in_core_channel_is_delivered_and_retried_by_the_core(world: World, pool: asyncpg.Pool) -> None:
    """notify's ``plugin`` channel slot: a deliverer registered in the core, worked like the hooks."""
    from billcore.billing.outbox import enqueue_one
    from billcore.billing.outbox_delivery import Claimed, NewDelivery, StoredEvent
    from billcore.db.rows import DbConnection

    async def to_sms(conn: DbConnection, events: Any, now: dt.datetime) -> list[NewDelivery]:
        return [NewDelivery(e.id, "plugin", "sms", {"to": "+100", "text": "hi"}) for e in events
                if isinstance(e, StoredEvent) and e.event == "balance.low"]

    sent: list[tuple[int, dict[str, Any]]] = []
    answers = iter(["gateway down", None])

    async def sms(c: Claimed) -> str | None:
        sent.append((c.event_id, c.message))
        return next(answers)

    world.service.routers.append(to_sms)
    world.service.in_core["plugin"] = sms
    async with pool.acquire() as conn, conn.transaction():
        event_id = await enqueue_one(conn, "balance.low", {"balance": 1}, T0, account_id=None)
    await world.service.dispatch_once()
    assert await world.service.deliver_in_core_once("plugin") == 1
    assert await world.service.deliver_in_core_once("plugin") == 0          # backing off
    world.clock[0] = T0 + dt.timedelta(seconds=5)
    assert await world.service.deliver_in_core_once("plugin") == 1
    assert sent == [(event_id, {"to": "+100", "text": "hi"})] * 2
    assert await pool.fetchval("SELECT state FROM outbox_deliveries WHERE channel = 'plugin'") == "delivered"
