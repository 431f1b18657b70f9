"""Operators, their roles and their second factor, through the real call layer and URFA service.

In-process (``Live``): the core's URFA service with every built-in call module and the database
auth backend on a real PostgreSQL, on a real socket, with the wall clock TOTP counts from driven
by the test (so a code's 30-second step is the test's choice, not luck).  Operators log in
directly (``urfa.client``, what billctl uses) and through the console's system login
(``session.proxy_login`` with kind ``admin``); the web office's login must get neither.
"""

from __future__ import annotations

import asyncio
import datetime as dt
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

from billcore.clients.exits import LOGIN_REFUSED, REFUSED
from billcore.common.config import Config
from billcore.common.totp import parse_b32, totp
from billcore.radius.secrets import SecretStore
from billcore.server.calls import CallRegistry, allows
from billcore.server.context import CoreContext
from billcore.server.core import build_calls
from billcore.server.principals import SERVICE_RIGHTS, DatabaseAuth, create_admin, create_system_login
from billcore.server.service import URFAConfig, URFAService
from tests.running import BillcoreProcess
from tests.waiting import eventually
from urfa import client as uc
from urfa.connection import Connection, Role
from urfa.messages import Bye, Challenge, Hello, Login, Otp, Proof
from urfa import scram
from urfa.errors import CallFailed, LoginFailed

PW = "operator-password"
CONSOLE_PW = "console-password"
PORTAL_PW = "portal-password"
T0 = 1_800_000_000.0   # 2027-01-15: a wall clock the test moves in whole 30-second steps
BROWSER = "198.51.100.7"


def test_rights_patterns() -> None:
    support = frozenset({"*.read", "blocks.write"})
    assert allows(support, "users.read") and allows(support, "radius.read") and allows(support, "a.b.read")
    assert not allows(support, "users.write") and not allows(support, "read") and not allows(support, "users.reader")
    assert allows(support, "blocks.write")
    either = "session.proxy|session.proxy_admin"
    assert allows(frozenset({"session.proxy_admin"}), either) and allows(frozenset({"session.proxy"}), either)
    assert not allows(frozenset({"session.proxy_admin"}), "session.proxy")
    assert not allows(frozenset({"session.proxy"}), "session.proxy_admin")
    assert allows(frozenset({"session.*"}), either) and allows(frozenset({"*"}), either)


class Wall:
    """The Unix time the core's TOTP checks use."""

    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t

    def next_step(self) -> None:
        self.t += 30


class Live:
    def __init__(self, pool: asyncpg.Pool, config: URFAConfig) -> None:
        self.pool = pool
        self.wall = Wall()
        self.core = CoreContext(pool, Config(), now=lambda: dt.datetime.fromtimestamp(self.wall.t, dt.timezone.utc))
        self.core.extras["secret_store"] = SecretStore(secrets.token_bytes(32))   # radius.* need one; no file
        self.registry = CallRegistry()
        self.service = URFAService(self.registry, DatabaseAuth(pool, wall_clock=self.wall), config)
        self.registry.register_all(build_calls(self.core))
        self.port = 0
        self.clients: list[uc.Client] = []

    async def start(self) -> Live:
        await self.service.start(tcp=("127.0.0.1", 0))
        self.port = self.service.sockets[0].getsockname()[1]
        async with self.pool.acquire() as conn:
            await create_admin(conn, "root", PW, ["superusers"])
            for role in ("cashiers", "support", "tariff_managers", "accountants"):
                await create_admin(conn, role, PW, [role])
            await create_system_login(conn, "console", CONSOLE_PW, SERVICE_RIGHTS["console"])
            await create_system_login(conn, "portal", PORTAL_PW, SERVICE_RIGHTS["portal"])
        return self

    async def client(self) -> uc.Client:
        client = await uc.connect("127.0.0.1", self.port)
        self.clients.append(client)
        return client

    async def admin(self, login: str, otp: uc.OtpSource | None = None, password: str = PW) -> uc.Client:
        client = await self.client()
        await client.login("admin", login, password, otp=otp)
        return client

    async def system(self, login: str) -> uc.Client:
        client = await self.client()
        await client.login("system", login, {"console": CONSOLE_PW, "portal": PORTAL_PW}[login])
        return client

    async def operator_id(self, login: str) -> int:
        return int(await self.pool.fetchval("SELECT id FROM admins WHERE login = $1", login))

    async def enroll(self, client: uc.Client) -> tuple[bytes, list[str]]:
        """Enrol the client's operator at the wall's time; the secret and the recovery codes."""
        begun = await client.call("self.otp_begin")
        secret = parse_b32(begun["secret"])
        confirmed = await client.call("self.otp_confirm", {"code": totp(secret, self.wall.t)})
        return secret, confirmed["recovery_codes"]

    async def stop(self) -> None:
        for client in self.clients:
            await client.close()
        await self.service.stop()


@pytest.fixture
async def live(pool: asyncpg.Pool) -> AsyncIterator[Live]:
    core = await Live(pool, URFAConfig(login_failures=5, mock_iterations=4096)).start()
    yield core
    await core.stop()


@pytest.fixture
async def strict(pool: asyncpg.Pool) -> AsyncIterator[Live]:
    """Three failed logins per address or login lock it out."""
    core = await Live(pool, URFAConfig(login_failures=3, mock_iterations=4096)).start()
    yield core
    await core.stop()


async def refused(code: str, awaitable: Any) -> None:
    with pytest.raises((CallFailed, LoginFailed)) as caught:
        await awaitable
    error = caught.value
    assert isinstance(error, (CallFailed, LoginFailed)) and error.code == code, error


# -- proxied operator logins (the console) ---------------------------------

async def test_console_logs_an_operator_in_and_calls_in_their_table(live: Live) -> None:
    console = await live.system("console")
    info = await console.proxy_login("cashiers", PW, BROWSER, kind="admin")
    assert info.kind == "admin"
    me = await console.call("sys.whoami", as_sid=info.sid, as_ip=BROWSER)
    assert (me["kind"], me["login"], me["proxied"], me["ip"]) == ("admin", "cashiers", True, BROWSER)
    assert "self.otp" in me["rights"]
    names = {entry["name"] for entry in await console.call("sys.calls", as_sid=info.sid, as_ip=BROWSER)}
    assert "payments.add" in names and "tariffs.add" not in names
    await refused("not_in_table", console.call("tariffs.add", {"name": "x", "service_ids": []},
                                               as_sid=info.sid, as_ip=BROWSER))
    # what the operator does is theirs: the audit row names them and the browser, not the console
    made = await (await live.admin("root")).call("users.create", {"login": "sub1", "password": "sub1-password"})
    await console.call("payments.add", {"account_id": made["basic_account_id"], "amount": 1_000_000,
                                        "method": "cash"}, as_sid=info.sid, as_ip=BROWSER)
    row = await live.pool.fetchrow("SELECT principal_kind, principal_login, ip FROM audit_log"
                                   " WHERE action = 'payments.add'")
    assert row is not None and tuple(row) == ("admin", "cashiers", BROWSER)
    await refused("no_session", console.call("sys.whoami", as_sid=info.sid, as_ip="198.51.100.8"))
    # the console logs no subscriber in
    await refused("forbidden", console.proxy_login("nobody", PW, BROWSER))


async def test_the_offices_login_cannot_act_for_an_operator(live: Live) -> None:
    portal = await live.system("portal")
    await refused("forbidden", portal.proxy_login("root", PW, BROWSER, kind="admin"))
    await refused("not_in_table", portal.call("session.proxy_otp", {"handle": b"\0" * 16, "code": "123456"}))
    console = await live.system("console")
    info = await console.proxy_login("root", PW, BROWSER, kind="admin")
    await refused("forbidden", portal.call("sys.whoami", as_sid=info.sid, as_ip=BROWSER))
    await refused("forbidden", portal.call("operators.list", as_sid=info.sid, as_ip=BROWSER))
    # a handle the console started cannot be finished by the office either
    cnonce = secrets.token_bytes(16)
    started = await console.call("session.proxy_login", {"login": "root", "cnonce": cnonce, "ip": BROWSER,
                                                         "kind": "admin"})
    keys = scram.client_keys(PW, started["salt"], started["iter"])
    am = scram.auth_message("admin", "root", cnonce, started["nonce"], started["salt"], started["iter"])
    await refused("forbidden", portal.call("session.proxy_proof", {"handle": started["handle"],
                                                                   "proof": scram.client_proof(keys, am)}))
    # and a direct admin session cannot act for anyone
    root = await live.admin("root")
    await refused("forbidden", root.call("sys.whoami", as_sid=info.sid, as_ip=BROWSER))


# -- the second factor ------------------------------------------------------

async def test_enrolled_operator_needs_a_code_direct_and_proxied(live: Live) -> None:
    support = await live.admin("support")
    secret, recovery = await live.enroll(support)
    assert len(recovery) == 10 and len(set(recovery)) == 10
    listed = await (await live.admin("root")).call("operators.get",
                                                   {"operator_id": await live.operator_id("support")})
    assert listed["otp_enrolled"] is True

    await refused("otp_required", live.admin("support"))
    live.wall.next_step()
    code = totp(secret, live.wall.t)
    direct = await live.admin("support", otp=code)
    assert (await direct.call("sys.whoami"))["login"] == "support"
    await refused("auth_failed", live.admin("support", otp=code))          # the same code again: replay

    live.wall.next_step()
    console = await live.system("console")
    cnonce = secrets.token_bytes(16)
    started = await console.call("session.proxy_login", {"login": "support", "cnonce": cnonce, "ip": BROWSER,
                                                         "kind": "admin"})
    keys = scram.client_keys(PW, started["salt"], started["iter"])
    am = scram.auth_message("admin", "support", cnonce, started["nonce"], started["salt"], started["iter"])
    proven = await console.call("session.proxy_proof", {"handle": started["handle"],
                                                        "proof": scram.client_proof(keys, am)})
    assert proven == {"sig": scram.server_signature(keys.server_key, am), "otp_required": True}
    await refused("auth_failed", console.call("session.proxy_otp", {"handle": started["handle"], "code": code}))
    opened = await console.call("session.proxy_otp", {"handle": started["handle"],
                                                      "code": totp(secret, live.wall.t)})
    assert set(opened) == {"sid", "timeout"}
    me = await console.call("sys.whoami", as_sid=opened["sid"], as_ip=BROWSER)
    assert (me["kind"], me["login"]) == ("admin", "support")
    # the handle is spent
    await refused("auth_failed", console.call("session.proxy_otp", {"handle": started["handle"], "code": "1"}))

    # a recovery code works once, in either form people type it
    recovered = await live.admin("support", otp=recovery[0].upper().replace("-", " "))
    assert (await recovered.call("sys.whoami"))["login"] == "support"
    await refused("auth_failed", live.admin("support", otp=recovery[0]))
    info = await console.proxy_login("support", PW, BROWSER, kind="admin", otp=recovery[1])
    assert info.kind == "admin"

    # disabling it takes a current code; then the password alone logs in again
    live.wall.next_step()
    await refused("operators.otp_code", direct.call("self.otp_disable", {"code": "000000"}))
    assert await direct.call("self.otp_disable", {"code": totp(secret, live.wall.t)}) is True
    assert (await (await live.admin("support")).call("sys.whoami"))["login"] == "support"


async def test_wrong_codes_count_as_failed_logins(strict: Live) -> None:
    live = strict
    support = await live.admin("support")
    secret, _ = await live.enroll(support)
    live.wall.next_step()
    console = await live.system("console")

    async def proven_handle(ip: str) -> bytes:
        cnonce = secrets.token_bytes(16)
        started = await console.call("session.proxy_login", {"login": "support", "cnonce": cnonce, "ip": ip,
                                                             "kind": "admin"})
        keys = scram.client_keys(PW, started["salt"], started["iter"])
        am = scram.auth_message("admin", "support", cnonce, started["nonce"], started["salt"], started["iter"])
        proof = scram.client_proof(keys, am)
        assert (await console.call("session.proxy_proof", {"handle": started["handle"], "proof": proof}))[
            "otp_required"]
        return bytes(started["handle"])

    handle = await proven_handle("198.51.100.20")
    for _ in range(3):   # three tries per handle, each a failed login
        await refused("auth_failed", console.call("session.proxy_otp", {"handle": handle, "code": "000000"}))
    # the handle is gone after its third wrong code, even for the right one
    await refused("auth_failed", console.call("session.proxy_otp", {"handle": handle,
                                                                    "code": totp(secret, live.wall.t)}))
    # and the login is now locked out, from any address, before any password is checked
    await refused("rate_limited", console.proxy_login("support", PW, "198.51.100.21", kind="admin"))
    await refused("rate_limited", live.admin("support", otp=totp(secret, live.wall.t)))


async def test_a_wrong_code_on_a_direct_login_is_refused_and_counted(strict: Live) -> None:
    live = strict
    tariffs = await live.admin("tariff_managers")
    secret, _ = await live.enroll(tariffs)
    live.wall.next_step()
    for _ in range(3):
        await refused("auth_failed", live.admin("tariff_managers", otp="123456"))
    await refused("rate_limited", live.admin("tariff_managers", otp=totp(secret, live.wall.t)))


async def test_the_code_goes_out_only_to_the_server_that_knows_the_password(live: Live) -> None:
    """A client asked for a code checks the server's signature first (a code is a login for 30 s)."""
    asked: list[str] = []

    def prompt() -> str:
        asked.append("code")
        return "000000"

    support = await live.admin("support")
    await live.enroll(support)
    live.wall.next_step()
    await refused("auth_failed", live.admin("support", otp=prompt))
    assert asked == ["code"]           # the genuine server: asked, and the wrong code refused
    asked.clear()
    await refused("auth_failed", live.admin("support", otp=prompt, password="not-the-password"))
    assert asked == []                 # a wrong password never reaches the code


# -- the calls ----------------------------------------------------------------

async def test_operator_lifecycle_is_audited_and_ends_sessions(live: Live) -> None:
    root = await live.admin("root")
    roles = {role["name"]: role for role in await root.call("operators.roles")}
    assert roles["support"]["rights"] == sorted(
        ["*.read", "blocks.write", "outbox.write", "radius.disconnect", "users.password", "sys.health"])
    assert {"superusers", "cashiers", "support", "tariff_managers", "accountants"} <= set(roles)

    anna = await root.call("operators.create", {"login": "anna", "password": "anna-password",
                                                "groups": ["cashiers"], "full_name": "Anna K"})
    assert (anna["login"], anna["groups"], anna["disabled"], anna["otp_enrolled"]) == (
        "anna", ["cashiers"], False, False)
    await refused("core.already_exists", root.call("operators.create", {"login": "anna", "password": "x" * 8,
                                                                        "groups": []}))
    await refused("operators.unknown_group", root.call("operators.create", {
        "login": "bob", "password": "bob-password", "groups": ["nope"]}))
    listed = await root.call("operators.list", {"limit": 2})
    assert [row["login"] for row in listed] == ["accountants", "anna"]

    # a group change ends the session: its call table is the old role's
    direct = await live.admin("anna", password="anna-password")
    console = await live.system("console")
    proxied = await console.proxy_login("anna", "anna-password", BROWSER, kind="admin")
    edited = await root.call("operators.edit", {"operator_id": anna["id"], "groups": ["support"]})
    assert edited["groups"] == ["support"]
    await eventually(lambda: direct.closed, what="anna's connection closed")
    assert direct.close_reason is not None and direct.close_reason.code == "logged_out"
    await refused("no_session", console.call("sys.whoami", as_sid=proxied.sid, as_ip=BROWSER))

    # a disabled operator's live session ends, and they cannot log in
    direct = await live.admin("anna", password="anna-password")
    proxied = await console.proxy_login("anna", "anna-password", BROWSER, kind="admin")
    assert (await root.call("operators.disable", {"operator_id": anna["id"]}))["disabled"] is True
    await eventually(lambda: direct.closed, what="the disabled operator's connection closed")
    await refused("no_session", console.call("sys.whoami", as_sid=proxied.sid, as_ip=BROWSER))
    await refused("auth_failed", live.admin("anna", password="anna-password"))
    await root.call("operators.enable", {"operator_id": anna["id"]})

    # a new password ends the sessions too, and the old one no longer works
    direct = await live.admin("anna", password="anna-password")
    assert await root.call("operators.set_password", {"operator_id": anna["id"], "password": "new-password"})
    await eventually(lambda: direct.closed, what="the session after a password change closed")
    await refused("auth_failed", live.admin("anna", password="anna-password"))
    anna_now = await live.admin("anna", password="new-password")
    await live.enroll(anna_now)
    assert await root.call("operators.reset_otp", {"operator_id": anna["id"]}) is True
    assert (await root.call("operators.get", {"operator_id": anna["id"]}))["otp_enrolled"] is False

    actions = [row["action"] for row in await root.call("audit.query", {"object": f"admin:{anna['id']}"})]
    assert actions == ["operators.reset_otp", "self.otp_confirm", "operators.set_password", "operators.enable",
                       "operators.disable", "operators.edit", "operators.create"]


async def test_no_one_removes_the_last_superuser_or_disables_themselves(live: Live) -> None:
    root = await live.admin("root")
    root_id = await live.operator_id("root")
    await refused("operators.self", root.call("operators.disable", {"operator_id": root_id}))
    async with live.pool.acquire() as conn:
        await conn.execute("INSERT INTO admin_groups(name, rights) VALUES ('operator_admins', '{operators.*}')")
        await create_admin(conn, "keeper", PW, ["operator_admins"])
    keeper = await live.admin("keeper")
    await refused("operators.last_superuser", keeper.call("operators.disable", {"operator_id": root_id}))
    await refused("operators.last_superuser", keeper.call("operators.edit", {"operator_id": root_id,
                                                                             "groups": ["cashiers"]}))
    second = await keeper.call("operators.create", {"login": "root2", "password": PW, "groups": ["superusers"]})
    assert (await keeper.call("operators.disable", {"operator_id": root_id}))["disabled"] is True
    await refused("operators.last_superuser", keeper.call("operators.disable", {"operator_id": second["id"]}))


async def test_enrolment_rules(live: Live) -> None:
    cashier = await live.admin("cashiers")
    await refused("operators.otp_state", cashier.call("self.otp_confirm", {"code": "123456"}))
    await refused("operators.otp_state", cashier.call("self.otp_disable", {"code": "123456"}))
    begun = await cashier.call("self.otp_begin")
    assert begun["uri"].startswith("otpauth://totp/billcore:cashiers?secret=" + begun["secret"])
    await refused("operators.otp_code", cashier.call("self.otp_confirm", {"code": "000000"}))
    await cashier.call("self.otp_confirm", {"code": totp(parse_b32(begun["secret"]), live.wall.t)})
    await refused("operators.otp_state", cashier.call("self.otp_begin"))   # enrolled: disable first


async def test_wrong_enrolment_codes_are_limited(live: Live) -> None:
    cashier = await live.admin("cashiers")
    await cashier.call("self.otp_begin")
    for _ in range(5):
        await refused("operators.otp_code", cashier.call("self.otp_confirm", {"code": "000000"}))
    await refused("rate_limited", cashier.call("self.otp_confirm", {"code": "000000"}))


# -- the roles, for every client -------------------------------------------

# What each role may call, spelled out right by right (not derived from its patterns).
ROLE_RIGHTS = {
    "cashiers": {"payments.add", "payments.cancel", "payments.read", "payments.promised", "payments.lookup", "users.read",
                 "accounts.read"},
    "support": {"users.read", "accounts.read", "blocks.read", "audit.read", "payments.read", "tariffs.read",
                "reports.read", "radius.read", "netflow.read", "plugins.read", "operators.read", "tokens.read",
                "sys.health", "blocks.write", "radius.disconnect", "users.password", "notify.read", "webhooks.read",
                "outbox.read", "outbox.write", "fup.read", "dunning.read", "invoices.read"},
    "tariff_managers": {"tariffs.read", "tariffs.write", "reports.read", "users.read", "accounts.read"},
    "accountants": {"invoices.read", "invoices.write", "reports.read", "payments.read", "users.read", "accounts.read",
                    "tariffs.read"},
}


def expected_calls(registry: CallRegistry, role: str) -> set[str]:
    rights = ROLE_RIGHTS[role] | {"self.otp"}
    return {symbol.spec.name for symbol in registry.symbols()
            if "admin" in symbol.spec.kinds and (symbol.spec.right is None or symbol.spec.right in rights)}


@pytest.mark.parametrize("role", sorted(ROLE_RIGHTS))
async def test_each_roles_call_table_is_exactly_its_rights(live: Live, role: str) -> None:
    operator = await live.admin(role)
    table = {entry["name"] for entry in await operator.call("sys.calls")}
    assert table == expected_calls(live.registry, role)


async def test_roles_are_enforced(live: Live) -> None:
    root = await live.admin("root")
    user = await root.call("users.create", {"login": "sub1", "password": "sub1-password"})
    account = user["basic_account_id"]
    cashier = await live.admin("cashiers")
    support = await live.admin("support")
    tariffs = await live.admin("tariff_managers")
    payment = {"account_id": account, "amount": 10_000_000, "method": "cash"}

    await cashier.call("payments.add", payment)
    await refused("not_in_table", cashier.call("tariffs.list"))
    await refused("not_in_table", cashier.call("tariffs.add", {"name": "x", "service_ids": []}))
    await refused("not_in_table", cashier.call("operators.list"))

    await refused("not_in_table", support.call("payments.add", payment))
    assert await support.call("users.set_password", {"user_id": user["id"], "password": "reset-password"})
    await refused("not_in_table", support.call("users.create", {"login": "sub2", "password": "sub2-password"}))
    await support.call("blocks.set", {"account_id": account, "reason": "test"})
    await support.call("blocks.lift", {"account_id": account})
    assert (await support.call("accounts.get", {"account_id": account}))["balance"] == 10_000_000

    await refused("not_in_table", tariffs.call("payments.add", payment))
    await refused("not_in_table", tariffs.call("blocks.set", {"account_id": account}))
    assert await tariffs.call("services.list") == []


async def test_console_service_login_is_provisioned(pool: asyncpg.Pool, tmp_path: Any) -> None:
    from billcore.server.principals import ensure_service_login

    async with pool.acquire() as conn:
        await ensure_service_login(conn, tmp_path, "console")
        rights = await conn.fetchval("SELECT rights FROM system_logins WHERE login = 'console'")
    assert {"events.subscribe", "session.proxy_admin"} <= set(rights) and "session.proxy" not in rights


def test_roles_hold_in_the_real_core_for_billctl(tmp_path: Path, db_dsn: str) -> None:
    """``billcore serve`` (plugins' admin calls included) and billctl: what each role's session
    may call is its rights, whatever the client."""
    with BillcoreProcess(tmp_path, dsn=db_dsn, periodic={"enabled": False}) as bc:
        bc.child_pid("core")
        env = dict(os.environ, BILLCTL_PASSWORD=PW, PW=PW)
        env.pop("BILLCORE_CONFIG", None)
        for role in ("cashiers", "support", "tariff_managers", "accountants"):
            subprocess.run([sys.executable, "-m", "billcore.cli", "-c", str(bc.config_path), "admin", "create", role,
                            "--group", role, "--password-env", "PW"], env=env, check=True, capture_output=True)

        def billctl(login: str, *args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "billcore.clients.billctl", "--port", str(bc.urfa_port),
                                   "--login", login, *args], env=env, capture_output=True, text=True, timeout=60)

        def table(login: str) -> set[str]:
            listed = billctl(login, "--json", "calls")
            assert listed.returncode == 0, listed.stderr
            return {row["name"] for row in json.loads(listed.stdout)}

        for fn in ("tariffs.list", "tariffs.add", "plugins.list", "plugins.load", "operators.list"):
            refused_call = billctl("cashiers", "call", fn)
            assert refused_call.returncode == REFUSED and "not_in_table" in refused_call.stderr, (fn, refused_call)
        cashier, support, tariffs = table("cashiers"), table("support"), table("tariff_managers")
        assert {"payments.add", "payments.cancel", "users.search", "accounts.get", "self.otp_begin"} <= cashier
        assert not any(name.split(".")[0] in ("tariffs", "plugins", "blocks", "operators") for name in cashier)
        assert {"plugins.list", "operators.list", "audit.query", "radius.sessions", "users.set_password",
                "blocks.set", "radius.disconnect"} <= support
        assert not {"payments.add", "plugins.load", "users.create", "tariffs.add", "operators.create"} & support
        assert {"tariffs.add", "services.add", "classes.add", "timeranges.add", "reports.traffic"} <= tariffs
        assert not {"payments.add", "payments.cancel", "blocks.set", "plugins.list"} & tariffs
        assert "not_in_table" in billctl("support", "pay", "1", "10.00").stderr
        assert "not_in_table" in billctl("tariff_managers", "pay", "1", "10.00").stderr


async def test_a_person_typing_the_code_gets_more_than_the_handshake_time(pool: asyncpg.Pool) -> None:
    live = await Live(pool, URFAConfig(handshake_timeout=0.3, otp_timeout=30.0, mock_iterations=4096)).start()
    try:
        support = await live.admin("support")
        secret, _ = await live.enroll(support)
        live.wall.next_step()

        async def slow_person() -> str:
            await asyncio.sleep(0.6)   # twice the handshake time: the code's own time covers it
            return totp(secret, live.wall.t)

        late = await live.admin("support", otp=slow_person)
        assert (await late.call("sys.whoami"))["login"] == "support"
    finally:
        await live.stop()


async def test_a_code_that_never_comes_ends_the_connection(pool: asyncpg.Pool) -> None:
    live = await Live(pool, URFAConfig(handshake_timeout=0.3, otp_timeout=0.5, mock_iterations=4096)).start()
    try:
        support = await live.admin("support")
        await live.enroll(support)
        reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
        machine = Connection(Role.CLIENT, 0.0)

        async def received() -> object:
            while (event := machine.next_event()) is None:
                machine.receive_data(await reader.read(65536))
            return event

        def send(message: Any) -> None:
            machine.send(message)
            writer.write(machine.data_to_send())

        hello = await received()
        assert isinstance(hello, Hello)
        cnonce = secrets.token_bytes(16)
        send(Login("admin", "support", cnonce))
        challenge = await received()
        assert isinstance(challenge, Challenge)
        keys = scram.client_keys(PW, challenge.salt, challenge.iterations)
        am = scram.auth_message("admin", "support", cnonce, hello.nonce, challenge.salt, challenge.iterations)
        send(Proof(scram.client_proof(keys, am)))
        assert await received() == Otp(scram.server_signature(keys.server_key, am))
        bye = await asyncio.wait_for(received(), 10.0)    # no code: the server gives up after 0.3 + 0.5 s
        assert isinstance(bye, Bye) and bye.code == "timeout"
        writer.close()
    finally:
        await live.stop()


def converse(argv: list[str], env: dict[str, str], answer: Any, timeout: float = 60.0) -> tuple[int, str]:
    """Run ``argv`` on a pseudo-terminal (what a person at a shell gives billctl); ``answer(output so
    far)`` returns the next line to type, or None.  The exit code and everything it wrote."""
    import pty
    import select
    import time

    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
    os.close(slave)
    output = ""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 4096)
            except OSError:   # EIO: the program ended and closed its side
                break
            if not data:
                break
            output += data.decode(errors="replace")
            line = answer(output)
            if line is not None:
                os.write(master, (line + "\n").encode())
        else:
            proc.kill()
            raise AssertionError(f"{argv} did not finish: {output}")
        return proc.wait(timeout=10), output
    finally:
        os.close(master)


async def test_billctl_enrolls_and_asks_for_the_code_on_a_terminal(live: Live) -> None:
    env = dict(os.environ, BILLCTL_PASSWORD=PW)
    env.pop("BILLCTL_OTP", None)
    billctl = [sys.executable, "-m", "billcore.clients.billctl", "--port", str(live.port), "--login", "support"]
    secret: list[bytes] = []

    def enrolment(output: str) -> str | None:
        if "the code your app shows now" in output and not secret:
            secret.append(parse_b32(output.split("secret: ", 1)[1].split()[0]))
            return totp(secret[0], live.wall.t)
        return None

    code, output = await asyncio.to_thread(converse, [*billctl, "otp", "enroll"], env, enrolment)
    assert code == 0, output
    assert "otpauth://totp/billcore:support?secret=" in output and output.count("-") >= 30   # ten recovery codes
    live.wall.next_step()
    typed: list[str] = []

    def login(output: str) -> str | None:
        if "one-time code:" in output and not typed:
            typed.append(totp(secret[0], live.wall.t))
            return typed[0]
        return None

    code, output = await asyncio.to_thread(converse, [*billctl, "--json", "call", "sys.whoami"], env, login)
    assert code == 0 and typed and '"login": "support"' in output, output
    # no terminal and no --otp: refused at once, with the reason
    done = await asyncio.create_subprocess_exec(*billctl, "call", "sys.whoami", env=env,
                                                stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, stderr = await done.communicate()
    assert done.returncode == LOGIN_REFUSED and b"otp_required" in stderr
