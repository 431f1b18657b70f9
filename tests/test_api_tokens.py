"""API tokens: ``tokens.*`` and ``session.token_login``, through the real call layer and URFA service.

In-process, like tests/test_operators.py: the core's URFA service with every built-in call module and the
database auth backend on a real PostgreSQL, on a real socket.  The HTTP API edge is played by a client
logged in as the ``httpapi`` system login with exactly its ``SERVICE_RIGHTS``; the test drives both the
wall clock (token expiry) and the session table's clock (a token session's end), so nothing sleeps.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from billcore.billing import api_tokens
from billcore.common.api_token import well_formed
from billcore.common.config import Config
from billcore.radius.secrets import SecretStore
from billcore.server.calls import CallRegistry
from billcore.server.context import CoreContext
from billcore.server.core import build_calls
from billcore.common.sysfiles import service_password_file
from billcore.server.principals import (
    SERVICE_RIGHTS, DatabaseAuth, create_admin, create_system_login, ensure_service_login,
)
from billcore.server.service import URFAConfig, URFAService
from urfa import client as uc
from urfa.errors import CallFailed

PW = "operator-password"
SYSTEM_PW = {"httpapi": "httpapi-password", "console": "console-password", "radius": "radius-password"}
T0 = 1_800_000_000.0
CLIENT_IP = "203.0.113.9"


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Live:
    def __init__(self, pool: asyncpg.Pool, config: URFAConfig) -> None:
        self.pool = pool
        self.wall = Clock(T0)          # Unix time: token expiry, created_at, last_used_at
        self.mono = Clock(1000.0)      # the session table's clock
        self.core = CoreContext(pool, Config(), now=self.utc)
        self.core.extras["secret_store"] = SecretStore(secrets.token_bytes(32))
        self.registry = CallRegistry()
        self.service = URFAService(self.registry, DatabaseAuth(pool, wall_clock=self.wall), config, clock=self.mono)
        self.registry.register_all(build_calls(self.core))
        self.port = 0
        self.clients: list[uc.Client] = []

    def utc(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.wall.t, dt.timezone.utc)

    def advance(self, seconds: float) -> None:
        self.wall.t += seconds
        self.mono.t += seconds

    async def start(self) -> Live:
        await self.service.start(tcp=("127.0.0.1", 0))
        self.port = self.service.sockets[0].getsockname()[1]
        async with self.pool.acquire() as conn:
            await create_admin(conn, "root", PW, ["superusers"])
            for login, password in SYSTEM_PW.items():
                await create_system_login(conn, login, password, SERVICE_RIGHTS[login])
        return self

    async def login(self, kind: str, login: str) -> uc.Client:
        client = await uc.connect("127.0.0.1", self.port)
        self.clients.append(client)
        await client.login(kind, login, PW if kind == "admin" else SYSTEM_PW[login])
        return client

    async def stop(self) -> None:
        for client in self.clients:
            await client.close()
        await self.service.stop()


@pytest.fixture
async def live(pool: asyncpg.Pool) -> AsyncIterator[Live]:
    core = await Live(pool, URFAConfig(login_failures=5, mock_iterations=4096, session_timeout=1800)).start()
    yield core
    await core.stop()


async def refused(code: str, awaitable: Any) -> CallFailed:
    with pytest.raises(CallFailed) as caught:
        await awaitable
    assert caught.value.code == code, caught.value
    assert "internal" not in caught.value.message.lower()
    return caught.value


async def token_session(httpapi: uc.Client, token: str, ip: str = CLIENT_IP) -> dict[str, Any]:
    opened: dict[str, Any] = await httpapi.call("session.token_login", {"token": token, "ip": ip})
    return opened


# -- the edge's path, first: create, log in, call -------------------------------------------------

async def test_create_shows_the_token_once_and_stores_only_its_hash(live: Live) -> None:
    root = await live.login("admin", "root")
    made = await root.call("tokens.create", {"name": "crm-sync", "groups": ["cashiers"]})
    token = made["token"]
    assert well_formed(token) and len(token) == 47 and token.startswith("bct_")
    assert (made["name"], made["groups"], made["expires_at"]) == ("crm-sync", ["cashiers"], None)
    row = await live.pool.fetchrow("SELECT * FROM api_tokens WHERE id = $1", made["id"])
    assert bytes(row["secret_hash"]) == hashlib.sha256(token.encode()).digest()
    assert token not in repr(dict(row)) and token[4:] not in repr(dict(row))
    # the list never shows it again, nor its hash; the audit log neither
    listed = await root.call("tokens.list")
    assert [entry["name"] for entry in listed] == ["crm-sync"]
    assert set(listed[0]) == {"id", "name", "groups", "created_by", "created_at", "expires_at", "revoked_at",
                              "last_used_at"}
    assert listed[0]["created_by"].startswith("admin:root")
    logged = await live.pool.fetchval("SELECT string_agg(after::text, ' ') FROM audit_log"
                                      " WHERE action = 'tokens.create'")
    assert "crm-sync" in logged and token[4:] not in logged
    # two tokens never share a secret
    other = await root.call("tokens.create", {"name": "other", "groups": ["support"]})
    assert other["token"] != token


async def test_a_cashiers_token_session_calls_what_a_cashier_may(live: Live) -> None:
    root = await live.login("admin", "root")
    token = (await root.call("tokens.create", {"name": "till", "groups": ["cashiers"]}))["token"]
    httpapi = await live.login("system", "httpapi")
    opened = await token_session(httpapi, token)
    assert (opened["name"], opened["expires_at"], opened["timeout"]) == ("till", None, 1800)
    sid = opened["sid"]
    me = await httpapi.call("sys.whoami", as_sid=sid, as_ip=CLIENT_IP)
    assert (me["kind"], me["login"], me["proxied"], me["ip"]) == ("token", "till", True, CLIENT_IP)
    assert "self.otp" not in me["rights"]
    names = {entry["name"] for entry in await httpapi.call("sys.calls", as_sid=sid, as_ip=CLIENT_IP)}
    assert {"payments.add", "users.get", "sys.ping"} <= names
    assert not names & {"tariffs.list", "tokens.create", "events.subscribe", "events.unsubscribe",
                        "session.proxy_login", "session.token_login", "self.otp_begin", "operators.list"}
    await refused("not_in_table", httpapi.call("tariffs.list", as_sid=sid, as_ip=CLIENT_IP))
    await refused("not_in_table", httpapi.call("events.subscribe", {"topics": ["blocks"]},
                                               as_sid=sid, as_ip=CLIENT_IP))
    # a payment by the token is audited as the token, from the HTTP client's address
    user = await root.call("users.create", {"login": "sub1", "password": "sub1-password"})
    await httpapi.call("payments.add", {"account_id": user["basic_account_id"], "amount": 5_000_000,
                                        "method": "bank", "external_id": "crm-1"}, as_sid=sid, as_ip=CLIENT_IP)
    row = await live.pool.fetchrow("SELECT principal_kind, principal_login, principal_id, ip FROM audit_log"
                                   " WHERE action = 'payments.add'")
    token_id = await live.pool.fetchval("SELECT id FROM api_tokens WHERE name = 'till'")
    assert tuple(row) == ("token", "till", token_id, CLIENT_IP)
    # the session is bound to its client's address
    await refused("no_session", httpapi.call("sys.ping", as_sid=sid, as_ip="203.0.113.10"))
    # use is noted
    assert await live.pool.fetchval("SELECT last_used_at FROM api_tokens WHERE id = $1", token_id) == live.utc()


async def test_only_the_httpapi_login_turns_tokens_into_sessions(live: Live) -> None:
    root = await live.login("admin", "root")
    token = (await root.call("tokens.create", {"name": "t1", "groups": ["superusers"]}))["token"]
    console = await live.login("system", "console")
    await refused("forbidden", console.call("session.token_login", {"token": token, "ip": CLIENT_IP}))
    await refused("not_in_table", root.call("session.token_login", {"token": token, "ip": CLIENT_IP}))
    httpapi = await live.login("system", "httpapi")
    sid = (await token_session(httpapi, token))["sid"]
    # nobody else may call as the token's session
    for other in (console, await live.login("system", "radius"), root):
        await refused("forbidden", other.call("sys.whoami", as_sid=sid, as_ip=CLIENT_IP))
    # and the httpapi login reads nothing itself, nor acts for operators
    await refused("not_in_table", httpapi.call("users.list"))
    await refused("not_in_table", httpapi.proxy_login("root", PW, CLIENT_IP, kind="admin"))


async def test_revoke_ends_the_tokens_sessions_at_once(live: Live) -> None:
    root = await live.login("admin", "root")
    made = await root.call("tokens.create", {"name": "gone", "groups": ["support"]})
    httpapi = await live.login("system", "httpapi")
    sids = [(await token_session(httpapi, made["token"], ip))["sid"] for ip in (CLIENT_IP, "198.51.100.1")]
    assert await httpapi.call("sys.ping", as_sid=sids[0], as_ip=CLIENT_IP) == "pong"
    assert await root.call("tokens.revoke", {"token_id": made["id"]}) is True
    await refused("no_session", httpapi.call("sys.ping", as_sid=sids[0], as_ip=CLIENT_IP))
    await refused("no_session", httpapi.call("sys.ping", as_sid=sids[1], as_ip="198.51.100.1"))
    await refused("auth_failed", token_session(httpapi, made["token"]))
    listed = await root.call("tokens.list")
    assert listed[0]["revoked_at"] == live.utc()
    row = await live.pool.fetchrow("SELECT principal_login, object FROM audit_log WHERE action = 'tokens.revoke'")
    assert tuple(row) == ("root", f"token:{made['id']}")


async def test_expired_and_wrong_tokens_fail_alike_and_count_as_failed_logins(live: Live) -> None:
    root = await live.login("admin", "root")
    soon = live.utc() + dt.timedelta(minutes=10)
    made = await root.call("tokens.create", {"name": "short", "groups": ["cashiers"], "expires_at": soon})
    assert made["expires_at"] == soon
    httpapi = await live.login("system", "httpapi")
    opened = await token_session(httpapi, made["token"])
    assert opened["expires_at"] == soon
    live.advance(600)
    await refused("auth_failed", token_session(httpapi, made["token"], "192.0.2.1"))
    wrong = "bct_" + "A" * 43
    for bad in (wrong, made["token"][:-1] + ("B" if made["token"][-1] != "B" else "C"), "", "x" * 60_000):
        await refused("auth_failed", token_session(httpapi, bad, "192.0.2.1"))
    # a NUL never reaches the desk: the call's argument check refuses it (and counts nothing)
    await refused("bad_args", token_session(httpapi, "bct_\0" + "a" * 42, "192.0.2.1"))
    await refused("bad_args", token_session(httpapi, "x" * 70_000, "192.0.2.1"))
    # five failures from one address (login_failures=5 in the fixture): the next try is rate limited,
    # even with a good token; another address is not
    good = (await root.call("tokens.create", {"name": "good", "groups": ["cashiers"]}))["token"]
    await refused("rate_limited", token_session(httpapi, good, "192.0.2.1"))
    assert (await token_session(httpapi, good, "192.0.2.2"))["name"] == "good"


async def test_a_token_session_ends_at_the_tokens_expiry_even_when_busy(live: Live) -> None:
    root = await live.login("admin", "root")
    until = live.utc() + dt.timedelta(seconds=120)
    made = await root.call("tokens.create", {"name": "brief", "groups": ["cashiers"], "expires_at": until})
    httpapi = await live.login("system", "httpapi")
    sid = (await token_session(httpapi, made["token"]))["sid"]
    for _ in range(4):   # busy: a call every 29 s keeps it from ever being idle
        live.advance(29)
        assert await httpapi.call("sys.ping", as_sid=sid, as_ip=CLIENT_IP) == "pong"
    live.advance(5)
    await refused("no_session", httpapi.call("sys.ping", as_sid=sid, as_ip=CLIENT_IP))
    # the sweep ends one nobody calls with, too
    other = await root.call("tokens.create", {"name": "brief2", "groups": ["cashiers"],
                                              "expires_at": live.utc() + dt.timedelta(seconds=60)})
    sid2 = (await token_session(httpapi, other["token"]))["sid"]
    live.advance(61)
    assert [s.sid for s in live.service.sweep()] == [sid2]
    assert live.service.sessions.get(sid2) is None


async def test_worst_inputs_get_clear_codes(live: Live) -> None:
    root = await live.login("admin", "root")
    ok = {"name": "ok", "groups": ["cashiers"]}
    cases: list[tuple[dict[str, Any], str]] = [
        ({**ok, "name": "bad\0name"}, "bad_args"),   # the argument check refuses a NUL anywhere
        ({**ok, "name": "x" * 65}, "tokens.name"),
        ({**ok, "name": "n" * 60_000}, "tokens.name"),
        ({**ok, "name": "n" * 1_000_000}, "bad_args"),   # past the argument check's text cap
        ({**ok, "name": ""}, "tokens.name"),
        ({**ok, "name": "spaces are bad"}, "tokens.name"),
        ({**ok, "name": "ünïcode"}, "tokens.name"),
        ({**ok, "groups": []}, "tokens.group"),
        ({**ok, "groups": ["nope"]}, "tokens.group"),
        ({**ok, "groups": ["cashiers\0"]}, "bad_args"),
        ({**ok, "groups": [1, 2]}, "tokens.group"),
        ({**ok, "groups": ["g" * 60_000]}, "tokens.group"),
        ({**ok, "groups": ["cashiers"] * 65}, "tokens.group"),
        ({**ok, "expires_at": live.utc() - dt.timedelta(seconds=1)}, "tokens.expires"),
        ({**ok, "expires_at": live.utc()}, "tokens.expires"),
        ({**ok, "groups": "cashiers"}, "bad_args"),
        ({**ok, "expires_at": "tomorrow"}, "bad_args"),
        ({**ok, "extra": 1}, "bad_args"),
    ]
    for args, code in cases:
        failed = await refused(code, root.call("tokens.create", args))
        assert len(failed.message) < 1000, (args, failed.message)
    assert await root.call("tokens.list") == []
    await root.call("tokens.create", ok)
    await refused("tokens.name", root.call("tokens.create", ok))
    for token_id in (10**9, 2**63 - 1):
        await refused("tokens.not_found", root.call("tokens.revoke", {"token_id": token_id}))
    for token_id in (0, -1):
        await refused("billing.invalid", root.call("tokens.revoke", {"token_id": token_id}))
    await refused("bad_args", root.call("tokens.revoke", {"token_id": 2**63}))
    await refused("billing.invalid", root.call("tokens.list", {"limit": 1001}))   # as operators.list
    httpapi = await live.login("system", "httpapi")
    await refused("bad_args", httpapi.call("session.token_login", {"token": "bct_x", "ip": "not-an-ip"}))
    await refused("bad_args", httpapi.call("session.token_login", {"token": 7, "ip": CLIENT_IP}))


async def test_tokens_rights_and_a_token_managing_tokens(live: Live) -> None:
    root = await live.login("admin", "root")
    async with live.pool.acquire() as conn:
        await create_admin(conn, "cash", PW, ["cashiers"])
    cash = await live.login("admin", "cash")
    await refused("not_in_table", cash.call("tokens.list"))
    await refused("not_in_table", cash.call("tokens.create", {"name": "x", "groups": ["superusers"]}))
    # a superusers token may make (and revoke) tokens; created_by names it
    boss = (await root.call("tokens.create", {"name": "boss", "groups": ["superusers"]}))["token"]
    httpapi = await live.login("system", "httpapi")
    sid = (await token_session(httpapi, boss))["sid"]
    child = await httpapi.call("tokens.create", {"name": "child", "groups": ["support"]}, as_sid=sid, as_ip=CLIENT_IP)
    listed = {entry["name"]: entry for entry in await root.call("tokens.list")}
    assert listed["child"]["created_by"].startswith("token:boss")
    row = await live.pool.fetchrow("SELECT principal_kind, principal_login FROM audit_log"
                                   " WHERE action = 'tokens.create' AND object = $1", f"token:{child['id']}")
    assert tuple(row) == ("token", "boss")
    # every right, yet no operator's own calls (self.otp_* would take the token's id for an operator's)
    names = {entry["name"] for entry in await httpapi.call("sys.calls", as_sid=sid, as_ip=CLIENT_IP)}
    assert {"tokens.create", "operators.disable", "tariffs.list", "sys.ping"} <= names
    assert not {name for name in names if name.startswith(("self.", "events.", "session.proxy", "me."))}
    await refused("not_in_table", httpapi.call("self.otp_begin", as_sid=sid, as_ip=CLIENT_IP))
    # a token revoking itself ends its own session
    boss_id = listed["boss"]["id"]
    assert await httpapi.call("tokens.revoke", {"token_id": boss_id}, as_sid=sid, as_ip=CLIENT_IP) is True
    await refused("no_session", httpapi.call("sys.ping", as_sid=sid, as_ip=CLIENT_IP))


async def test_billctl_creates_lists_and_revokes_tokens(live: Live) -> None:
    env = dict(os.environ, BILLCTL_PASSWORD=PW)
    env.pop("BILLCTL_OTP", None)
    base = [sys.executable, "-m", "billcore.clients.billctl", "--port", str(live.port), "--login", "root"]

    async def billctl(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(subprocess.run, [*base, *args], env=env, capture_output=True, text=True,
                                       timeout=60)

    made = await billctl("--json", "tokens", "create", "billing-bot", "--group", "cashiers", "--group", "support",
                         "--expires", "2031-01-01T00:00:00")
    assert made.returncode == 0, made.stderr
    created = json.loads(made.stdout)
    assert (created["name"], created["groups"]) == ("billing-bot", ["cashiers", "support"])
    assert created["expires_at"].startswith("2031-01-01T00:00:00") and "shown this once" in made.stderr
    httpapi = await live.login("system", "httpapi")
    assert (await token_session(httpapi, created["token"]))["name"] == "billing-bot"
    listed = await billctl("tokens", "list")
    assert listed.returncode == 0 and "billing-bot" in listed.stdout and created["token"] not in listed.stdout
    revoked = await billctl("tokens", "revoke", str(created["id"]))
    assert revoked.returncode == 0, revoked.stderr
    await refused("auth_failed", token_session(httpapi, created["token"]))
    bad = await billctl("tokens", "create", "bad name", "--group", "cashiers")
    assert bad.returncode != 0 and "tokens.name" in bad.stderr
    unknown = await billctl("tokens", "revoke", "999999")
    assert unknown.returncode != 0 and "tokens.not_found" in unknown.stderr
    assert (await billctl("tokens", "create", "nogroup")).returncode != 0   # --group is required


async def test_last_used_at_follows_use_at_most_once_a_minute(live: Live) -> None:
    root = await live.login("admin", "root")
    made = await root.call("tokens.create", {"name": "busy", "groups": ["cashiers"]})
    httpapi = await live.login("system", "httpapi")
    sid = (await token_session(httpapi, made["token"]))["sid"]
    login_time = live.utc()

    async def last_used() -> dt.datetime:
        await asyncio.gather(*live.service._background)   # the sweep's note, spawned as it ran
        value: dt.datetime = await live.pool.fetchval("SELECT last_used_at FROM api_tokens WHERE id = $1",
                                                      made["id"])
        return value

    assert await last_used() == login_time
    live.advance(30)
    await httpapi.call("sys.ping", as_sid=sid, as_ip=CLIENT_IP)
    live.service.sweep()
    assert await last_used() == login_time          # less than a minute since the last note
    live.advance(31)
    live.service.sweep()
    assert await last_used() == live.utc()          # used since, and a minute passed
    noted = live.utc()
    live.advance(120)
    live.service.sweep()
    assert await last_used() == noted               # not used since: nothing to note


async def test_the_httpapi_login_is_provisioned_like_the_consoles(live: Live, tmp_path: Path) -> None:
    async with live.pool.acquire() as conn:
        await ensure_service_login(conn, tmp_path, "httpapi")
    secret_file = service_password_file(tmp_path, "httpapi")
    assert secret_file.stat().st_mode & 0o777 == 0o600
    client = await uc.connect("127.0.0.1", live.port)
    live.clients.append(client)
    await client.login("system", "httpapi", secret_file.read_text().strip())
    me = await client.call("sys.whoami")
    assert (me["kind"], me["rights"]) == ("system", ["session.proxy_token"])
    names = {entry["name"] for entry in await client.call("sys.calls")}
    assert "session.token_login" in names and not any(n.split(".")[0] in ("users", "payments", "tokens")
                                                      for n in names)


async def test_a_revoke_during_a_token_login_wins(live: Live) -> None:
    """The login read the token before the revoke committed, and opens its session after the revoke
    ended the token's sessions: it must not open one that nothing would end."""
    root = await live.login("admin", "root")
    made = await root.call("tokens.create", {"name": "racy", "groups": ["cashiers"]})
    auth = live.service.desk.auth
    looked_up, go_on = asyncio.Event(), asyncio.Event()

    class SlowAfterLookup:
        async def find_token(self, token: str) -> Any:
            grant = await auth.find_token(token)   # type: ignore[attr-defined]
            looked_up.set()
            await go_on.wait()
            return grant

    httpapi = await live.login("system", "httpapi")
    live.service.desk.auth = SlowAfterLookup()   # type: ignore[assignment]
    login = asyncio.create_task(token_session(httpapi, made["token"]))
    await looked_up.wait()
    assert await root.call("tokens.revoke", {"token_id": made["id"]}) is True
    go_on.set()
    await refused("auth_failed", login)
    assert not [s for s in live.service.sessions if s.kind == "token"]
    live.service.desk.auth = auth
