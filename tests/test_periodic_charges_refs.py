"""periodic_charges.account_id: a foreign key checked per statement (schema 0009) keeps every guarantee."""

from __future__ import annotations

from datetime import datetime, timezone

import asyncpg
import pytest

from billcore.billing import tariffs as T
from tests.test_usage_commit import make_accounts

APR = datetime(2024, 4, 1, tzinfo=timezone.utc)
MAY = datetime(2024, 5, 1, tzinfo=timezone.utc)
INSERT = ("INSERT INTO periodic_charges(account_id, service_id, period_start, period_end, charged, revision,"
          " updated_at) SELECT a, $2, $3, $4, 1, 1, $3 FROM unnest($1::bigint[]) AS a")


async def test_account_reference_is_enforced_both_ways(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        service = await T.create_service(conn, "m", "periodic", fee=1,
                                         period={"kind": "monthly", "anchor": APR.date()}, charge_mode="start")
        a, b, spare = await make_accounts(conn, 3)
        # one statement, one missing account among real ones: nothing is written
        with pytest.raises(asyncpg.ForeignKeyViolationError, match="account 999999 does not exist"):
            await conn.execute(INSERT, [a, 999999, b], service, APR, MAY)
        assert await conn.fetchval("SELECT count(*) FROM periodic_charges") == 0
        assert await conn.execute(INSERT, [a, b], service, APR, MAY) == "INSERT 0 2"
        with pytest.raises(asyncpg.ForeignKeyViolationError, match="never changes"):
            await conn.execute("UPDATE periodic_charges SET account_id = $1 WHERE account_id = $2", spare, a)
        await conn.execute("UPDATE periodic_charges SET charged = 2 WHERE account_id = $1", a)  # not a key
        with pytest.raises(asyncpg.ForeignKeyViolationError, match=f"account {a} is still referenced"):
            await conn.execute("DELETE FROM accounts WHERE id = $1", a)
        with pytest.raises(asyncpg.ForeignKeyViolationError, match=f"account {b} is still referenced"):
            await conn.execute("UPDATE accounts SET id = 999998 WHERE id = $1", b)
        await conn.execute("DELETE FROM accounts WHERE id = $1", spare)    # unreferenced: fine


async def test_a_delete_waits_for_the_inserters_lock_then_is_refused(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn, pool.acquire() as other:
        service = await T.create_service(conn, "m", "periodic", fee=1,
                                         period={"kind": "monthly", "anchor": APR.date()}, charge_mode="start")
        (a,) = await make_accounts(conn, 1)
        async with conn.transaction():
            await conn.execute(INSERT, [a], service, APR, MAY)
            # the inserter holds the account FOR KEY SHARE, as an RI check would
            await other.execute("SET lock_timeout = '200ms'")
            with pytest.raises(asyncpg.LockNotAvailableError):
                await other.execute("DELETE FROM accounts WHERE id = $1", a)
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            await other.execute("DELETE FROM accounts WHERE id = $1", a)
