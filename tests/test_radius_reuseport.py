"""Several radius processes on one port (``[radius] processes``), SO_REUSEPORT.

A real ``billcore serve`` with two radius processes: the supervisor binds
the ports as groups and hands each process its sockets.  What a NAS sees:
a retransmitted Access-Request or Accounting-Request (same source port,
Identifier and authenticator) gets the very reply bytes of the first copy —
the kernel hashes the source address and port, so the copy reaches the
process whose duplicate cache holds the reply — and the accounting is
decided once; requests from many source ports are answered by both
processes.  Which process answered is read from the per-process metric
files (multiprocess Prometheus: one file per pid).

Strangers: ``bind_group`` refuses a port anyone holds (plain or
SO_REUSEPORT, like pyrad's server), ``strangers`` finds a socket that joined
the group later, and the supervisor says so in its log.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.mmap_dict import MmapedDict
from pyrad.packet import AccountingRequest, AcctPacket

from billcore.common.udpgroup import PortTaken, bind_group, inode, strangers
from radius.auth import parse_header
from radius.server import PortInUse, bind_udp, load_dictionary
from tests.conftest import TEMPLATE, _create_db, _drop_db, free_port, with_database
from tests.running import BillcoreProcess
from tests.test_radius_server import raw_access_request
from tests.waiting import eventually
from urfa.client import Client, connect

SECRET = "nas-secret-rp"
ADMIN_PASSWORD = "admin-password-rp"


# -- the group, without a server ---------------------------------------------------------


def test_group_shares_a_free_port_and_sees_no_stranger() -> None:
    socks = bind_group("127.0.0.1", 0, 3)
    try:
        port = socks[0].getsockname()[1]
        assert {s.getsockname()[1] for s in socks} == {port}
        assert strangers("127.0.0.1", port, {inode(s) for s in socks}) == []
        # every socket of the group is seen by the kernel table: without ours, three strangers
        assert len(strangers("127.0.0.1", port, set())) == 3
    finally:
        for s in socks:
            s.close()


def test_group_refuses_a_port_held_exclusively() -> None:
    holder = bind_udp("127.0.0.1", 0)
    try:
        port = holder.getsockname()[1]
        with pytest.raises(PortTaken, match=str(port)):
            bind_group("127.0.0.1", port, 2)
    finally:
        holder.close()


def test_group_refuses_a_port_held_with_reuseport() -> None:
    # pyrad's server binds with SO_REUSEPORT: without the exclusive probe we would silently share with it
    pyrad_style = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    pyrad_style.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    pyrad_style.bind(("127.0.0.1", 0))
    try:
        port = pyrad_style.getsockname()[1]
        with pytest.raises(PortTaken, match="already in use"):
            bind_group("127.0.0.1", port, 2)
        with pytest.raises(PortTaken):   # a wildcard group overlaps it too
            bind_group("0.0.0.0", port, 2)
    finally:
        pyrad_style.close()


def test_a_stranger_joining_the_group_later_is_found() -> None:
    socks = bind_group("127.0.0.1", 0, 2)
    port = socks[0].getsockname()[1]
    joiner = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        joiner.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        joiner.bind(("127.0.0.1", port))   # the same user may join a reuseport group: the kernel allows it
        found = strangers("127.0.0.1", port, {inode(s) for s in socks})
        assert [s.inode for s in found] == [inode(joiner)]
        assert found[0].port == port and found[0].address == "127.0.0.1" and found[0].uid == os.getuid()
        # a socket on another address of the same port is no stranger to 127.0.0.1
        assert strangers("127.0.0.2", port, set()) == []
    finally:
        joiner.close()
        for s in socks:
            s.close()


def test_port_in_use_is_a_port_taken() -> None:
    # the supervisor catches PortTaken; the single-process radius raises PortInUse: both name the port
    assert issubclass(PortInUse, PortTaken)


# -- a real billcore with two radius processes -------------------------------------------


@dataclass
class Stack:
    bc: BillcoreProcess
    admin: Client
    auth_port: int
    acct_port: int
    metrics_dir: Path
    radius_pids: list[int]
    account_id: int


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, pg_server_dsn: str,
                template_dsn: str) -> AsyncIterator[Stack]:
    db = await _create_db(pg_server_dsn, TEMPLATE)
    workdir = tmp_path_factory.mktemp("radius-reuseport")
    auth_port, acct_port = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    bc = BillcoreProcess(workdir, dsn=with_database(pg_server_dsn, db), radius={
        "enabled": True, "host": "127.0.0.1", "auth_port": auth_port, "acct_port": acct_port, "processes": 2,
        "decision_timeout": 2.0, "stale_check": 3600.0})
    bc.start()
    try:
        bc.wait_for(r"msg=\"radius ports bound as a group\" processes=2", timeout=60)
        for _ in range(2):
            bc.wait_for(r'role=radius .*msg="core connected"', timeout=60)
        await eventually(lambda: len(set(re.findall(r"role=radius pid=(\d+) .*msg=\"radius serving\"",
                                                    bc.log()))) == 2, what="two radius processes serving")
        pids = sorted({int(p) for p in re.findall(r"role=radius pid=(\d+) .*msg=\"radius serving\"", bc.log())})
        made = subprocess.run(
            [sys.executable, "-m", "billcore.cli", "-c", str(bc.config_path), "admin", "create", "root",
             "--password-env", "RP_ADMIN_PW"],
            env=dict(os.environ, RP_ADMIN_PW=ADMIN_PASSWORD), cwd=workdir, capture_output=True, text=True,
            timeout=60)
        assert made.returncode == 0, made.stderr
        admin = await connect("127.0.0.1", bc.urfa_port)
        await admin.login("admin", "root", ADMIN_PASSWORD)
        await admin.call("radius.nas_add", {"name": "fleet", "address": "127.0.0.1", "secret": SECRET,
                                            "require_message_authenticator": True})
        user = await admin.call("users.create", {"login": "rp-alice", "password": "rp-alice-portal"})
        await admin.call("payments.add", {"account_id": user["basic_account_id"], "amount": 10_000_000,
                                          "method": "cash", "external_id": "rp-1"})
        await admin.call("radius.link_add", {"account_id": user["basic_account_id"], "login": "alice",
                                             "password": "wonderland", "static_ip": "10.78.0.5"})
        await admin.call("radius.link_add", {"account_id": user["basic_account_id"], "login": "bob",
                                             "password": "builder", "static_ip": "10.78.0.6"})
        # both processes have the NAS (each loads the table on the core's radius.nas event)
        for _ in range(2):
            bc.wait_for(r'role=radius .*msg="NAS table loaded" nas=1', timeout=20)
        await eventually(lambda: bc.log().count('msg="NAS table loaded" nas=1') >= 2, what="both tables loaded")
        yield Stack(bc, admin, auth_port, acct_port, workdir / "var" / "metrics", pids,
                    int(user["basic_account_id"]))
        await admin.close()
    finally:
        bc.__exit__(None, None, None)
        await _drop_db(pg_server_dsn, db)


def per_process(metrics_dir: Path, metric: str, **labels: str) -> dict[int, float]:
    """``metric``'s sum per pid, from the multiprocess files (counter_<pid>.db)."""
    out: dict[int, float] = {}
    for path in metrics_dir.glob("counter_*.db"):
        pid = int(path.stem.split("_")[1])
        for key, value, *_ in MmapedDict.read_all_values_from_file(str(path)):
            name, sample, sample_labels, _help = json.loads(key)
            if sample == metric and all(sample_labels.get(k) == v for k, v in labels.items()):
                out[pid] = out.get(pid, 0.0) + value
    return out


def ask(sock: socket.socket, port: int, datagram: bytes, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    sock.sendto(datagram, ("127.0.0.1", port))
    data, _ = sock.recvfrom(4096)
    return data


def accounting_request(session: str, status: str) -> bytes:
    pkt = AcctPacket(AccountingRequest, secret=SECRET.encode(), dict=load_dictionary())
    pkt.AddAttribute("User-Name", "alice")
    pkt.AddAttribute("Acct-Status-Type", status)
    pkt.AddAttribute("Acct-Session-Id", session)
    pkt.AddAttribute("Framed-IP-Address", "10.78.0.5")
    pkt.AddAttribute("NAS-IP-Address", "127.0.0.1")
    return bytes(pkt.RequestPacket())


async def test_two_processes_serve_the_port(stack: Stack) -> None:
    assert len(stack.radius_pids) == 2
    assert re.search(r'role=radius .*msg="radius serving" .*shared=True', stack.bc.log())


async def test_retransmitted_access_request_gets_the_cached_reply(stack: Stack) -> None:
    loop = asyncio.get_running_loop()
    request = raw_access_request("alice", "wonderland", secret=SECRET.encode())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as nas:
        nas.bind(("127.0.0.1", 0))
        first = await loop.run_in_executor(None, ask, nas, stack.auth_port, request)
        again = [await loop.run_in_executor(None, ask, nas, stack.auth_port, request) for _ in range(3)]
    assert first[0] == 2 and parse_header(first)[0].id == request[1]   # Access-Accept to this request
    assert again == [first] * 3   # the same bytes: from the cache of the process that decided it
    await eventually(lambda: sum(per_process(stack.metrics_dir, "billcore_radius_duplicates_total").values()) >= 3,
                     what="three duplicates counted")
    # the decision tallies are flushed each second
    await eventually(lambda: sum(per_process(stack.metrics_dir, "billcore_radius_decisions_total",
                                             kind="auth").values()) >= 1, what="the decision counted")
    decided = per_process(stack.metrics_dir, "billcore_radius_decisions_total", kind="auth")
    dups = per_process(stack.metrics_dir, "billcore_radius_duplicates_total")
    assert sum(decided.values()) == 1, decided   # decided once, by one process
    assert [pid for pid, n in dups.items() if n] == [pid for pid, n in decided.items() if n]


async def test_retransmitted_accounting_request_is_applied_once(stack: Stack) -> None:
    loop = asyncio.get_running_loop()
    start = accounting_request("rp-session-1", "Start")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as nas:
        nas.bind(("127.0.0.1", 0))
        first = await loop.run_in_executor(None, ask, nas, stack.acct_port, start)
        again = [await loop.run_in_executor(None, ask, nas, stack.acct_port, start) for _ in range(3)]
    assert first[0] == 5 and again == [first] * 3   # Accounting-Response, the cached bytes
    await eventually(lambda: sum(per_process(stack.metrics_dir, "billcore_radius_decisions_total",
                                             kind="acct").values()) >= 1, what="the Start counted")
    recorded = per_process(stack.metrics_dir, "billcore_radius_decisions_total", kind="acct", outcome="recorded")
    assert sum(recorded.values()) == 1, recorded   # the core was asked once for four copies
    sessions = await stack.admin.call("radius.sessions", {"account_id": stack.account_id})
    assert [s["session_id"] for s in sessions] == ["rp-session-1"]


async def test_many_source_ports_spread_over_the_processes(stack: Stack) -> None:
    loop = asyncio.get_running_loop()
    before = per_process(stack.metrics_dir, "billcore_radius_requests_total", kind="access")
    nases = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(32)]
    try:
        for nas in nases:
            nas.bind(("127.0.0.1", 0))
        replies = [await loop.run_in_executor(None, ask, nas, stack.auth_port,
                                              raw_access_request("bob", "builder", secret=SECRET.encode()))
                   for nas in nases]
    finally:
        for nas in nases:
            nas.close()
    assert all(r[0] == 2 for r in replies)

    def served() -> dict[int, float]:
        after = per_process(stack.metrics_dir, "billcore_radius_requests_total", kind="access")
        return {pid: after.get(pid, 0.0) - before.get(pid, 0.0) for pid in stack.radius_pids}

    await eventually(lambda: sum(served().values()) == 32, what="32 requests counted")
    # 32 source ports over 2 sockets: every one of them gets some (all on one: 2**-31)
    assert all(n > 0 for n in served().values()), served()


async def test_supervisor_says_when_a_stranger_joins_the_port(stack: Stack) -> None:
    mark = len(stack.bc.log())
    joiner = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        joiner.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        joiner.bind(("127.0.0.1", stack.auth_port))
        stack.bc.wait_for(rf"a socket that is not billcore's shares the RADIUS port.* port={stack.auth_port}"
                          rf".* inode={inode(joiner)}", timeout=20, after=mark)
    finally:
        joiner.close()


async def test_a_held_port_stops_the_group_with_the_port_named(tmp_path: Path, pg_server_dsn: str,
                                                               template_dsn: str) -> None:
    db = await _create_db(pg_server_dsn, TEMPLATE)
    holder = bind_udp("127.0.0.1", 0)   # e.g. a FreeRADIUS already there
    port = holder.getsockname()[1]
    bc = BillcoreProcess(tmp_path, dsn=with_database(pg_server_dsn, db), radius={
        "enabled": True, "host": "127.0.0.1", "auth_port": port, "acct_port": free_port(socket.SOCK_DGRAM),
        "processes": 2})
    try:
        with bc:
            bc.wait_for(rf"UDP 127.0.0.1:{port} is already in use", timeout=60)
            assert "radius serving" not in bc.log()
    finally:
        holder.close()
        await _drop_db(pg_server_dsn, db)
