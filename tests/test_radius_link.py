"""The radius process's link to the core, against the real URFA service on
a real socket (an in-memory principal store stands in for the database):
waiting for a core that is not up yet, batching Access-Requests, failing
fast while down, resuming the same session after a drop (subscriptions
kept), and logging in again when the core restarted."""

from __future__ import annotations

import asyncio
import types
from pathlib import Path
from typing import Any

from billcore.server.calls import CallRegistry, CallSpec
from billcore.server.service import URFAConfig, URFAService
from billcore.server.sessions import Principal
from radius.process import CONNECTS, UrfaDecider, core_link
from radius.server import DecisionUnavailable, Nas, RadiusError
from tests.conftest import free_port
from tests.waiting import eventually
from urfa import scram
from urfa.client import Client
from urfa.messages import Event

PASSWORD = "radius-system-pw"
NAS = Nas("127.0.0.1", b"s")


class OneLogin:
    def __init__(self) -> None:
        self.principal = Principal("system", "radius", 1, frozenset({"radius.*", "events.subscribe", "outbox.claim"}),
                                   scram.make_verifier(PASSWORD, iterations=4096))

    async def find_principal(self, kind: str, login: str) -> Principal | None:
        return self.principal if (kind, login) == ("system", "radius") else None

    async def accounts_of(self, user_id: int) -> frozenset[int]:
        return frozenset()


class Core:
    """A stand-in core: the real URFA service with two radius calls."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.batches: list[int] = []
        self.service: URFAService | None = None

    async def start(self) -> None:
        async def authorize_many(ctx: Any, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
            self.batches.append(len(requests))
            return [{"accept": r["login"] == "alice", "reply": [["Session-Timeout", 60]]} for r in requests]

        async def nas_list(ctx: Any) -> list[dict[str, Any]]:
            return [{"address": "127.0.0.1", "secret": b"s"}]

        registry = CallRegistry()
        registry.register_all([
            CallSpec("radius.authorize_many", authorize_many, right="radius.serve", args={"requests": "list"}),
            CallSpec("radius.nas_list", nas_list, right="radius.serve"),
        ])
        self.service = URFAService(registry, OneLogin(), URFAConfig(secret=b"k" * 32))
        await self.service.start(tcp=("127.0.0.1", self.port))

    async def stop(self) -> None:
        assert self.service is not None
        await self.service.stop()


class Harness:
    """The radius process's own link (``core_link``), pointed at the stand-in core."""

    def __init__(self, port: int, tmp_path: Path) -> None:
        (tmp_path / "system").mkdir()
        (tmp_path / "system" / "radius.password").write_text(PASSWORD + "\n")
        config = types.SimpleNamespace(urfa_socket=None, urfa=types.SimpleNamespace(host="127.0.0.1", port=port),
                                       data_dir=tmp_path)
        self.events: list[Event] = []
        self.connected = 0
        self.link = core_link(config, self.on_connected, self.events.append, backoff=(0.05, 0.2))

    async def on_connected(self, client: Client, how: str) -> None:
        self.connected += 1


def connects(how: str) -> float:
    return float(CONNECTS.labels(how)._value.get())


async def test_link_waits_for_the_core_batches_resumes_and_logs_in_again(tmp_path: Path) -> None:
    port = free_port()
    h = Harness(port, tmp_path)
    decider = UrfaDecider(h.link, timeout=2.0)
    h.link.start()
    core = Core(port)
    try:
        # the core is not up yet: the link keeps trying, decisions fail at once
        await eventually(lambda: h.link.plan.attempts >= 2)
        assert not h.link.up.is_set()
        try:
            decider.authorize(NAS, {"login": "alice"})
            raise AssertionError("a decision while the core is down must fail fast")
        except DecisionUnavailable:
            pass
        await core.start()
        await eventually(h.link.up.is_set)

        # many requests of one loop turn go as one batch, answered in order
        logins = ["alice" if i % 3 else "mallory" for i in range(100)]
        decisions = await asyncio.gather(*(decider.authorize(NAS, {"login": x}) for x in logins))
        assert [d.accept for d in decisions] == [x == "alice" for x in logins]
        assert core.batches == [100]

        # a dropped connection: the same session is resumed, with its subscription
        assert h.link.client is not None and h.link.client.info is not None
        sid = h.link.client.info.sid
        resumed = connects("resume")
        h.link.client._transport.abort()  # type: ignore[union-attr]
        await eventually(lambda: connects("resume") == resumed + 1 and h.link.up.is_set())
        assert h.link.client.info.sid == sid
        assert core.service is not None
        core.service.publish("outbox", {"channels": ["radius"]})
        await eventually(lambda: len(h.events) == 1)
        assert h.events[0].payload["channels"] == ["radius"]
        assert (await decider.authorize(NAS, {"login": "alice"})).accept

        # the core restarts: it knows no old session, so the link logs in afresh
        logins_before = connects("login")
        await core.stop()
        await eventually(lambda: not h.link.up.is_set())
        core = Core(port)
        await core.start()
        await eventually(lambda: connects("login") == logins_before + 1 and h.link.up.is_set())
        assert h.link.client.info.sid != sid
        assert h.connected == 3  # first login, resume, fresh login: subscribed each time
        assert (await decider.authorize(NAS, {"login": "alice"})).accept
    finally:
        await h.link.close()
        await core.stop()


async def test_accounting_calls_stay_under_the_cores_cap(tmp_path: Path) -> None:
    """A burst of accounting requests goes in batches (``radius.accounting_many``),
    never more than ``max_accounting`` calls in flight on the connection; the
    rest wait their turn, and each request hears its own record's answer."""
    port = free_port()
    h = Harness(port, tmp_path)
    running = 0
    peak = 0
    seen: list[str] = []

    async def accounting_many(ctx: Any, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.02)
        running -= 1
        seen.extend(record["session_id"] for record in records)
        return [{"error": "billing.invalid", "message": "bad"} if record["session_id"] == "7"
                else {"error": "busy", "message": "again"} if record["session_id"] == "8"
                else {"session": record["session_id"]} for record in records]

    core = Core(port)
    await core.start()
    assert core.service is not None
    core.service.registry.register_all([CallSpec("radius.accounting_many", accounting_many, right="radius.serve",
                                                 args={"records": "list"})])
    h.link.start()
    try:
        await eventually(h.link.up.is_set)
        decider = UrfaDecider(h.link, timeout=5.0, max_batch=3, max_accounting=4)
        outcomes = await asyncio.gather(*(decider.account(NAS, {"session_id": str(i)}) for i in range(40)),
                                        return_exceptions=True)
        assert peak == 4
        assert sorted(seen, key=int) == [str(i) for i in range(40)]   # each record sent once
        assert isinstance(outcomes[7], RadiusError)              # refused: counted, never retried by us
        assert isinstance(outcomes[8], DecisionUnavailable)      # retry later: the NAS retransmits
        assert [o for i, o in enumerate(outcomes) if i not in (7, 8)] == [None] * 38
    finally:
        await h.link.close()
        await core.stop()
