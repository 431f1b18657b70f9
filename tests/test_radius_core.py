"""The core side of RADIUS against a real PostgreSQL: authorization rules,
pools, accounting, time charges exactly once, IP bindings, stale sessions,
encrypted secrets."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import stat
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from billcore.api.radius import calls
from billcore.billing.tariffs import create_service, create_tariff, link_tariff, set_rate
from billcore.common.config import Config
from billcore.radius.accounting import apply_accounting, close_stale
from billcore.radius.authorize import authorize, authorize_many
from billcore.radius.nas import add_link, add_nas, add_pool, nas_list
from billcore.radius.records import AccountingResult, Decision, SessionHook, read_access_request, read_accounting_record
from billcore.radius.secrets import SecretStore
from billcore.radius.sessions import active_sessions
from billcore.server.context import CoreContext

T0 = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.timezone.utc)
NAS = "10.0.0.1"


@pytest.fixture
def store(tmp_path: Path) -> SecretStore:
    return SecretStore(SecretStore.load_or_create_key(tmp_path / "secret.key"))


async def make_account(conn: asyncpg.Connection, login: str, balance: int = 0, credit: int = 0) -> int:
    uid = await conn.fetchval(
        "INSERT INTO users(login, scram_salt, scram_iterations, scram_stored_key, scram_server_key)"
        " VALUES ($1, '\\x00', 4096, '\\x00', '\\x00') RETURNING id", login)
    return int(await conn.fetchval(
        "INSERT INTO accounts(user_id, balance, credit) VALUES ($1, $2, $3) RETURNING id", uid, balance, credit))


async def auth(conn: asyncpg.Connection, store: SecretStore, login: str, password: bytes, now: dt.datetime = T0) -> Decision:
    request = read_access_request({"nas": NAS, "login": login, "method": "pap", "password": password})
    async with conn.transaction():
        return await authorize(conn, store, request, now)


async def acct(conn: asyncpg.Connection, status: str, sid: str, login: str = "alice", **kw: object) -> AccountingResult:
    rec = {"nas": NAS, "status": status, "session_id": sid, "login": login,
           "event_time": kw.pop("at", T0).timestamp(), **kw}  # type: ignore[union-attr]
    async with conn.transaction():
        return await apply_accounting(conn, read_accounting_record(rec), T0)


async def test_secret_key_file_is_created_0600_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "secret.key"
    key = SecretStore.load_or_create_key(path)
    assert len(key) == 32 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert SecretStore.load_or_create_key(path) == key
    sealed = SecretStore(key).seal(b"pw")
    assert b"pw" not in sealed and SecretStore(key).open(sealed) == b"pw"
    with pytest.raises(ValueError):
        SecretStore(os.urandom(32)).open(sealed)


async def test_nas_secrets_encrypted_at_rest(pool: asyncpg.Pool, store: SecretStore) -> None:
    async with pool.acquire() as conn:
        await add_nas(conn, store, name="mt1", address=NAS, secret="s3cret-nas", coa_port=1700)
        raw = await conn.fetchval("SELECT secret_enc FROM radius_nas")
        assert b"s3cret-nas" not in raw
        [full] = await nas_list(conn, store, with_secrets=True)
        assert full.secret == b"s3cret-nas" and full.address == NAS and full.coa_port == 1700
        [public] = await nas_list(conn, store, with_secrets=False)
        assert public.secret is None and "secret" not in public.wire()


async def test_pap_chap_blocks_and_session_limit(pool: asyncpg.Pool, store: SecretStore) -> None:
    async with pool.acquire() as conn:
        await add_nas(conn, store, name="mt1", address=NAS, secret="x")
        acc = await make_account(conn, "u1", balance=1000)
        await add_link(conn, store, account_id=acc, login="alice", password="wonder", static_ip="10.5.0.9",
                       rate_limit="10M/10M", cisco_avpairs=["ip:sub-qos-policy-in=10M"])
        assert b"wonder" not in await conn.fetchval("SELECT password_enc FROM radius_links")
        ok = await auth(conn, store, "alice", b"wonder")
        assert ok.accept and ("Framed-IP-Address", "10.5.0.9") in ok.reply
        assert ("Mikrotik-Rate-Limit", "10M/10M") in ok.reply and ("Cisco-AVPair", "ip:sub-qos-policy-in=10M") in ok.reply
        assert not (await auth(conn, store, "alice", b"wrong")).accept
        assert not (await auth(conn, store, "nobody", b"wonder")).accept
        challenge = os.urandom(16)
        chap = {"id": 3, "challenge": challenge, "response": hashlib.md5(b"\x03wonder" + challenge).digest()}
        async with conn.transaction():
            request = read_access_request({"nas": NAS, "login": "alice", "method": "chap", "chap": chap})
            assert (await authorize(conn, store, request, T0)).accept
        # one session allowed: a second is refused while the first is active
        await acct(conn, "start", "S1", framed_ip="10.5.0.9")
        assert (await auth(conn, store, "alice", b"wonder")).reason == "too many sessions"
        await acct(conn, "stop", "S1", session_time=10)
        assert (await auth(conn, store, "alice", b"wonder")).accept
        # any block refuses
        await conn.execute("INSERT INTO blocks(account_id, kind, set_at, set_by) VALUES ($1, 'admin', now(), 't')", acc)
        assert (await auth(conn, store, "alice", b"wonder")).reason == "account blocked"


async def test_pool_addresses_never_collide_and_are_sticky(pool: asyncpg.Pool, store: SecretStore) -> None:
    async with pool.acquire() as conn:
        await add_nas(conn, store, name="mt1", address=NAS, secret="x")
        await add_pool(conn, name="p", first="10.8.0.1", last="10.8.0.2")
        for i in range(3):
            acc = await make_account(conn, f"u{i}")
            await add_link(conn, store, account_id=acc, login=f"l{i}", password="pw", pool="p")
        a0 = await auth(conn, store, "l0", b"pw")
        a1 = await auth(conn, store, "l1", b"pw")
        ips = [decision.attribute("Framed-IP-Address") for decision in (a0, a1)]
        assert sorted(ips) == ["10.8.0.1", "10.8.0.2"]
        assert (await auth(conn, store, "l2", b"pw")).reason == "IP pool exhausted"
        again = await auth(conn, store, "l0", b"pw")
        assert again.attribute("Framed-IP-Address") == ips[0]
        # an unused lease expires and goes to someone else
        late = T0 + dt.timedelta(minutes=10)
        assert (await auth(conn, store, "l2", b"pw", now=late)).accept


async def test_start_binds_ip_stop_unbinds(pool: asyncpg.Pool, store: SecretStore) -> None:
    async with pool.acquire() as conn:
        await add_nas(conn, store, name="mt1", address=NAS, secret="x")
        acc = await make_account(conn, "u1")
        await add_link(conn, store, account_id=acc, login="alice", password="pw")
        first = await acct(conn, "start", "S1", framed_ip="10.7.0.5")
        again = await acct(conn, "start", "S1", framed_ip="10.7.0.5")  # retransmitted Start
        # plugins hear of the session once, not of its retransmission
        assert first.hooks == (SessionHook("session.started", {"account_id": acc, "session_id": "S1", "ip": "10.7.0.5"}),)
        assert again.hooks == ()
        rows = await conn.fetch("SELECT account_id, host(prefix) AS ip, valid_to FROM ip_bindings")
        assert [(r["account_id"], r["ip"], r["valid_to"]) for r in rows] == [(acc, "10.7.0.5", None)]
        [active] = await active_sessions(conn, acc)
        assert active.session_id == "S1" and active.nas_ip == NAS
        await acct(conn, "interim", "S1", session_time=60, input_octets=5 * 2**32 + 7, output_octets=9)
        assert await conn.fetchval("SELECT input_octets FROM radius_sessions") == 5 * 2**32 + 7
        stop = await acct(conn, "stop", "S1", session_time=120, at=T0 + dt.timedelta(minutes=2))
        assert stop.hooks == (SessionHook("session.stopped", {"account_id": acc, "session_id": "S1", "ip": "10.7.0.5",
                                                           "bytes_in": 5 * 2**32 + 7, "bytes_out": 9}),)
        assert await conn.fetchval("SELECT valid_to FROM ip_bindings") == T0 + dt.timedelta(minutes=2)
        assert await active_sessions(conn, acc) == []


async def time_tariff(conn: asyncpg.Connection, account_id: int, price_per_hour: int) -> int:
    """Put the account on a tariff with one time service at a flat price; its id."""
    service = await create_service(conn, f"time-{account_id}", "time")
    await set_rate(conn, service, class_id=None, range_id=None, prepaid=0, unit_size=3600,
                   tiers=[(0, price_per_hour)])
    tariff = await create_tariff(conn, f"dialup-{account_id}", [service])
    await link_tariff(conn, account_id, tariff, now=T0 - dt.timedelta(days=1), tz=dt.timezone.utc, actor="t")
    return service


async def test_time_charged_exactly_once_per_counter_value(pool: asyncpg.Pool, store: SecretStore) -> None:
    async with pool.acquire() as conn:
        await add_nas(conn, store, name="mt1", address=NAS, secret="x")
        acc = await make_account(conn, "u1", balance=10_000_000)  # 10 units
        await add_link(conn, store, account_id=acc, login="alice", password="pw")
        await time_tariff(conn, acc, 3_600_000_000)  # 1 unit a second
        ok = await auth(conn, store, "alice", b"pw")
        assert ok.attribute("Session-Timeout") == 10
        await acct(conn, "start", "S1")
        for t in (3, 3, 5, 4, 5):  # retransmission, then an out-of-order older interim
            await acct(conn, "interim", "S1", session_time=t)
        await acct(conn, "stop", "S1", session_time=7)
        await acct(conn, "stop", "S1", session_time=7)  # retransmitted Stop
        assert await conn.fetchval("SELECT balance FROM accounts WHERE id = $1", acc) == 10_000_000 - 7_000_000
        assert await conn.fetchval("SELECT sum(amount) FROM ledger WHERE account_id = $1", acc) == -7_000_000
        # one ledger row per new counter value: 3, 5, 7
        assert await conn.fetchval("SELECT count(*) FROM ledger WHERE account_id = $1 AND amount < 0", acc) == 3
        assert await conn.fetchval("SELECT charged FROM radius_sessions WHERE session_id = 'S1'") == 7_000_000
        await acct(conn, "start", "S2")
        await acct(conn, "stop", "S2", session_time=3)
        # balance 0 now: no time left, refused
        assert (await auth(conn, store, "alice", b"pw")).reason == "no money left for time"


async def test_accounting_on_and_stale_sweep_close_sessions(pool: asyncpg.Pool, store: SecretStore) -> None:
    async with pool.acquire() as conn:
        await add_nas(conn, store, name="mt1", address=NAS, secret="x")
        acc = await make_account(conn, "u1")
        await add_link(conn, store, account_id=acc, login="alice", password="pw", max_sessions=5)
        await acct(conn, "start", "S1", framed_ip="10.7.0.1")
        await acct(conn, "start", "S2", framed_ip="10.7.0.2")
        async with conn.transaction():
            record = read_accounting_record({"nas": NAS, "status": "on",
                                             "event_time": (T0 + dt.timedelta(hours=1)).timestamp()})
            out = await apply_accounting(conn, record, T0)
        assert out.closed == 2
        assert await conn.fetchval("SELECT count(*) FROM ip_bindings WHERE valid_to IS NULL") == 0
        await acct(conn, "start", "S3")
        async with conn.transaction():
            assert await close_stale(conn, T0 + dt.timedelta(minutes=5), dt.timedelta(minutes=10)) == 0
            assert await close_stale(conn, T0 + dt.timedelta(minutes=11), dt.timedelta(minutes=10)) == 1
        assert await conn.fetchval("SELECT end_reason FROM radius_sessions WHERE session_id = 'S3'") == "stale"


async def test_a_batch_is_decided_in_order_with_one_lease_per_link(pool: asyncpg.Pool, store: SecretStore) -> None:
    async with pool.acquire() as conn:
        await add_nas(conn, store, name="mt1", address=NAS, secret="x")
        await add_pool(conn, name="p", first="10.8.0.1", last="10.8.0.9")
        blocked = await make_account(conn, "blocked")
        await conn.execute("INSERT INTO blocks(account_id, kind, set_at, set_by) VALUES ($1, 'admin', now(), 't')",
                           blocked)
        await add_link(conn, store, account_id=blocked, login="b", password="pw")
        for login in ("p1", "p2"):
            await add_link(conn, store, account_id=await make_account(conn, login), login=login, password="pw",
                           pool="p")
        req = [{"nas": NAS, "login": login, "method": "pap", "password": pw}
               for login, pw in (("p1", b"pw"), ("b", b"pw"), ("nobody", b"pw"), ("p2", b"pw"), ("p1", b"pw"),
                                 ("p2", b"wrong"))]
        req.insert(2, {"nas": NAS, "method": "pap", "password": b"pw"})  # no login at all
        out = await authorize_many(conn, store, [read_access_request(r) for r in req], T0)
    assert [o.accept for o in out] == [True, False, False, False, True, True, False]
    assert [o.reason for o in out if not o.accept] == [
        "account blocked", "no login", "wrong login or password", "wrong login or password"]
    ip = [out[i].attribute("Framed-IP-Address") for i in (0, 4, 5)]
    assert ip[0] != ip[1] and ip[0] == ip[2]  # p1 twice in one batch: the same lease


async def test_a_malformed_request_is_rejected_alone_and_the_batch_decided(pool: asyncpg.Pool,
                                                                           store: SecretStore) -> None:
    async with pool.acquire() as conn:
        await add_link(conn, store, account_id=await make_account(conn, "alice"), login="alice", password="pw")
        good = {"nas": NAS, "login": "alice", "method": "pap", "password": b"pw"}
        chap = {"id": 7, "challenge": b"", "response": hashlib.md5(b"\x07pw").digest()}
        bad = [{**good, "login": "al\0ice"},                     # PostgreSQL text has no NUL
               {**good, "login": "a" * 300},
               {**good, "password": "pw"},                       # not bytes
               {"nas": NAS, "login": "alice", "method": "chap", "chap": chap},   # empty challenge
               {"nas": NAS, "login": "alice", "method": "chap", "chap": "x"}]
        out = await authorize_many(conn, store, [read_access_request(r) for r in (good, *bad, good)], T0)
    assert [o.accept for o in out] == [True, False, False, False, False, False, True]
    assert [o.reason for o in out[1:-1]] == [
        "malformed login", "malformed login", "malformed password", "malformed CHAP", "malformed CHAP"]


async def test_a_block_set_by_a_time_charge_reaches_the_topic_and_the_plugins(pool: asyncpg.Pool,
                                                                             store: SecretStore) -> None:
    """A time charge that runs the account out of money blocks it: the
    ``blocks`` topic hears of it, and the outbox holds ``account.blocked`` for
    the plugins and RADIUS, as for every other charge (the hook was once left out)."""
    published: list[tuple[str, dict[str, Any]]] = []
    core = CoreContext(pool, Config(), publish=lambda topic, payload: published.append((topic, payload)),
                       now=lambda: T0 + dt.timedelta(seconds=20))
    core.extras["secret_store"] = store
    handlers = {spec.name: spec.handler for spec in calls(core)}
    async with pool.acquire() as conn:
        await add_nas(conn, store, name="mt1", address=NAS, secret="x")
        acc = await make_account(conn, "u1", balance=5_000_000)
        await add_link(conn, store, account_id=acc, login="alice", password="pw")
        await time_tariff(conn, acc, 3_600_000_000)  # 1 unit a second: 5 s paid, 20 s used
    record = {"nas": NAS, "session_id": "S1", "login": "alice", "event_time": T0.timestamp()}
    await handlers["radius.accounting"](None, record={**record, "status": "start"})
    answer = await handlers["radius.accounting"](None, record={**record, "status": "interim", "session_time": 20})
    assert set(answer) == {"session"}   # the wire answer: block changes and hooks stay in the core
    [block] = [payload for topic, payload in published if topic == "blocks"]
    assert block["account_id"] == acc and block["action"] == "set"
    # the plugins' hook: enqueued in the accounting transaction (session.* only while a plugin
    # listens; none does here), delivered by the core's outbox worker
    rows = await pool.fetch("SELECT event, payload->>'block_id' AS block_id FROM outbox_events ORDER BY id")
    assert [(r["event"], r["block_id"]) for r in rows] == [("account.blocked", str(block["block_id"]))]


async def test_a_second_session_of_a_link_gets_its_own_pool_address(pool: asyncpg.Pool, store: SecretStore) -> None:
    """A link allowed two sessions: the second is not given the address the
    first one is using (two sessions, one IP: the NAS cannot route both)."""
    async with pool.acquire() as conn:
        await add_nas(conn, store, name="mt1", address=NAS, secret="x")
        await add_pool(conn, name="p", first="10.8.0.1", last="10.8.0.9")
        await add_link(conn, store, account_id=await make_account(conn, "u1"), login="alice", password="pw",
                       pool="p", max_sessions=2)
        first = (await auth(conn, store, "alice", b"pw")).attribute("Framed-IP-Address")
        assert (await auth(conn, store, "alice", b"pw")).attribute("Framed-IP-Address") == first  # a NAS's retry
        await acct(conn, "start", "S1", framed_ip=first)
        second = (await auth(conn, store, "alice", b"pw")).attribute("Framed-IP-Address")
        assert second is not None and second != first
        await acct(conn, "start", "S2", framed_ip=second)
        await acct(conn, "stop", "S1", session_time=10)
        # the address S1 gave back is the link's to reuse; S2's stays S2's
        later = T0 + dt.timedelta(minutes=1)
        assert (await auth(conn, store, "alice", b"pw", now=later)).attribute("Framed-IP-Address") == first


async def test_session_starts_and_ends_reach_the_sessions_topic(pool: asyncpg.Pool, store: SecretStore) -> None:
    """The console's online list reloads on ``radius.sessions``: a Start, a Stop
    and an Accounting-On that closes sessions are each published once, after the
    commit; an Interim-Update (nothing started or ended) is not."""
    published: list[tuple[str, dict[str, Any]]] = []
    core = CoreContext(pool, Config(), publish=lambda topic, payload: published.append((topic, payload)),
                       now=lambda: T0)
    core.extras["secret_store"] = store
    handlers = {spec.name: spec.handler for spec in calls(core)}
    async with pool.acquire() as conn:
        await add_nas(conn, store, name="mt1", address=NAS, secret="x")
        acc = await make_account(conn, "u1")
        await add_link(conn, store, account_id=acc, login="alice", password="pw", max_sessions=2)
    record = {"nas": NAS, "login": "alice", "event_time": T0.timestamp()}
    first = await handlers["radius.accounting"](None, record={**record, "session_id": "S1", "status": "start"})
    await handlers["radius.accounting"](None, record={**record, "session_id": "S1", "status": "interim",
                                                      "session_time": 5})
    await handlers["radius.accounting"](None, record={**record, "session_id": "S1", "status": "stop",
                                                      "session_time": 9})
    await handlers["radius.accounting"](None, record={**record, "session_id": "S2", "status": "start"})
    await handlers["radius.accounting"](None, record={"nas": NAS, "status": "on", "event_time": T0.timestamp()})
    sessions = [payload for topic, payload in published if topic == "radius.sessions"]
    assert [payload["event"] for payload in sessions] == ["started", "stopped", "started", "closed"]
    assert sessions[0] == {"event": "started", "session": first["session"], "account_id": acc}
    assert sessions[-1]["closed"] == 1
