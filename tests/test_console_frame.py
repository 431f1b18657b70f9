"""The console's frame end to end: an operator logs in from real Chromium (SCRAM in the
page's script, relayed by the console), sees the navigation their call table allows,
switches language, gets live "changed" notices, logs out; and the system pages.

Against the real core call layer on a real PostgreSQL (``tests/console_harness.py``).
"""

from __future__ import annotations

import asyncio
import base64
import re
import types
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from console.page import Page, live
from tests.console_harness import (  # noqa: F401  (console_world is a fixture)
    ConsoleWorld, chromium, console_world, console_world_of, submit_login,
)
from urfa import scram
from webedge.core_link import SessionGone


async def test_operator_logs_in_and_sees_the_dashboard(console_world: ConsoleWorld) -> None:
    browser = await console_world.operator("carol")
    page = await browser.get("/")
    assert page.status == 200, page.text
    assert 'id="operator">carol<' in page.text
    assert 'id="figure-online"' in page.text          # radius.sessions: a superuser's table has it
    assert 'id="figure-subscribers"' in page.text     # subscribers.search
    for label in ("Dashboard", "Audit log", "Health", "Operators", "My two-factor"):
        assert f">{label}</a>" in page.text, label


async def test_navigation_and_routes_follow_the_call_table(console_world: ConsoleWorld) -> None:
    await console_world.group("auditors", ["audit.read"], "Read the audit log")
    browser = await console_world.operator("dave", groups=["auditors"])
    page = await browser.get("/")
    assert ">Audit log</a>" in page.text
    assert ">Plugins</a>" not in page.text and ">Operators</a>" not in page.text
    audit = await browser.get("/system/audit")
    assert audit.status == 200
    assert re.search(r'data-test="nav-audit" aria-current="page"', audit.text)
    assert not re.search(r'data-test="nav-dashboard" aria-current', audit.text)     # "/" is not every page's
    refused = await browser.get("/system/plugins")         # typed by hand: outside the table
    assert refused.status == 403 and "no right" in refused.text
    stranger = console_world.browser()                      # nobody logged in: no navigation at all
    assert 'id="nav"' not in (await stranger.get("/login")).text


async def test_audit_log_search(console_world: ConsoleWorld) -> None:
    root = console_world.root
    user = await root.call("users.create", {"login": "alice", "password": "alice-password", "full_name": "Alice"})
    account = int(user["basic_account_id"])
    await root.call("accounts.set_credit", {"account_id": account, "credit": 5_000_000})
    browser = await console_world.operator("erin")
    page = await browser.get(f"/system/audit?object=account:{account}")
    assert page.status == 200
    assert "accounts.set_credit" in page.text or "set_credit" in page.text, page.text[-3000:]
    assert 'data-id="' in page.text
    nothing = await browser.get("/system/audit?login=nobody-at-all")
    assert "Nothing found." in nothing.text
    bad = await browser.get("/system/audit?since=yesterday")
    assert bad.status == 400 and "YYYY-MM-DD" in bad.text


async def test_health_shows_sys_health_and_the_console_s_link(console_world: ConsoleWorld) -> None:
    browser = await console_world.operator("frank")                       # superusers: sys.health
    page = await browser.get("/system/health")
    assert page.status == 200
    assert 'id="processes"' in page.text and 'id="database-state">answering<' in page.text
    assert 'id="link-state">connected<' in page.text and 'id="core-time">' in page.text
    assert 'id="health-missing"' in page.text                            # what the core cannot know, said
    cashier = await console_world.operator("fiona", groups=["cashiers"])
    assert ">Health</a>" not in (await cashier.get("/")).text
    assert (await cashier.get("/system/health")).status == 403


async def test_language_switch_and_logout_end_the_core_session(console_world: ConsoleWorld) -> None:
    browser = await console_world.operator("gina")
    russian = await browser.get("/lang/ru?next=/system/health")
    assert "Связь консоли с ядром" in russian.text and "Выйти" in russian.text
    sid_cookie = browser.cookie("console_sid")
    assert sid_cookie is not None
    sid = base64.urlsafe_b64decode(sid_cookie.value + "=" * (-len(sid_cookie.value) % 4))
    assert await console_world.console.link.call(sid, "127.0.0.1", "sys.ping") == "pong"
    answer = await browser.post("/logout")
    assert answer.status == 303 and answer.headers["Location"].startswith("/login")
    with pytest.raises(SessionGone):
        await console_world.console.link.call(sid, "127.0.0.1", "sys.ping")
    again = await browser.get("/")
    assert "/login" in again.url
    assert "console_sid" not in {cookie.key for cookie in browser.http.cookie_jar}


# -- live updates: events wake the page, carrying nothing ------------------------------

LIVE = Page.routes()


@LIVE.get("/test/live", needs=("sys.ping",))
async def _live_route(request: web.Request) -> web.StreamResponse:
    return await live(request, ["blocks"])


async def test_live_stream_says_changed_and_carries_no_payload(db_dsn: str, tmp_path: Path) -> None:
    from console.pages import PAGES

    module = types.ModuleType("test_live_page")
    module.ROUTES = LIVE          # type: ignore[attr-defined]
    module.MESSAGES = {}          # type: ignore[attr-defined]
    async with console_world_of(db_dsn, tmp_path, pages=[*PAGES, module]) as world:
        browser = await world.operator("hank")
        async with browser.http.get(world.url + "/test/live") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            await response.content.readuntil(b"\n\n")          # "retry:", sent at once
            service = world.core.service
            assert service is not None

            async def publish_until_heard() -> bytes:
                while True:   # the console's link subscribes when it connects: publish until it hears
                    service.publish("blocks", {"account_id": 7, "kind": "admin", "reason": "secret reason"})
                    try:
                        return await asyncio.wait_for(response.content.readuntil(b"\n\n"), 0.5)
                    except asyncio.TimeoutError:
                        continue
            frame = await asyncio.wait_for(publish_until_heard(), 15)
            while frame.startswith(b":"):                        # keep-alives
                frame = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 5)
            assert frame == b"event: changed\ndata: blocks\n\n"
        with pytest.raises(ValueError):
            world.console.live.listen(["no.such.topic"])


# -- the real browser ----------------------------------------------------------------

async def test_browser_login_computes_scram_in_the_page(console_world: ConsoleWorld) -> None:
    password = await console_world.admin("ivan", "ivan's pass, with = and ,")
    url = console_world.url
    async with chromium(locale="en-US") as context:
        page = await context.new_page()
        await page.goto(url + "/system/audit")
        assert "/login" in page.url

        # the page's SCRAM is docs/protocol.md §6.2's vector
        vector = await page.evaluate("""async () => {
            const s = window.billcoreScram, range = (a) => Uint8Array.from({length: 16}, (_, i) => a + i);
            const keys = await s.scram("admin", "alice", "correct horse battery", range(0x10), range(0x20),
                                       range(0x00), 4096);
            const hex = (b) => Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
            return [hex(keys.proof), hex(keys.serverSignature)];
        }""")
        assert vector == ["d48e367856be5fcf1bc4b9318a39ce6ec723e6cfac26b6ec28c45e7352492d46",
                          "e39a87a01547f4fba664e4fae6a43391ea058b05e28c173264fb86668021bfcf"]

        await page.fill("#login", "ivan")
        await page.fill("#password", "not the password")
        await page.click("#login-submit")
        await page.wait_for_selector("#login-error:not(.hidden)")
        assert "Wrong login or password." in await page.inner_text("#login-error")

        await page.fill("#password", password)
        async with page.expect_navigation():
            await page.click("#login-submit")
        await page.wait_for_selector("#operator")
        assert page.url == url + "/system/audit"                # back where the operator was going
        assert await page.inner_text("#operator") == "ivan"
        cookie = {c["name"]: c for c in await context.cookies()}["console_sid"]
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        await page.click("#logout")
        await page.wait_for_selector("text=You have logged out.")


def test_the_page_scram_matches_the_core_s(tmp_path: Path) -> None:
    """The oracle the browser test leans on: §6.2's numbers are the core's own SCRAM."""
    salt, cnonce, snonce = bytes(range(16)), bytes(range(16, 32)), bytes(range(32, 48))
    keys = scram.client_keys("correct horse battery", salt, 4096)
    message = scram.auth_message("admin", "alice", cnonce, snonce, salt, 4096)
    assert scram.client_proof(keys, message).hex().startswith("d48e3678")
    assert scram.server_signature(keys.server_key, message).hex().startswith("e39a87a0")


async def test_healthz_needs_no_login(console_world: ConsoleWorld) -> None:
    async with aiohttp.ClientSession() as http, http.get(console_world.url + "/healthz") as response:
        assert response.status == 200



async def test_the_supervisor_runs_the_console_as_a_child(tmp_path: Path, db_dsn: str) -> None:
    """The ``console`` role: provisioned by the core (system login ``console``), connected, serving."""
    from tests.conftest import free_port
    from tests.running import BillcoreProcess

    port = free_port()
    with BillcoreProcess(tmp_path, dsn=db_dsn, console={"enabled": True, "port": port, "cookie_secure": False}) as bc:
        bc.wait_for(r'role=console .*msg="core connected"', timeout=60)
        bc.wait_for(r'role=console .*msg="console serving"', timeout=60)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/login") as response:
                assert response.status == 200
                assert 'src="/static/login.js' in await response.text()
        assert (tmp_path / "var" / "system" / "console.password").exists()
        # an edge facing browsers never holds the database's address (only the core gets it)
        environ = Path(f"/proc/{bc.child_pid('console')}/environ").read_bytes().split(b"\0")
        assert not any(entry.startswith(b"BILLCORE_DSN=") for entry in environ)
        core_environ = Path(f"/proc/{bc.child_pid('core')}/environ").read_bytes().split(b"\0")
        assert any(entry.startswith(b"BILLCORE_DSN=") for entry in core_environ)
        assert bc.stop(timeout=10) == 0


async def test_the_default_secure_cookie_logs_in_over_loopback(db_dsn: str, tmp_path: Path) -> None:
    """The shipped config (Secure cookies, plain HTTP on 127.0.0.1: a browser on the host or an SSH
    tunnel) logs in: Chromium counts loopback as a secure context, for WebCrypto and cookies alike."""
    async with console_world_of(db_dsn, tmp_path, cookie_secure=True) as world, chromium() as context:
        page = await context.new_page()
        await submit_login(page, world.url, "jane", await world.admin("jane"))
        await page.wait_for_selector("#operator")
        cookie = {c["name"]: c for c in await context.cookies()}["console_sid"]
        assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict"


# -- the frame's pure parts ---------------------------------------------------------------

def test_operator_book_forgets_idle_and_least_recent_operators() -> None:
    from console.operators_book import Operator, OperatorBook

    book = OperatorBook(max_operators=2)
    ann, bob, cid = (Operator(sid=bytes([n]) * 16, login=name, calls=frozenset({"sys.ping"}), timeout=100.0)
                     for n, name in ((1, "ann"), (2, "bob"), (3, "cid")))
    book.put(ann, now=0.0)
    book.put(bob, now=1.0)
    assert book.get(ann.sid, now=50.0) is ann          # a use: ann is now the most recent
    book.put(cid, now=51.0)                            # over the bound: bob, the least recent, goes
    assert book.get(bob.sid, now=52.0) is None and len(book) == 2
    assert book.alive(ann.sid, now=149.0) and not book.alive(ann.sid, now=150.0)   # asking is not a use
    assert book.get(ann.sid, now=150.0) is None        # idle for the session's timeout: forgotten
    book.drop(cid.sid)
    assert len(book) == 0


def test_pending_logins_take_one_step_each_and_age() -> None:
    from console.pending_logins import PendingLogin, PendingLogins

    logins = PendingLogins(max_pending=2, max_age=60.0)
    logins.put(b"pre-1", PendingLogin(b"h1", "ann", started=0.0, stage="proof"))
    assert logins.get(b"pre-1", "otp", now=1.0) is None          # not at that step
    assert logins.get(b"pre-1", "proof", now=61.0) is None       # too old
    assert logins.get(b"pre-1", "proof", now=1.0) is not None
    logins.put(b"pre-2", PendingLogin(b"h2", "bob", started=0.0, stage="proof"))
    logins.put(b"pre-3", PendingLogin(b"h3", "cid", started=0.0, stage="proof"))
    assert logins.get(b"pre-1", "proof", now=1.0) is None        # the oldest went over the bound


def test_a_message_key_defined_twice_stops_the_start() -> None:
    from webedge.i18n import catalogs_of

    with pytest.raises(ValueError, match="'nav.x' is defined by both a and b"):
        catalogs_of([("a", {"nav.x": ("X", "Икс")}), ("b", {"nav.x": ("X", "Икс")})])
    with pytest.raises(ValueError, match="one text per language"):
        catalogs_of([("a", {"nav.y": ("Y",)})])  # type: ignore[dict-item]
    catalogs = catalogs_of([("a", {"nav.x": ("X", "Икс")})])
    assert catalogs == {"en": {"nav.x": "X"}, "ru": {"nav.x": "Икс"}}


def test_every_frame_and_page_message_has_both_languages() -> None:
    from console import messages
    from console.pages import PAGES
    from webedge.i18n import catalogs_of

    catalogs = catalogs_of([("frame", messages.MESSAGES), *((page.__name__, page.MESSAGES) for page in PAGES)])
    assert set(catalogs["en"]) == set(catalogs["ru"])
    assert all(text.strip() for catalog in catalogs.values() for text in catalog.values())
    for page in PAGES:                     # a nav entry has its label
        for route in page.ROUTES.routes:
            if route.nav is not None:
                assert "nav." + route.nav in catalogs["en"], (page.__name__, route.nav)


async def test_audit_pages_keep_their_filters(console_world: ConsoleWorld) -> None:
    root = console_world.root
    for n in range(55):                                           # more than a page of one operator's actions
        await root.call("users.create", {"login": f"paged{n}", "password": "paged-password"})
    browser = await console_world.operator("kim")
    first = await browser.get("/system/audit?login=root&action=users.create")
    assert first.text.count('data-test="audit-row"') == 50
    following = re.search(r'href="([^"]+)" data-test="pager-next"', first.text)
    assert following, "no next page"
    second = await browser.get(following.group(1).replace("&amp;", "&"))
    assert second.text.count('data-test="audit-row"') == 5
    assert 'value="root"' in second.text and 'data-test="pager-previous"' in second.text
