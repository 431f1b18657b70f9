"""The pieces the office and tray tests share, and the office's pure parts.

``LiveCore`` is the real core's call layer on a real socket and a real
PostgreSQL, in this process: the core's built-in calls, the tariff and
report calls, and the office's extra subscriber calls, served by
``URFAService`` with the database auth backend — so a test can restart it
(sessions gone, like a core restart) and drive its clock (idle timeout).
``LiveOffice`` runs the web office against it, in-process too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from billcore.api import portal_calls, reports, tariffs
from billcore.billing.rating import TrafficUsage
from billcore.billing.usage import commit_usage
from billcore.server.calls import CallRegistry, CallSpec
from billcore.common.config import Config, CoreSection
from billcore.server.context import CoreContext
from billcore.server.core import build_calls
from billcore.server.principals import SERVICE_RIGHTS, DatabaseAuth, create_admin, create_system_login
from billcore.server.service import URFAConfig, URFAService
from billcore.common.config import PortalSection
from portal.app import serve
from portal.i18n import CATALOGS, translator
from webedge import chart, render
from webedge.core_link import CoreLink
from webedge.guard import LoginLimiter, csrf_ok, csrf_token
from webedge.i18n import pick_language
from webedge.settings import read_or_make_secret
from tests.conftest import free_port
from urfa import client as uc

UNIT = 1_000_000
PORTAL_PASSWORD = "portal-system-password"
ADMIN_PASSWORD = "root-password"


class Clock:
    """The URFA service's monotonic clock, real time plus a shift tests add to."""

    def __init__(self) -> None:
        self.shift = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.shift


def all_calls(core: CoreContext) -> list[CallSpec]:
    """Every call module the office uses, once each (the integrator may already
    register the tariff/report/portal modules in ``build_calls``)."""
    specs: dict[str, CallSpec] = {}
    for spec in [*build_calls(core), *tariffs.calls(core), *reports.calls(core), *portal_calls.calls(core)]:
        specs.setdefault(spec.name, spec)
    specs["me.tariff"] = dataclasses.replace(specs["me.tariff"], handler=_ints(specs["me.tariff"].handler))
    return list(specs.values())


def _ints(handler: Any) -> Any:
    """Work around reports.py's me.tariff answering ``prepaid_left`` as a
    Decimal (PostgreSQL's sum(bigint) is numeric), which msgpack cannot
    encode; a no-op once that call casts to bigint."""
    def plain(v: Any) -> Any:
        if isinstance(v, Decimal):
            assert v == int(v)
            return int(v)
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list):
            return [plain(x) for x in v]
        return v

    async def wrapped(ctx: Any, **args: Any) -> Any:
        return plain(await handler(ctx, **args))
    return wrapped


class LiveCore:
    def __init__(self, pool: asyncpg.Pool, workdir: Path, session_timeout: float = 1800.0) -> None:
        self.pool = pool
        self.port = free_port()
        self.clock = Clock()
        self.session_timeout = session_timeout
        config = dataclasses.replace(Config(), core=CoreSection(data_dir=str(workdir / "var")))
        self.core = CoreContext(pool=pool, config=config)
        (workdir / "var").mkdir(exist_ok=True)
        self.password_file = workdir / "portal.password"
        self.password_file.write_text(PORTAL_PASSWORD + "\n")
        self.service: URFAService | None = None

    async def start(self) -> LiveCore:
        registry = CallRegistry()
        self.service = URFAService(
            registry, DatabaseAuth(self.pool),
            URFAConfig(session_timeout=self.session_timeout, login_failures=50, sweep_interval=0.2),
            clock=self.clock)
        self.core.publish = self.service.publish
        registry.register_all(all_calls(self.core))
        await self.service.start(tcp=("127.0.0.1", self.port))
        return self

    async def stop(self) -> None:
        if self.service is not None:
            await self.service.stop()
            self.service = None

    async def restart(self) -> None:
        """Like a core restart: every session (the office's and subscribers') is gone."""
        await self.stop()
        await self.start()

    async def provision(self) -> None:
        async with self.pool.acquire() as conn:
            await create_admin(conn, "root", ADMIN_PASSWORD, ["superusers"])
            await create_system_login(conn, "portal", PORTAL_PASSWORD, SERVICE_RIGHTS["portal"])

    async def admin(self) -> uc.Client:
        client = await uc.connect("127.0.0.1", self.port)
        await client.login("admin", "root", ADMIN_PASSWORD)
        return client

    def link(self) -> CoreLink:
        return CoreLink.for_endpoint(host="127.0.0.1", port=self.port, unix=None, login="portal",
                                     password=lambda: self.password_file.read_text().strip(), timeout=3.0)


async def seed_subscriber(admin: uc.Client, login: str, password: str, *, balance: int = 0,
                          credit: int = 0) -> int:
    """A subscriber with money on the basic account, through admin calls; the account id."""
    user = await admin.call("users.create", {"login": login, "password": password, "full_name": login.title()})
    acc = int(user["basic_account_id"])
    if credit:
        await admin.call("accounts.set_credit", {"account_id": acc, "credit": credit})
    if balance:
        await admin.call("payments.add", {"account_id": acc, "amount": balance, "method": "bank",
                                          "external_id": f"seed-{login}"})
    return acc


async def seed_tariff(admin: uc.Client, pool: asyncpg.Pool, account_id: int, prepaid: int) -> dict[str, int]:
    """Two traffic classes priced by one service with a prepaid volume on one
    of them, the tariff made through admin calls and linked since 40 days ago
    (so that usage of past days is rated)."""
    from billcore.billing.tariffs import link_tariff

    local = (await admin.call("classes.add", {"name": "Local", "position": 1}))["id"]
    world = (await admin.call("classes.add", {"name": "Internet", "position": 2}))["id"]
    service = (await admin.call("services.add", {"name": "Traffic", "kind": "traffic"}))["id"]
    await admin.call("services.set_rate", {"service_id": service, "class_id": world, "unit_size": 1 << 20,
                                           "tiers": [[0, 10_000]], "prepaid": prepaid})
    await admin.call("services.set_rate", {"service_id": service, "class_id": local, "unit_size": 1 << 20,
                                           "tiers": [[0, 0]]})
    tariff = (await admin.call("tariffs.add", {"name": "Home 100", "service_ids": [service]}))["id"]
    async with pool.acquire() as conn:
        await link_tariff(conn, account_id, tariff, now=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=40),
                          tz=dt.timezone.utc, actor="test")
    return {"local": local, "world": world, "service": service, "tariff": tariff}


async def seed_usage(pool: asyncpg.Pool, account_id: int, classes: dict[str, int], *,
                     world_now: int) -> int:
    """Five past days of traffic in both classes, plus ``world_now`` bytes of
    the prepaid class a minute ago; the prepaid class's bytes in this
    (monthly, UTC) period."""
    now = dt.datetime.now(dt.timezone.utc)
    usage = [TrafficUsage(account_id, classes["world"], now - dt.timedelta(minutes=1), world_now)]
    for d in range(1, 6):
        at = (now - dt.timedelta(days=d)).replace(minute=0, second=0, microsecond=0)
        usage.append(TrafficUsage(account_id, classes["world"], at, (d * 40) << 20))
        usage.append(TrafficUsage(account_id, classes["local"], at, (d * 25) << 20))
    async with pool.acquire() as conn:
        result = await commit_usage(conn, "test-netflow", 1, usage, now)
    assert not result.rejected, result.rejected
    month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return sum(u.bytes for u in usage if u.klass == classes["world"] and u.at >= month)


class LiveOffice:
    """The web office in this process, on a free port, plain HTTP."""

    def __init__(self, link: CoreLink, workdir: Path, **section: Any) -> None:
        self.port = free_port()
        self.section = dataclasses.replace(PortalSection(), enabled=True, port=self.port, cookie_secure=False,
                                           **section)
        self.link = link
        self.key = read_or_make_secret(workdir / "portal.secret")
        self.url = f"http://127.0.0.1:{self.port}"
        self.runner: Any = None

    async def __aenter__(self) -> LiveOffice:
        self.runner = await serve(self.section, self.link, self.key)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()
        await self.link.close()


# -- the office's pure parts ----------------------------------------------------

def test_money_is_the_one_format_grouped() -> None:
    # the same digits billctl and the tray show (billcore.common.money.format_money), never
    # rounded: a subscriber who owes 1.999999 does not read 1.99
    assert render.money(12_500_000) == "12.50"
    assert render.money(12_345_678) == "12.345678"
    assert render.money(-1_999_999) == "-1.999999"
    assert render.money(0) == "0.00"
    assert render.money(1_234_567 * UNIT) == "1\u202f234\u202f567.00"
    assert render.money(10**24) == "1\u202f000\u202f000\u202f000\u202f000\u202f000\u202f000.00"  # past MAX_AMOUNT


def test_bytes_and_durations() -> None:
    assert render.human_bytes(512) == "512 B"
    assert render.human_bytes(1536) == "1.5 KiB"
    assert render.human_bytes(724 << 20) == "724.0 MiB"
    assert render.duration(3723) == "1:02:03"


def test_chart_stacks_classes_per_day_and_escapes_names() -> None:
    traffic = {"first": "2024-07-01", "last": "2024-07-03", "rows": [
        {"day": "2024-07-01", "class_id": 1, "class": "<Local>", "bytes": 100, "amount": 0},
        {"day": "2024-07-01", "class_id": 2, "class": "World", "bytes": 300, "amount": 5},
        {"day": "2024-07-03", "class_id": 2, "class": "World", "bytes": 200, "amount": 3}]}
    svg = chart.traffic_chart(traffic, "Traffic")
    assert svg.count('<rect x=') == 3 + 2     # three bars, two legend swatches
    assert "&lt;Local&gt;" in svg and "<Local>" not in svg
    table = chart.traffic_table(traffic)
    assert list(table["days"]) == ["2024-07-01", "2024-07-03"]
    assert table["totals"] == {1: (100, 0), 2: (500, 8)} and table["total_amount"] == 8


def test_csrf_token_is_bound_to_the_session_and_purpose() -> None:
    key = b"k" * 32
    token = csrf_token(key, b"sid-one")
    assert csrf_ok(key, b"sid-one", token)
    assert not csrf_ok(key, b"sid-two", token)
    assert not csrf_ok(key, b"sid-one", token, "login")
    assert not csrf_ok(key, None, token)
    assert not csrf_ok(key, b"sid-one", None)
    assert not csrf_ok(b"x" * 32, b"sid-one", token)


def test_login_limiter_counts_failures_per_address_in_a_window() -> None:
    limiter = LoginLimiter(3, window=60.0, max_addresses=2)
    for t in (0.0, 1.0, 2.0):
        assert not limiter.blocked("192.0.2.1", t)
        limiter.failed("192.0.2.1", t)
    assert limiter.blocked("192.0.2.1", 3.0)
    assert not limiter.blocked("192.0.2.2", 3.0)
    assert not limiter.blocked("192.0.2.1", 61.0)       # the first failure left the window
    limiter.failed("192.0.2.2", 70.0)
    limiter.failed("192.0.2.3", 71.0)                   # the table holds two addresses at most
    assert len(limiter._seen) <= 2
    limiter.succeeded("192.0.2.3")
    assert not limiter.blocked("192.0.2.3", 72.0)


def test_language_from_cookie_then_browser_then_default() -> None:
    assert pick_language("ru-RU,ru;q=0.9,en;q=0.8", None) == "ru"
    assert pick_language("de-DE,en;q=0.5,ru;q=0.7", None) == "ru"
    assert pick_language("de-DE", None, "en") == "en"
    assert pick_language("ru", "en") == "en"
    assert pick_language("ru;q=bogus,en", None) == "en"
    assert translator("ru")("nav.logout") == "Выйти"
    assert translator("xx")("nav.logout") == "Log out"
    assert translator("en")("traffic.days", days=7) == "Last 7 days"


def test_catalogues_have_the_same_keys() -> None:
    assert set(CATALOGS["en"]) == set(CATALOGS["ru"])


def test_secret_file_is_made_once_and_private(tmp_path: Path) -> None:
    path = tmp_path / "system" / "portal.secret"
    key = read_or_make_secret(path)
    assert len(key) == 32 and read_or_make_secret(path) == key
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.fixture
async def live_core(db_dsn: str, tmp_path: Path) -> Any:
    pool = await asyncpg.create_pool(db_dsn, min_size=1, max_size=8)
    core = LiveCore(pool, tmp_path)
    await core.provision()
    await core.start()
    try:
        yield core
    finally:
        await core.stop()
        await pool.close()


async def test_core_link_reconnects_after_a_core_restart(live_core: LiveCore) -> None:
    admin = await live_core.admin()
    await seed_subscriber(admin, "alice", "alice-password", balance=7 * UNIT)
    await admin.close()
    link = live_core.link()
    info = await link.proxy_login("alice", "alice-password", "192.0.2.10")
    accounts = await link.call(info.sid, "192.0.2.10", "me.accounts")
    assert accounts[0]["balance"] == 7 * UNIT
    from webedge.core_link import BadLogin, CoreDown, SessionGone
    with pytest.raises(SessionGone):        # the SID is bound to the address it logged in from
        await link.call(info.sid, "192.0.2.11", "me.accounts")
    with pytest.raises(BadLogin):
        await link.proxy_login("alice", "wrong-password", "192.0.2.10")
    await live_core.stop()
    with pytest.raises(CoreDown):
        await link.call(info.sid, "192.0.2.10", "me.accounts")
    await live_core.start()
    with pytest.raises(SessionGone):        # subscriber sessions died with the core
        await link.call(info.sid, "192.0.2.10", "me.accounts")
    again = await link.proxy_login("alice", "alice-password", "192.0.2.10")
    assert (await link.call(again.sid, "192.0.2.10", "me.accounts"))[0]["balance"] == 7 * UNIT
    assert link.reconnects >= 1
    await link.close()


async def test_portal_role_entry_point_serves_and_stops(live_core: LiveCore, tmp_path: Path) -> None:
    """``portal.app:run(config, dsn, index, stop)`` as the supervisor calls it:
    its section, the core's address and the password file come from the config."""
    import types

    import aiohttp

    from portal.app import run
    from webedge.settings import EdgeSettings

    data_dir = tmp_path / "data"
    (data_dir / "system").mkdir(parents=True)
    (data_dir / "system" / "portal.password").write_text(PORTAL_PASSWORD + "\n")
    port = free_port()
    config = types.SimpleNamespace(
        portal=dataclasses.replace(PortalSection(), enabled=True, port=port, cookie_secure=False),
        data_dir=data_dir, urfa_socket=None, urfa=types.SimpleNamespace(host="0.0.0.0", port=live_core.port))
    settings = EdgeSettings.of(config, "portal", config.portal)
    assert (settings.core_host, settings.core_port) == ("127.0.0.1", live_core.port)
    assert settings.secret_file == data_dir / "system" / "portal.secret"

    admin = await live_core.admin()
    await seed_subscriber(admin, "erin", "erin-password", balance=2 * UNIT)
    await admin.close()
    stop = asyncio.Event()
    task = asyncio.create_task(run(config, "", 0, stop))
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        for _ in range(100):
            try:
                async with http.get(url + "/healthz") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)
        async with http.get(url + "/login") as r:
            import re
            token = re.search(r'name="csrf" value="([0-9a-f]{64})"', await r.text()).group(1)  # type: ignore[union-attr]
        async with http.post(url + "/login", data={"csrf": token, "login": "erin", "password": "erin-password"}) as r:
            assert r.status == 200 and 'id="balance">2.00<' in await r.text()
    assert (data_dir / "system" / "portal.secret").stat().st_mode & 0o777 == 0o600
    stop.set()
    await asyncio.wait_for(task, 10)
