"""The notify, webhooks and me.notify_* calls over a real URFA service and a real database.

Operators edit and preview templates, manage webhook endpoints whose secret
is shown once, subscribers set their own language and opt-outs; a bad input
answers a clear code, never ``internal``.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from billcore.billing import accounts
from billcore.common.config import Config
from billcore.radius.secrets import SecretStore
from billcore.server.calls import CallRegistry
from billcore.server.context import CoreContext
from billcore.server.core import build_calls
from billcore.server.principals import SERVICE_RIGHTS, DatabaseAuth, create_admin, create_system_login
from billcore.server.service import URFAConfig, URFAService
from urfa import client as uc
from urfa.errors import CallFailed
from urfa.scram import make_verifier

PW = "operator-password"
NOW = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.timezone.utc)


class Live:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.core = CoreContext(pool, Config(), now=lambda: NOW)
        self.core.extras["secret_store"] = SecretStore(secrets.token_bytes(32))
        self.registry = CallRegistry()
        self.service = URFAService(self.registry, DatabaseAuth(pool),
                                   URFAConfig(login_failures=50, mock_iterations=4096, session_timeout=1800))
        self.registry.register_all(build_calls(self.core))
        self.clients: list[uc.Client] = []
        self.port = 0

    async def start(self) -> Live:
        await self.service.start(tcp=("127.0.0.1", 0))
        self.port = self.service.sockets[0].getsockname()[1]
        async with self.pool.acquire() as conn:
            await create_admin(conn, "root", PW, ["superusers"])
            await create_admin(conn, "cashier", PW, ["cashiers"])
            await create_system_login(conn, "notify", PW, SERVICE_RIGHTS["notify"])
            await accounts.create_user(conn, "olga", make_verifier(PW, iterations=4096), email="olga@example.test")
        return self

    async def login(self, kind: str, login: str) -> uc.Client:
        client = await uc.connect("127.0.0.1", self.port)
        self.clients.append(client)
        await client.login(kind, login, PW)
        return client

    async def stop(self) -> None:
        for client in self.clients:
            await client.close()
        await self.service.stop()


@pytest.fixture
async def live(pool: asyncpg.Pool) -> AsyncIterator[Live]:
    core = await Live(pool).start()
    yield core
    await core.stop()


async def refused(code: str, awaitable: Any) -> CallFailed:
    with pytest.raises(CallFailed) as caught:
        await awaitable
    assert caught.value.code == code, caught.value
    assert "internal" not in caught.value.message.lower()
    return caught.value


async def test_templates_edit_preview_reset(live: Live) -> None:
    root = await live.login("admin", "root")
    listed = await root.call("notify.templates_list", {})
    assert {(t["event"], t["lang"]) for t in listed if t["channel"] == "email"} >= {("balance.low", "ru"),
                                                                                   ("invoice.issued", "en")}
    assert next(t for t in listed if t["event"] == "account.blocked")["essential"] is True
    shown = await root.call("notify.templates_preview", {"event": "balance.low", "lang": "en"})
    assert shown["subject"] == "Your balance is low: 4.50 RUB"   # [billing] currency
    done = await root.call("notify.templates_set", {"event": "balance.low", "lang": "en",
                                                     "subject": "Low: {{ data.balance|money }} of {{ login }}",
                                                     "body": "Top up, {{ full_name }}."})
    assert done["overridden"] is True
    got = await root.call("notify.templates_get", {"event": "balance.low", "lang": "en"})
    assert got["subject"].startswith("Low:") and got["default_subject"].startswith("Your balance")
    shown = await root.call("notify.templates_preview", {"event": "balance.low", "lang": "en",
                                                          "data": {"balance": 1}})
    assert shown["subject"] == "Low: 0.000001 RUB of subscriber"
    audit = await live.pool.fetchval("SELECT count(*) FROM audit_log WHERE action = 'notify.templates_set'")
    assert audit == 1
    assert await root.call("notify.templates_reset", {"event": "balance.low", "lang": "en"}) is True
    assert await root.call("notify.templates_reset", {"event": "balance.low", "lang": "en"}) is False
    # the sandbox: code is refused when saved and when previewed, with a clear code
    await refused("notify.bad_template", root.call("notify.templates_set", {
        "event": "balance.low", "lang": "en", "subject": "x", "body": "{{ ''.__class__.__mro__ }}"}))
    await refused("notify.bad_template", root.call("notify.templates_preview", {
        "event": "balance.low", "lang": "en", "subject": "x", "body": "{% for %}"}))
    await refused("billing.invalid", root.call("notify.templates_get", {"event": "no.such", "lang": "en"}))
    await refused("billing.invalid", root.call("notify.templates_get", {"event": "balance.low", "lang": "de"}))
    cashier = await live.login("admin", "cashier")
    await refused("not_in_table", cashier.call("notify.templates_list", {}))


async def test_webhooks_secret_shown_once(live: Live) -> None:
    root = await live.login("admin", "root")
    made = await root.call("webhooks.add", {"name": "crm", "url": "https://crm.example.test/hook",
                                            "events": ["payment.added", "balance.low"]})
    assert made["secret"].startswith("whsec_") and made["enabled"] is True
    listed = await root.call("webhooks.list", {})
    assert listed == [{k: v for k, v in made.items() if k != "secret"}]
    assert made["secret"].encode() not in bytes(await live.pool.fetchval("SELECT secret_enc FROM webhooks"))
    assert "whsec_" not in str(await live.pool.fetch("SELECT after FROM audit_log WHERE action LIKE 'webhooks.%'"))
    await refused("core.already_exists", root.call("webhooks.add", {"name": "crm", "url": "http://x.test/",
                                                                    "events": ["*"]}))
    for bad in ({"url": "ftp://x.test/"}, {"url": "http://"}, {"events": []}, {"events": ["Bad Event"]},
                {"name": "no spaces"}):
        await refused("billing.invalid", root.call("webhooks.add", {"name": "x", "url": "http://x.test/",
                                                                    "events": ["*"], **bad}))
    edited = await root.call("webhooks.edit", {"webhook_id": made["id"], "enabled": False, "rotate_secret": True})
    assert edited["enabled"] is False and edited["secret"] != made["secret"]
    plain = await root.call("webhooks.edit", {"webhook_id": made["id"], "events": ["*"]})
    assert "secret" not in plain and plain["events"] == ["*"]
    # the notify edge reads the secret it signs with; an operator without the right cannot
    edge = await live.login("system", "notify")
    assert await edge.call("notify.webhook_secrets", {"ids": [made["id"], 999]}) == [
        {"id": made["id"], "secret": edited["secret"]}]
    cashier = await live.login("admin", "cashier")
    await refused("not_in_table", cashier.call("notify.webhook_secrets", {"ids": [made["id"]]}))
    await refused("not_in_table", root.call("notify.webhook_secrets", {"ids": [made["id"]]}))   # even with "*"
    await refused("not_in_table", edge.call("webhooks.list", {}))
    tested = await root.call("webhooks.test", {"webhook_id": made["id"]})
    row = await live.pool.fetchrow("SELECT event, payload->>'webhook_id' AS w FROM outbox_events WHERE id = $1",
                                   tested["event_id"])
    assert (row["event"], row["w"]) == ("webhook.test", str(made["id"]))
    assert await root.call("webhooks.delete", {"webhook_id": made["id"]}) is True
    await refused("core.unknown", root.call("webhooks.delete", {"webhook_id": made["id"]}))
    await refused("core.unknown", root.call("webhooks.test", {"webhook_id": made["id"]}))


async def test_subscriber_sets_language_and_opt_outs(live: Live) -> None:
    olga = await live.login("user", "olga")
    prefs = await olga.call("me.notify_get", {})
    assert prefs["language"] == "" and prefs["optouts"] == [] and prefs["email"] == "olga@example.test"
    assert {"event": "account.blocked", "essential": True} in prefs["events"]
    prefs = await olga.call("me.notify_set", {"language": "ru", "optouts": [
        {"event": "payment.added", "channel": "email"}, {"event": "balance.low", "channel": "email"}]})
    assert prefs["language"] == "ru" and len(prefs["optouts"]) == 2
    await refused("billing.invalid", olga.call("me.notify_set", {"optouts": [
        {"event": "account.blocked", "channel": "email"}]}))
    await refused("billing.invalid", olga.call("me.notify_set", {"language": "klingon"}))
    await refused("billing.invalid", olga.call("me.notify_set", {"optouts": [{"event": "*", "channel": "pigeon"}]}))
    await refused("billing.invalid", olga.call("me.notify_set", {"optouts": ["payment.added"]}))
    assert (await olga.call("me.notify_get", {}))["language"] == "ru"   # the refused calls changed nothing
    root = await live.login("admin", "root")
    await refused("not_in_table", root.call("me.notify_get", {}))
