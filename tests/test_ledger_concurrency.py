"""Many writers at once on the same and overlapping accounts: no lost update,
no deadlock, exact final balances."""

from __future__ import annotations

import asyncio
import datetime as dt
import random

import asyncpg

from billcore.billing import accounts, payments
from billcore.billing.ledger import Entry, post_charges
from billcore.billing.verify import verify
from urfa.scram import make_verifier

T0 = dt.datetime(2024, 6, 1, tzinfo=dt.timezone.utc)
VERIFIER = make_verifier("pw", iterations=4096)


async def test_concurrent_payments_and_multi_account_charges(db_dsn: str) -> None:
    pool = await asyncpg.create_pool(db_dsn, min_size=12, max_size=12)
    try:
        async with pool.acquire() as conn:
            ids = [int((await accounts.create_user(conn, f"c{i}", VERIFIER))["basic_account_id"])
                   for i in range(4)]
        rng = random.Random(7)
        expected = dict.fromkeys(ids, 0)
        jobs = []
        for n in range(300):
            if n % 3:
                acc, amount = rng.choice(ids), rng.randint(1, 10**7)
                expected[acc] += amount
                jobs.append(("pay", acc, amount, n))
            else:
                # a batch over 2-4 accounts in a random (unsorted) order: the ledger
                # must lock them in id order or two such batches deadlock
                chosen = rng.sample(ids, rng.randint(2, 4))
                entries = [Entry(a, -rng.randint(1, 10**6), "traffic", f"t{n}:{a}") for a in chosen]
                for e in entries:
                    expected[e.account_id] += e.amount
                jobs.append(("batch", entries, None, n))

        async def run(job: tuple) -> None:
            kind, a, b, n = job
            async with pool.acquire() as conn:
                if kind == "pay":
                    # each payment is sent twice at once: the external id makes it one
                    await payments.add_payment(conn, account_id=a, amount=b, method="bank",
                                               actor="test", external_id=f"e{n}", now=T0)
                else:
                    async with conn.transaction():
                        await post_charges(conn, a, actor="rating", now=T0)

        retried = [j for j in jobs if j[0] == "pay"]
        await asyncio.wait_for(asyncio.gather(*(run(j) for j in jobs + retried)), timeout=60)

        async with pool.acquire() as conn:
            rows = await conn.fetch("SELECT id, balance FROM accounts ORDER BY id")
            assert {r["id"]: r["balance"] for r in rows} == expected
            assert await conn.fetchval("SELECT count(*) FROM payments") == len(retried)
            assert await verify(conn, T0) == []
    finally:
        await pool.close()
