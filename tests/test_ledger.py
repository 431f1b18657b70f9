"""The ledger, payments, blocks, promised payments and verify on a real PostgreSQL."""

from __future__ import annotations

import datetime as dt

import asyncpg
import pytest

from billcore.billing import accounts, blocks, payments
from billcore.billing.ledger import Entry, post_batch, post_charges
from billcore.billing.ledger_errors import (
    AmountError, IdempotencyConflict, InvalidValue, NotInTransaction, PaymentConflict, PromisedRefused,
    UnknownAccount, UnknownPayment,
)
from billcore.billing.verify import verify
from urfa.scram import make_verifier

T0 = dt.datetime(2024, 3, 10, 12, 0, tzinfo=dt.timezone.utc)
VERIFIER = make_verifier("secret", iterations=4096)
UNIT = 1_000_000


async def new_account(conn: asyncpg.Connection, login: str, **settings: object) -> int:
    user = await accounts.create_user(conn, login, VERIFIER, full_name=login.title())
    acc = user["basic_account_id"]
    if settings:
        await accounts.edit_account(conn, acc, actor="test", now=T0, **settings)  # type: ignore[arg-type]
    return int(acc)


async def state(conn: asyncpg.Connection, account_id: int) -> tuple[int, int, set[str]]:
    balance = await conn.fetchval("SELECT balance FROM accounts WHERE id = $1", account_id)
    total = await conn.fetchval("SELECT coalesce(sum(amount), 0) FROM ledger WHERE account_id = $1", account_id)
    active = {r["kind"] for r in await conn.fetch(
        "SELECT kind FROM blocks WHERE account_id = $1 AND lifted_at IS NULL", account_id)}
    return balance, total, active


async def test_charge_into_debt_blocks_and_payment_lifts_only_system_block(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        acc = await new_account(conn, "alice", credit=10 * UNIT)
        await blocks.set_block(conn, acc, "user", actor="user:alice#1", reason="holiday", now=T0)
        async with conn.transaction():
            r = await post_charges(conn, [Entry(acc, -10 * UNIT, "charge", "c1")], actor="rating", now=T0)
        assert r.block_changes == ()                    # exactly at -credit: not in debt
        assert await state(conn, acc) == (-10 * UNIT, -10 * UNIT, {"user"})
        async with conn.transaction():
            r = await post_charges(conn, [Entry(acc, -1, "charge", "c2")], actor="rating", now=T0)
        assert [(c.kind, c.action) for c in r.block_changes] == [("system", "set")]
        assert r.balances[acc] == -10 * UNIT - 1
        pay = await payments.add_payment(conn, account_id=acc, amount=1, method="cash",
                                         actor="admin:bob#1", now=T0)
        assert [(c.kind, c.action) for c in pay.block_changes] == [("system", "lifted")]
        assert await state(conn, acc) == (-10 * UNIT, -10 * UNIT, {"user"})
        assert await verify(conn, T0) == []


async def test_post_charges_needs_a_transaction_and_skips_posted_keys(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        a = await new_account(conn, "a")
        b = await new_account(conn, "b")
        with pytest.raises(NotInTransaction):
            await post_charges(conn, [Entry(a, -5, "charge", "k1")], actor="rating")
        entries = [Entry(b, -7, "traffic", "k2"), Entry(a, -5, "charge", "k1"), Entry(a, -3, "charge", "k3")]
        async with conn.transaction():
            first = await post_charges(conn, entries, actor="rating", now=T0)
        assert len(first.posted) == 3 and first.skipped == ()
        assert [p.balance_after for p in first.posted if p.account_id == a] == [-5, -8]
        async with conn.transaction():
            again = await post_charges(conn, entries, actor="rating", now=T0)
        assert again.posted == () and sorted(again.skipped) == ["k1", "k2", "k3"]
        assert (await state(conn, a))[:2] == (-8, -8)
        with pytest.raises(IdempotencyConflict):
            async with conn.transaction():
                await post_charges(conn, [Entry(a, -1, "charge", "new"), Entry(a, -6, "charge", "k1")],
                                   actor="rating", now=T0)
        assert (await state(conn, a))[:2] == (-8, -8)      # the whole batch was refused
        with pytest.raises(UnknownAccount):
            async with conn.transaction():
                await post_charges(conn, [Entry(a, -1, "charge", "x1"), Entry(999999, -1, "charge", "x2")],
                                   actor="rating", now=T0)
        with pytest.raises(AmountError):
            async with conn.transaction():
                await post_charges(conn, [Entry(a, 10**18, "charge", "x3")], actor="rating", now=T0)
        assert (await state(conn, a))[:2] == (-8, -8)


async def test_post_batch_books_what_post_charges_books(pool: asyncpg.Pool) -> None:
    """The same rows (mixed kinds and references, two rows on one account, one account
    pushed into debt) posted as Entries and as columns: the same ledger rows, balances
    and block changes."""
    async with pool.acquire() as conn:
        rows = [(0, -7, "traffic", "usage w@1"), (1, -5, "charge", "usage w@1"), (0, -3, "traffic", "other"),
                (2, -11 * UNIT, "traffic", "usage w@1")]
        booked = []
        for way in ("entries", "columns"):
            ids = [await new_account(conn, f"{way}{i}", credit=10 * UNIT) for i in range(3)]
            keys = [f"{way}-{n}" for n in range(len(rows))]
            async with conn.transaction():
                if way == "entries":
                    r = await post_charges(conn, [Entry(ids[i], m, k, key, reference=ref)
                                                  for (i, m, k, ref), key in zip(rows, keys)], actor="t", now=T0)
                    balances, changes = r.balances, r.block_changes
                    assert [p.ledger_id for p in r.posted] == sorted(p.ledger_id for p in r.posted)
                else:
                    b = await post_batch(conn, [ids[i] for i, *_ in rows], [m for _, m, _, _ in rows],
                                         [k for _, _, k, _ in rows], keys, reference="usage w@1", actor="t", now=T0)
                    balances, changes = b.balances, b.block_changes
                    assert list(b.ledger_ids) == sorted(b.ledger_ids) and len(b.ledger_ids) == len(rows)
            ledger = [(ids.index(r["account_id"]), r["amount"], r["kind"], r["balance_after"], r["actor"])
                      for r in await conn.fetch("SELECT * FROM ledger WHERE idem_key = ANY($1) ORDER BY id", keys)]
            booked.append((ledger, [balances[i] for i in ids],
                           [(ids.index(c.account_id), c.kind, c.action) for c in changes]))
        assert booked[0] == booked[1]
        assert booked[0][1] == [-10, -5, -11 * UNIT] and booked[0][2] == [(2, "system", "set")]
        assert await conn.fetchval("SELECT count(*) FROM ledger WHERE reference = 'other'") == 1  # entries' own
        assert await verify(conn, T0) == []


async def test_post_batch_checks_every_row_and_a_taken_key_books_nothing(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        a = await new_account(conn, "a", credit=UNIT)

        async def post(accounts: list[object], amounts: list[object], kinds: list[object],
                       keys: list[object], reference: object = "") -> None:
            async with conn.transaction():
                await post_batch(conn, accounts, amounts, kinds, keys,  # type: ignore[arg-type]
                                 reference=reference, actor="t", now=T0)  # type: ignore[arg-type]

        with pytest.raises(NotInTransaction):
            await post_batch(conn, [a], [-1], ["charge"], ["k"], reference="", actor="t", now=T0)
        for accounts_, amounts, kinds, keys, error in [
                ([a, 0], [-1, -1], ["charge"] * 2, ["k1", "k2"], InvalidValue),
                ([a, True], [-1, -1], ["charge"] * 2, ["k1", "k2"], InvalidValue),
                ([a, a], [-1, 0], ["charge"] * 2, ["k1", "k2"], AmountError),
                ([a, a], [-1, 1.5], ["charge"] * 2, ["k1", "k2"], AmountError),
                ([a], [10**18], ["charge"], ["k1"], AmountError),
                ([a, a], [-1, -1], ["charge", "gift"], ["k1", "k2"], InvalidValue),
                ([a, a], [-1, -1], ["charge"] * 2, ["k1", ""], InvalidValue),
                ([a], [-1], ["charge"], ["k" * 257], InvalidValue),
                ([a, a], [-1, -1], ["charge"] * 2, ["k1", None], InvalidValue),
                ([a, a], [-1], ["charge"] * 2, ["k1", "k2"], InvalidValue),
                ([a, a], [-1, -1], ["charge"] * 2, ["k1", "k1"], IdempotencyConflict),
                ([a, 999_999], [-1, -1], ["charge"] * 2, ["k1", "k2"], UnknownAccount)]:
            with pytest.raises(error):
                await post(accounts_, amounts, kinds, keys)
        with pytest.raises(InvalidValue):
            await post([a], [-1], ["charge"], ["k1"], reference="r" * 1001)
        await post([a], [-5], ["charge"], ["taken"])
        with pytest.raises(asyncpg.UniqueViolationError):
            await post([a, a], [-1, -2], ["charge"] * 2, ["fresh", "taken"])
        assert await state(conn, a) == (-5, -5, set())
        assert await verify(conn, T0) == []


async def test_ledger_rows_cannot_be_updated_or_deleted(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        a = await new_account(conn, "a")
        await payments.add_payment(conn, account_id=a, amount=UNIT, method="cash", actor="t", now=T0)
        with pytest.raises(asyncpg.RestrictViolationError, match="append-only"):
            await conn.execute("UPDATE ledger SET amount = 2")
        with pytest.raises(asyncpg.RestrictViolationError, match="append-only"):
            await conn.execute("DELETE FROM ledger")
        assert await conn.fetchval("SELECT sum(amount) FROM ledger") == UNIT


async def test_payment_external_id_is_idempotent_and_conflicts_are_refused(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        a = await new_account(conn, "a")
        b = await new_account(conn, "b")
        first = await payments.add_payment(conn, account_id=a, amount=5 * UNIT, method="bank",
                                           actor="t", external_id="bank-1", now=T0)
        again = await payments.add_payment(conn, account_id=a, amount=5 * UNIT, method="bank",
                                           actor="t", external_id="bank-1", now=T0)
        assert first.created and not again.created and again.payment_id == first.payment_id
        for kwargs in ({"account_id": b, "amount": 5 * UNIT}, {"account_id": a, "amount": 6 * UNIT}):
            with pytest.raises(PaymentConflict):
                await payments.add_payment(conn, method="bank", actor="t", external_id="bank-1",
                                           now=T0, **kwargs)  # type: ignore[arg-type]
        assert (await state(conn, a))[:2] == (5 * UNIT, 5 * UNIT)
        assert (await state(conn, b))[:2] == (0, 0)
        for bad in (0, -1, payments.MAX_PAYMENT + 1, 1.5, True):
            with pytest.raises(AmountError):
                await payments.add_payment(conn, account_id=a, amount=bad, method="cash", actor="t")  # type: ignore[arg-type]
        with pytest.raises(UnknownAccount):
            await payments.add_payment(conn, account_id=424242, amount=1, method="cash", actor="t")
        assert await conn.fetchval("SELECT count(*) FROM payments") == 1


async def test_cancel_restores_balance_and_is_idempotent(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        a = await new_account(conn, "a")
        async with conn.transaction():
            await post_charges(conn, [Entry(a, -3 * UNIT, "charge", "c")], actor="r", now=T0)
        pay = await payments.add_payment(conn, account_id=a, amount=5 * UNIT, method="cash", actor="t", now=T0)
        assert (await state(conn, a))[2] == set()
        c1 = await payments.cancel_payment(conn, pay.payment_id, actor="t", reason="typo", now=T0)
        c2 = await payments.cancel_payment(conn, pay.payment_id, actor="t", now=T0)
        assert c1.created and not c2.created and c1.ledger_id == c2.ledger_id
        assert (await state(conn, a)) == (-3 * UNIT, -3 * UNIT, {"system"})
        assert [(c.kind, c.action) for c in c1.block_changes] == [("system", "set")]
        with pytest.raises(UnknownPayment):
            await payments.cancel_payment(conn, 777, actor="t")
        assert await verify(conn, T0) == []


async def test_promised_payment_once_a_month_and_expires(pool: asyncpg.Pool) -> None:
    rule = payments.PromisedRule(amount=20 * UNIT, duration=dt.timedelta(days=3))
    async with pool.acquire() as conn:
        a = await new_account(conn, "a")
        async with conn.transaction():
            r = await post_charges(conn, [Entry(a, -15 * UNIT, "charge", "c")], actor="r", now=T0)
        assert [c.action for c in r.block_changes] == ["set"]
        taken = await payments.take_promised(conn, a, actor="user:a#1", rule=rule, now=T0)
        assert [c.action for c in taken.block_changes] == ["lifted"]
        with pytest.raises(PromisedRefused):
            await payments.take_promised(conn, a, actor="user:a#1", rule=rule, now=T0 + dt.timedelta(days=1))
        assert await payments.expire_promised(conn, T0 + dt.timedelta(days=2)) == []
        changes = await payments.expire_promised(conn, T0 + dt.timedelta(days=3))
        assert [(c.account_id, c.kind, c.action) for c in changes] == [(a, "system", "set")]
        assert await verify(conn, T0 + dt.timedelta(days=3)) == []
        # next month: allowed again; a payment to >= 0 covers it
        later = T0 + dt.timedelta(days=30)
        await payments.take_promised(conn, a, actor="user:a#1", rule=rule, now=later)
        await payments.add_payment(conn, account_id=a, amount=15 * UNIT, method="cash", actor="t", now=later)
        why = await conn.fetchval("SELECT closed_why FROM promised_payments ORDER BY id DESC LIMIT 1")
        assert why == "covered"


async def test_credit_and_unlimited_changes_resync_the_system_block(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        a = await new_account(conn, "a")
        async with conn.transaction():
            await post_charges(conn, [Entry(a, -5 * UNIT, "charge", "c")], actor="r", now=T0)
        ch = await accounts.edit_account(conn, a, actor="t", now=T0, credit=5 * UNIT)
        assert [c.action for c in ch.block_changes] == ["lifted"]
        assert ch.before["credit"] == 0 and ch.after["credit"] == 5 * UNIT
        ch = await accounts.edit_account(conn, a, actor="t", now=T0, credit=0)
        assert [c.action for c in ch.block_changes] == ["set"]
        ch = await accounts.edit_account(conn, a, actor="t", now=T0, unlimited=True)
        assert [c.action for c in ch.block_changes] == ["lifted"]
        with pytest.raises(AmountError):
            await accounts.edit_account(conn, a, actor="t", credit=-1)


async def test_verify_names_the_corrupted_account(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        a = await new_account(conn, "a")
        b = await new_account(conn, "b")
        await payments.add_payment(conn, account_id=a, amount=UNIT, method="cash", actor="t", now=T0)
        await payments.add_payment(conn, account_id=b, amount=UNIT, method="cash", actor="t", now=T0)
        assert await verify(conn, T0) == []
        await conn.execute("UPDATE accounts SET balance = balance + 1 WHERE id = $1", b)
        problems = await verify(conn, T0)
        assert [(p.check, p.account_id) for p in problems] == [("balance", b)]
        assert f"account {b}" in str(problems[0])
        # a tampered ledger row (trigger disabled by someone with superuser rights)
        await conn.execute("UPDATE accounts SET balance = balance - 1 WHERE id = $1", b)
        await conn.execute("ALTER TABLE ledger DISABLE TRIGGER ledger_no_update_delete")
        await conn.execute("UPDATE ledger SET amount = amount + 5 WHERE account_id = $1", a)
        checks = {(p.check, p.account_id) for p in await verify(conn, T0)}
        assert {("balance", a), ("chain", a), ("trigger", None), ("payment", a)} <= checks
        assert all(acc != b for _, acc in checks)


async def test_verify_sees_a_system_block_that_disagrees_with_the_balance(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        a = await new_account(conn, "a")
        b = await new_account(conn, "b")
        async with conn.transaction():
            await post_charges(conn, [Entry(a, -1, "charge", "a1"), Entry(b, -1, "charge", "b1")],
                               actor="r", now=T0)
        assert await verify(conn, T0) == []
        # someone lifts a's debt block by hand with SQL
        await conn.execute("UPDATE blocks SET lifted_at = $2, lifted_by = 'sql' WHERE account_id = $1", a, T0)
        problems = await verify(conn, T0)
        assert [(p.check, p.account_id) for p in problems] == [("system_block", a)]
        assert "no system block" in problems[0].detail
        await conn.execute("UPDATE accounts SET credit = 5 WHERE id = $1", b)   # behind the ledger's back
        assert {(p.check, p.account_id) for p in await verify(conn, T0)} == {("system_block", a), ("system_block", b)}
