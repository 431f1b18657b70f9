"""NAS reboots and storms.

* A NAS that comes back with Accounting-On (or leaves with Accounting-Off)
  while N_SESSIONS of its sessions are open: all of them end, each charged
  up to its last known time, in one transaction whose time is measured and
  bounded (against a real PostgreSQL).
* A storm: STORM_NAS NAS devices (127.0.0.x, all loopback) send
  Start/Interim/Stop for their sessions at once, more than 10,000 requests,
  through a real ``billcore serve`` (its radius process over UDP, the core,
  PostgreSQL), retransmitting as a NAS does when an answer is late: every
  request is answered, every Start recorded, every Stop closes its session,
  and every account is charged exactly its seconds.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import random
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from pyrad.packet import AccountingRequest, AcctPacket

from billcore.billing.tariffs import create_service, create_tariff, set_rate
from billcore.radius.accounting import apply_accounting
from billcore.radius.nas import add_nas
from billcore.radius.records import read_accounting_record
from billcore.radius.secrets import SecretStore
from radius.server import load_dictionary
from tests.test_radius_e2e import Stack, radius_stack, subscriber, time_tariff, wait_until
from tests.test_radius_time import store  # noqa: F401  (a fixture)

N_SESSIONS = int(os.environ.get("BILLCORE_STORM_SESSIONS", "5000"))
NAS = "10.0.0.1"
T0 = dt.datetime(2025, 3, 3, 10, 0, tzinfo=dt.timezone.utc)
PER_SECOND = 1000                  # micro-units: 3 600 000 an hour in every time range
CLOSE_BOUND = 120.0                # seconds the close of N_SESSIONS may take on a loaded 2-core test machine


async def many_open_sessions(conn: asyncpg.Connection, store: SecretStore, n: int) -> list[int]:
    """``n`` accounts on one time tariff, each with an open session of the
    NAS: started at T0, its Interim at 600 s charged (watermark row and
    charged_time at 600), its framed IP bound.  Made in a few set-based
    statements — what is measured is the close, not this."""
    await add_nas(conn, store, name="mt1", address=NAS, secret="x")
    service = await create_service(conn, "dialup", "time")
    await set_rate(conn, service, class_id=None, range_id=None, prepaid=0, unit_size=3600,
                   tiers=[(0, 3600 * PER_SECOND)])
    tariff = await create_tariff(conn, "dialup", [service])
    accounts = [int(r["id"]) for r in await conn.fetch(
        "WITH u AS (INSERT INTO users(login, scram_salt, scram_iterations, scram_stored_key, scram_server_key)"
        "  SELECT 'storm' || g, '\\x00', 4096, '\\x00', '\\x00' FROM generate_series(1, $1) g RETURNING id)"
        " INSERT INTO accounts(user_id, balance) SELECT id, 1000000000 FROM u ORDER BY id RETURNING id", n)]
    await conn.execute(
        "INSERT INTO account_tariffs(account_id, tariff_id, valid_from, created_at, created_by)"
        " SELECT a, $2, $3, $3, 'test' FROM unnest($1::bigint[]) a", accounts, tariff, T0 - dt.timedelta(days=2))
    await conn.execute(
        "INSERT INTO radius_links(account_id, login, password_enc, max_sessions)"
        " SELECT a, 'l' || a, '\\x00', 2 FROM unnest($1::bigint[]) a", accounts)
    await conn.execute(
        "INSERT INTO radius_sessions(nas_id, session_id, account_id, link_id, login, framed_ip, started_at,"
        " updated_at, session_time, charged_time)"
        " SELECT n.id, 's' || l.account_id, l.account_id, l.id, l.login,"
        "  '10.128.0.0'::inet + row_number() OVER (ORDER BY l.id), $1, $2, 600, 600"
        " FROM radius_links l, radius_nas n WHERE l.login LIKE 'l%'", T0, T0 + dt.timedelta(seconds=600))
    await conn.execute(
        "INSERT INTO ip_bindings(account_id, prefix, kind, source, session_ref, valid_from)"
        " SELECT account_id, set_masklen(framed_ip, 32)::cidr, 'dynamic', 'radius',"
        "  'radius:' || nas_id || ':' || session_id, started_at FROM radius_sessions")
    await conn.execute(
        "INSERT INTO ingest_watermarks(source, watermark, updated_at)"
        " SELECT 'radius:' || nas_id || ':' || session_id, 600, $1 FROM radius_sessions", T0)
    return accounts


async def nas_event(conn: asyncpg.Connection, status: str, at: dt.datetime) -> tuple[int, float]:
    record = read_accounting_record({"nas": NAS, "status": status, "event_time": at.timestamp()})
    began = time.perf_counter()
    async with conn.transaction():
        result = await apply_accounting(conn, record, at)
    return result.closed or 0, time.perf_counter() - began


async def closed_cleanly(conn: asyncpg.Connection, n: int) -> None:
    assert await conn.fetchval("SELECT count(*) FROM radius_sessions WHERE ended_at IS NULL") == 0
    assert await conn.fetchval("SELECT count(*) FROM ip_bindings WHERE valid_to IS NULL") == 0
    assert await conn.fetchval("SELECT count(*) FROM ingest_watermarks WHERE source LIKE 'radius:%'") == 0
    assert await conn.fetchval("SELECT count(*) FROM radius_sessions") == n


async def test_accounting_on_closes_thousands_of_sessions_in_bounded_time(
        pool: asyncpg.Pool, store: SecretStore) -> None:
    async with pool.acquire() as conn:
        accounts = await many_open_sessions(conn, store, N_SESSIONS)
        # one in ten sessions has seconds its last Interim could not commit (charged_time 300 of 600):
        # the Accounting-On charges them, the rest is already charged to the last Interim
        owed = accounts[::10]
        await conn.execute("UPDATE radius_sessions SET charged_time = 300 WHERE account_id = ANY($1::bigint[])", owed)
        await conn.execute("UPDATE ingest_watermarks w SET watermark = 300 FROM radius_sessions s"
                           " WHERE w.source = 'radius:' || s.nas_id || ':' || s.session_id AND s.charged_time = 300")
        closed, took = await nas_event(conn, "on", T0 + dt.timedelta(minutes=30))
        print(f"\nAccounting-On closed {closed} sessions ({len(owed)} charged) in {took:.2f} s")
        assert closed == N_SESSIONS and took < CLOSE_BOUND
        await closed_cleanly(conn, N_SESSIONS)
        assert await conn.fetchval("SELECT count(*) FROM radius_sessions WHERE charged_time <> 600") == 0
        rows = await conn.fetch("SELECT account_id, sum(amount) AS total FROM ledger GROUP BY account_id")
        assert {r["account_id"]: r["total"] for r in rows} == {acc: -300 * PER_SECOND for acc in owed}
        # a second Accounting-On (the NAS retransmits it) finds nothing to do
        assert (await nas_event(conn, "on", T0 + dt.timedelta(minutes=30)))[0] == 0
        assert await conn.fetchval("SELECT sum(amount) FROM ledger") == -300 * PER_SECOND * len(owed)


async def test_accounting_off_charges_thousands_of_sessions_up_to_the_off(
        pool: asyncpg.Pool, store: SecretStore) -> None:
    async with pool.acquire() as conn:
        accounts = await many_open_sessions(conn, store, N_SESSIONS)
        closed, took = await nas_event(conn, "off", T0 + dt.timedelta(minutes=20))   # 1200 s after the start
        print(f"\nAccounting-Off closed and charged {closed} sessions in {took:.2f} s")
        assert closed == N_SESSIONS and took < CLOSE_BOUND
        await closed_cleanly(conn, N_SESSIONS)
        assert await conn.fetchval("SELECT count(*) FROM radius_sessions WHERE charged_time <> 1200"
                                   " OR charged <> $1", 600 * PER_SECOND) == 0
        rows = await conn.fetch("SELECT account_id, sum(amount) AS total FROM ledger GROUP BY account_id")
        assert {r["account_id"]: r["total"] for r in rows} == {acc: -600 * PER_SECOND for acc in accounts}


# -- the storm, through a real billcore over UDP ------------------------------------------

STORM_NAS = 8                      # 127.0.0.2 .. 127.0.0.9
STORM_SESSIONS = 420               # per NAS: 8 × 420 × (Start, Interim, Stop) = 10 080 requests
STORM_ACCOUNTS = 40
IN_FLIGHT = 64                     # outstanding requests per NAS (a NAS's identifier space is 256)
RETRY_AFTER = 3.0                  # seconds a NAS waits for the Accounting-Response before re-sending
RETRIES = 20
STORM_SECRET = b"storm-secret"


class StormNas(asyncio.DatagramProtocol):
    """One NAS: a UDP socket on its own loopback address, identifiers handed
    out and matched to their answers, retransmission of the same datagram."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.ids: asyncio.Queue[int] = asyncio.Queue()
        for i in range(256):
            self.ids.put_nowait(i)
        self.waiting: dict[int, asyncio.Future[bytes]] = {}
        self.transport: Any = None
        self.sent = self.answered = self.retransmitted = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        fut = self.waiting.get(data[1]) if len(data) >= 20 else None
        if fut is not None and not fut.done():
            fut.set_result(data)

    async def request(self, attributes: list[tuple[str, Any]]) -> None:
        from radius.auth import response_ok
        ident = await self.ids.get()
        try:
            packet = AcctPacket(AccountingRequest, id=ident, secret=STORM_SECRET, dict=DICTIONARY)
            for name, value in attributes:
                packet.AddAttribute(name, value)
            raw = packet.RequestPacket()
            self.sent += 1
            for attempt in range(RETRIES):
                fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
                self.waiting[ident] = fut
                assert self.transport is not None
                self.transport.sendto(raw)
                try:
                    reply = await asyncio.wait_for(fut, RETRY_AFTER)
                except asyncio.TimeoutError:
                    self.retransmitted += 1
                    continue
                assert reply[0] == 5 and response_ok(reply, raw[4:20], STORM_SECRET), reply[:4]
                self.answered += 1
                return
            raise AssertionError(f"NAS {self.address}: no answer after {RETRIES} tries")
        finally:
            self.waiting.pop(ident, None)
            self.ids.put_nowait(ident)


DICTIONARY = load_dictionary()


@pytest.fixture(scope="module")
async def storm_stack(tmp_path_factory: pytest.TempPathFactory, pg_server_dsn: str,
                      template_dsn: str) -> AsyncIterator[Stack]:
    async with radius_stack(tmp_path_factory, pg_server_dsn, "radius-storm") as s:
        admin = s.admin
        service = (await admin.call("services.add", {"name": "storm-time", "kind": "time"}))["id"]
        await admin.call("services.set_rate", {"service_id": service, "unit_size": 3600,
                                               "tiers": [[0, 3600 * PER_SECOND]]})
        tariff = (await admin.call("tariffs.add", {"name": "storm", "service_ids": [service]}))["id"]
        for i in range(STORM_ACCOUNTS):
            account = await subscriber(admin, f"st{i}", 100_000_000)
            await admin.call("tariffs.link", {"account_id": account, "tariff_id": tariff})
            await admin.call("radius.link_add", {"account_id": account, "login": f"st{i}", "password": "pw",
                                                 "max_sessions": 1000})
            s.accounts[f"st{i}"] = account
        # the storm replays the last hours: the tariff links begin a day ago (a set-up step on the database)
        conn = await asyncpg.connect(s.dsn)
        try:
            await conn.execute("UPDATE account_tariffs SET valid_from = valid_from - interval '1 day'"
                               " WHERE tariff_id = $1", tariff)
        finally:
            await conn.close()
        for k in range(STORM_NAS):
            await admin.call("radius.nas_add", {"name": f"storm{k}", "address": f"127.0.0.{k + 2}",
                                                "secret": STORM_SECRET.decode(),
                                                "require_message_authenticator": False})
        yield s


async def test_a_storm_from_many_nas_loses_nothing(storm_stack: Stack) -> None:
    s = storm_stack
    loop = asyncio.get_running_loop()
    fleet = []
    for k in range(STORM_NAS):
        nas = StormNas(f"127.0.0.{k + 2}")
        await loop.create_datagram_endpoint(lambda nas=nas: nas, local_addr=(nas.address, 0),  # type: ignore[misc]
                                            remote_addr=("127.0.0.1", s.acct_port))
        fleet.append(nas)
    # the radius process learns the new NAS devices from the radius.nas event
    probe = fleet[-1]

    async def known() -> bool:
        try:
            await asyncio.wait_for(probe.request([("Acct-Status-Type", "Accounting-On")]), 10)
            return True
        except (AssertionError, asyncio.TimeoutError):
            return False
    await wait_until(known, timeout=60)
    for nas in fleet:
        await nas.request([("Acct-Status-Type", "Accounting-On")])   # a NAS announces itself first
        nas.sent = nas.answered = nas.retransmitted = 0
    rng = random.Random(19)
    base = int(time.time()) - 3 * 3600          # sessions of the last hours: nothing stamped in the future
    plan: dict[tuple[int, str], tuple[str, int, int, int]] = {}
    for k in range(STORM_NAS):
        for j in range(STORM_SESSIONS):
            plan[(k, f"n{k}-s{j}")] = (f"st{rng.randrange(STORM_ACCOUNTS)}", base + rng.randrange(3600),
                                       rng.randrange(30, 600), rng.randrange(0, 3000))
    limit = [asyncio.Semaphore(IN_FLIGHT) for _ in fleet]

    async def session(k: int, sid: str) -> None:
        login, start, interim, rest = plan[(k, sid)]
        common = [("User-Name", login), ("Acct-Session-Id", sid)]
        for status, seconds in (("Start", 0), ("Interim-Update", interim), ("Stop", interim + rest)):
            attrs = [("Acct-Status-Type", status), *common, ("Event-Timestamp", start + seconds)]
            if status != "Start":
                attrs.append(("Acct-Session-Time", seconds))
            async with limit[k]:
                await fleet[k].request(attrs)

    began = time.perf_counter()
    await asyncio.gather(*(session(k, sid) for k, sid in plan))
    took = time.perf_counter() - began
    requests = sum(nas.sent for nas in fleet)
    print(f"\nstorm: {requests} requests from {STORM_NAS} NAS in {took:.1f} s,"
          f" {sum(nas.retransmitted for nas in fleet)} retransmissions")
    assert requests == 3 * len(plan) >= 10_000
    assert all(nas.answered == nas.sent for nas in fleet)       # every request answered
    conn = await asyncpg.connect(s.dsn)
    try:
        rows = await conn.fetch(
            "SELECT s.session_id, s.ended_at IS NOT NULL AS ended, s.end_reason, s.session_time, s.charged_time,"
            " s.started_at, n.address FROM radius_sessions s JOIN radius_nas n ON n.id = s.nas_id"
            " WHERE n.name LIKE 'storm%'")
        assert len(rows) == len(plan)                           # every Start recorded
        for row in rows:
            login, start, interim, rest = plan[(int(row["session_id"].split("-")[0][1:]), row["session_id"])]
            assert row["ended"] and row["end_reason"] == "stop:0", row
            assert row["session_time"] == row["charged_time"] == interim + rest, row
            assert row["started_at"] == dt.datetime.fromtimestamp(start, dt.timezone.utc), row
        owed: dict[int, int] = {}
        for login, _, interim, rest in plan.values():
            owed[s.accounts[login]] = owed.get(s.accounts[login], 0) + (interim + rest) * PER_SECOND
        charged = {r["account_id"]: -r["total"] for r in await conn.fetch(
            "SELECT account_id, sum(amount) AS total FROM ledger WHERE reference LIKE 'usage radius:%'"
            " GROUP BY account_id")}
        assert charged == {acc: total for acc, total in owed.items() if total}   # to the micro-unit
        assert await conn.fetchval("SELECT count(*) FROM ingest_watermarks WHERE source LIKE 'radius:%'") == 0
    finally:
        await conn.close()
