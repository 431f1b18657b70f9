"""Property tests: random sequences of money operations against the real database.

One database per test; each hypothesis example opens fresh accounts (unique
logins) and a fresh idempotency-key prefix, so examples never see each
other's rows.  A Python model of the balances, credits and cancellations
runs beside the database; after every operation the database must agree
with the model and with itself.
"""

from __future__ import annotations

import datetime as dt
import itertools
from dataclasses import dataclass, field

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billcore.billing import accounts, blocks, payments
from billcore.billing.blocks import in_debt
from billcore.common.errors import BillingError
from billcore.billing.ledger import Entry, post_charges
from billcore.billing.ledger_errors import PromisedRefused
from billcore.billing.verify import verify
from urfa.scram import make_verifier

T0 = dt.datetime(2024, 5, 1, tzinfo=dt.timezone.utc)
VERIFIER = make_verifier("pw", iterations=4096)
N_ACCOUNTS = 3
PROMISED = payments.PromisedRule(amount=20_000_000, duration=dt.timedelta(days=3))
_seq = itertools.count()

amounts = st.integers(min_value=1, max_value=50_000_000)
acc_idx = st.integers(min_value=0, max_value=N_ACCOUNTS - 1)
ops = st.one_of(
    st.tuples(st.just("pay"), acc_idx, amounts, st.one_of(st.none(), st.integers(0, 3))),
    st.tuples(st.just("charge"), acc_idx, amounts, st.integers(0, 5)),
    st.tuples(st.just("cancel"), st.integers(0, 10)),
    st.tuples(st.just("credit"), acc_idx, st.integers(0, 30_000_000)),
    st.tuples(st.just("block"), acc_idx, st.sampled_from(["admin", "user"]), st.booleans()),
    st.tuples(st.just("replay"), st.integers(0, 20)),
    st.tuples(st.just("promised"), acc_idx),
    st.tuples(st.just("expire"),),
    st.tuples(st.just("bad"), acc_idx, st.sampled_from(
        ["unknown_account", "absurd", "negative", "conflict", "batch_conflict", "overflow"])),
)
SETTINGS = settings(max_examples=120, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@dataclass
class Model:
    ids: list[int]
    prefix: str
    balance: dict[int, int] = field(default_factory=dict)
    credit: dict[int, int] = field(default_factory=dict)
    payments: list[tuple[int, int, int]] = field(default_factory=list)   # (payment id, account, amount)
    cancelled: set[int] = field(default_factory=set)
    by_external: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    charges: dict[str, tuple[int, int]] = field(default_factory=dict)
    done: list[tuple] = field(default_factory=list)
    promised: dict[int, int] = field(default_factory=dict)      # open promised credit
    promised_taken: set[int] = field(default_factory=set)       # taken this month

    def posted(self, acc: int) -> None:
        """A ledger row was posted: a balance >= 0 covers the promised credit."""
        if self.balance[acc] >= 0:
            self.promised[acc] = 0


async def fresh_accounts(conn: asyncpg.Connection, n: int) -> list[int]:
    out = []
    for _ in range(n):
        user = await accounts.create_user(conn, f"p{next(_seq)}", VERIFIER)
        out.append(int(user["basic_account_id"]))
    return out


async def snapshot(conn: asyncpg.Connection, ids: list[int]) -> tuple:
    return (
        tuple(await conn.fetch("SELECT id, balance, credit FROM accounts WHERE id = ANY($1) ORDER BY id", ids)),
        await conn.fetchval("SELECT count(*) FROM ledger WHERE account_id = ANY($1)", ids),
        await conn.fetchval("SELECT count(*) FROM payments WHERE account_id = ANY($1)", ids),
        tuple(await conn.fetch("SELECT id, kind, lifted_at FROM blocks WHERE account_id = ANY($1) ORDER BY id", ids)),
    )


async def apply(conn: asyncpg.Connection, m: Model, op: tuple) -> None:
    """Run one operation on the database and on the model."""
    kind = op[0]
    if kind == "pay":
        _, i, amount, ext = op
        acc = m.ids[i]
        external = None if ext is None else f"{m.prefix}-ext{ext}"
        if external is not None and external in m.by_external:
            pid, pacc, pamount = m.by_external[external]
            if (pacc, pamount) != (acc, amount):
                return await apply(conn, m, ("bad", i, "conflict"))
        r = await payments.add_payment(conn, account_id=acc, amount=amount, method="cash",
                                       actor="prop", external_id=external, now=T0)
        if external is not None and external in m.by_external:
            assert not r.created and r.payment_id == m.by_external[external][0]
        else:
            assert r.created
            m.balance[acc] += amount
            m.posted(acc)
            m.payments.append((r.payment_id, acc, amount))
            if external is not None:
                m.by_external[external] = (r.payment_id, acc, amount)
    elif kind == "charge":
        _, i, amount, k = op
        acc, key = m.ids[i], f"{m.prefix}-c{k}"
        if key in m.charges and m.charges[key] != (acc, -amount):
            return await apply(conn, m, ("bad", i, "batch_conflict"))
        async with conn.transaction():
            r = await post_charges(conn, [Entry(acc, -amount, "charge", key)], actor="prop", now=T0)
        if key in m.charges:
            assert r.posted == () and r.skipped == (key,)
        else:
            m.charges[key] = (acc, -amount)
            m.balance[acc] -= amount
            m.posted(acc)
    elif kind in ("cancel", "cancel_pid"):
        if not m.payments:
            return
        if kind == "cancel":      # pick by position now; remember the payment id for replays
            pid, acc, amount = m.payments[op[1] % len(m.payments)]
            op = ("cancel_pid", pid)
        else:
            pid, acc, amount = next(p for p in m.payments if p[0] == op[1])
        before = await conn.fetchval("SELECT balance FROM accounts WHERE id = $1", acc)
        r = await payments.cancel_payment(conn, pid, actor="prop", now=T0)
        assert r.created == (pid not in m.cancelled)
        if pid not in m.cancelled:
            m.cancelled.add(pid)
            m.balance[acc] -= amount
            m.posted(acc)
            assert r.balance == before - amount
        # a cancelled payment's rows sum to exactly zero
        assert await conn.fetchval(
            "SELECT sum(l.amount) FROM ledger l JOIN payments p ON l.id IN (p.ledger_id, p.cancel_ledger_id)"
            " WHERE p.id = $1", pid) == 0
    elif kind == "credit":
        _, i, credit = op
        await accounts.edit_account(conn, m.ids[i], actor="prop", now=T0, credit=credit)
        m.credit[m.ids[i]] = credit
    elif kind == "block":
        _, i, bkind, on = op
        fn = blocks.set_block if on else blocks.lift_block
        await fn(conn, m.ids[i], bkind, actor="prop", now=T0)
    elif kind == "promised":
        acc = m.ids[op[1]]
        if acc in m.promised_taken:
            before = await snapshot(conn, m.ids)
            try:
                await payments.take_promised(conn, acc, actor="prop", rule=PROMISED, now=T0)
            except PromisedRefused:
                pass
            else:
                raise AssertionError("a second promised payment in one month was granted")
            assert await snapshot(conn, m.ids) == before
            return
        await payments.take_promised(conn, acc, actor="prop", rule=PROMISED, now=T0)
        m.promised_taken.add(acc)
        m.promised[acc] = PROMISED.amount
    elif kind == "expire":
        await payments.expire_promised(conn, T0 + PROMISED.duration)
        m.promised = dict.fromkeys(m.ids, 0)
    elif kind == "replay":
        # anything carrying an idempotency key (an external id, a ledger key, the
        # payment id of a cancel) replays at any later time; setting a credit or
        # a block replays as the very next operation
        replayable = [d for d in m.done if d[0] in ("charge", "cancel_pid")
                      or (d[0] == "pay" and d[3] is not None)]
        if m.done and m.done[-1][0] in ("credit", "block"):
            replayable.append(m.done[-1])
        if not replayable:
            return
        target = replayable[op[1] % len(replayable)]
        before = await snapshot(conn, m.ids)
        await apply(conn, m, target)
        assert await snapshot(conn, m.ids) == before, f"replaying {target} changed something"
        return
    elif kind == "bad":
        await failing(conn, m, op[1], op[2])
        return
    m.done.append(op)


async def failing(conn: asyncpg.Connection, m: Model, i: int, how: str) -> None:
    acc = m.ids[i]
    before = await snapshot(conn, m.ids)
    try:
        if how == "unknown_account":
            async with conn.transaction():
                await post_charges(conn, [Entry(acc, -1, "charge", f"{m.prefix}-u{next(_seq)}"),
                                          Entry(2**62, -1, "charge", f"{m.prefix}-u{next(_seq)}")],
                                   actor="prop", now=T0)
        elif how == "absurd":
            await payments.add_payment(conn, account_id=acc, amount=payments.MAX_PAYMENT + 1,
                                       method="cash", actor="prop", now=T0)
        elif how == "negative":
            await payments.add_payment(conn, account_id=acc, amount=-5, method="cash", actor="prop", now=T0)
        elif how == "conflict":
            ext = f"{m.prefix}-conflict"
            if ext not in m.by_external:
                r = await payments.add_payment(conn, account_id=m.ids[0], amount=7, method="bank",
                                               actor="prop", external_id=ext, now=T0)
                m.by_external[ext] = (r.payment_id, m.ids[0], 7)
                m.payments.append((r.payment_id, m.ids[0], 7))
                m.balance[m.ids[0]] += 7
                m.posted(m.ids[0])
                before = await snapshot(conn, m.ids)
            await payments.add_payment(conn, account_id=acc, amount=8, method="bank",
                                       actor="prop", external_id=ext, now=T0)
        elif how == "batch_conflict":
            key = f"{m.prefix}-bc"
            if key not in m.charges:
                async with conn.transaction():
                    await post_charges(conn, [Entry(m.ids[0], -3, "charge", key)], actor="prop", now=T0)
                m.charges[key] = (m.ids[0], -3)
                m.balance[m.ids[0]] -= 3
                m.posted(m.ids[0])
                before = await snapshot(conn, m.ids)
            async with conn.transaction():   # a good entry first: it must not survive either
                await post_charges(conn, [Entry(acc, -1, "charge", f"{m.prefix}-g{next(_seq)}"),
                                          Entry(acc, -4, "charge", key)], actor="prop", now=T0)
        elif how == "overflow":
            async with conn.transaction():
                await post_charges(conn, [Entry(acc, -(10**18 - 1), "charge", f"{m.prefix}-o1"),
                                          Entry(acc, -(10**18 - 1), "charge", f"{m.prefix}-o2")],
                                   actor="prop", now=T0)
    except BillingError:
        pass
    else:
        raise AssertionError(f"{how} did not fail")
    assert await snapshot(conn, m.ids) == before, f"failed {how} changed something"


async def check(conn: asyncpg.Connection, m: Model) -> None:
    for acc in m.ids:
        balance, credit = await conn.fetchrow("SELECT balance, credit FROM accounts WHERE id = $1", acc)
        total = await conn.fetchval("SELECT coalesce(sum(amount), 0) FROM ledger WHERE account_id = $1", acc)
        assert balance == total == m.balance[acc]
        assert credit == m.credit[acc]
        system = await conn.fetchval(
            "SELECT count(*) FROM blocks WHERE account_id = $1 AND kind = 'system' AND lifted_at IS NULL", acc)
        assert bool(system) == in_debt(balance, credit, m.promised.get(acc, 0), False)


@SETTINGS
@given(sequence=st.lists(ops, min_size=1, max_size=25))
async def test_random_operation_sequences_keep_every_invariant(pool: asyncpg.Pool, sequence: list[tuple]) -> None:
    async with pool.acquire() as conn:
        ids = await fresh_accounts(conn, N_ACCOUNTS)
        m = Model(ids, f"x{next(_seq)}", {i: 0 for i in ids}, {i: 0 for i in ids})
        for op in sequence:
            await apply(conn, m, op)
            await check(conn, m)
        assert await verify(conn, T0) == []


commutable = st.one_of(
    st.tuples(st.just("pay"), acc_idx, amounts, st.none()),
    st.tuples(st.just("charge"), acc_idx, amounts, st.integers(0, 1000)),
    st.tuples(st.just("credit"), acc_idx, st.integers(0, 30_000_000)),
)


def _unique_charge_keys(xs: list[tuple]) -> list[tuple]:
    return [(o[0], o[1], o[2], n) if o[0] == "charge" else o for n, o in enumerate(xs)]


@SETTINGS
@given(pair=st.lists(commutable, min_size=2, max_size=8,
                     unique_by=lambda o: (o[0], o[1]) if o[0] == "credit" else o)
       .map(_unique_charge_keys)
       .flatmap(lambda xs: st.tuples(st.just(xs), st.permutations(xs))))
async def test_operations_in_either_order_give_the_same_books(
        pool: asyncpg.Pool, pair: tuple[list[tuple], list[tuple]]) -> None:
    forward, shuffled = pair
    async with pool.acquire() as conn:
        results = []
        for sequence in (forward, shuffled):
            ids = await fresh_accounts(conn, N_ACCOUNTS)
            m = Model(ids, f"y{next(_seq)}", {i: 0 for i in ids}, {i: 0 for i in ids})
            for op in sequence:
                await apply(conn, m, op)
            await check(conn, m)
            results.append([tuple(r) for r in await conn.fetch(
                "SELECT a.balance, a.credit, count(b.id) FROM accounts a LEFT JOIN blocks b"
                " ON b.account_id = a.id AND b.lifted_at IS NULL"
                " WHERE a.id = ANY($1) GROUP BY a.id ORDER BY a.id", ids)])
        assert results[0] == results[1]
