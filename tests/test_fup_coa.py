"""Fair usage against a real PostgreSQL and the NAS simulator: a quota crossed by a usage batch throttles the
account in the batch's transaction and sends exactly one CoA with Mikrotik-Rate-Limit — also when the batch is
replayed; a NAS answering CoA-NAK gets a Disconnect; Access-Accept of a throttled account carries the reduced
rate; the period's end restores it."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from billcore.billing import classification, fup
from billcore.billing.ledger_errors import InvalidValue
from billcore.billing import tariffs as T
from billcore.billing.usage import commit_usage
from billcore.billing.rating import TrafficUsage
from billcore.radius.accounting import apply_accounting
from billcore.radius.authorize import authorize
from billcore.radius.nas import add_link, add_nas
from billcore.radius.records import read_access_request, read_accounting_record
from billcore.radius.secrets import SecretStore
from radius.nas_sim import NasSimulator
from radius.process import RadiusSettings
from radius.rate_apply import apply_session_rate
from radius.server import Nas, NasTable, load_dictionary

UTC = dt.timezone.utc
T0 = dt.datetime(2025, 3, 1, tzinfo=UTC)
NOW = dt.datetime(2025, 3, 10, 12, tzinfo=UTC)
MB = 1_000_000
QUOTA = 100 * MB
SECRET = "nas-secret"
DICT = load_dictionary()
MIKROTIK_RATE_LIMIT = (14988, 8)   # vendor, attribute


@pytest.fixture
def store(tmp_path: Path) -> SecretStore:
    return SecretStore(SecretStore.load_or_create_key(tmp_path / "secret.key"))


@pytest.fixture
async def nas() -> AsyncIterator[NasSimulator]:
    sim = NasSimulator(SECRET.encode(), DICT, sessions={"S1": "alice"})
    sim.port = await sim.start()  # type: ignore[attr-defined]
    yield sim
    sim.close()


async def setup(conn: asyncpg.Connection, store: SecretStore, nas_port: int, kind: str = "mikrotik",
                ) -> dict[str, Any]:
    inet = await classification.create_class(conn, "inet")
    service = await T.create_service(conn, "traffic", "traffic")
    await T.set_rate(conn, service, class_id=inet, range_id=None, prepaid=0, unit_size=MB, tiers=[(0, 1)])
    tariff = await T.create_tariff(conn, "home", [service])
    uid = await conn.fetchval(
        "INSERT INTO users(login, scram_salt, scram_iterations, scram_stored_key, scram_server_key)"
        " VALUES ('alice', '\\x00', 4096, '\\x00', '\\x00') RETURNING id")
    account = int(await conn.fetchval("INSERT INTO accounts(user_id, balance) VALUES ($1, 10^12) RETURNING id", uid))
    await T.link_tariff(conn, account, tariff, now=T0, tz=UTC, actor="test")
    nas_id = await add_nas(conn, store, name="sim", address="127.0.0.1", secret=SECRET, coa_port=nas_port,
                           require_message_authenticator=False)
    await fup.nas_set(conn, nas_id, kind=kind)
    await add_link(conn, store, account_id=account, login="alice", password="pw", rate_limit="10M/20M", max_sessions=2,
                   cisco_avpairs=["ip:sub-qos-policy-in=FAST"])
    profile = await fup.profile_set(conn, "fup-slow", 2000, 512, "SLOW-IN", "SLOW-OUT")
    await fup.quota_set(conn, service, None, QUOTA, profile)
    async with conn.transaction():
        await apply_accounting(conn, read_accounting_record(
            {"nas": "127.0.0.1", "status": "start", "session_id": "S1", "login": "alice",
             "event_time": (NOW - dt.timedelta(hours=2)).timestamp()}), NOW - dt.timedelta(hours=2))
    return {"account": account, "service": service, "inet": inet, "nas_id": nas_id, "profile": profile}


def table_for(nas_port: int) -> NasTable:
    return NasTable([Nas("127.0.0.1", SECRET.encode(), "sim", coa_port=nas_port)])


async def deliver_rate_events(conn: asyncpg.Connection, table: NasTable, after_id: int) -> int:
    """What the outbox's radius router and consumer do for rate events (until outbox is merged): per event
    in fup.RATE_EVENTS after ``after_id``, apply the account's current rate; the last event id."""
    last = after_id
    for row in await conn.fetch("SELECT id, event, account_id FROM outbox_events WHERE id > $1 ORDER BY id", after_id):
        last = row["id"]
        if row["event"] in fup.RATE_EVENTS:
            for session in await fup.rate_state(conn, row["account_id"], NOW):
                assert await apply_session_rate(session, table, RadiusSettings(coa_timeout=0.5), DICT)
    return last


def rate_limits(sim: NasSimulator, code: int = 43) -> list[bytes]:
    """The Mikrotik-Rate-Limit values of every CoA-Request (43) the NAS received."""
    out = []
    for received_code, attrs in sim.received:
        if received_code != code:
            continue
        for vsa in attrs.get(26, []):
            vendor = int.from_bytes(vsa[:4], "big")
            if vendor == MIKROTIK_RATE_LIMIT[0] and vsa[4] == MIKROTIK_RATE_LIMIT[1]:
                out.append(vsa[6:])
    return out


async def test_a_crossing_sends_exactly_one_coa_also_when_its_batch_is_replayed(
        pool: asyncpg.Pool, store: SecretStore, nas: NasSimulator) -> None:
    port: int = nas.port  # type: ignore[attr-defined]
    async with pool.acquire() as conn:
        s = await setup(conn, store, port)
        table = table_for(port)
        hour = NOW - dt.timedelta(hours=1)
        under = await commit_usage(conn, "w1", 10, [TrafficUsage(s["account"], s["inet"], hour, 60 * MB)], NOW)
        assert under.counters == 1
        assert await conn.fetchval("SELECT count(*) FROM outbox_events WHERE event = 'fup.quota_reached'") == 0
        crossing = [TrafficUsage(s["account"], s["inet"], hour, 50 * MB)]
        await commit_usage(conn, "w1", 20, crossing, NOW)
        events = await conn.fetch("SELECT payload, dedup_key FROM outbox_events WHERE event = 'fup.quota_reached'")
        assert len(events) == 1
        payload = json.loads(events[0]["payload"])
        assert payload["quota"] == QUOTA and payload["used"] == 110 * MB and payload["profile"] == "fup-slow"
        assert events[0]["dedup_key"].startswith(f"fup:{s['account']}:{s['service']}:*:")
        last = await deliver_rate_events(conn, table, 0)

        # the same batch again (a worker replaying its journal): refused by the watermark, no event
        replay = await commit_usage(conn, "w1", 20, crossing, NOW)
        assert replay.duplicate
        # and more traffic above the quota: no second crossing
        await commit_usage(conn, "w1", 30, [TrafficUsage(s["account"], s["inet"], hour, 5 * MB)], NOW)
        # another source's batch carrying the same bytes cannot fire twice either: the dedup key
        assert await conn.fetchval("SELECT count(*) FROM outbox_events WHERE event = 'fup.quota_reached'") == 1
        await deliver_rate_events(conn, table, last)
        assert rate_limits(nas) == [b"512k/2M"]
        assert len([code for code, _ in nas.received if code == 43]) == 1
        assert (await fup.throttles_of(conn, s["account"]))[0]["until"] == dt.datetime(2025, 4, 1, tzinfo=UTC)


async def test_the_check_costs_nothing_without_a_quota_and_one_statement_with_one(
        pool: asyncpg.Pool, store: SecretStore, nas: NasSimulator) -> None:
    async with pool.acquire() as conn:
        s = await setup(conn, store, nas.port)  # type: ignore[attr-defined]
        statements: list[str] = []
        conn.add_query_logger(lambda q: statements.append(q.query))
        key = [(s["account"], s["service"], s["inet"], 0, T0)]

        def ours() -> list[str]:   # leave out asyncpg's own type introspection
            return [q for q in statements if "fup_quotas" in q and "pg_type" not in q]

        async with conn.transaction():
            await fup.check_crossings(conn, key, [0], [MB], NOW, UTC)        # loads the cache
            fup._CACHE.unsettled_until = 0.0     # QUOTA_SETTLE seconds after the quota's write: settled
            statements.clear()
            assert await fup.check_crossings(conn, key, [0], [MB], NOW, UTC) == []
            assert len(ours()) == 1 and "usage_counters" in ours()[0]       # one statement: the quota's sum
            await fup.quota_delete(conn, (await fup.quota_list(conn))[0]["id"])
            await fup.check_crossings(conn, key, [0], [MB], NOW, UTC)        # re-reads the cache: no quota
            fup._CACHE.unsettled_until = 0.0
            statements.clear()
            assert await fup.check_crossings(conn, key, [0], [QUOTA * 2], NOW, UTC) == []
            assert statements == []                                           # nothing at all


async def test_access_accept_of_a_throttled_account_carries_the_reduced_rate_and_the_period_end_restores(
        pool: asyncpg.Pool, store: SecretStore, nas: NasSimulator) -> None:
    port: int = nas.port  # type: ignore[attr-defined]
    async with pool.acquire() as conn:
        s = await setup(conn, store, port)
        request = read_access_request({"nas": "127.0.0.1", "login": "alice", "method": "pap", "password": b"pw"})
        before = await authorize(conn, store, request, NOW)
        assert ("Mikrotik-Rate-Limit", "10M/20M") in before.reply
        await commit_usage(conn, "w1", 1, [TrafficUsage(s["account"], s["inet"], NOW - dt.timedelta(hours=1),
                                                        QUOTA)], NOW)
        throttled = await authorize(conn, store, request, NOW)
        assert ("Mikrotik-Rate-Limit", "512k/2M") in throttled.reply
        assert ("Mikrotik-Rate-Limit", "10M/20M") not in throttled.reply
        assert ("Cisco-AVPair", "subscriber:sub-qos-policy-in=SLOW-IN") in throttled.reply
        assert ("Cisco-AVPair", "ip:sub-qos-policy-in=FAST") not in throttled.reply

        # the period ends: Access-Accept is back to the link's rate at once, the pass restores and says so
        april = dt.datetime(2025, 4, 1, 0, 5, tzinfo=UTC)
        assert ("Mikrotik-Rate-Limit", "10M/20M") in (await authorize(conn, store, request, april)).reply
        last = await conn.fetchval("SELECT max(id) FROM outbox_events")
        assert await fup.restore_due(conn, NOW) == 0
        assert await fup.restore_due(conn, april) == 1
        assert await fup.restore_due(conn, april) == 0
        restored = await conn.fetch("SELECT event, dedup_key FROM outbox_events WHERE id > $1", last)
        assert [row["event"] for row in restored] == ["fup.restored"]
        # the restore CoA gives the session its link's rate back
        await deliver_rate_events(conn, table_for(port), last)
        assert rate_limits(nas) == [b"10M/20M"]


async def test_a_nas_answering_coa_nak_gets_a_disconnect(pool: asyncpg.Pool, store: SecretStore,
                                                          nas: NasSimulator) -> None:
    port: int = nas.port  # type: ignore[attr-defined]
    nas.coa_nak = True   # a NAS that refuses every CoA-Request (CoA-NAK, Error-Cause 405)
    async with pool.acquire() as conn:
        s = await setup(conn, store, port)
        await commit_usage(conn, "w1", 1, [TrafficUsage(s["account"], s["inet"], NOW - dt.timedelta(hours=1),
                                                        QUOTA)], NOW)
        await deliver_rate_events(conn, table_for(port), 0)
        assert [code for code, _ in nas.received] == [43, 40]    # CoA-Request, then Disconnect-Request
        assert "S1" not in nas.sessions                          # the NAS ended the session

        # with coa_nak_action none, a refused CoA is left at that
        nas.sessions["S1"] = "alice"
        await fup.nas_set(conn, s["nas_id"], coa_nak_action="none")
        [session] = await fup.rate_state(conn, s["account"], NOW)
        assert await apply_session_rate(session, table_for(port), RadiusSettings(coa_timeout=0.5), DICT)
        assert [code for code, _ in nas.received] == [43, 40, 43] and "S1" in nas.sessions


async def test_cisco_and_generic_nas_get_their_own_attributes(pool: asyncpg.Pool, store: SecretStore,
                                                               nas: NasSimulator) -> None:
    async with pool.acquire() as conn:
        s = await setup(conn, store, nas.port, kind="cisco")  # type: ignore[attr-defined]
        await commit_usage(conn, "w1", 1, [TrafficUsage(s["account"], s["inet"], NOW - dt.timedelta(hours=1),
                                                        QUOTA)], NOW)
        [session] = await fup.rate_state(conn, s["account"], NOW)
        assert session["attributes"] == [["Cisco-AVPair", "subscriber:sub-qos-policy-in=SLOW-IN"],
                                         ["Cisco-AVPair", "subscriber:sub-qos-policy-out=SLOW-OUT"]]
        await fup.profile_set(conn, "fup-slow", 2000, 512, "", "", [["Filter-Id", "slow"]])
        await fup.nas_set(conn, s["nas_id"], kind="generic")
        [session] = await fup.rate_state(conn, s["account"], NOW)
        assert session["attributes"] == [["Filter-Id", "slow"]]
        with pytest.raises(InvalidValue):
            await fup.profile_set(conn, "bad", 1, 1, "", "", [["No-Such-Attribute", "x"]])
