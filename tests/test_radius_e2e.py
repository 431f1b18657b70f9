"""RADIUS end to end: a real ``billcore serve`` (supervisor, core, radius
process, PostgreSQL), an administrator over URFA, FreeRADIUS's radclient as
the NAS's requests, and the NAS simulator receiving Disconnect-Requests.

Nothing here reaches into the processes: every set-up step is an admin URFA
call, every check is what a NAS or an administrator would see (a reply on
the wire, ``radius.sessions``, the balance, the metrics endpoint).  The
tests share one running billcore (starting one takes seconds) and run in
file order; the core-restart test comes last.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from pyrad.packet import AccessRequest, AuthPacket

from radius.nas_sim import NasSimulator
from radius.server import load_dictionary
from tests.conftest import TEMPLATE, _create_db, _drop_db, free_port, need_peer, with_database
from tests.running import BillcoreProcess, pid_alive
from tests.test_radius_server import exchange
from tests.waiting import eventually
from urfa.client import Client, connect
from urfa.errors import CallFailed

RADCLIENT = shutil.which("radclient")
SECRET = "nas-secret-1"
ADMIN_PASSWORD = "admin-password-1"
PRICE_PER_HOUR = 3_600_000  # 1 000 micro-units a second
PAID = 7_200_000  # two hours of time


@dataclass
class Stack:
    bc: BillcoreProcess
    admin: Client
    auth_port: int
    acct_port: int
    nas: NasSimulator
    nas_id: int
    dsn: str
    accounts: dict[str, int] = field(default_factory=dict)
    links: dict[str, int] = field(default_factory=dict)


async def admin_session(bc: BillcoreProcess) -> Client:
    client = await connect("127.0.0.1", bc.urfa_port)
    await client.login("admin", "root", ADMIN_PASSWORD)
    return client


async def subscriber(admin: Client, login: str, paid: int) -> int:
    user = await admin.call("users.create", {"login": login, "password": f"{login}-portal-pw"})
    account_id = int(user["basic_account_id"])
    if paid:
        await admin.call("payments.add", {"account_id": account_id, "amount": paid, "method": "cash",
                                          "external_id": f"e2e-{login}"})
    return account_id


@contextlib.asynccontextmanager
async def radius_stack(tmp_path_factory: pytest.TempPathFactory, pg_server_dsn: str,
                       name: str) -> AsyncIterator[Stack]:
    """A real ``billcore serve`` with its radius process on free ports, an administrator logged in
    over URFA and the NAS simulator added as NAS ``sim`` (its CoA port the simulator's)."""
    need_peer(RADCLIENT is not None, "radclient (Debian freeradius-utils) is not installed")
    db = await _create_db(pg_server_dsn, TEMPLATE)
    workdir = tmp_path_factory.mktemp(name)
    auth_port, acct_port = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    bc = BillcoreProcess(workdir, dsn=with_database(pg_server_dsn, db), radius={
        "enabled": True, "host": "127.0.0.1", "auth_port": auth_port, "acct_port": acct_port,
        "decision_timeout": 2.0, "coa_timeout": 0.5, "stale_check": 3600.0})
    sim = NasSimulator(SECRET.encode(), load_dictionary())
    nas_port = await sim.start("127.0.0.1", 0)
    bc.start()
    try:
        bc.wait_for(r'role=radius .*msg="core connected"', timeout=60)
        made = subprocess.run(
            [sys.executable, "-m", "billcore.cli", "-c", str(bc.config_path), "admin", "create", "root",
             "--password-env", "E2E_ADMIN_PW"],
            env=dict(os.environ, E2E_ADMIN_PW=ADMIN_PASSWORD), cwd=workdir, capture_output=True, text=True,
            timeout=60)
        assert made.returncode == 0, made.stderr
        admin = await admin_session(bc)
        nas_id = (await admin.call("radius.nas_add", {"name": "sim", "address": "127.0.0.1", "secret": SECRET,
                                                      "coa_port": nas_port,
                                                      "require_message_authenticator": False}))["id"]
        yield Stack(bc, admin, auth_port, acct_port, sim, nas_id, with_database(pg_server_dsn, db))
        await admin.close()
    finally:
        sim.close()
        bc.__exit__(None, None, None)
        await _drop_db(pg_server_dsn, db)


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, pg_server_dsn: str,
                template_dsn: str) -> AsyncIterator[Stack]:
    async with radius_stack(tmp_path_factory, pg_server_dsn, "radius-e2e") as s:
        admin = s.admin
        await admin.call("radius.pool_add", {"name": "dyn", "first": "10.77.0.10", "last": "10.77.0.20"})
        s.accounts["alice"] = await subscriber(admin, "alice", PAID)
        s.links["alice"] = await admin.call("radius.link_add", {
            "account_id": s.accounts["alice"], "login": "alice", "password": "wonderland",
            "static_ip": "10.77.1.5", "rate_limit": "10M/20M",
            "cisco_avpairs": ["ip:sub-qos-policy-in=10M"], "interim_interval": 60, "max_sessions": 2})
        await time_tariff(admin, s.accounts["alice"])
        s.accounts["bob"] = await subscriber(admin, "bob", 0)
        s.links["bob"] = await admin.call("radius.link_add", {
            "account_id": s.accounts["bob"], "login": "bob", "password": "builder", "pool": "dyn"})
        # the radius process reloads its NAS table on the radius.nas event
        await wait_until(lambda: radclient_ok(s, "auth", 'User-Name = "alice", User-Password = "wonderland"'),
                         timeout=30)
        yield s


async def time_tariff(admin: Client, account_id: int) -> None:
    """Alice's time is priced by her tariff: one time service at PRICE_PER_HOUR
    in every time range, all set up over the admin's URFA calls."""
    service = (await admin.call("services.add", {"name": "e2e-dialup-time", "kind": "time"}))["id"]
    await admin.call("services.set_rate", {"service_id": service, "unit_size": 3600,
                                           "tiers": [[0, PRICE_PER_HOUR]]})
    tariff = (await admin.call("tariffs.add", {"name": "e2e-dialup", "service_ids": [service]}))["id"]
    await admin.call("tariffs.link", {"account_id": account_id, "tariff_id": tariff})


async def radclient(port: int, command: str, attrs: str, secret: str = SECRET, timeout: float = 2.0,
                    retries: int = 2) -> tuple[int, str]:
    assert RADCLIENT is not None
    proc = await asyncio.create_subprocess_exec(
        RADCLIENT, "-x", "-t", str(timeout), "-r", str(retries), f"127.0.0.1:{port}", command, secret,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(attrs.encode()), 60)
    return proc.returncode or 0, out.decode()


async def radclient_ok(s: Stack, command: str, attrs: str) -> bool:
    port = s.auth_port if command == "auth" else s.acct_port
    rc, out = await radclient(port, command, attrs)
    return rc == 0 and ("Access-Accept" in out or "Accounting-Response" in out)


async def wait_until(check: Any, timeout: float = 15.0, every: float = 0.2) -> float:
    """Seconds until ``await check()`` is true; fails after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if await check():
            return time.monotonic() - start
        await asyncio.sleep(every)
    raise AssertionError(f"not true within {timeout}s")


async def ended_session(s: Stack, session_id: str) -> tuple[asyncpg.Record, int]:
    """The core's row of a session the NAS stopped, and the sum of its time
    charges in the ledger (booked by commit_usage as ``usage radius:<nas>:<id>@<seconds>``)."""
    conn = await asyncpg.connect(s.dsn)
    try:
        row = await conn.fetchrow("SELECT * FROM radius_sessions WHERE nas_id = $1 AND session_id = $2",
                                  s.nas_id, session_id)
        charged = await conn.fetchval(
            "SELECT coalesce(sum(amount), 0) FROM ledger WHERE kind = 'charge' AND reference LIKE $1",
            f"usage radius:{s.nas_id}:{session_id}@%")
    finally:
        await conn.close()
    assert row is not None, f"no session {session_id} in the core"
    return row, int(charged)


async def acct(s: Stack, status: str, session: str, login: str = "alice", extra: str = "") -> str:
    rc, out = await radclient(s.acct_port, "acct", f'User-Name = "{login}", Acct-Session-Id = "{session}",'
                                                   f' Acct-Status-Type = {status}{extra}')
    assert rc == 0 and "Accounting-Response" in out, out
    return out


# -- authentication ---------------------------------------------------------------


async def test_pap_accept_carries_address_timeout_and_rate_limit(stack: Stack) -> None:
    rc, out = await radclient(stack.auth_port, "auth", 'User-Name = "alice", User-Password = "wonderland"')
    assert rc == 0 and "Access-Accept" in out, out
    assert "Framed-IP-Address = 10.77.1.5" in out
    # 7.2 units at 3.6 units an hour buy 7200 s
    assert "Session-Timeout = 7200" in out and "Acct-Interim-Interval = 60" in out
    assert 'Mikrotik-Rate-Limit = "10M/20M"' in out and "ip:sub-qos-policy-in=10M" in out
    assert "Message-Authenticator" in out


async def test_pap_wrong_password_is_rejected(stack: Stack) -> None:
    rc, out = await radclient(stack.auth_port, "auth", 'User-Name = "alice", User-Password = "not-it"')
    assert "Access-Reject" in out and "wrong login or password" in out, out
    rc, out = await radclient(stack.auth_port, "auth", 'User-Name = "nobody", User-Password = "x"')
    assert "Access-Reject" in out, out


async def test_chap_accept_gets_a_pool_address_and_wrong_chap_is_rejected(stack: Stack) -> None:
    rc, out = await radclient(stack.auth_port, "auth", 'User-Name = "bob", CHAP-Password = "builder"')
    assert rc == 0 and "Access-Accept" in out, out
    m = re.search(r"Framed-IP-Address = (10\.77\.0\.\d+)", out)
    assert m and 10 <= int(m.group(1).rsplit(".", 1)[1]) <= 20, out
    assert "Session-Timeout" not in out  # bob's tariff has no time service
    # the same link asks again: the same lease
    rc, again = await radclient(stack.auth_port, "auth", 'User-Name = "bob", CHAP-Password = "builder"')
    assert f"Framed-IP-Address = {m.group(1)}" in again, again
    rc, out = await radclient(stack.auth_port, "auth", 'User-Name = "bob", CHAP-Password = "bricklayer"')
    assert "Access-Reject" in out, out


async def test_status_server(stack: Stack) -> None:
    for port in (stack.auth_port, stack.acct_port):
        rc, out = await radclient(port, "status", "Message-Authenticator = 0x00")
        assert rc == 0 and ("Access-Accept" in out or "Accounting-Response" in out), out


# -- accounting ---------------------------------------------------------------------


async def test_accounting_opens_updates_charges_and_closes_the_session(stack: Stack) -> None:
    acc = stack.accounts["alice"]
    before = (await stack.admin.call("accounts.get", {"account_id": acc}))["balance"]
    await acct(stack, "Start", "E2E-1", extra=", Framed-IP-Address = 10.77.1.5, NAS-Port-Id = \"ether1\"")
    sessions = await stack.admin.call("radius.sessions", {"account_id": acc})
    assert [(x["session_id"], x["framed_ip"], x["nas_ip"]) for x in sessions] == [("E2E-1", "10.77.1.5", "127.0.0.1")]

    await acct(stack, "Interim-Update", "E2E-1", extra=", Acct-Session-Time = 60, Acct-Input-Octets = 1000,"
                                                      " Acct-Input-Gigawords = 1, Acct-Output-Octets = 5")
    (s,) = await stack.admin.call("radius.sessions", {"account_id": acc})
    assert s["session_time"] == 60 and s["input_octets"] == 2**32 + 1000 and s["output_octets"] == 5
    # 60 s at 1 000 micro-units a second
    assert (await stack.admin.call("accounts.get", {"account_id": acc}))["balance"] == before - 60_000

    await acct(stack, "Stop", "E2E-1", extra=", Acct-Session-Time = 90, Acct-Terminate-Cause = User-Request")
    assert await stack.admin.call("radius.sessions", {"account_id": acc}) == []
    assert (await stack.admin.call("accounts.get", {"account_id": acc}))["balance"] == before - 90_000
    # a Stop sent again (the NAS missed our answer) charges nothing more
    await acct(stack, "Stop", "E2E-1", extra=", Acct-Session-Time = 90, Acct-Terminate-Cause = User-Request")
    assert (await stack.admin.call("accounts.get", {"account_id": acc}))["balance"] == before - 90_000
    # closed in the core with the NAS's last counters; 90 s at 1 000 micro-units a second in the ledger, once
    row, charged = await ended_session(stack, "E2E-1")
    assert row["ended_at"] is not None and row["end_reason"] == "stop:1" and row["session_time"] == 90, dict(row)
    assert charged == -90 * PRICE_PER_HOUR // 3600 and row["charged"] == 90 * PRICE_PER_HOUR // 3600, dict(row)


def access_request(login: str, password: str) -> bytes:
    pkt = AuthPacket(AccessRequest, secret=SECRET.encode(), dict=load_dictionary(), message_authenticator=True)
    pkt.AddAttribute("User-Name", login)
    pkt.AddAttribute("User-Password", pkt.PwCrypt(password))
    return bytes(pkt.RequestPacket())


async def test_a_retransmission_is_answered_from_the_cache(stack: Stack) -> None:
    before = stack.bc.metric("billcore_radius_duplicates_total")
    packet = access_request("bob", "builder")
    # the copy goes once the first is answered: then it hits the cache, not the request in progress
    replies = await exchange(stack.auth_port, [packet, packet], expect=2, one_by_one=True)
    assert len(replies) == 2 and replies[0] == replies[1] and replies[0][0] == 2  # the same Access-Accept
    # the radius process flushes its counters each second
    await eventually(lambda: stack.bc.metric("billcore_radius_duplicates_total") >= before + 1,
                     what="the retransmission counted")
    assert stack.bc.metric("billcore_radius_duplicates_total") == before + 1


# -- admin changes reach the NAS's answers ------------------------------------------


async def test_block_rejects_and_disconnects_the_active_session(stack: Stack) -> None:
    acc = stack.accounts["alice"]
    await acct(stack, "Start", "E2E-BLK", extra=", Framed-IP-Address = 10.77.1.5")
    stack.nas.sessions["E2E-BLK"] = "alice"
    seen = len(stack.nas.received)

    result = await stack.admin.call("blocks.set", {"account_id": acc, "reason": "e2e"})
    assert result["changed"]
    # the core publishes the block; the radius process sends Disconnect-Request
    await wait_until(lambda: _true(len(stack.nas.received) > seen), timeout=10)
    code, attrs = stack.nas.received[seen]
    assert code == 40  # Disconnect-Request
    assert attrs[44] == [b"E2E-BLK"] and attrs[1] == [b"alice"]
    assert "E2E-BLK" not in stack.nas.sessions  # the NAS ACKed and dropped it

    rc, out = await radclient(stack.auth_port, "auth", 'User-Name = "alice", User-Password = "wonderland"')
    assert "Access-Reject" in out and "account blocked" in out, out
    await acct(stack, "Stop", "E2E-BLK", extra=", Acct-Session-Time = 1, Acct-Terminate-Cause = Admin-Reset")

    await stack.admin.call("blocks.lift", {"account_id": acc})
    rc, out = await radclient(stack.auth_port, "auth", 'User-Name = "alice", User-Password = "wonderland"')
    assert "Access-Accept" in out, out


async def _true(value: bool) -> bool:
    return value


async def test_admin_disconnect_of_one_session(stack: Stack) -> None:
    await acct(stack, "Start", "E2E-ADM", login="bob", extra=", Framed-IP-Address = 10.77.0.10")
    stack.nas.sessions["E2E-ADM"] = "bob"
    (s,) = await stack.admin.call("radius.sessions", {"account_id": stack.accounts["bob"]})
    await stack.admin.call("radius.disconnect", {"session": s["id"]})
    await wait_until(lambda: _true("E2E-ADM" not in stack.nas.sessions), timeout=10)
    await acct(stack, "Stop", "E2E-ADM", login="bob", extra=", Acct-Session-Time = 5")


async def test_link_edit_disable_password_and_delete(stack: Stack) -> None:
    link = stack.links["bob"]
    await stack.admin.call("radius.link_edit", {"id": link, "disabled": True})
    rc, out = await radclient(stack.auth_port, "auth", 'User-Name = "bob", User-Password = "builder"')
    assert "Access-Reject" in out and "service disabled" in out, out
    await stack.admin.call("radius.link_edit", {"id": link, "disabled": False, "password": "mason-2",
                                                "static_ip": "10.77.2.2", "rate_limit": "1M/1M"})
    rc, out = await radclient(stack.auth_port, "auth", 'User-Name = "bob", User-Password = "builder"')
    assert "Access-Reject" in out, out
    rc, out = await radclient(stack.auth_port, "auth", 'User-Name = "bob", User-Password = "mason-2"')
    assert "Access-Accept" in out and "Framed-IP-Address = 10.77.2.2" in out and '"1M/1M"' in out, out
    (row,) = await stack.admin.call("radius.link_list", {"login": "bob"})
    assert row["static_ip"] == "10.77.2.2" and row["pool"] is None and "password" not in str(row)

    # a link with an active session is deleted only with force, which ends the session
    await acct(stack, "Start", "E2E-DEL", login="bob", extra=", Framed-IP-Address = 10.77.2.2")
    with pytest.raises(CallFailed, match="active session"):
        await stack.admin.call("radius.link_delete", {"id": link})
    assert await stack.admin.call("radius.link_delete", {"id": link, "force": True})
    assert await stack.admin.call("radius.sessions", {"account_id": stack.accounts["bob"]}) == []
    rc, out = await radclient(stack.auth_port, "auth", 'User-Name = "bob", User-Password = "mason-2"')
    assert "Access-Reject" in out, out


async def test_pool_edit_list_and_delete(stack: Stack) -> None:
    (pool,) = await stack.admin.call("radius.pool_list")
    assert pool["name"] == "dyn" and pool["size"] == 11
    assert await stack.admin.call("radius.pool_edit", {"id": pool["id"], "last": "10.77.0.30"})
    (pool,) = await stack.admin.call("radius.pool_list")
    assert pool["last"] == "10.77.0.30" and pool["size"] == 21
    with pytest.raises(CallFailed, match="billing.invalid"):  # first after last
        await stack.admin.call("radius.pool_edit", {"id": pool["id"], "first": "10.77.0.40"})
    assert await stack.admin.call("radius.pool_delete", {"id": pool["id"]})  # bob's link is gone
    assert await stack.admin.call("radius.pool_list") == []


async def test_nas_edit_secret_and_delete(stack: Stack) -> None:
    await stack.admin.call("radius.nas_edit", {"id": stack.nas_id, "secret": "rotated-secret"})

    async def new_secret_works() -> bool:
        rc, out = await radclient(stack.auth_port, "auth", 'User-Name = "alice", User-Password = "wonderland"',
                                  secret="rotated-secret", timeout=0.5)
        return "Access-Accept" in out

    await wait_until(new_secret_works, timeout=10)
    rc, out = await radclient(stack.auth_port, "auth", 'User-Name = "alice", User-Password = "wonderland"',
                              timeout=0.5)
    assert "Access-Accept" not in out  # the old secret's Message-Authenticator fails: dropped
    (shown,) = await stack.admin.call("radius.nas_show")
    assert shown["name"] == "sim" and "secret" not in shown
    await stack.admin.call("radius.nas_edit", {"id": stack.nas_id, "secret": SECRET})
    await wait_until(lambda: radclient_ok(stack, "auth", 'User-Name = "alice", User-Password = "wonderland"'))


async def test_time_charged_into_debt_blocks_and_disconnects(stack: Stack) -> None:
    acc = stack.accounts["alice"]
    # leave alice 100 s of money (a correction), then report 200 s: an Interim
    # can only report time that has passed (rating refuses usage more than
    # five minutes ahead of the core's clock)
    balance = (await stack.admin.call("accounts.get", {"account_id": acc}))["balance"]
    await stack.admin.call("payments.add", {"account_id": acc, "amount": 100_000 - balance, "method": "correction",
                                            "external_id": "e2e-alice-drain"})
    rc, out = await radclient(stack.auth_port, "auth", 'User-Name = "alice", User-Password = "wonderland"')
    assert "Access-Accept" in out and "Session-Timeout = 100" in out, out
    await acct(stack, "Start", "E2E-DEBT", extra=", Framed-IP-Address = 10.77.1.5")
    stack.nas.sessions["E2E-DEBT"] = "alice"
    seen = len(stack.nas.received)
    # more time than the money left buys: the charge puts the account in debt,
    # the core sets the automatic block, the radius process disconnects
    await acct(stack, "Interim-Update", "E2E-DEBT", extra=", Acct-Session-Time = 200")
    assert (await stack.admin.call("accounts.get", {"account_id": acc}))["balance"] < 0
    await wait_until(lambda: _true("E2E-DEBT" not in stack.nas.sessions), timeout=10)
    assert stack.nas.received[seen][0] == 40
    rc, out = await radclient(stack.auth_port, "auth", 'User-Name = "alice", User-Password = "wonderland"')
    assert "Access-Reject" in out, out
    assert (await stack.admin.call("accounts.get", {"account_id": acc}))["balance"] == -100_000
    await acct(stack, "Stop", "E2E-DEBT", extra=", Acct-Session-Time = 200, Acct-Terminate-Cause = Admin-Reset")
    # the Stop closed the session in the core; its 200 s were charged once, at the Interim
    row, charged = await ended_session(stack, "E2E-DEBT")
    assert row["ended_at"] is not None and row["end_reason"] == "stop:6" and row["session_time"] == 200, dict(row)
    assert charged == -200 * PRICE_PER_HOUR // 3600 and row["charged"] == 200 * PRICE_PER_HOUR // 3600, dict(row)
    # paying lifts the automatic block: accepted again
    await stack.admin.call("payments.add", {"account_id": acc, "amount": PAID, "method": "cash",
                                            "external_id": "e2e-alice-2"})
    rc, out = await radclient(stack.auth_port, "auth", 'User-Name = "alice", User-Password = "wonderland"')
    assert "Access-Accept" in out, out


# -- the radius process survives the core -------------------------------------------


async def test_radius_recovers_after_the_core_is_killed(stack: Stack) -> None:
    bc = stack.bc
    core_pid = int(bc.wait_for(r'role=core pid=(\d+) .*msg="core serving"').group(1))
    mark = len(bc.log())
    dropped_before = bc.metric("billcore_radius_dropped_total", reason="core_unavailable")
    os.kill(core_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    await wait_until(lambda: _true(not pid_alive(core_pid)), timeout=5, every=0.05)
    # while the core is down the request is left unanswered, and counted
    rc, out = await radclient(stack.auth_port, "auth", 'User-Name = "alice", User-Password = "wonderland"',
                              timeout=0.3, retries=1)
    assert "Access-Accept" not in out, out
    recovered = await wait_until(
        lambda: radclient_ok(stack, "auth", 'User-Name = "alice", User-Password = "wonderland"'),
        timeout=20, every=0.1)
    took = time.monotonic() - killed_at
    assert took < 15, f"radius answered again only {took:.1f}s after the core was killed"
    assert recovered >= 0
    new_pid = int(bc.wait_for(r'role=core pid=(\d+) .*msg="core serving"', after=mark).group(1))
    assert new_pid != core_pid
    bc.wait_for(r'role=radius .*msg="core connected"', after=mark)
    await eventually(lambda: bc.metric("billcore_radius_dropped_total", reason="core_unavailable") > dropped_before,
                     what="the request left unanswered counted")   # flushed each second
    # the radius process itself was never restarted
    assert not re.search(r'child died.*child=radius', bc.log()[mark:])
    # accounting works again too, and the admin can reconnect and see it
    await acct(stack, "Start", "E2E-AFTER", extra=", Framed-IP-Address = 10.77.1.5")
    admin = await admin_session(bc)
    try:
        sessions = await admin.call("radius.sessions", {"account_id": stack.accounts["alice"]})
        assert [x["session_id"] for x in sessions] == ["E2E-AFTER"]
    finally:
        await admin.close()
