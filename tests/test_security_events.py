"""Who may read which event topic (issue 14 item 3): every topic of the
core's table (``billcore.server.topics.TOPICS``) for every session kind, on a real
URFA server over TCP with the real call modules and the real auth backend.

A session kind that may not read a topic is refused at ``events.subscribe``
(``forbidden``) and receives nothing; a subscriber's session gets only its
own accounts' events, with no operator login and no operator's reason
text; a proxied subscriber session (the web office's) may not subscribe.
A topic published anywhere in the code without a rule in the table, or
missing from docs/protocol.md §9, fails here.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from pathlib import Path
from typing import Any

import pytest

from billcore.server.calls import allows
from billcore.server.principals import create_admin, create_system_login
from billcore.server.topics import TOPICS
from tests.test_portal_harness import ADMIN_PASSWORD, LiveCore, live_core  # noqa: F401 (a fixture)
from urfa import client as uc
from urfa.errors import CallFailed

ROOT = Path(__file__).resolve().parent.parent
PW = "a-long-test-password"
SECRET_REASON = "operator note: SECRET-REASON-4711"
OPERATOR = "admin:root"
CASHIER_RIGHTS = frozenset({"payments.*", "users.read", "accounts.read"})   # schema/0001's cashiers


def sample(account_id: int) -> dict[str, Any]:
    """An event as the core could publish it on any topic: an account, an
    operator's identity and free text, and the other topics' own keys."""
    return {"account_id": account_id, "kind": "admin", "action": "set", "block_id": 7, "reason": SECRET_REASON,
            "at": dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc), "by": OPERATOR,
            "version": 3, "changed": 1, "sessions": [{"account_id": account_id, "login": "x", "framed_ip": "10.9.8.7"}]}


async def drain(client: uc.Client, wait: float = 0.3) -> list[Any]:
    """Every event the client has received or receives within ``wait``."""
    got = []
    while True:
        try:
            got.append(await client.next_event(wait))
        except (asyncio.TimeoutError, TimeoutError):
            return got


@pytest.fixture
async def live(live_core: LiveCore) -> LiveCore:
    """The harness core, with the logins every session kind needs."""
    async with live_core.pool.acquire() as conn:
        await create_admin(conn, "cashier", PW, ["cashiers"])
        await create_system_login(conn, "norights", PW, ["nothing.here"])
        await create_system_login(conn, "office", PW, ["session.proxy"])
        for i, topic in enumerate(TOPICS.values()):   # one system login holding exactly the topic's right
            await create_system_login(conn, f"reader{i}", PW, [topic.rights[0]])
    return live_core


async def test_every_topic_for_every_session_kind(live: LiveCore) -> None:
    assert live.service is not None
    port = live.port
    admin = await live.admin()
    ids = {}
    for name in ("alice", "bob"):
        ids[name] = (await admin.call("users.create", {"login": name, "password": f"{name}-password"}))[
            "basic_account_id"]

    for i, (name, topic) in enumerate(TOPICS.items()):
        clients: dict[str, uc.Client] = {}

        async def open_as(label: str, kind: str, login: str, password: str) -> uc.Client:
            c = await uc.connect("127.0.0.1", port)
            await c.login(kind, login, password)
            clients[label] = c
            return c

        await open_as("system with the right", "system", f"reader{i}", PW)
        await open_as("system without", "system", "norights", PW)
        await open_as("admin with the right", "admin", "root", ADMIN_PASSWORD)
        await open_as("admin without", "admin", "cashier", PW)
        await open_as("user", "user", "alice", "alice-password")
        office = await open_as("office (proxy)", "system", "office", PW)
        proxied = await office.proxy_login("alice", "alice-password", "192.0.2.10")

        may = {
            "system with the right": True,
            "system without": False,
            "admin with the right": True,
            "admin without": any(allows(CASHIER_RIGHTS, r) for r in topic.rights),
            "user": topic.for_subscriber is not None,
        }
        for label, allowed in may.items():
            if allowed:
                assert await clients[label].subscribe(name) == [name], (name, label)
            else:
                with pytest.raises(CallFailed) as refused:
                    await clients[label].subscribe(name)
                assert refused.value.code == "forbidden", (name, label, refused.value)
        with pytest.raises(CallFailed) as refused:
            await office.call("events.subscribe", {"topics": [name]}, as_sid=proxied.sid, as_ip="192.0.2.10")
        assert refused.value.code == "forbidden", (name, "proxied")

        alice_event, bob_event = sample(ids["alice"]), sample(ids["bob"])
        live.service.publish(name, bob_event)
        live.service.publish(name, alice_event)
        for label, c in clients.items():
            got = await drain(c)
            assert all(e.topic == name for e in got)
            payloads = [e.payload for e in got]
            if label == "user" and may["user"]:
                assert [p["account_id"] for p in payloads] == [ids["alice"]], (name, payloads)
                seen = repr(payloads)
                assert "by" not in payloads[0] and OPERATOR not in seen and "SECRET" not in seen, (name, payloads)
                assert "sessions" not in payloads[0] and "10.9.8.7" not in seen, (name, payloads)
            elif may.get(label):
                assert payloads == [bob_event, alice_event], (name, label, payloads)
            else:
                assert payloads == [], (name, label, payloads)
        for c in clients.values():
            await c.close()
    await admin.close()


async def test_a_subscriber_hears_only_their_own_real_block_events(live: LiveCore) -> None:
    """The issue's reproduction with real calls: an operator blocks bob, then
    alice, with a reason; alice's subscription hears only her own block,
    without the operator's login or reason; me.blocks shows the same."""
    admin = await live.admin()
    ids = {}
    for name in ("alice", "bob"):
        ids[name] = (await admin.call("users.create", {"login": name, "password": f"{name}-password"}))[
            "basic_account_id"]
    alice = await uc.connect("127.0.0.1", live.port)
    await alice.login("user", "alice", "alice-password")
    assert await alice.subscribe("blocks") == ["blocks"]
    radius = await uc.connect("127.0.0.1", live.port)   # an operator-side reader hears everything
    await radius.login("system", "reader0", PW)
    assert await radius.subscribe("blocks") == ["blocks"]
    for name in ("bob", "alice"):
        await admin.call("blocks.set", {"account_id": ids[name], "reason": SECRET_REASON})
    await alice.call("me.block", {"on": True})
    mine = await drain(alice)
    assert [(e.payload["account_id"], e.payload["kind"]) for e in mine] == [(ids["alice"], "admin"),
                                                                            (ids["alice"], "user")], mine
    assert "SECRET" not in repr(mine) and OPERATOR not in repr(mine) and "by" not in mine[0].payload
    assert mine[1].payload["reason"] == "by the subscriber"          # her own words she may read
    everything = await drain(radius)
    assert [e.payload["account_id"] for e in everything] == [ids["bob"], ids["alice"], ids["alice"]]
    assert everything[0].payload["reason"] == SECRET_REASON and everything[0].payload["by"].startswith(OPERATOR)
    rows = await alice.call("me.blocks")
    assert {r["kind"] for r in rows} == {"admin", "user"}
    assert "SECRET" not in repr(rows) and OPERATOR not in repr(rows), rows
    assert all("set_by" not in r and "lifted_by" not in r for r in rows), rows
    with pytest.raises(CallFailed) as refused:
        await alice.subscribe("no.such.topic")
    assert refused.value.code == "bad_args"
    for c in (alice, radius, admin):
        await c.close()


def test_every_published_topic_has_a_rule_and_is_documented() -> None:
    """A topic published anywhere in the code must be in the table (else it
    reaches nobody), and every topic of the table must be in the protocol doc."""
    published = set()
    for folder in ("billcore", "radius", "netflow", "portal", "plugins", "urfa"):
        for path in (ROOT / folder).rglob("*.py"):
            published |= set(re.findall(r"publish\(\s*[\"']([^\"']+)[\"']", path.read_text()))
    assert published, "the scan found no publish() at all"
    assert published <= set(TOPICS), f"topics without a rule in billcore/server/topics.py: {published - set(TOPICS)}"
    doc = (ROOT / "docs" / "protocol.md").read_text()
    events = doc[doc.index("## 9. Events"):doc.index("## 10.")]
    for name, topic in TOPICS.items():
        row = next((line for line in events.splitlines() if line.startswith(f"| `{name}` |")), None)
        assert row is not None, f"docs/protocol.md §9 has no row for topic {name}"
        for right in topic.rights:
            assert f"`{right}`" in row, f"docs/protocol.md §9: topic {name} must name right {right}"
