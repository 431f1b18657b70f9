"""The RADIUS server against FreeRADIUS's radclient as the real client.

The decisions come from a small table decider (the core's role); these tests
check the protocol edge: PAP/CHAP accept and reject, accounting, Status-
Server, duplicates, Message-Authenticator enforcement, unknown NAS, overload,
and the exclusive port.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client import REGISTRY
from pyrad.packet import AccessRequest, AuthPacket

from radius.auth import chap_ok
from radius.server import Decision, Nas, NasTable, PortInUse, RadiusServer, bind_udp, load_dictionary
from tests.conftest import need_peer
from tests.waiting import eventually

SECRET = "testing123"
RADCLIENT = shutil.which("radclient")


@dataclass
class TableDecider:
    passwords: dict[str, bytes]
    delay: float = 0.0
    authorized: list[dict[str, Any]] = field(default_factory=list)
    accounted: list[dict[str, Any]] = field(default_factory=list)
    gate: asyncio.Event | None = None

    async def authorize(self, nas: Nas, request: dict[str, Any]) -> Decision:
        self.authorized.append(request)
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(self.delay)
        pw = self.passwords.get(request["login"] or "")
        ok = pw is not None and (
            (request["method"] == "pap" and request["password"] == pw)
            or (
                request["method"] == "chap"
                and chap_ok(bytes([request["chap"]["id"]]) + request["chap"]["response"], pw, request["chap"]["challenge"])
            )
        )
        if not ok:
            return Decision(False, (("Reply-Message", "bad login"),))
        return Decision(
            True,
            (
                ("Framed-IP-Address", "10.9.0.7"),
                ("Session-Timeout", 3600),
                ("Acct-Interim-Interval", 300),
                ("Mikrotik-Rate-Limit", "10M/20M"),
                ("Cisco-AVPair", "ip:sub-qos-policy-in=10M"),
            ),
        )

    async def account(self, nas: Nas, record: dict[str, Any]) -> None:
        self.accounted.append(record)
        await asyncio.sleep(self.delay)


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@dataclass
class Running:
    server: RadiusServer
    decider: TableDecider
    auth_port: int
    acct_port: int


async def start(decider: TableDecider, **nas_opts: Any) -> Running:
    nas = Nas(address="127.0.0.1", secret=SECRET.encode(), **nas_opts)
    server = RadiusServer(decider=decider, nas_table=NasTable([nas]))
    auth_port, acct_port = await server.listen("127.0.0.1", 0, 0)
    return Running(server, decider, auth_port, acct_port)


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    r = await start(TableDecider({"alice": b"wonderland", "bob": b"builder"}))
    yield r
    await r.server.close()


async def radclient(port: int, command: str, attrs: str, secret: str = SECRET, *opts: str) -> tuple[int, str]:
    need_peer(RADCLIENT is not None, "radclient (Debian freeradius-utils) is not installed")
    assert RADCLIENT is not None
    proc = await asyncio.create_subprocess_exec(
        RADCLIENT, "-x", "-t", "1", "-r", "1", *opts, f"127.0.0.1:{port}", command, secret,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(attrs.encode()), 30)
    return proc.returncode or 0, out.decode()


async def test_pap_accept_carries_reply_attributes(running: Running) -> None:
    rc, out = await radclient(running.auth_port, "auth", 'User-Name = "alice", User-Password = "wonderland"')
    assert rc == 0 and "Access-Accept" in out, out
    assert "10.9.0.7" in out and "Session-Timeout = 3600" in out and "Acct-Interim-Interval = 300" in out
    assert 'Mikrotik-Rate-Limit = "10M/20M"' in out and "ip:sub-qos-policy-in=10M" in out
    assert "Message-Authenticator" in out  # signed reply (BlastRADIUS)


async def test_pap_wrong_password_rejected(running: Running) -> None:
    rc, out = await radclient(running.auth_port, "auth", 'User-Name = "alice", User-Password = "nope"')
    assert "Access-Reject" in out and "bad login" in out, out
    assert running.decider.authorized[-1]["password"] == b"nope"


async def test_chap_accept_and_reject(running: Running) -> None:
    rc, out = await radclient(running.auth_port, "auth", 'User-Name = "bob", CHAP-Password = "builder"')
    assert "Access-Accept" in out, out
    assert running.decider.authorized[-1]["method"] == "chap"
    rc, out = await radclient(running.auth_port, "auth", 'User-Name = "bob", CHAP-Password = "wrong"')
    assert "Access-Reject" in out, out


async def test_accounting_start_interim_stop(running: Running) -> None:
    base = 'User-Name = "alice", Acct-Session-Id = "S1", Framed-IP-Address = 10.9.0.7, NAS-Port-Id = "ether1"'
    for status, extra in (
        ("Start", ""),
        ("Interim-Update", ", Acct-Session-Time = 60, Acct-Input-Octets = 1000, Acct-Input-Gigawords = 1"),
        ("Stop", ", Acct-Session-Time = 90, Acct-Input-Octets = 2000, Acct-Terminate-Cause = User-Request"),
    ):
        rc, out = await radclient(running.acct_port, "acct", f"{base}, Acct-Status-Type = {status}{extra}")
        assert rc == 0 and "Accounting-Response" in out, out
    statuses = [r["status"] for r in running.decider.accounted]
    assert statuses == ["start", "interim", "stop"]
    assert running.decider.accounted[1]["input_octets"] == 2**32 + 1000
    assert running.decider.accounted[2]["terminate_cause"] == 1


async def test_accounting_with_wrong_secret_is_dropped_and_counted(running: Running) -> None:
    before = counter("billcore_radius_dropped_total", reason="bad_authenticator")
    rc, out = await radclient(running.acct_port, "acct", 'Acct-Status-Type = Start, Acct-Session-Id = "x"', "wrong")
    assert "Accounting-Response" not in out
    assert running.decider.accounted == []
    assert counter("billcore_radius_dropped_total", reason="bad_authenticator") >= before + 1


async def test_decision_latency_and_outcomes_are_measured_per_kind() -> None:
    r = await start(TableDecider({"alice": b"wonderland"}, delay=0.3))
    try:
        before = {(kind, le): counter("billcore_radius_decision_seconds_bucket", kind=kind, le=le)
                  for kind in ("auth", "acct") for le in ("0.25", "0.5", "+Inf")}
        sums = {kind: counter("billcore_radius_decision_seconds_sum", kind=kind) for kind in ("auth", "acct")}
        outcomes = {(k, o): counter("billcore_radius_decisions_total", kind=k, outcome=o)
                    for k, o in (("auth", "accept"), ("auth", "reject"), ("acct", "recorded"))}
        rc, out = await radclient(r.auth_port, "auth", 'User-Name = "alice", User-Password = "wonderland"')
        assert "Access-Accept" in out, out
        rc, out = await radclient(r.auth_port, "auth", 'User-Name = "alice", User-Password = "nope"')
        assert "Access-Reject" in out, out
        rc, out = await radclient(r.acct_port, "acct", 'Acct-Status-Type = Start, Acct-Session-Id = "m1",'
                                                         ' User-Name = "alice"')
        assert "Accounting-Response" in out, out
        r.server.flush_metrics()
        # each decision took the decider's 0.3 s: over 0.25, within 0.5
        for kind, n in (("auth", 2), ("acct", 1)):
            assert counter("billcore_radius_decision_seconds_bucket", kind=kind, le="0.25") == before[kind, "0.25"]
            assert counter("billcore_radius_decision_seconds_bucket", kind=kind, le="0.5") == before[kind, "0.5"] + n
            assert counter("billcore_radius_decision_seconds_bucket", kind=kind, le="+Inf") == before[kind, "+Inf"] + n
            assert 0.3 * n <= counter("billcore_radius_decision_seconds_sum", kind=kind) - sums[kind] < 0.5 * n
        for (kind, outcome), was in outcomes.items():
            assert counter("billcore_radius_decisions_total", kind=kind, outcome=outcome) == was + 1
    finally:
        await r.server.close()


async def test_status_server_on_both_ports(running: Running) -> None:
    for port in (running.auth_port, running.acct_port):
        rc, out = await radclient(port, "status", 'Message-Authenticator = 0x00')
        assert rc == 0 and ("Access-Accept" in out or "Accounting-Response" in out), out
    assert running.decider.authorized == [] and running.decider.accounted == []


async def test_retransmission_is_answered_from_cache_and_decided_once() -> None:
    # the decision takes longer than radclient's timeout: radclient retransmits
    # the same packet (same id and authenticator) while it is in progress
    # (dropped), then after the answer (answered from the cache)
    r = await start(TableDecider({"alice": b"wonderland"}, delay=1.3))
    try:
        before_dup = counter("billcore_radius_duplicates_total")
        before_drop = counter("billcore_radius_dropped_total", reason="duplicate_in_progress")
        need_peer(RADCLIENT is not None, "radclient (Debian freeradius-utils) is not installed")
        assert RADCLIENT is not None
        proc = await asyncio.create_subprocess_exec(
            RADCLIENT, "-x", "-t", "0.6", "-r", "4", f"127.0.0.1:{r.acct_port}", "acct", SECRET,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate(b'Acct-Status-Type = Start, Acct-Session-Id = "dup", User-Name = "alice"')
        assert "Accounting-Response" in out.decode(), out
        assert len(r.decider.accounted) == 1
        assert counter("billcore_radius_dropped_total", reason="duplicate_in_progress") >= before_drop + 1
        # the later copy of the same bytes gets the cached reply, byte for byte
        sent = raw_access_request("alice", "wonderland")
        replies = await exchange(r.auth_port, [sent, sent], expect=2, one_by_one=True)
        assert len(replies) == 2 and replies[0] == replies[1]
        assert len(r.decider.authorized) == 1
        assert counter("billcore_radius_duplicates_total") >= before_dup + 1
    finally:
        await r.server.close()


def raw_access_request(login: str, password: str, secret: bytes = SECRET.encode(), ma: bool = True) -> bytes:
    pkt = AuthPacket(AccessRequest, secret=secret, dict=load_dictionary(), message_authenticator=ma)
    pkt.AddAttribute("User-Name", login)
    pkt.AddAttribute("User-Password", pkt.PwCrypt(password))
    return bytes(pkt.RequestPacket())


async def exchange(port: int, datagrams: list[bytes], expect: int, until: Callable[[], bool] = lambda: True,
                   one_by_one: bool = False, gap: float = 0.0) -> list[bytes]:
    """Send datagrams from one socket (one source port); collect replies until
    ``expect`` have come and ``until()`` holds (for a drop: its counter moved,
    so no reply can follow).  ``one_by_one`` waits for each reply before the
    next datagram; ``gap`` paces the sends (part of a scenario)."""
    loop = asyncio.get_running_loop()
    replies: list[bytes] = []

    class Collect(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            replies.append(data)

    transport, _ = await loop.create_datagram_endpoint(Collect, remote_addr=("127.0.0.1", port))
    try:
        for i, d in enumerate(datagrams):
            transport.sendto(d)
            if one_by_one:
                await eventually(lambda: len(replies) > i, what=f"reply {i + 1}")
            elif gap:
                await asyncio.sleep(gap)
        await eventually(lambda: len(replies) >= expect and until(), what=f"{expect} replies")
    finally:
        transport.close()
    return replies


async def test_wrong_secret_with_message_authenticator_is_dropped(running: Running) -> None:
    before = counter("billcore_radius_dropped_total", reason="bad_message_authenticator")
    replies = await exchange(running.auth_port, [raw_access_request("alice", "wonderland", secret=b"bad")], expect=0,
                             until=lambda: counter("billcore_radius_dropped_total",
                                                   reason="bad_message_authenticator") == before + 1)
    assert replies == [] and running.decider.authorized == []


async def test_required_message_authenticator() -> None:
    r = await start(TableDecider({"alice": b"wonderland"}), require_message_authenticator=True)
    try:
        before = counter("billcore_radius_dropped_total", reason="missing_message_authenticator")
        assert await exchange(r.auth_port, [raw_access_request("alice", "wonderland", ma=False)], expect=0,
                              until=lambda: counter("billcore_radius_dropped_total",
                                                    reason="missing_message_authenticator") == before + 1) == []
        replies = await exchange(r.auth_port, [raw_access_request("alice", "wonderland", ma=True)], expect=1)
        assert len(replies) == 1 and replies[0][0] == 2  # Access-Accept
    finally:
        await r.server.close()


async def test_unknown_nas_is_dropped_and_counted() -> None:
    decider = TableDecider({"alice": b"wonderland"})
    server = RadiusServer(decider=decider, nas_table=NasTable([Nas("192.0.2.1", b"x")]))
    auth_port, _ = await server.listen("127.0.0.1", 0, 0)
    try:
        before = counter("billcore_radius_dropped_total", reason="unknown_nas")
        assert await exchange(auth_port, [raw_access_request("alice", "wonderland")], expect=0,
                              until=lambda: counter("billcore_radius_dropped_total",
                                                    reason="unknown_nas") == before + 1) == []
    finally:
        await server.close()


async def test_requests_over_the_inflight_cap_are_dropped() -> None:
    decider = TableDecider({"alice": b"wonderland"}, gate=asyncio.Event())
    server = RadiusServer(decider=decider, nas_table=NasTable([Nas("127.0.0.1", SECRET.encode())]), max_inflight=2)
    auth_port, _ = await server.listen("127.0.0.1", 0, 0)
    try:
        before = counter("billcore_radius_dropped_total", reason="overload")
        sends = [raw_access_request("alice", "wonderland") for _ in range(5)]
        task = asyncio.ensure_future(exchange(auth_port, sends, expect=2, gap=0.01))
        await eventually(lambda: counter("billcore_radius_dropped_total", reason="overload") == before + 3,
                         what="three requests dropped over the cap")
        assert server.inflight == 2 and len(decider.authorized) == 2
        decider.gate.set()  # type: ignore[union-attr]
        replies = await task
        assert len(replies) == 2
        assert counter("billcore_radius_dropped_total", reason="overload") == before + 3
    finally:
        await server.close()


async def test_second_instance_on_the_same_port_refuses_to_start(running: Running) -> None:
    with pytest.raises(PortInUse, match=str(running.auth_port)):
        bind_udp("127.0.0.1", running.auth_port)
    # a pyrad-style SO_REUSEPORT socket holding the port also stops us
    pyrad_style = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    pyrad_style.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    pyrad_style.bind(("127.0.0.1", 0))
    try:
        with pytest.raises(PortInUse):
            bind_udp("127.0.0.1", pyrad_style.getsockname()[1])
    finally:
        pyrad_style.close()
    # and nobody can quietly share ours
    sharer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sharer.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    with pytest.raises(OSError):
        sharer.bind(("127.0.0.1", running.auth_port))
    sharer.close()
