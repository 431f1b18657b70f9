"""The console against a real core, for page tests: ``console_world`` and ``ConsoleBrowser``.

``ConsoleCore`` is the portal harness's ``LiveCore`` (the real call layer on
a real socket and a real PostgreSQL, in this process) with the console's
system login provisioned; ``LiveConsole`` runs the console in-process on a
free port (plain HTTP on loopback, so its cookies are not ``Secure``).

``ConsoleBrowser`` is a browser in Python: it logs in through the console's
real login (``/login`` → ``/login/start`` → ``/login/proof`` → ``/login/otp``),
computing the SCRAM proof itself as the page's script does, so the console
sees no password; then ``get``/``post`` pages (``post`` adds the CSRF token
of the page it last read, or of the dashboard).

In a page test::

    async def test_my_page(console_world: ConsoleWorld) -> None:
        browser = await console_world.operator("carol", groups=["cashiers"])
        page = await browser.get("/subscribers?q=ali")
        assert page.status == 200 and "alice" in page.text
        answer = await browser.post("/subscribers/1/payment", {"amount": "10.00"})
        assert answer.status == 303

``console_world.root`` is a direct admin URFA client (superusers) for seeding;
``console_world.group(name, rights)`` makes an admin group by hand.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import re
import secrets
import shutil
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import asyncpg
import pytest

from billcore.common.config import ConsoleSection
from billcore.server.principals import SERVICE_RIGHTS, create_admin, create_system_login
from console.app import build_app, console_link
from console.live import LiveHub
from console.pages import PAGES
from tests.conftest import free_port, need_peer
from tests.test_portal_e2e import CHROMIUM, CHROMIUM_ARGS, DESKTOP
from tests.test_portal_harness import LiveCore
from urfa import client as uc
from urfa import scram
from webedge import http
from webedge.settings import EdgeSettings, read_or_make_secret

CONSOLE_PASSWORD = "console-system-password"
_CSRF = re.compile(r'name="csrf" value="([0-9a-f]{64})"')


# Until the auth branch (proxied admin logins, TOTP) is merged, the core's
# session.proxy_login knows only subscribers: the harness stands in for it with
# the same call taking ``kind``, and lets the console call as proxied sessions
# with the portal's right.  Gone with the merge (billcore.common.totp comes with it).
AUTH_MERGED = importlib.util.find_spec("billcore.common.totp") is not None


class ConsoleCore(LiveCore):
    """``LiveCore`` with the console's system login."""

    async def provision(self) -> None:
        await super().provision()
        rights = set(SERVICE_RIGHTS["console"]) | (set() if AUTH_MERGED else {"session.proxy"})
        async with self.pool.acquire() as conn:
            await create_system_login(conn, "console", CONSOLE_PASSWORD, frozenset(rights))
        (self.password_file.parent / "console.password").write_text(CONSOLE_PASSWORD + "\n")

    async def start(self) -> ConsoleCore:
        await super().start()
        if not AUTH_MERGED:
            _stand_in_for_admin_proxy_login(self)
        return self


def _stand_in_for_admin_proxy_login(core: ConsoleCore) -> None:
    from billcore.server.call_context import CallContext
    from billcore.server.calls import CallSpec, Symbol
    from billcore.server.dispatcher import PROXY_RIGHT

    service = core.service
    assert service is not None
    desk = service.desk

    async def proxy_login(ctx: CallContext, login: str, cnonce: bytes, ip: str, kind: str = "user") -> Any:
        snonce = secrets.token_bytes(scram.NONCE_BYTES)
        pending = await desk.begin_login(kind, login, cnonce, snonce, ip, desk.clock())
        handle = desk.add_proxy_login(pending)
        return {"handle": handle, "nonce": snonce, "salt": pending.verifier.salt, "iter": pending.verifier.iterations}

    spec = CallSpec("session.proxy_login", proxy_login, right=PROXY_RIGHT, kinds=frozenset({"system"}),
                    args={"login": "str", "cnonce": "bytes", "ip": "ip", "kind": "str?"}, result="map",
                    module="builtin", bound="fixed")
    service.registry._symbols["session.proxy_login"] = Symbol(spec)


@dataclass
class Page:
    status: int
    text: str
    url: str
    headers: Any

    @property
    def csrf(self) -> str:
        found = _CSRF.search(self.text)
        assert found, f"no CSRF token on {self.url}"
        return found.group(1)


class LoginRefused(Exception):
    def __init__(self, status: int, answer: dict[str, Any]) -> None:
        super().__init__(f"{status}: {answer}")
        self.status = status
        self.answer = answer


class ConsoleBrowser:
    """One browser (its own cookie jar) on the console."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.last_csrf = ""

    async def close(self) -> None:
        await self.http.close()

    async def get(self, path: str, **kwargs: Any) -> Page:
        async with self.http.get(self.url + path, **kwargs) as response:
            page = Page(response.status, await response.text(), str(response.url), response.headers)
        found = _CSRF.search(page.text)
        if found:
            self.last_csrf = found.group(1)
        return page

    async def post(self, path: str, data: dict[str, Any] | None = None, *, csrf: str | None = None,
                   follow: bool = False) -> Page:
        """POST a form with the CSRF token of the last page read (``csrf=""`` sends none)."""
        fields = dict(data or {})
        token = self.last_csrf if csrf is None else csrf
        if token:
            fields.setdefault("csrf", token)
        async with self.http.post(self.url + path, data=fields, allow_redirects=follow) as response:
            return Page(response.status, await response.text(), str(response.url), response.headers)

    async def _step(self, path: str, body: dict[str, Any], csrf: str) -> dict[str, Any]:
        async with self.http.post(self.url + path, json=body, headers={"X-CSRF-Token": csrf}) as response:
            answer: dict[str, Any] = await response.json(content_type=None)
            if response.status != 200:
                raise LoginRefused(response.status, answer)
            return answer

    async def login(self, login: str, password: str, otp: str | None = None) -> dict[str, Any]:
        """The page's script, in Python: SCRAM here, the console relays; checks the core's signature."""
        page = await self.get("/login")
        csrf = page.csrf
        cnonce = secrets.token_bytes(16)
        challenge = await self._step("/login/start", {"login": login, "cnonce": scram._b64(cnonce)}, csrf)
        salt, nonce = _unb64(challenge["salt"]), _unb64(challenge["nonce"])
        keys = scram.client_keys(password, salt, challenge["iter"])
        message = scram.auth_message("admin", login, cnonce, nonce, salt, challenge["iter"])
        answer = await self._step("/login/proof", {"proof": scram._b64(scram.client_proof(keys, message))}, csrf)
        assert _unb64(answer["sig"]) == scram.server_signature(keys.server_key, message), "not the core's signature"
        if answer.get("otp_required"):
            if otp is None:
                return answer
            answer = await self._step("/login/otp", {"code": otp}, csrf)
        await self.get("/")            # the dashboard: its CSRF token for the next post
        return answer

    async def otp(self, code: str) -> dict[str, Any]:
        """The second step after ``login`` answered ``otp_required``."""
        page_csrf = (await self.get("/login")).csrf
        return await self._step("/login/otp", {"code": code}, page_csrf)

    def cookie(self, name: str) -> Any:
        for cookie in self.http.cookie_jar:
            if cookie.key == name:
                return cookie
        return None


@contextlib.asynccontextmanager
async def chromium(**options: Any) -> AsyncIterator[Any]:
    """A Playwright browser context in Debian's Chromium (``options`` for ``new_context``); skips without it."""
    need_peer(shutil.which(CHROMIUM) is not None, f"{CHROMIUM} is not installed (apt-get install chromium)")
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield await browser.new_context(**{"viewport": DESKTOP, **options})
        finally:
            await browser.close()


async def submit_login(page: Any, url: str, login: str, password: str) -> None:
    """Type a login and password into the console's login page at ``url`` and send it (the page's script runs)."""
    await page.goto(url + "/login")
    await page.fill("#login", login)
    await page.fill("#password", password)
    await page.click("#login-submit")


def _unb64(text: str) -> bytes:
    import base64

    return base64.b64decode(text)


class LiveConsole:
    """The console in this process, on a free port, plain HTTP on loopback.

    ``pages`` replaces the page modules (a test's own), ``middlewares`` run
    before the console's (a test's request recorder)."""

    def __init__(self, core: ConsoleCore, workdir: Path, *, pages: Sequence[ModuleType] = PAGES,
                 middlewares: Sequence[Any] = (), **section: Any) -> None:
        self.port = free_port()
        self.section = dataclasses.replace(ConsoleSection(), **{"enabled": True, "port": self.port,
                                                                 "cookie_secure": False, **section})
        self.settings = EdgeSettings(section=self.section, core_host="127.0.0.1", core_port=core.port,
                                     core_unix=None, password_file=core.password_file.parent / "console.password",
                                     secret_file=workdir / "console.secret", login="console")
        self.live = LiveHub(keepalive=1.0)
        self.link = console_link(self.settings, self.live)
        self.pages = pages
        self.middlewares = middlewares
        self.url = f"{'https' if self.section.tls_cert else 'http'}://127.0.0.1:{self.port}"
        self.runner: Any = None

    async def __aenter__(self) -> LiveConsole:
        app = build_app(self.section, self.link, read_or_make_secret(self.settings.secret_file), self.live, self.pages)
        for middleware in reversed(self.middlewares):
            app.middlewares.insert(0, middleware)
        self.runner = await http.serve(app, host=self.section.host, port=self.port, tls_cert=self.section.tls_cert,
                                       tls_key=self.section.tls_key, logger_name="console.http")
        # up before the test runs: a teardown never meets the link half way through its first login
        await self.link.link.ready(15.0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()
        await self.link.close()


class ConsoleWorld:
    """A core, a console and a superuser client; ``operator`` makes an admin and logs a browser in."""

    def __init__(self, core: ConsoleCore, console: LiveConsole, root: uc.Client) -> None:
        self.core = core
        self.console = console
        self.root = root
        self.url = console.url
        self._browsers: list[ConsoleBrowser] = []

    async def group(self, name: str, rights: list[str], description: str = "") -> None:
        async with self.core.pool.acquire() as conn:
            await conn.execute("INSERT INTO admin_groups(name, rights, description) VALUES ($1, $2, $3)"
                               " ON CONFLICT (name) DO UPDATE SET rights = EXCLUDED.rights", name, rights, description)

    async def admin(self, login: str, password: str | None = None, groups: list[str] | None = None) -> str:
        """A new admin in ``groups`` (default superusers); their password."""
        password = password or f"{login}-password"
        async with self.core.pool.acquire() as conn:
            await create_admin(conn, login, password, groups if groups is not None else ["superusers"])
        return password

    def browser(self) -> ConsoleBrowser:
        browser = ConsoleBrowser(self.url)
        self._browsers.append(browser)
        return browser

    async def operator(self, login: str, groups: list[str] | None = None,
                       password: str | None = None) -> ConsoleBrowser:
        """A new admin in ``groups``, logged in through the console's real login."""
        password = await self.admin(login, password, groups)
        browser = self.browser()
        await browser.login(login, password)
        return browser

    async def close(self) -> None:
        for browser in self._browsers:
            await browser.close()


@contextlib.asynccontextmanager
async def console_world_of(db_dsn: str, workdir: Path, **console: Any) -> AsyncIterator[ConsoleWorld]:
    """A core, a console (``LiveConsole``'s options) and a superuser client, torn down after."""
    pool = await asyncpg.create_pool(db_dsn, min_size=1, max_size=8)
    core = ConsoleCore(pool, workdir)
    await core.provision()
    await core.start()
    root = await core.admin()
    try:
        async with LiveConsole(core, workdir, **console) as live_console:
            world = ConsoleWorld(core, live_console, root)
            try:
                yield world
            finally:
                await world.close()
    finally:
        await root.close()
        await core.stop()
        await pool.close()


@pytest.fixture
async def console_world(db_dsn: str, tmp_path: Path) -> AsyncIterator[ConsoleWorld]:
    async with console_world_of(db_dsn, tmp_path) as world:
        yield world
