"""Fair usage end to end: a real ``billcore serve`` (core with the outbox dispatcher, radius process with its
outbox consumer), an administrator over URFA, radclient as the NAS's requests and the NAS simulator receiving
CoA-Requests.  A usage batch crossing a quota commits (as the core commits a NetFlow worker's batch); the
outbox carries the rate event to the radius process, which asks ``radius.rate_state`` and sends exactly one
CoA with Mikrotik-Rate-Limit — also when the batch is replayed; Access-Accept then carries the reduced rate."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator

import asyncpg
import pytest

from billcore.billing.rating import TrafficUsage
from billcore.billing.usage import commit_usage
from tests.test_fup_coa import rate_limits
from tests.test_radius_e2e import Stack, radclient, radius_stack, subscriber, wait_until

MB = 1_000_000


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, pg_server_dsn: str,
                template_dsn: str) -> AsyncIterator[Stack]:
    async with radius_stack(tmp_path_factory, pg_server_dsn, "fup-e2e") as s:
        assert await s.admin.call("fup.nas_set", {"id": s.nas_id, "kind": "mikrotik"})
        yield s


async def test_a_quota_crossing_reaches_the_nas_as_one_coa_and_access_accept_is_throttled(stack: Stack) -> None:
    admin = stack.admin
    klass = (await admin.call("classes.add", {"name": "fup-inet"}))["id"]
    service = (await admin.call("services.add", {"name": "fup-traffic", "kind": "traffic"}))["id"]
    await admin.call("services.set_rate", {"service_id": service, "class_id": klass, "unit_size": MB,
                                           "tiers": [[0, 1]]})
    tariff = (await admin.call("tariffs.add", {"name": "fup-home", "service_ids": [service]}))["id"]
    account = await subscriber(admin, "carol", 10**9)
    await admin.call("tariffs.link", {"account_id": account, "tariff_id": tariff})
    await admin.call("radius.link_add", {"account_id": account, "login": "carol", "password": "pw-carol",
                                         "rate_limit": "10M/20M", "max_sessions": 2})
    profile = await admin.call("fup.profiles_set", {"name": "slow", "down_kbps": 2000, "up_kbps": 512})
    await admin.call("fup.quotas_set", {"service_id": service, "quota_bytes": 100 * MB, "profile_id": profile})

    async def accepted() -> bool:
        rc, out = await radclient(stack.auth_port, "auth", 'User-Name = "carol", User-Password = "pw-carol"')
        return "Access-Accept" in out
    await wait_until(accepted, timeout=30)   # the radius process has the NAS table
    rc, out = await radclient(stack.acct_port, "acct", 'User-Name = "carol", Acct-Session-Id = "FUP-1",'
                                                       ' Acct-Status-Type = Start')
    assert "Accounting-Response" in out, out
    stack.nas.sessions["FUP-1"] = "carol"

    now = dt.datetime.now(dt.timezone.utc)
    batch = [TrafficUsage(account, klass, now - dt.timedelta(minutes=5), 150 * MB)]
    conn = await asyncpg.connect(stack.dsn)
    try:
        assert not (await commit_usage(conn, "fup-e2e", 1, batch, now)).duplicate
        await wait_until(lambda: _true(rate_limits(stack.nas) != []), timeout=20)
        assert (await commit_usage(conn, "fup-e2e", 1, batch, now)).duplicate   # the replay
        await commit_usage(conn, "fup-e2e", 2, [TrafficUsage(account, klass, now - dt.timedelta(minutes=4), MB)],
                           now)
        await asyncio.sleep(2.0)   # room for a second CoA, if anything were to send one
        delivered = await conn.fetchval(
            "SELECT count(*) FROM outbox_deliveries d JOIN outbox_events e ON e.id = d.event_id"
            " WHERE e.event = 'fup.quota_reached' AND d.channel = 'radius' AND d.state = 'delivered'")
    finally:
        await conn.close()
    assert rate_limits(stack.nas) == [b"512k/2M"] and delivered == 1
    state = await admin.call("fup.state", {"account_id": account})
    assert state["throttled"] and state["profile"]["name"] == "slow"
    rc, out = await radclient(stack.auth_port, "auth", 'User-Name = "carol", User-Password = "pw-carol"')
    assert "Access-Accept" in out and "512k/2M" in out and "10M/20M" not in out, out


async def _true(value: bool) -> bool:
    return value
