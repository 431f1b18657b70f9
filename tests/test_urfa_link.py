"""The reconnecting link against the real URFA service on real sockets (an
in-memory principal store stands in for the database): it waits for a core
that is not up yet, resumes its session after a drop with the subscription
kept, logs in afresh after a core restart and subscribes again, fails over
to the second address when the first is down, retries only what the retry
table calls worth a retry, and a tool's refused login ends it."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import pytest

from billcore.server.calls import CallRegistry, CallSpec
from billcore.server.service import URFAConfig, URFAService
from billcore.server.sessions import Principal
from tests.conftest import free_port
from tests.waiting import eventually
from tests.test_urfa_service import _self_signed
from urfa import scram
from urfa.errors import BAD_ARGS, CallFailed, LoginFailed
from urfa.link import Address, Link, LinkDown
from urfa.messages import Event
from urfa.reconnect import DB_UNAVAILABLE

PASSWORD = "link-system-pw"


class OneLogin:
    def __init__(self) -> None:
        self.principal = Principal("system", "edge", 1, frozenset({"edge.*", "blocks.read", "events.subscribe"}),
                                   scram.make_verifier(PASSWORD, iterations=4096))

    async def find_principal(self, kind: str, login: str) -> Principal | None:
        return self.principal if (kind, login) == ("system", "edge") else None

    async def accounts_of(self, user_id: int) -> frozenset[int]:
        return frozenset()


class Core:
    """The real URFA service with a few calls whose failures a test scripts."""

    def __init__(self, port: int = 0, unix: str | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.port = port
        self.unix = unix
        self.tls = tls
        self.service: URFAService | None = None
        self.failures: list[str] = []    # codes the next edge.flaky calls fail with, in order
        self.flaky_calls = 0

    async def start(self) -> Core:
        async def flaky(ctx: Any) -> str:
            self.flaky_calls += 1
            if self.failures:
                raise CallFailed(self.failures.pop(0), "scripted")
            return "ok"

        async def echo(ctx: Any, text: str) -> str:
            return text

        registry = CallRegistry()
        registry.register_all([CallSpec("edge.flaky", flaky, right="edge.use"),
                               CallSpec("edge.echo", echo, right="edge.use", args={"text": "str"})])
        self.service = URFAService(registry, OneLogin(), URFAConfig(secret=b"k" * 32))
        await self.service.start(tcp=("127.0.0.1", self.port) if self.port else None, unix=self.unix, ssl=self.tls)
        return self

    def publish(self, account_id: int) -> None:
        assert self.service is not None
        self.service.publish("blocks", {"action": "set", "account_id": account_id})

    async def stop(self) -> None:
        if self.service is not None:
            await self.service.stop()
            self.service = None


class Edge:
    """What an edge gives the link, and what it sees of it."""

    def __init__(self, addresses: list[Address], password: str = PASSWORD, **options: Any) -> None:
        self.events: list[Event] = []
        self.connected: list[str] = []
        self.missed: list[str] = []
        self.lost: list[str] = []

        async def on_connected(client: Any, how: str) -> None:
            self.connected.append(how)

        self.link = Link(addresses, "system", "edge", password, topics=["blocks"], on_connected=on_connected,
                         on_event=self.events.append, on_missed=self.missed.append, on_lost=self.lost.append,
                         **{"timeout": 3.0, "backoff": (0.05, 0.2), **options})


async def test_waits_for_the_core_resumes_after_a_drop_and_logs_in_after_a_restart() -> None:
    port = free_port()
    edge = Edge([Address("127.0.0.1", port)])
    link = edge.link.start()
    core = Core(port)
    try:
        # not up yet: a call fails at once, nothing was sent
        await eventually(lambda: link.plan.attempts >= 2)
        with pytest.raises(LinkDown):
            await link.call("edge.echo", {"text": "hi"})
        await core.start()
        await eventually(link.up.is_set)
        assert await link.call("edge.echo", {"text": "hi"}) == "hi"
        assert edge.connected == ["login"] and edge.missed == []
        core.publish(1)
        await eventually(lambda: len(edge.events) == 1)

        # the connection drops: the same session is resumed, its subscription still delivers
        assert link.client is not None and link.info is not None
        sid = link.info.sid
        link.client._transport.abort()  # type: ignore[union-attr]
        await eventually(lambda: edge.connected == ["login", "resume"] and link.up.is_set())
        assert link.info.sid == sid
        assert edge.missed == ["reconnected"] and len(edge.lost) == 1
        core.publish(2)
        await eventually(lambda: [e.payload["account_id"] for e in edge.events] == [1, 2])

        # the core restarts and knows no session: a fresh login, subscribed again
        await core.stop()
        await eventually(lambda: not link.up.is_set())
        core = await Core(port).start()
        await eventually(lambda: edge.connected[-1] == "login" and link.up.is_set())
        assert link.info.sid != sid
        assert link.connects == {"login": 2, "resume": 1} and link.reconnects == 2
        core.publish(3)
        await eventually(lambda: [e.payload["account_id"] for e in edge.events] == [1, 2, 3])
    finally:
        await link.close()
        await core.stop()


async def test_a_list_of_addresses_fails_over_to_the_second_when_the_first_is_down(tmp_path: Path) -> None:
    down = Address("127.0.0.1", free_port())
    sock = str(tmp_path / "urfa.sock")
    core = await Core(unix=sock).start()
    edge = Edge([down, Address.parse(sock)])
    try:
        client = await edge.link.start().ready()
        assert client.info is not None and edge.link.address == Address(host=None, unix=sock)
        assert await edge.link.call("edge.echo", {"text": "via the standby"}) == "via the standby"
    finally:
        await edge.link.close()
        await core.stop()


async def test_a_tls_address_verifies_the_core(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    core = await Core(free_port(), tls=server).start()
    trusting = ssl.create_default_context(cafile=str(cert))
    edge = Edge([Address.parse(f"127.0.0.1:{core.port}", ssl=trusting, server_hostname="localhost")])
    stranger = Edge([Address.parse(f"127.0.0.1:{core.port}", ssl=ssl.create_default_context(),
                                   server_hostname="localhost")], persistent=False)
    try:
        await edge.link.start().ready()
        assert await edge.link.call("edge.echo", {"text": "sealed"}) == "sealed"
        with pytest.raises(ssl.SSLCertVerificationError):   # a core we cannot verify is no core
            await stranger.link.start().ready()
    finally:
        await edge.link.close()
        await stranger.link.close()
        await core.stop()


async def test_only_what_the_table_calls_retryable_is_retried() -> None:
    core = await Core(free_port()).start()
    edge = Edge([Address("127.0.0.1", core.port)])
    try:
        await edge.link.start().ready()
        core.failures = [DB_UNAVAILABLE, DB_UNAVAILABLE]
        assert await edge.link.call("edge.flaky", retry_for=5.0) == "ok"
        assert core.flaky_calls == 3

        core.failures = [BAD_ARGS]
        with pytest.raises(CallFailed) as refused:
            await edge.link.call("edge.flaky", retry_for=5.0)
        assert refused.value.code == BAD_ARGS and core.flaky_calls == 4

        # without retry_for nothing is retried, even what could be
        core.failures = [DB_UNAVAILABLE]
        with pytest.raises(CallFailed):
            await edge.link.call("edge.flaky")
        assert core.flaky_calls == 5
    finally:
        await edge.link.close()
        await core.stop()


async def test_a_tools_refused_login_is_its_answer_and_is_not_retried(caplog: pytest.LogCaptureFixture) -> None:
    core = await Core(free_port()).start()
    edge = Edge([Address("127.0.0.1", core.port)], password="wrong", persistent=False)
    try:
        with pytest.raises(LoginFailed) as refused:
            await edge.link.start().ready()
        assert refused.value.code == "auth_failed"
        with pytest.raises(LoginFailed):      # and it stays the answer, without another attempt
            await edge.link.ready()
        assert edge.link.plan.attempts == 1
        assert [r.message for r in caplog.records if r.name == "urfa.link"] == ["core refused the login"]
    finally:
        await edge.link.close()
        await core.stop()


async def test_a_waiting_call_brings_the_next_attempt_forward() -> None:
    """``wait_for_core``: a call while down makes the keeper try now instead
    of after its pause, and goes through when that works."""
    port = free_port()
    edge = Edge([Address("127.0.0.1", port)], wait_for_core=3.0, backoff=(5.0, 5.0))
    link = edge.link.start()
    try:
        await eventually(lambda: link.plan.attempts >= 1 and not link.up.is_set())
        with pytest.raises(LinkDown):
            await link.call("edge.echo", {"text": "down"})
        core = await Core(port).start()
        started = asyncio.get_running_loop().time()
        assert await link.call("edge.echo", {"text": "up"}) == "up"
        assert asyncio.get_running_loop().time() - started < 4.0    # not after the 5 s pause
    finally:
        await link.close()
        await core.stop()


async def test_an_event_handler_that_raises_marks_events_missed_and_the_link_stays_up() -> None:
    core = await Core(free_port()).start()
    edge = Edge([Address("127.0.0.1", core.port)])
    seen: list[int] = []

    def handler(event: Event) -> None:
        seen.append(event.payload["account_id"])
        if len(seen) == 1:
            raise KeyError("a bug in the edge")

    edge.link._on_event = handler
    try:
        await edge.link.start().ready()
        core.publish(1)
        core.publish(2)
        await eventually(lambda: seen == [1, 2])
        assert edge.missed == ["event handler failed"] and edge.link.up.is_set()
    finally:
        await edge.link.close()
        await core.stop()


def test_addresses_parse_from_config_text() -> None:
    assert Address.parse("core.example:11758") == Address("core.example", 11758)
    assert Address.parse("[2001:db8::1]:9000") == Address("2001:db8::1", 9000)
    assert Address.parse("10.0.0.1") == Address("10.0.0.1")
    assert Address.parse("unix:/run/billcore/urfa.sock") == Address(host=None, unix="/run/billcore/urfa.sock")
    assert str(Address.parse("[::1]:5")) == "[::1]:5"
    with pytest.raises(ValueError):
        Address.parse("core:http")


async def test_a_fault_in_the_event_pump_reconnects_and_marks_events_missed(caplog: pytest.LogCaptureFixture) -> None:
    """Anything but a lost connection failing in the pump (a bug, a decode fault) must not end the
    keeper silently: the link drops that connection, says its events are stale, and comes back."""
    port = free_port()
    core = await Core(port).start()
    faults = {"left": 1}

    edge = Edge([Address("127.0.0.1", port)])
    original_on_connected = edge.link._on_connected

    async def on_connected(client: Any, how: str) -> None:
        if faults["left"]:
            faults["left"] -= 1

            healthy = client.next_event

            async def broken_once(timeout: float | None = None) -> Event:
                client.next_event = healthy   # one fault; the resumed connection's pump works
                raise RuntimeError("decoder bug")

            client.next_event = broken_once
        assert original_on_connected is not None
        await original_on_connected(client, how)

    edge.link._on_connected = on_connected
    link = edge.link.start()
    try:
        await eventually(lambda: len(edge.connected) == 2 and link.up.is_set())
        assert "event pump failed" in edge.missed
        assert any(r.getMessage() == "event pump failed" and r.exc_info for r in caplog.records)
        core.publish(7)   # the new connection's pump delivers again
        await eventually(lambda: len(edge.events) == 1)
        assert edge.events[0].payload["account_id"] == 7
    finally:
        await link.close()
        await core.stop()
