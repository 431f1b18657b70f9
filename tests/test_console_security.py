"""The console's defences, each as a browser or an attacker would meet it: CSRF refused,
a strict CSP and no inline script or style on any page, 403 outside the call table,
the login limit, the cookies' flags, 503 when the core is down, bounded bodies, and
no password ever reaching the console (the browser computes the SCRAM proof).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from billcore.common.config import ConfigError, config_from_dict
from console.page import Page
from tests.conftest import need_peer
from tests.console_harness import (  # noqa: F401  (console_world is a fixture)
    ConsoleBrowser, ConsoleWorld, LoginRefused, chromium, console_world, console_world_of, submit_login,
)
from urfa import scram

_CSRF = re.compile(r'name="csrf" value="([0-9a-f]{64})"')


class InlineFinder(HTMLParser):
    """Everything a strict CSP would block: inline script, style elements and attributes, handlers."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = {name for name, _ in attrs}
        if tag == "script":
            if "src" not in names:
                self.found.append("<script> without src")
            self._in_script = True
        if tag == "style":
            self.found.append("<style>")
        if "style" in names:
            self.found.append(f"style= on <{tag}>")
        self.found += [f"{name}= on <{tag}>" for name in names if name.startswith("on")]
        self.found += [f"javascript: in <{tag}>" for _, value in attrs
                       if value and value.strip().lower().startswith("javascript:")]

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.found.append("script text")


def inline_parts(html: str) -> list[str]:
    finder = InlineFinder()
    finder.feed(html)
    return finder.found


def test_the_finder_finds_what_it_should() -> None:
    # the oracle is checked first: each kind of inline part is seen
    assert inline_parts('<script>alert(1)</script>') == ["<script> without src", "script text"]
    assert inline_parts('<p style="color:red" onclick="x()">') == ["style= on <p>", "onclick= on <p>"]
    assert inline_parts('<style>p{}</style><a href="javascript:x()">') == ["<style>", "javascript: in <a>"]
    assert inline_parts('<script src="/static/console.js" defer></script>') == []


async def test_every_page_has_the_csp_and_no_inline_script_or_style(console_world: ConsoleWorld) -> None:
    browser = await console_world.operator("olga")
    await console_world.admin("victor")
    pages = ["/", "/system/audit", "/system/health", "/system/plugins", "/operators", "/operators/new", "/me/otp",
             "/no/such/page"]
    anonymous = ConsoleBrowser(console_world.url)
    try:
        seen = [(path, await browser.get(path)) for path in pages]
        seen += [("/login", await anonymous.get("/login"))]
        seen += [("/ (anonymous)", await anonymous.get("/"))]
    finally:
        await anonymous.close()
    for path, page in seen:
        csp = page.headers.get("Content-Security-Policy", "")
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "style-src 'self'" in csp, (path, csp)
        assert "frame-ancestors 'none'" in csp and "base-uri 'none'" in csp and "form-action 'self'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp and "*" not in csp
        assert page.headers.get("Cache-Control") == "no-store", path
        assert page.headers.get("X-Frame-Options") == "DENY"
        assert inline_parts(page.text) == [], (path, inline_parts(page.text))
    assert any(path == "/no/such/page" and page.status == 404 for path, page in seen)


async def test_post_without_the_session_s_csrf_token_is_refused(console_world: ConsoleWorld) -> None:
    browser = await console_world.operator("paul")
    other = await console_world.operator("quinn")
    for token in ("", "0" * 64, other.last_csrf):
        answer = await browser.post("/logout", csrf=token)
        assert answer.status == 403 and "The form has expired" in answer.text, token
    assert (await browser.get("/")).status == 200           # still logged in
    # the login's steps too: without the pre-session cookie's token nothing reaches the core
    stranger = ConsoleBrowser(console_world.url)
    try:
        await stranger.get("/login")
        async with stranger.http.post(console_world.url + "/login/start", json={"login": "paul", "cnonce": "AAAA"},
                                      headers={"X-CSRF-Token": "f" * 64}) as response:
            assert response.status == 403
    finally:
        await stranger.close()


async def test_login_limit_per_browser_address(console_world: ConsoleWorld) -> None:
    await console_world.admin("rita", "rita-password")
    browser = console_world.browser()
    for _ in range(5):
        with pytest.raises(LoginRefused) as refused:
            await browser.login("rita", "wrong")
        assert refused.value.status == 401
    with pytest.raises(LoginRefused) as limited:
        await browser.login("rita", "rita-password")           # the right password, but over the limit
    assert limited.value.status == 429 and "Too many" in limited.value.answer["message"]


async def test_cookies_flags(db_dsn: str, tmp_path: Path) -> None:
    async with console_world_of(db_dsn, tmp_path, cookie_secure=True) as world:
        password = await world.admin("sam")
        browser = world.browser()
        async with browser.http.get(world.url + "/login") as response:
            pre = response.headers.getall("Set-Cookie")
            csrf = _CSRF.search(await response.text()).group(1)  # type: ignore[union-attr]
        assert any(c.startswith("console_pre=") and "HttpOnly" in c and "SameSite=Strict" in c and "Secure" in c
                   for c in pre), pre
        # over plain HTTP a browser would not send a Secure cookie back: this test does, by hand
        browser.http.cookie_jar.update_cookies({"console_pre": pre[0].split(";")[0].split("=", 1)[1]})
        cnonce = secrets.token_bytes(16)
        async with browser.http.post(world.url + "/login/start", headers={"X-CSRF-Token": csrf},
                                     json={"login": "sam", "cnonce": base64.b64encode(cnonce).decode()}) as response:
            challenge = await response.json()
        salt, nonce = base64.b64decode(challenge["salt"]), base64.b64decode(challenge["nonce"])
        keys = scram.client_keys(password, salt, challenge["iter"])
        message = scram.auth_message("admin", "sam", cnonce, nonce, salt, challenge["iter"])
        proof = base64.b64encode(scram.client_proof(keys, message)).decode()
        async with browser.http.post(world.url + "/login/proof", headers={"X-CSRF-Token": csrf},
                                     json={"proof": proof}) as response:
            assert response.status == 200, await response.text()
            sid = [c for c in response.headers.getall("Set-Cookie") if c.startswith("console_sid=")]
            assert response.headers.get("Strict-Transport-Security")
    assert len(sid) == 1 and "HttpOnly" in sid[0] and "SameSite=Strict" in sid[0] and "Secure" in sid[0], sid


async def test_core_down_is_503_and_back_again(console_world: ConsoleWorld) -> None:
    browser = await console_world.operator("tom")
    await console_world.core.stop()
    page = await browser.get("/system/audit")
    assert page.status == 503 and "not available" in page.text
    assert "Traceback" not in page.text
    await console_world.core.start()
    again = await browser.get("/system/audit")          # the core forgot the session: log in again
    assert "/login" in again.url and "session has ended" in again.text


async def test_huge_body_is_413(console_world: ConsoleWorld) -> None:
    browser = await console_world.operator("uma")
    answer = await browser.post("/logout", {"filler": "x" * 100_000})
    assert answer.status == 413


async def test_an_unexpected_error_is_a_plain_500(console_world: ConsoleWorld, monkeypatch: Any) -> None:
    browser = await console_world.operator("walt")
    from console.pages import system

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug with a secret detail")
    monkeypatch.setattr(system, "call", broken)
    page = await browser.get("/system/audit")
    assert page.status == 500 and "unexpected error" in page.text
    assert "secret detail" not in page.text and "Traceback" not in page.text


def test_config_refuses_a_network_address_without_tls() -> None:
    assert config_from_dict({"console": {"host": "127.0.0.1"}}).console.port == 8445
    assert config_from_dict({"console": {"host": "::1"}}).console.host == "::1"
    for host in ("0.0.0.0", "192.0.2.7", "console.example.net"):
        with pytest.raises(ConfigError, match="console.host"):
            config_from_dict({"console": {"host": host}})
    config = config_from_dict({"console": {"host": "0.0.0.0", "tls_cert": "/c.pem", "tls_key": "/k.pem"}})
    assert config.console.tls_cert == "/c.pem"
    with pytest.raises(ConfigError, match="go together"):
        config_from_dict({"console": {"tls_cert": "/c.pem"}})


# -- no password reaches the console ---------------------------------------------------

def _recorder(bodies: list[tuple[str, dict[str, Any]]]) -> Any:
    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method == "POST":
            raw = await request.read()        # cached: the console reads it again
            fields: dict[str, Any] = {}
            if request.content_type == "application/json":
                fields = json.loads(raw or b"{}")
            else:
                fields = dict(await request.post())
            bodies.append((request.path, fields))
        return await handler(request)  # type: ignore[no-any-return]
    return record


async def test_the_console_never_receives_a_password(db_dsn: str, tmp_path: Path) -> None:
    bodies: list[tuple[str, dict[str, Any]]] = []
    password = "xavier's very own passphrase"
    async with console_world_of(db_dsn, tmp_path, middlewares=[_recorder(bodies)]) as world, \
            chromium() as context:
        await world.admin("xavier", password)
        page = await context.new_page()
        await page.goto(world.url + "/login")
        # a form posted with the script off would not carry it either: the field has no name
        assert await page.evaluate("!document.getElementById('password').name") is True
        await submit_login(page, world.url, "xavier", password)
        await page.wait_for_selector("#operator")
    paths = [path for path, _ in bodies]
    assert paths == ["/login/start", "/login/proof"], paths
    for path, fields in bodies:
        assert "password" not in fields, (path, fields)
        assert password not in json.dumps(fields), path
        assert not any(password in str(value) for value in fields.values())


async def test_a_subscriber_session_cookie_is_not_an_operator(console_world: ConsoleWorld) -> None:
    """A console cookie holding any SID but an operator's (here a subscriber's, from the office) is no login."""
    await console_world.root.call("users.create", {"login": "yara", "password": "yara-password"})
    office = console_world.core.link()
    try:
        info = await office.proxy_login("yara", "yara-password", "127.0.0.1")
    finally:
        await office.close()
    from webedge.http import b64
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        http.cookie_jar.update_cookies({"console_sid": b64(info.sid)})
        async with http.get(console_world.url + "/system/audit") as response:
            assert "/login" in str(response.url)


def _forging_signatures(sids: list[bytes]) -> Any:
    """A console that lies about the core's answer: the proof's ``sig`` flipped (the SID noted)."""
    @web.middleware
    async def forge(request: web.Request, handler: Any) -> web.StreamResponse:
        response = await handler(request)
        if request.path == "/login/proof" and isinstance(response, web.Response) and response.status == 200:
            answer = json.loads(response.text or "{}")
            if "sig" in answer:
                raw = bytearray(base64.b64decode(answer["sig"]))
                raw[0] ^= 1
                answer["sig"] = base64.b64encode(bytes(raw)).decode()
                cookie = response.cookies.get("console_sid")
                if cookie is not None:
                    sids.append(base64.urlsafe_b64decode(cookie.value + "=" * (-len(cookie.value) % 4)))
                response.text = json.dumps(answer)
        return response
    return forge


async def test_the_page_refuses_a_forged_server_signature(db_dsn: str, tmp_path: Path) -> None:
    from webedge.core_link import SessionGone

    sids: list[bytes] = []
    async with console_world_of(db_dsn, tmp_path, middlewares=[_forging_signatures(sids)]) as world:
        password = await world.admin("yusuf")
        async with chromium() as context:
            page = await context.new_page()
            await submit_login(page, world.url, "yusuf", password)
            await page.wait_for_selector("#login-error:not(.hidden)")
            assert "not the billing core's" in await page.inner_text("#login-error")
            assert page.url.endswith("/login")
        assert len(sids) == 1
        with pytest.raises(SessionGone):        # the script ended the session the forged answer opened
            await world.console.link.call(sids[0], "127.0.0.1", "sys.ping")


SLOW = Page.routes()


@SLOW.get("/test/slow")
async def _slow(request: web.Request) -> web.StreamResponse:
    await asyncio.sleep(30)
    return web.Response(text="too late")


async def test_a_request_over_its_time_is_503(db_dsn: str, tmp_path: Path) -> None:
    import types

    from console.pages import PAGES

    module = types.ModuleType("test_slow_page")
    module.ROUTES = SLOW          # type: ignore[attr-defined]
    module.MESSAGES = {}          # type: ignore[attr-defined]
    async with console_world_of(db_dsn, tmp_path, pages=[*PAGES, module], request_timeout=0.5) as world:
        browser = await world.operator("zoe")
        page = await browser.get("/test/slow")
        assert page.status == 503 and "too late" not in page.text


def test_python_m_console_refuses_a_network_address_without_tls(tmp_path: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "console", "--host", "0.0.0.0", "--password-file",
                           str(tmp_path / "pw"), "--secret-file", str(tmp_path / "secret")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "console.host" in done.stderr


async def test_the_console_s_own_login_reaches_no_data(console_world: ConsoleWorld) -> None:
    """The console's system login may relay logins, call as operators and hear its topics; as itself it
    may call nothing that reads or changes the ISP's data (its read rights open topics, and every call
    with those rights is for admin sessions only)."""
    from tests.console_harness import CONSOLE_PASSWORD
    from urfa import client as uc

    own = await uc.connect("127.0.0.1", console_world.core.port)
    try:
        await own.login("system", "console", CONSOLE_PASSWORD)
        names = {entry["name"] for entry in await own.call("sys.calls", {"limit": 500})}
    finally:
        await own.close()
    assert {"session.proxy_login", "session.proxy_proof", "session.proxy_otp", "events.subscribe"} <= names
    assert all(name.split(".")[0] in ("sys", "session", "events") for name in names), sorted(names)


async def test_over_tls_on_a_network_address(db_dsn: str, tmp_path: Path) -> None:
    """The console as it faces an admin network: HTTPS on 0.0.0.0, Secure cookies, HSTS; Chromium logs in."""
    need_peer(shutil.which("openssl") is not None, "the openssl CLI (Debian openssl) is not installed")
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-keyout", str(key), "-out", str(cert), "-days", "2", "-nodes", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    section = {"host": "0.0.0.0", "tls_cert": str(cert), "tls_key": str(key), "cookie_secure": True}
    config_from_dict({"console": section})                       # the config accepts it
    async with console_world_of(db_dsn, tmp_path, **section) as world:
        assert world.url.startswith("https://")
        password = await world.admin("tess")
        async with chromium(ignore_https_errors=True) as context:
            page = await context.new_page()
            answer = await page.goto(world.url + "/login")
            assert answer is not None and answer.headers.get("strict-transport-security")
            await submit_login(page, world.url, "tess", password)
            await page.wait_for_selector("#operator")
            cookie = {c["name"]: c for c in await context.cookies()}["console_sid"]
            assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
