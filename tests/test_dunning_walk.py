"""Dunning on a driven clock against a real PostgreSQL: a reminder before the balance runs out; after it goes
negative, grace, a speed limit, a block, closing — each once, audited, with its outbox event; a payment that
clears the debt cancels the cycle (throttle lifted, block lifted by the debt rule, a rate event)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from billcore.billing import dunning, fup
from billcore.billing import tariffs as T
from billcore.billing.forecast import daily_fee, days_left, forecast
from billcore.billing.ledger import Entry, post_charges
from billcore.billing.ledger_errors import InvalidValue
from billcore.common.errors import UnknownObject
from billcore.billing.payments import add_payment
from billcore.radius.authorize import authorize
from billcore.radius.nas import add_link
from billcore.radius.records import read_access_request
from billcore.radius.secrets import SecretStore

UTC = dt.timezone.utc
T0 = dt.datetime(2025, 3, 1, tzinfo=UTC)
DAY = dt.timedelta(days=1)
UNIT = 1_000_000
FEE_PER_DAY = 3 * UNIT


@pytest.fixture
def store(tmp_path: Path) -> SecretStore:
    return SecretStore(SecretStore.load_or_create_key(tmp_path / "secret.key"))


async def setup(conn: asyncpg.Connection, store: SecretStore, balance: int, grace: int = 2, block: int = 5,
                close: int | None = 30, throttle: bool = True) -> dict[str, Any]:
    service = await T.create_service(conn, "daily", "periodic", fee=FEE_PER_DAY,
                                     period={"kind": "daily", "anchor": dt.date(2025, 1, 1), "days": 0},
                                     charge_mode="start")
    tariff = await T.create_tariff(conn, "home", [service])
    uid = await conn.fetchval(
        "INSERT INTO users(login, scram_salt, scram_iterations, scram_stored_key, scram_server_key)"
        " VALUES ('dan', '\\x00', 4096, '\\x00', '\\x00') RETURNING id")
    account = int(await conn.fetchval("INSERT INTO accounts(user_id) VALUES ($1) RETURNING id", uid))
    await T.link_tariff(conn, account, tariff, now=T0, tz=UTC, actor="test")
    await add_payment(conn, account_id=account, amount=balance, method="cash", actor="test", now=T0)
    profile = await fup.profile_set(conn, "debtor", 256, 128)
    await dunning.policy_set(conn, dunning.Policy(tariff, reminder_days=3, grace_days=grace,
                                                  throttle_profile=profile if throttle else None,
                                                  block_after_days=block, close_after_days=close), T0)
    await add_link(conn, store, account_id=account, login="dan", password="pw", rate_limit="10M/10M")
    return {"account": account, "tariff": tariff, "profile": profile}


async def charge(conn: asyncpg.Connection, account: int, amount: int, key: str, now: dt.datetime) -> None:
    async with conn.transaction():
        await post_charges(conn, [Entry(account, -amount, "charge", key)], actor="test", now=now)


async def events(conn: asyncpg.Connection, account: int) -> list[tuple[str, dict[str, Any]]]:
    rows = await conn.fetch("SELECT event, payload FROM outbox_events WHERE account_id = $1 ORDER BY id", account)
    return [(row["event"], json.loads(row["payload"])) for row in rows]


async def system_block(conn: asyncpg.Connection, account: int) -> bool:
    return bool(await conn.fetchval("SELECT EXISTS (SELECT 1 FROM blocks WHERE account_id = $1 AND kind = 'system'"
                                    " AND lifted_at IS NULL)", account))


async def rate(conn: asyncpg.Connection, store: SecretStore, now: dt.datetime) -> Any:
    request = read_access_request({"nas": "127.0.0.1", "login": "dan", "method": "pap", "password": b"pw"})
    decision = await authorize(conn, store, request, now)
    return dict(decision.reply).get("Mikrotik-Rate-Limit") if decision.accept else decision.reason


def test_forecast_is_integer_and_rounds_down() -> None:
    assert daily_fee(30 * UNIT, "monthly", 0) == 30 * UNIT * 12 // 365
    assert daily_fee(7 * UNIT, "weekly", 0) == UNIT and daily_fee(10, "custom", 3) == 3
    assert days_left(10 * UNIT, 3 * UNIT) == 3 and days_left(-5, 1) == 0 and days_left(5, 0) is None
    seen = forecast(1, 10 * UNIT, 0, FEE_PER_DAY, 7 * UNIT, dt.date(2025, 3, 1))
    assert seen.burn_per_day == 4 * UNIT and seen.days_left == 2 and seen.runs_out_on == dt.date(2025, 3, 3)


async def test_a_policy_walks_an_account_through_every_step_and_a_payment_cancels_it(
        pool: asyncpg.Pool, store: SecretStore) -> None:
    async with pool.acquire() as conn:
        s = await setup(conn, store, balance=20 * UNIT)
        account = s["account"]

        # 20 units at 3 a day: 6 days left, no reminder; at 9 units: 3 days, a reminder, once
        result = await dunning.dunning_step(conn, T0, UTC)
        assert result.accounts == 1 and result.steps == []
        await charge(conn, account, 11 * UNIT, "c1", T0)
        assert (await dunning.dunning_step(conn, T0 + DAY, UTC)).steps == [(account, 1, "reminder")]
        assert (await dunning.dunning_step(conn, T0 + DAY, UTC)).steps == []
        [(event, payload)] = [e for e in await events(conn, account) if e[0] == "balance.runout_soon"]
        assert payload["days_left"] == 3 and payload["balance"] == 9 * UNIT

        # into debt: the debt rule's block waits for the policy (grace 2 days, block after 5)
        debt_at = T0 + 2 * DAY
        await charge(conn, account, 10 * UNIT, "c2", debt_at)
        assert not await system_block(conn, account)
        assert await rate(conn, store, debt_at) == "10M/10M"
        assert (await dunning.dunning_step(conn, debt_at, UTC)).steps == [(account, 1, "grace")]
        assert (await dunning.dunning_step(conn, debt_at + DAY, UTC)).steps == []
        assert (await dunning.dunning_step(conn, debt_at + 2 * DAY, UTC)).steps == [(account, 1, "throttled")]
        assert await rate(conn, store, debt_at + 2 * DAY) == "128k/256k"
        state = await dunning.dunning_state(conn, account)
        assert state["step"] == "throttled" and state["block_on"] == debt_at + 5 * DAY
        result = await dunning.dunning_step(conn, debt_at + 5 * DAY, UTC)
        assert result.steps == [(account, 1, "blocked")] and [c.action for c in result.block_changes] == ["set"]
        assert await system_block(conn, account)
        assert (await dunning.dunning_step(conn, debt_at + 6 * DAY, UTC)).steps == []

        # a payment that clears the debt: the block goes at once (the debt rule) and the cycle with it,
        # in the payment's transaction (its dunning.cleared restores the speed); the next pass has nothing to do
        await add_payment(conn, account_id=account, amount=5 * UNIT, method="cash", actor="test",
                          now=debt_at + 6 * DAY)
        assert not await system_block(conn, account)
        assert (await dunning.dunning_state(conn, account))["step"] == "cleared"
        assert [taken for taken in (await dunning.dunning_step(conn, debt_at + 6 * DAY, UTC)).steps
                if taken[1] == 1] == []   # (a reminder of the next cycle may come: the balance is low again)
        assert await rate(conn, store, debt_at + 6 * DAY) == "10M/10M"
        assert (await dunning.dunning_state(conn, account))["step"] == "cleared"

        names = [event for event, _ in await events(conn, account) if event.startswith(("dunning.", "balance."))]
        assert names == ["balance.runout_soon", "dunning.grace", "dunning.throttled", "dunning.blocked",
                         "dunning.cleared", "balance.runout_soon"]   # the last: the next cycle's reminder
        assert {"dunning.throttled", "dunning.cleared"} <= set(fup.RATE_EVENTS)
        audited = await conn.fetch("SELECT action FROM audit_log WHERE object = $1 ORDER BY id", f"account:{account}")
        assert [row["action"] for row in audited] == ["dunning.reminder", "dunning.grace", "dunning.throttled",
                                                      "dunning.blocked", "dunning.cleared", "dunning.reminder"]


async def test_a_late_pass_takes_every_due_step_once_and_closes_the_account(pool: asyncpg.Pool,
                                                                          store: SecretStore) -> None:
    async with pool.acquire() as conn:
        s = await setup(conn, store, balance=UNIT, grace=1, block=2, close=10)
        account = s["account"]
        await charge(conn, account, 5 * UNIT, "c1", T0)
        assert (await dunning.dunning_step(conn, T0, UTC)).steps == [(account, 1, "grace")]
        # the core was down for two weeks: the next pass takes throttle, block and close, in order
        result = await dunning.dunning_step(conn, T0 + 14 * DAY, UTC)
        assert [step for *_, step in result.steps] == ["throttled", "blocked", "closed"]
        assert await conn.fetchval("SELECT status FROM accounts WHERE id = $1", account) == "closed"
        assert await system_block(conn, account)
        # closed stays closed, a rerun does nothing, and a payment does not reopen it
        assert (await dunning.dunning_step(conn, T0 + 15 * DAY, UTC)).steps == []
        await add_payment(conn, account_id=account, amount=10 * UNIT, method="cash", actor="test", now=T0 + 16 * DAY)
        assert (await dunning.dunning_step(conn, T0 + 16 * DAY, UTC)).steps == []
        assert await conn.fetchval("SELECT status FROM accounts WHERE id = $1", account) == "closed"
        keys = await conn.fetch("SELECT dedup_key FROM outbox_events WHERE account_id = $1 AND event LIKE 'dunning.%'"
                                " ORDER BY id", account)
        assert [row["dedup_key"] for row in keys] == [f"dunning:{account}:1:{step}" for step in
                                                      ("grace", "throttled", "blocked", "closed")]


async def test_without_days_before_the_block_the_debt_rule_blocks_at_once(pool: asyncpg.Pool,
                                                                         store: SecretStore) -> None:
    async with pool.acquire() as conn:
        s = await setup(conn, store, balance=UNIT, grace=0, block=0, close=None, throttle=False)
        await charge(conn, s["account"], 2 * UNIT, "c1", T0)
        assert await system_block(conn, s["account"])
        result = await dunning.dunning_step(conn, T0, UTC)
        assert [step for *_, step in result.steps] == ["grace", "blocked"] and result.block_changes == []


async def test_a_second_debt_is_a_new_cycle_and_the_payment_transaction_cancels_the_first(
        pool: asyncpg.Pool, store: SecretStore) -> None:
    async with pool.acquire() as conn:
        s = await setup(conn, store, balance=UNIT)
        account = s["account"]
        await charge(conn, account, 2 * UNIT, "c1", T0)
        await dunning.dunning_step(conn, T0 + 3 * DAY, UTC)   # grace and throttle
        async with conn.transaction():
            await add_payment(conn, account_id=account, amount=5 * UNIT, method="cash", actor="test",
                              now=T0 + 4 * DAY)
            # add_payment cancelled the cycle already: a second cancel finds nothing open
            assert (await dunning.cancel_cleared(conn, [account], T0 + 4 * DAY)).steps == []
        assert (await dunning.dunning_state(conn, account))["step"] == "cleared"
        cleared = await conn.fetchval("SELECT count(*) FROM outbox_events WHERE account_id = $1"
                                      " AND event = 'dunning.cleared'", account)
        assert cleared == 1
        assert await rate(conn, store, T0 + 4 * DAY) == "10M/10M"
        await charge(conn, account, 10 * UNIT, "c2", T0 + 5 * DAY)
        assert (await dunning.dunning_step(conn, T0 + 5 * DAY, UTC)).steps == [(account, 2, "grace")]


async def test_bad_policies_are_refused_with_clear_errors(pool: asyncpg.Pool, store: SecretStore) -> None:
    async with pool.acquire() as conn:
        s = await setup(conn, store, balance=UNIT)
        with pytest.raises(InvalidValue):
            await dunning.policy_set(conn, dunning.Policy(s["tariff"], grace_days=5, block_after_days=2), T0)
        with pytest.raises(InvalidValue):
            await dunning.policy_set(conn, dunning.Policy(s["tariff"], reminder_days=-1), T0)
        with pytest.raises(UnknownObject):
            await dunning.policy_set(conn, dunning.Policy(s["tariff"], throttle_profile=10**9), T0)


async def test_the_minutely_pass_reads_only_debtors_and_open_cycles(pool: asyncpg.Pool, store: SecretStore) -> None:
    """A tariff of many quiet subscribers costs the every-minute pass nothing per subscriber: without
    reminders it reads the debtors and open cycles alone; the daily reminder pass reads them all but
    opens a transaction only where a reminder is due."""
    async with pool.acquire() as conn:
        s = await setup(conn, store, balance=100 * UNIT)          # rich: 33 days of fees left
        uids = await conn.fetch(
            "INSERT INTO users(login, scram_salt, scram_iterations, scram_stored_key, scram_server_key)"
            " SELECT 'q' || g, '\\x00', 4096, '\\x00', '\\x00' FROM generate_series(1, 300) g RETURNING id")
        quiet = [int(await conn.fetchval("INSERT INTO accounts(user_id, balance) VALUES ($1, 0) RETURNING id",
                                         row["id"])) for row in uids]
        for account in quiet:
            await T.link_tariff(conn, account, s["tariff"], now=T0, tz=UTC, actor="test")
        await conn.execute("UPDATE accounts SET balance = 0 WHERE id = ANY($1::bigint[])", quiet)
        async with conn.transaction():
            await post_charges(conn, [Entry(quiet[0], -UNIT, "charge", "debt-1")], actor="test", now=T0)
        minutely = await dunning.dunning_step(conn, T0, UTC, reminders=False)
        assert minutely.accounts == 1 and minutely.steps == [(quiet[0], 1, "grace")]
        # the daily look: every account under the policy read, a reminder for each one about to run
        # out (balance 0 with 3.00 a day: today), none for the rich one, nothing twice
        daily = await dunning.dunning_step(conn, T0, UTC)
        assert daily.accounts == 301
        assert sorted(a for a, _, step in daily.steps if step == "reminder") == sorted(quiet[1:])
        assert (await dunning.dunning_step(conn, T0, UTC)).steps == []
