"""Operators' rights seen from outside the console, and what the console holds.

One ``billcore serve`` (embedded PostgreSQL: the config names no database)
with the console on; operators of the role templates log in through the
login page in Chromium, then:

- a cashier sees no tariff, plugin or operator pages in the nav, and every
  URL of those pages answers 403 to GET and to POST (a valid CSRF token
  included), and nothing changed in the core;
- a support operator sees no payment form, a POST of one is refused, and
  the core refuses the call itself (billctl, and a plain URFA client);
- the console process, inspected through /proc and ``ss`` like an auditor
  would, holds no database connection, no DSN, and — after a browser login
  — not the operator's password anywhere in its memory.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.console_stack import ConsoleStack, console_stack, need_chromium
from tests.process_view import encodings_of, environ_of, memory_hits, sockets_of
from tests.test_portal_e2e import CHROMIUM, CHROMIUM_ARGS, DESKTOP
from urfa.errors import CallFailed

PASSWORDS = {"cashier": "kassa-Pw-31337-q", "support": "help-Desk-Pw-2718-z", "tariffer": "rates-Pw-1618-m"}
GROUPS = {"cashier": "cashiers", "support": "support", "tariffer": "tariff_managers"}
# areas a cashier must not reach: their URL prefixes
CLOSED_TO_CASHIERS = ("/tariffs", "/services", "/classes", "/timeranges", "/system/plugins", "/operators", "/bulk")
PARAM = re.compile(r"\{(\w+)(?::[^}]*)?\}")


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ConsoleStack]:
    need_chromium()
    async with console_stack(tmp_path_factory.mktemp("console-roles")) as stack:
        for login, group in GROUPS.items():
            await stack.operator(login, PASSWORDS[login], [group])
        # things with ids for the URLs to name
        service = (await stack.admin.call("services.add", {"name": "roles-traffic", "kind": "traffic"}))["id"]
        tariff = (await stack.admin.call("tariffs.add", {"name": "roles-tariff", "service_ids": [service]}))["id"]
        klass = (await stack.admin.call("classes.add", {"name": "roles-class"}))["id"]
        rng = (await stack.admin.call("timeranges.add", {"name": "roles-night", "start": "23:00", "end": "07:00"}))
        user = await stack.admin.call("users.create", {"login": "rita", "password": "rita-office-pw"})
        await stack.admin.call("payments.add", {"account_id": user["basic_account_id"], "amount": 10_000_000,
                                                "method": "cash", "external_id": "roles-1"})
        operators = {row["login"]: row["id"] for row in await stack.admin.call("operators.list", {})}
        stack.extra["ids"] = {"service_id": service, "tariff_id": tariff, "class_id": klass,
                              "range_id": rng["id"], "user_id": user["id"],
                              "account_id": user["basic_account_id"], "operator_id": operators["support"],
                              "name": "example", "rule_id": 1, "id": tariff}
        yield stack


async def browser_session(stack: ConsoleStack, playwright: Any, login: str) -> tuple[Any, Any]:
    """(browser, page) logged in as ``login`` through the login page."""
    browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    context = await browser.new_context(viewport=DESKTOP, locale="en-US")
    page = await context.new_page()
    await page.goto(stack.url + "/login")
    await page.fill("input[name=login]", login)
    await page.fill("input[name=password]", PASSWORDS[login])
    async with page.expect_navigation():
        await page.click("button[type=submit]")
    assert await page.locator('[data-test="logout"]').count() == 1, await page.content()
    return browser, page


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf"[^>]*value="([^"]+)"', html) or re.search(r'value="([^"]+)"[^>]*name="csrf"', html)
    assert match, html[:2000]
    return match.group(1)


def console_routes() -> list[tuple[str, str, tuple[str, ...]]]:
    """(method, path pattern, needs) of every page the console serves, read from its page modules."""
    from console.pages import PAGES

    found = []
    for module in PAGES:
        for route in module.ROUTES:
            found.append((route.method, route.path, tuple(route.needs)))
    return found


def concrete(path: str, ids: dict[str, Any]) -> str:
    return PARAM.sub(lambda m: str(ids.get(m.group(1), 1)), path)


async def test_a_cashier_neither_sees_nor_reaches_tariffs_plugins_operators(stack: ConsoleStack) -> None:
    from playwright.async_api import async_playwright

    closed = [(method, path) for method, path, _ in console_routes() if path.startswith(CLOSED_TO_CASHIERS)]
    assert {"/tariffs", "/system/plugins", "/operators"} <= {path for _, path in closed}, closed
    tariffs_before = await stack.admin.call("tariffs.list", {})
    async with async_playwright() as playwright:
        browser, page = await browser_session(stack, playwright, "cashier")
        try:
            nav = await page.locator("nav").first.inner_text()
            links = [await a.get_attribute("href") for a in await page.locator("nav a").all()]
            assert not [href for href in links if href and href.startswith(CLOSED_TO_CASHIERS)], links
            assert "Tariffs" not in nav and "Plugins" not in nav and "Operators" not in nav, nav
            assert await page.locator('[data-test="nav-subscribers"]').count() == 1
            token = csrf_of(await page.content())
            request = page.context.request
            refused = []
            for method, pattern in closed:
                url = stack.url + concrete(pattern, stack.extra["ids"])
                for verb in {"GET", method}:
                    if verb == "GET":
                        response = await request.get(url, max_redirects=0)
                    else:
                        response = await request.post(url, max_redirects=0, form={
                            "csrf": token, "name": "cashier-was-here", "path": "example", "login": "mallory",
                            "password": "mallory-pw-123", "groups": "superusers", "tariff_id": "1",
                            "service_ids": "1"})
                    body = await response.text()
                    refused.append((verb, url, response.status))
                    assert response.status == 403, (verb, url, response.status, body[:500])
                    assert 'data-test="forbidden"' in body and "Traceback" not in body
            # the pages the cashier may use still work
            for path in ("/subscribers", f"/subscribers/{stack.extra['ids']['user_id']}"):
                response = await request.get(stack.url + path)
                assert response.status == 200, path
        finally:
            await browser.close()
    assert len(refused) >= 2 * len({p for _, p in closed}) - 1
    assert await stack.admin.call("tariffs.list", {}) == tariffs_before
    assert "mallory" not in {row["login"] for row in await stack.admin.call("operators.list", {})}
    assert all(row["name"] != "example" for row in await stack.admin.call("plugins.list", {}))


async def test_support_cannot_take_payments_anywhere(stack: ConsoleStack) -> None:
    from playwright.async_api import async_playwright

    ids = stack.extra["ids"]
    before = (await stack.admin.call("accounts.get", {"account_id": ids["account_id"]}))["balance"]
    async with async_playwright() as playwright:
        browser, page = await browser_session(stack, playwright, "support")
        try:
            card = await page.goto(f"{stack.url}/subscribers/{ids['user_id']}")
            assert card is not None and card.status == 200
            assert await page.locator('[data-test="balance"]').count() == 1            # support reads all
            assert await page.locator('[data-test="payment-form"]').count() == 0       # but takes no money
            assert await page.locator('[data-test="block-form"]').count() == 1         # and blocks
            token = csrf_of(await page.content())
            response = await page.context.request.post(
                f"{stack.url}/subscribers/{ids['user_id']}/payment", max_redirects=0,
                form={"csrf": token, "amount": "100.00", "external_id": "support-tries", "method": "cash"})
            assert response.status == 403, response.status
        finally:
            await browser.close()

    # the core refuses support the call whatever the client: billctl ...
    env = {**os.environ, "BILLCTL_PASSWORD": PASSWORDS["support"], "BILLCTL_PORT": str(stack.bc.urfa_port)}
    done = subprocess.run([sys.executable, "-m", "billcore.clients.billctl", "--login", "support",
                           "pay", str(ids["account_id"]), "100.00", "--external-id", "support-billctl"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode != 0 and "not_in_table" in done.stdout + done.stderr, done
    # ... and a plain URFA client
    support = await stack.urfa_login("support", PASSWORDS["support"])
    try:
        with pytest.raises(CallFailed) as refused:
            await support.call("payments.add", {"account_id": ids["account_id"], "amount": 100_000_000,
                                                "method": "cash", "external_id": "support-urfa"})
        assert refused.value.code == "not_in_table"
        assert await support.call("blocks.list", {"account_id": ids["account_id"]}) == []   # reading is fine
    finally:
        await support.close()
    assert (await stack.admin.call("accounts.get", {"account_id": ids["account_id"]}))["balance"] == before


def test_the_memory_search_finds_what_a_process_holds() -> None:
    """The oracle of the next test: a process holding a string is caught holding it."""
    secret = "held-" + "Xq83-secret"
    code = ("import sys, time; half = sys.stdin.readline().strip(); held = 'held-' + half;"
            " print('ready', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(secret.removeprefix("held-") + "\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "ready"
        assert memory_hits(proc.pid, [secret.encode()])[secret.encode()]
        assert not any(memory_hits(proc.pid, encodings_of("never-" + "given-Zz9")).values())
    finally:
        proc.kill()
        proc.wait()


def postgres_endpoint(data_dir: Path) -> tuple[int, str]:
    """The embedded PostgreSQL's TCP port and Unix socket directory, from its postmaster.pid."""
    lines = (data_dir / "pg" / "postmaster.pid").read_text().splitlines()
    return int(lines[3]), lines[4]


async def test_the_console_holds_no_password_and_no_database(stack: ConsoleStack) -> None:
    from playwright.async_api import async_playwright

    console, core = stack.console_pid(), stack.core_pid()
    data_dir = (stack.bc.workdir / "var").resolve()
    pg_port, pg_socket_dir = postgres_endpoint(data_dir)
    dsn = environ_of(core).get("BILLCORE_DSN", "")
    assert dsn.startswith("postgres"), "the core's own DSN, the one the console must not know"

    # the browser logs the tariff manager in: it sends the console a SCRAM proof, never the password
    async with async_playwright() as playwright:
        browser, page = await browser_session(stack, playwright, "tariffer")
        try:
            response = await page.goto(stack.url + "/tariffs")
            assert response is not None and response.status == 200
            password_hits = memory_hits(console, encodings_of(PASSWORDS["tariffer"]))
            assert not any(password_hits.values()), {k: v[:3] for k, v in password_hits.items() if v}
            # what the console does hold, it is seen holding: the login on the page it just rendered
            assert any(memory_hits(console, encodings_of("tariffer")).values())
        finally:
            await browser.close()

    # its environment and its config name no database
    environment = environ_of(console)
    assert "BILLCORE_DSN" not in environment, sorted(environment)
    assert not [key for key, value in environment.items() if dsn in value or ".s.PGSQL" in value]
    config = Path(environment["BILLCORE_CONFIG"]).read_text()
    assert not re.search(r'^dsn\s*=\s*"[^"]', config, re.M), config
    assert not memory_hits(console, [dsn.encode()])[dsn.encode()], "the console holds the core's DSN"

    # its sockets: the HTTP listener and its clients, the core's URFA endpoint; no PostgreSQL
    sockets = sockets_of(console)
    for sock in sockets:
        if sock.kind == "tcp":
            assert pg_port not in (sock.local_port, sock.peer_port), sock
            assert sock.local_port == stack.console_port or sock.peer_port == stack.bc.urfa_port, sock
        elif sock.kind == "unix":
            assert pg_socket_dir not in sock.peer and ".s.PGSQL" not in sock.peer + sock.local, sock
            assert sock.peer in ("*", "") or sock.peer == str(data_dir / "urfa.sock"), sock
        else:
            assert sock.kind == "other", sock            # no UDP at all
    assert any(sock.kind == "tcp" and sock.state == "LISTEN" for sock in sockets), sockets
    # the inspection does see a database connection where there is one: the core's
    assert any(".s.PGSQL" in sock.peer or sock.peer_port == pg_port for sock in sockets_of(core))
