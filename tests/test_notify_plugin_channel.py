"""A notification channel served by a plugin (an SMS gateway is a plugin): a signed plugin declares
``channels = ["sms"]`` and registers ``api.notification_channel("sms", send)``; the core's notify router
gives it a short message for every notification event of a subscriber with a phone (unless they opted
out of text messages; essential events always), and the outbox delivers it inside the core, at least
once, retrying a plugin that raised.  Real PostgreSQL, a real signed plugin, the core's own outbox."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from billcore.billing.blocks import set_block
from billcore.billing.payments import add_payment
from billcore.common.config import config_from_dict
from billcore.plugins.errors import PluginError
from billcore.server.calls import CallRegistry
from billcore.server.context import CoreContext
from billcore.server.core import _outbox, _start_plugins

from .test_plugins_support import DevKey, subscriber, write_plugin

UNIT = 1_000_000

SMS_PLUGIN = """\
import json
from pathlib import Path

OUT = Path({out!r})
FAIL = Path({fail!r})

async def send(to, text, *, lang, event_id):
    if FAIL.exists():
        raise RuntimeError("gateway answered 503")
    with OUT.open("a") as f:
        f.write(json.dumps({{"to": to, "text": text, "lang": lang, "event_id": event_id}}) + "\\n")

def setup(api):
    api.notification_channel("sms", send)
"""


async def start(tmp_path: Path, pool: asyncpg.Pool, init: str) -> tuple[CoreContext, Any, Any]:
    data = tmp_path / "data"
    key = DevKey(data / "plugin-keys")
    plugin = write_plugin(data / "plugins", "smsgw", channels=["sms"], init=init)
    key.sign(plugin)
    config = config_from_dict({"core": {"data_dir": str(data)}, "plugins": {"load": [plugin.name]}})
    core = CoreContext(pool, config, publish=lambda topic, payload: None)
    manager = await _start_plugins(core, CallRegistry())
    return core, manager, _outbox(core)


async def person(pool: asyncpg.Pool, login: str, phone: str, language: str = "en") -> int:
    _, (account,) = await subscriber(pool, login)
    await pool.execute("UPDATE users SET phone = $2, language = $3 WHERE login = $1", login, phone, language)
    return account


def sent(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []


async def test_a_plugin_channel_gets_short_messages_at_least_once(tmp_path: Path, pool: asyncpg.Pool) -> None:
    out, fail = tmp_path / "sms.jsonl", tmp_path / "gateway-down"
    core, manager, outbox = await start(tmp_path, pool, SMS_PLUGIN.format(out=str(out), fail=str(fail)))
    try:
        ivan = await person(pool, "ivan", "+79990001122", "ru")
        quiet = await person(pool, "quiet", "+79990003344")
        await pool.execute("INSERT INTO notify_optouts (user_id, event, channel)"
                           " SELECT id, '*', 'text' FROM users WHERE login = 'quiet'")
        await person(pool, "nophone", "")
        now = dt.datetime.now(dt.timezone.utc)
        async with pool.acquire() as conn:
            for account in (ivan, quiet):
                await add_payment(conn, account_id=account, amount=5 * UNIT, method="cash", actor="test", now=now)
            await set_block(conn, quiet, "admin", actor="admin:test#1", reason="x", now=now)   # essential
        fail.touch()                                   # the gateway is down at first
        await outbox.dispatch_once()
        assert await outbox.deliver_in_core_once("plugin") == 2
        assert sent(out) == []
        rows = await pool.fetch("SELECT state, attempts, last_error FROM outbox_deliveries WHERE channel = 'plugin'")
        assert {(r["state"], r["attempts"]) for r in rows} == {("pending", 1)}
        assert all("gateway answered 503" in r["last_error"] for r in rows)
        fail.unlink()                                  # back: the backoff's due time comes, and they go
        await pool.execute("UPDATE outbox_deliveries SET next_at = now() WHERE channel = 'plugin'")
        assert await outbox.deliver_in_core_once("plugin") == 2
        got = {m["to"]: m for m in sent(out)}
        assert set(got) == {"+79990001122", "+79990003344"}
        assert got["+79990001122"]["text"].startswith("Платёж") and got["+79990001122"]["lang"] == "ru"
        assert "5.00" in got["+79990001122"]["text"]          # the exact amount
        blocked = await pool.fetchval("SELECT id FROM outbox_events WHERE event = 'account.blocked'")
        assert got["+79990003344"]["event_id"] == blocked       # opted out of texts, but a block is essential
        assert await pool.fetchval("SELECT count(*) FROM outbox_deliveries WHERE channel = 'plugin'"
                                   " AND state = 'delivered'") == 2
        # the plugin unloaded: what comes next waits (and is retried) instead of being lost
        manager.unload("smsgw")
        async with pool.acquire() as conn:
            await add_payment(conn, account_id=ivan, amount=UNIT, method="cash", actor="test", now=now)
        await outbox.dispatch_once()
        assert await pool.fetchval("SELECT count(*) FROM outbox_deliveries WHERE channel = 'plugin'") == 2
    finally:
        await manager.close()


async def test_a_channel_must_be_declared_and_served_once(tmp_path: Path, pool: asyncpg.Pool) -> None:
    undeclared = "async def send(to, text, *, lang, event_id):\n    pass\n\ndef setup(api):\n" \
                 "    api.notification_channel('telegram', send)\n"
    data = tmp_path / "data"
    key = DevKey(data / "plugin-keys")
    plugin = write_plugin(data / "plugins", "smsgw", channels=["sms"], init=undeclared)
    key.sign(plugin)
    config = config_from_dict({"core": {"data_dir": str(data)}})
    core = CoreContext(pool, config, publish=lambda topic, payload: None)
    manager = await _start_plugins(core, CallRegistry())
    try:
        with pytest.raises(PluginError, match="not declared"):
            await manager.load(plugin, 0.0)
    finally:
        await manager.close()
