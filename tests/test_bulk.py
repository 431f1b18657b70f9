"""bulk.preview / bulk.apply on a real database: what the preview shows is what apply changes, once,
in one transaction, audited per account and once for the bulk, and announced like blocks.set."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import asyncpg
import pytest

from billcore.api import bulk as bulk_calls
from billcore.billing import bulk
from billcore.billing.blocks import set_block
from billcore.billing.tariffs import link_tariff
from billcore.common.config import Config
from billcore.server.context import CoreContext
from urfa.errors import CallFailed

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 3, 15, 12, tzinfo=UTC)
N = 30


class Ctx:
    def __init__(self, rights: frozenset[str] = frozenset({"*"}), pid: int = 1) -> None:
        self.principal = SimpleNamespace(kind="admin", id=pid, login=f"admin{pid}", rights=rights)
        self.ip = "192.0.2.1"


@dataclass
class World:
    pool: asyncpg.Pool
    fn: dict[str, Any]
    clock: list[dt.datetime]
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    tariffs: dict[str, int] = field(default_factory=dict)

    async def call(self, name: str, ctx: Ctx | None = None, **args: Any) -> Any:
        return await self.fn[name](ctx or Ctx(), **args)

    async def blocked(self) -> set[int]:
        return {row["account_id"] for row in await self.pool.fetch(
            "SELECT account_id FROM blocks WHERE lifted_at IS NULL AND kind = 'admin'")}

    async def outbox(self, event: str) -> list[int]:
        """The accounts of the outbox events ``event``, in enqueue order."""
        return [row["account_id"] for row in await self.pool.fetch(
            "SELECT account_id FROM outbox_events WHERE event = $1 ORDER BY id", event)]

    async def audit(self) -> list[asyncpg.Record]:
        return list(await self.pool.fetch("SELECT action, object, after::text AS after FROM audit_log ORDER BY id"))


@pytest.fixture
async def world(pool: asyncpg.Pool) -> World:
    clock = [T0]
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO users(login, full_name, scram_salt, scram_iterations, scram_stored_key, scram_server_key)"
            " SELECT 'sub' || g, CASE WHEN g % 3 = 0 THEN 'Olga' ELSE 'Ivan' END, '\\x00', 4096, '\\x00', '\\x00'"
            " FROM generate_series(1, $1) g", N)
        # every third (the Olgas) owes money
        await conn.execute("INSERT INTO accounts(user_id, is_basic, balance, credit)"
                           " SELECT id, true, CASE WHEN id % 3 = 0 THEN -5000000 ELSE 1000000 END, 10000000"
                           " FROM users ORDER BY id")
        home = await conn.fetchval("INSERT INTO tariffs(name) VALUES ('home') RETURNING id")
        fast = await conn.fetchval("INSERT INTO tariffs(name) VALUES ('fast') RETURNING id")
        for account in range(1, N + 1):
            await link_tariff(conn, account, home, now=T0 - dt.timedelta(days=40), tz=UTC, actor="test")
    world = World(pool, {}, clock, tariffs={"home": home, "fast": fast})
    core = CoreContext(pool, Config(), publish=lambda topic, payload: world.events.append((topic, payload)),
                       now=lambda: clock[0])
    world.fn = {spec.name: spec.handler for spec in bulk_calls.calls(core)}
    return world


async def test_block_the_debtors_then_unblock_them(world: World) -> None:
    preview = await world.call("bulk.preview", filter={"debtors": True}, action="block", reason="debt")
    assert preview["count"] == N // 3 and len(preview["sample"]) == N // 3
    assert all(row["balance"] < 0 for row in preview["sample"])
    assert preview["expires_at"] == T0 + bulk.TOKEN_TTL
    answer = await world.call("bulk.apply", token=preview["token"], expect_count=preview["count"])
    debtors = {row["account_id"] for row in preview["sample"]}
    assert answer["changed"] == len(debtors) and await world.blocked() == debtors
    # announced as blocks.set announces: an event per account on "blocks" and the plugin hook
    assert sorted(event["account_id"] for topic, event in world.events if topic == "blocks") == sorted(debtors)
    # and the outbox event (plugins' hook, RADIUS's Disconnect) in the same transaction
    assert await world.outbox("account.blocked") == sorted(debtors)
    rows = await world.audit()
    assert [row["action"] for row in rows[-len(debtors) - 1:]] == ["blocks.set"] * len(debtors) + ["bulk.apply"]
    assert {row["object"] for row in rows if row["action"] == "blocks.set"} == {f"account:{a}" for a in debtors}
    bulk_row = rows[-1]
    token_id = bulk_row["object"].removeprefix("bulk:")
    assert all(f'"bulk": "{token_id}"' in row["after"] for row in rows if row["action"] == "blocks.set")
    assert answer["bulk_id"] == await world.pool.fetchval("SELECT id FROM audit_log WHERE object = $1",
                                                         bulk_row["object"])

    world.events.clear()
    again = await world.call("bulk.preview", filter={"blocked": True}, action="unblock")
    assert again["count"] == len(debtors)
    assert (await world.call("bulk.apply", token=again["token"], expect_count=again["count"]))["changed"] == len(debtors)
    assert await world.blocked() == set() and await world.outbox("account.unblocked") == sorted(debtors)
    assert len([topic for topic, _ in world.events if topic == "blocks"]) == len(debtors)


async def test_set_tariff_now_and_from_the_next_period(world: World) -> None:
    fast = world.tariffs["fast"]
    preview = await world.call("bulk.preview", filter={"text": "olga"}, action="set_tariff", tariff_id=fast)
    answer = await world.call("bulk.apply", token=preview["token"], expect_count=preview["count"])
    assert answer["changed"] == N // 3
    now_on = await world.pool.fetch("SELECT account_id FROM account_tariffs WHERE tariff_id = $1"
                                    " AND valid_from = $2 AND valid_to IS NULL", fast, T0)
    assert {row["account_id"] for row in now_on} == {a for a in range(1, N + 1) if a % 3 == 0}
    # the same again changes nothing: no second link (its once-off services would be booked again)
    preview = await world.call("bulk.preview", filter={"text": "olga"}, action="set_tariff", tariff_id=fast)
    assert (await world.call("bulk.apply", token=preview["token"], expect_count=preview["count"]))["changed"] == 0
    # next_period: the link starts on the 1st of next month (the default monthly period)
    preview = await world.call("bulk.preview", filter={"text": "ivan"}, action="set_tariff", tariff_id=fast,
                               start="next_period")
    await world.call("bulk.apply", token=preview["token"], expect_count=preview["count"])
    starts = await world.pool.fetch("SELECT DISTINCT valid_from FROM account_tariffs WHERE tariff_id = $1"
                                    " AND account_id % 3 <> 0", fast)
    assert [row["valid_from"] for row in starts] == [dt.datetime(2026, 4, 1, tzinfo=UTC)]
    actions = [row["action"] for row in await world.audit()]
    assert actions.count("tariffs.link") == N and actions.count("bulk.apply") == 3


async def test_a_filter_that_now_matches_another_count_changes_nothing(world: World) -> None:
    preview = await world.call("bulk.preview", filter={"debtors": True, "blocked": False}, action="block")
    async with world.pool.acquire() as conn:   # someone blocks one of them meanwhile
        await set_block(conn, 3, "admin", actor="other", now=T0)
    with pytest.raises(CallFailed) as changed:
        await world.call("bulk.apply", token=preview["token"], expect_count=preview["count"])
    assert changed.value.code == "bulk.changed" and "preview again" in changed.value.message
    assert await world.blocked() == {3} and await world.audit() == []
    with pytest.raises(CallFailed) as expected:
        await world.call("bulk.apply", token=preview["token"], expect_count=preview["count"] - 1)
    assert expected.value.code == "bulk.changed"


async def test_one_transaction_all_or_nothing(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    real = bulk._change
    seen: list[int] = []

    async def failing(conn: Any, account_id: int, *args: Any) -> Any:
        seen.append(account_id)
        if len(seen) == 5:
            raise RuntimeError("the database went away")
        return await real(conn, account_id, *args)

    monkeypatch.setattr(bulk, "_change", failing)
    preview = await world.call("bulk.preview", filter={}, action="block")
    with pytest.raises(RuntimeError):
        await world.call("bulk.apply", token=preview["token"], expect_count=N)
    assert len(seen) == 5 and await world.blocked() == set() and await world.audit() == []
    assert world.events == []   # nothing announced for a rolled-back change
    monkeypatch.setattr(bulk, "_change", real)
    assert (await world.call("bulk.apply", token=preview["token"], expect_count=N))["changed"] == N


async def test_a_token_counts_once_for_its_operator_until_it_expires(world: World) -> None:
    preview = await world.call("bulk.preview", filter={"debtors": True}, action="block")
    token = preview["token"]
    for bad, who in [(token[:-2] + ("AA" if not token.endswith("AA") else "BB"), Ctx()), ("nonsense", Ctx()),
                     (token, Ctx(pid=2))]:
        with pytest.raises(CallFailed) as refused:
            await world.call("bulk.apply", who, token=bad, expect_count=preview["count"])
        assert refused.value.code == "bulk.token"
    world.clock[0] = T0 + bulk.TOKEN_TTL
    with pytest.raises(CallFailed) as expired:
        await world.call("bulk.apply", token=token, expect_count=preview["count"])
    assert expired.value.code == "bulk.token" and "expired" in expired.value.message
    world.clock[0] = T0 + bulk.TOKEN_TTL - dt.timedelta(seconds=1)
    await world.call("bulk.apply", token=token, expect_count=preview["count"])
    with pytest.raises(CallFailed) as used:
        await world.call("bulk.apply", token=token, expect_count=preview["count"])
    assert used.value.code == "bulk.used"


async def test_caps_rights_and_arguments(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bulk, "MAX_BULK", N - 1)
    with pytest.raises(CallFailed) as too_many:
        await world.call("bulk.preview", filter={}, action="block")
    assert too_many.value.code == "bulk.too_many" and str(N - 1) in too_many.value.message
    monkeypatch.setattr(bulk, "MAX_BULK", N)
    assert (await world.call("bulk.preview", filter={}, action="block"))["count"] == N

    only_bulk = Ctx(frozenset({"bulk.write"}))
    for args in ({"action": "block"}, {"action": "set_tariff", "tariff_id": world.tariffs["fast"]}):
        with pytest.raises(CallFailed) as forbidden:
            await world.call("bulk.preview", only_bulk, filter={}, **args)
        assert forbidden.value.code == "forbidden"
    assert (await world.call("bulk.preview", Ctx(frozenset({"bulk.write", "blocks.write"})), filter={},
                             action="unblock"))["count"] == N

    cases: list[tuple[dict[str, Any], str]] = [
        ({"filter": {}, "action": "delete"}, "billing.invalid"),
        ({"filter": {}, "action": "set_tariff"}, "billing.invalid"),
        ({"filter": {}, "action": "set_tariff", "tariff_id": 1, "start": "tomorrow"}, "billing.invalid"),
        ({"filter": {}, "action": "block", "tariff_id": 1}, "billing.invalid"),
        ({"filter": {"colour": "red"}, "action": "block"}, "billing.invalid"),
        ({"filter": {"balance_min": 1.5}, "action": "block"}, "billing.amount")]
    for args, code in cases:
        with pytest.raises(CallFailed) as refused:
            await world.call("bulk.preview", **args)
        assert refused.value.code == code, args
    with pytest.raises(CallFailed) as unknown:
        await world.call("bulk.preview", filter={}, action="set_tariff", tariff_id=10**9)
    assert unknown.value.code == "tariffs.unknown"
    # a tariff deleted between preview and apply
    doomed = await world.pool.fetchval("INSERT INTO tariffs(name) VALUES ('doomed') RETURNING id")
    preview = await world.call("bulk.preview", filter={}, action="set_tariff", tariff_id=doomed)
    await world.pool.execute("DELETE FROM tariffs WHERE id = $1", doomed)
    with pytest.raises(CallFailed) as gone:
        await world.call("bulk.apply", token=preview["token"], expect_count=N)
    assert gone.value.code == "tariffs.unknown"
