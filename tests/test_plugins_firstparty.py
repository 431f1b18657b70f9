"""The first-party plugins, signed with a development key, on a real PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from urfa.errors import CallFailed

from billcore.server.calls import CallRegistry, NotInTable
from billcore.plugins import errors
from billcore.plugins.cli import main as plugin_cli
from billcore.plugins.hooks import (
    ACCOUNT_BLOCKED,
    ACCOUNT_CHARGED,
    BATCH_RATED,
    PAYMENT_ADDED,
    HookBus,
)
from billcore.plugins.loader import PluginManager

from .test_plugins_support import DevKey, TableBilling, caller, copy_first_party, subscriber

NOW = 1_800_000_000.0


@dataclass
class Env:
    tmp: Path
    key: DevKey
    pool: asyncpg.Pool
    billing: TableBilling
    registry: CallRegistry
    bus: HookBus
    manager: PluginManager
    now: float = NOW

    async def call(self, symbol_name: str, /, ctx: Any = None, **args: object) -> Any:
        """Call through a session's call table, as the URFA server does (default: an admin with "*")."""
        ctx = ctx or caller()
        table = self.registry.snapshot(ctx.principal.kind, ctx.principal.rights)
        try:
            symbol = table.lookup(symbol_name)
            with self.registry.in_flight(symbol):
                return await symbol.spec.handler(ctx, **args)
        finally:
            table.close()

    async def load_first_party(self, name: str, **kw: object) -> Path:
        d = copy_first_party(name, self.tmp)
        self.key.sign(d)
        await self.manager.load(d, NOW, **kw)  # type: ignore[arg-type]
        return d


def make_env(tmp: Path, pool: asyncpg.Pool, billing: TableBilling) -> Env:
    key = DevKey(tmp / "keys")
    registry, bus = CallRegistry(), HookBus()
    env = Env(tmp, key, pool, billing, registry, bus, None)  # type: ignore[arg-type]
    env.manager = PluginManager(registry, bus, tmp / "keys", tmp / "state", 1, "inst-1", pool,
                                billing=billing, clock=lambda: env.now)
    return env


@pytest.fixture
async def env(tmp_path: Path, pool: asyncpg.Pool) -> AsyncIterator[Env]:
    billing = TableBilling(pool)
    await billing.create()
    e = make_env(tmp_path, pool, billing)
    yield e
    await e.manager.close()


class CrashingBilling(TableBilling):
    """Fails its first payment, as if the core died between redeem and credit."""

    crashes = 1

    async def add_payment(self, account_id: int, amount: int, external_id: str,
                          method: str, comment: str) -> int:
        if self.crashes:
            self.crashes -= 1
            raise ConnectionError("core went away")
        return await super().add_payment(account_id, amount, external_id, method, comment)


async def test_voucher_redeemed_twice_credits_once(env: Env) -> None:
    await env.load_first_party("vouchers")
    cards = await env.call("vouchers.generate", count=3, amount=5_000_000, batch="2026-05")
    assert isinstance(cards, list) and len(cards) == 3
    listed = await env.call("vouchers.list", batch="2026-05")
    assert [v["status"] for v in listed] == ["new"] * 3  # type: ignore[union-attr]
    assert all("code" not in v for v in listed)  # type: ignore[union-attr]

    code = cards[0]["code"]
    first = await env.call("vouchers.redeem", code=code, account_id=10)
    again = await env.call("vouchers.redeem", code=code.lower().replace("-", " "), account_id=10)
    assert first["repeated"] is False and again["repeated"] is True  # type: ignore[index]
    assert first["payment_id"] == again["payment_id"]  # type: ignore[index]
    assert await env.billing.balance(10) == 5_000_000
    assert await env.pool.fetchval("SELECT count(*) FROM test_plugin_payments") == 1

    with pytest.raises(CallFailed, match="plugin.refused: voucher already redeemed"):
        await env.call("vouchers.redeem", code=code, account_id=11)
    with pytest.raises(CallFailed, match="plugin.refused: unknown voucher"):
        await env.call("vouchers.redeem", code="2345-6789-ABCD-EFGH", account_id=10)
    assert await env.billing.balance(11) == 0
    redeemed = await env.call("vouchers.list", status="redeemed")
    assert [(v["serial"], v["redeemed_by"]) for v in redeemed] == [(cards[0]["serial"], 10)]  # type: ignore[union-attr]
    # Its table lives in its own schema, not beside the core's tables.
    assert await env.pool.fetchval("SELECT to_regclass('plugin_vouchers.vouchers') IS NOT NULL")
    assert await env.pool.fetchval("SELECT to_regclass('public.vouchers')") is None


async def test_voucher_redeem_retried_after_a_crash_credits_once(tmp_path: Path, pool: asyncpg.Pool) -> None:
    billing = CrashingBilling(pool)
    await billing.create()
    env = make_env(tmp_path, pool, billing)
    try:
        await env.load_first_party("vouchers")
        [card] = await env.call("vouchers.generate", count=1, amount=750_000)  # type: ignore[misc]
        with pytest.raises(ConnectionError):
            await env.call("vouchers.redeem", code=card["code"], account_id=3)
        assert await billing.balance(3) == 0
        retry = await env.call("vouchers.redeem", code=card["code"], account_id=3)
        assert retry["repeated"] is True  # type: ignore[index]
        await env.call("vouchers.redeem", code=card["code"], account_id=3)
        assert await billing.balance(3) == 750_000
    finally:
        await env.manager.close()


async def test_vouchers_is_permanent(env: Env) -> None:
    await env.load_first_party("vouchers")
    with pytest.raises(errors.PermanentPlugin):
        env.manager.unload("vouchers")
    assert len(await env.call("vouchers.generate", count=1, amount=1)) == 1  # type: ignore[arg-type]


async def test_lowbalance_queues_notices_from_hooks(env: Env) -> None:
    await env.load_first_party("lowbalance", config={"threshold": 1_000_000})
    fire = env.bus.fire
    await fire(PAYMENT_ADDED, {"account_id": 1, "amount": 2_000_000, "balance": 2_000_000,
                               "external_id": "p1", "method": "cash"})
    assert await env.call("lowbalance.pending") == []
    await fire(ACCOUNT_CHARGED, {"account_id": 1, "amount": 1_500_000, "balance": 500_000, "reason": "monthly"})
    await fire(BATCH_RATED, {"batch_id": 9, "charges": [
        {"account_id": 1, "amount": 100_000, "balance": 400_000},
        {"account_id": 2, "amount": 100_000, "balance": 5_000_000}]})
    result = await fire(ACCOUNT_BLOCKED, {"account_id": 3, "balance": -10, "reason": "debt"})
    assert result.failed == ()
    pending = await env.call("lowbalance.pending")
    assert [(n["account_id"], n["balance"], n["reason"]) for n in pending] == [  # type: ignore[union-attr]
        (1, 400_000, "traffic"), (3, -10, "blocked")]
    # A payment that lifts the balance withdraws the notice.
    await fire(PAYMENT_ADDED, {"account_id": 1, "amount": 3_000_000, "balance": 3_400_000,
                               "external_id": "p2", "method": "cash"})
    [left] = await env.call("lowbalance.pending")  # type: ignore[misc]
    assert left["account_id"] == 3
    assert await env.call("lowbalance.mark_sent", ids=[left["id"]]) == 1
    assert await env.call("lowbalance.pending") == []


async def test_migrations_run_once_and_cannot_be_rewritten(env: Env) -> None:
    d = await env.load_first_party("lowbalance")
    await env.bus.fire(ACCOUNT_BLOCKED, {"account_id": 5, "balance": 0, "reason": "x"})
    env.manager.unload("lowbalance")
    await env.manager.drain()
    await env.manager.load(d, NOW)  # migrations already applied: data kept
    assert len(await env.call("lowbalance.pending")) == 1  # type: ignore[arg-type]
    env.manager.unload("lowbalance")
    migration = d / "migrations" / "001_notices.sql"
    migration.write_text(migration.read_text() + "\n-- edited\n")
    manifest = d / "plugin.toml"
    manifest.write_text(manifest.read_text().replace('version = "1.0.0"', 'version = "1.0.1"'))
    env.key.sign(d)
    with pytest.raises(errors.PluginDatabaseError, match="changed after it was applied"):
        await env.manager.load(d, NOW)


async def test_new_plugin_from_the_example_signs_verifies_and_runs(env: Env) -> None:
    keys = env.tmp / "author"
    assert plugin_cli(["plugin", "keygen", "--out", str(keys), "--name", "acme"]) == 0
    assert plugin_cli(["plugin", "new", "demo", "--dest", str(env.tmp)]) == 0
    demo = env.tmp / "demo"
    assert plugin_cli(["plugin", "sign", str(demo), "--key", str(keys / "acme.key"),
                       "--not-after", "2099-01-01"]) == 0
    assert plugin_cli(["plugin", "verify", str(demo), "--keydir", str(keys)]) == 0
    (env.tmp / "keys" / "acme.pub").write_bytes((keys / "acme.pub").read_bytes())
    record = await env.manager.load(demo, NOW)
    assert record["symbols"] == ["demo.hello"]
    assert await env.call("demo.hello", name="operator") == "hello, operator!"
    await env.bus.fire(PAYMENT_ADDED, {"account_id": 4, "amount": 9, "balance": 9,
                                       "external_id": "bank-1", "method": "bank"})
    assert await env.pool.fetchval("SELECT amount FROM plugin_demo.seen_payments") == 9


async def test_subscriber_redeems_only_onto_own_accounts(env: Env) -> None:
    await env.load_first_party("vouchers")
    alice, (alice_basic, alice_extra) = await subscriber(env.pool, "alice", accounts=2)
    bob, (bob_basic,) = await subscriber(env.pool, "bob")
    cards = await env.call("vouchers.generate", count=2, amount=1_000_000)
    as_alice = caller("user", alice)

    # A subscriber's session sees redeem, and nothing of the administration.
    with pytest.raises(NotInTable):
        await env.call("vouchers.generate", as_alice, count=1, amount=1)
    with pytest.raises(CallFailed, match="plugin.refused: not your account"):
        await env.call("vouchers.redeem", as_alice, code=cards[0]["code"], account_id=bob_basic)
    assert await env.billing.balance(bob_basic) == 0
    assert [v["status"] for v in await env.call("vouchers.list")] == ["new", "new"]

    done = await env.call("vouchers.redeem", as_alice, code=cards[0]["code"], account_id=alice_extra)
    assert done["account_id"] == alice_extra and done["repeated"] is False
    assert await env.billing.balance(alice_extra) == 1_000_000
    # Bob cannot take over Alice's voucher onto his own account either.
    with pytest.raises(CallFailed, match="voucher already redeemed"):
        await env.call("vouchers.redeem", caller("user", bob), code=cards[0]["code"], account_id=bob_basic)

    # Administrators redeem onto any account, but only with the right.
    clerk = caller("admin", 7, frozenset({"vouchers.read"}))
    with pytest.raises(CallFailed, match="needs the right vouchers.redeem"):
        await env.call("vouchers.redeem", clerk, code=cards[1]["code"], account_id=bob_basic)
    cashier = caller("admin", 8, frozenset({"vouchers.*"}))
    await env.call("vouchers.redeem", cashier, code=cards[1]["code"], account_id=bob_basic)
    assert await env.billing.balance(bob_basic) == 1_000_000
    assert await env.billing.balance(alice_basic) == 0


async def test_failed_redeems_are_limited_per_caller(env: Env) -> None:
    await env.load_first_party("vouchers")
    alice, (alice_acc,) = await subscriber(env.pool, "alice")
    bob, (bob_acc,) = await subscriber(env.pool, "bob")
    good = await env.call("vouchers.generate", count=2, amount=250_000)
    as_alice, as_bob = caller("user", alice), caller("user", bob)

    guesses = ["2345-6789-ABCD-EFG" + c for c in "HJKMN"]
    for code in guesses:  # one a second
        with pytest.raises(CallFailed, match="unknown voucher code"):
            await env.call("vouchers.redeem", as_alice, code=code, account_id=alice_acc)
        env.now += 1
    # Over the limit even a right code is refused: a hit must not show.
    with pytest.raises(CallFailed, match="too many failed redeems; try again in 596 s"):
        await env.call("vouchers.redeem", as_alice, code=good[0]["code"], account_id=alice_acc)
    assert await env.billing.balance(alice_acc) == 0
    # Another subscriber is not affected.
    await env.call("vouchers.redeem", as_bob, code=good[1]["code"], account_id=bob_acc)

    env.now = NOW + 599
    with pytest.raises(CallFailed, match="try again in 2 s"):
        await env.call("vouchers.redeem", as_alice, code=good[0]["code"], account_id=alice_acc)
    env.now += 1  # the first failure leaves the 600 s window
    await env.call("vouchers.redeem", as_alice, code=good[0]["code"], account_id=alice_acc)
    assert await env.billing.balance(alice_acc) == 250_000
    # A success does not count: with four failures in the window, one more guess is allowed ...
    with pytest.raises(CallFailed, match="unknown voucher code"):
        await env.call("vouchers.redeem", as_alice, code=guesses[0], account_id=alice_acc)
    # ... and then the window is full again.
    with pytest.raises(CallFailed, match="too many failed redeems"):
        await env.call("vouchers.redeem", as_alice, code=guesses[1], account_id=alice_acc)


async def test_concurrent_guesses_cannot_pass_the_limit(env: Env) -> None:
    await env.load_first_party("vouchers")
    mallory, (acc,) = await subscriber(env.pool, "mallory")
    ctx = caller("user", mallory)
    codes = [f"2345-6789-ABCD-{a}{b}{c}{d}" for a, b, c, d in
             ["EFGH", "EFGJ", "EFGK", "EFGM", "EFGN", "EFGP", "EFGQ", "EFGR", "EFGS", "EFGT", "EFGU", "EFGV"]]
    results = await asyncio.gather(
        *(env.call("vouchers.redeem", ctx, code=c, account_id=acc) for c in codes), return_exceptions=True)
    messages = sorted(str(r) for r in results)
    assert sum("unknown voucher code" in m for m in messages) == 5
    assert sum("too many failed redeems" in m for m in messages) == 7


def test_failure_limit_window_and_bound() -> None:
    from plugins.vouchers.limits import FailureLimit

    limit = FailureLimit(max_failures=2, window=10.0, max_keys=2)
    assert limit.begin("a", 0.0) and limit.begin("a", 1.0)
    assert not limit.begin("a", 9.9) and limit.retry_after("a", 9.9) == pytest.approx(0.1)
    assert limit.begin("a", 10.0)            # the attempt at 0.0 left the window
    limit.succeeded("a", 10.0)               # ... and a success gives its slot back
    assert limit.begin("a", 10.5)
    assert not limit.begin("a", 10.6)
    # Only max_keys callers are remembered; the least recently seen goes first.
    assert limit.begin("b", 11.0) and limit.begin("c", 11.0)
    assert limit.begin("a", 10.7) and limit.begin("a", 10.8)
