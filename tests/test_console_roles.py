"""Operators' rights seen from outside the console, and what the console holds.

One ``billcore serve`` (embedded PostgreSQL: the config names no database)
with the console on; operators of the role templates log in through the
console's login (its SCRAM steps over HTTP, or Chromium running the login
page's script), then:

- a cashier sees no tariff, plugin or operator pages in the nav, and every
  URL the console serves whose calls are not in the cashier's call table
  (read from the page modules, so none is forgotten) answers 403, GET and
  POST alike (a valid CSRF token included), and nothing changed in the core;
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

from billcore.common.money import format_money
from console.page import Route
from tests.console_harness import ConsoleBrowser, chromium, submit_login
from tests.console_stack import ConsoleStack, console_stack, need_chromium, signed_example_plugin
from tests.process_view import encodings_of, environ_of, memory_hits, sockets_of
from urfa.errors import CallFailed

PASSWORDS = {"cashier": "kassa-Pw-31337-q", "support": "help-Desk-Pw-2718-z", "tariffer": "rates-Pw-1618-m"}
GROUPS = {"cashier": "cashiers", "support": "support", "tariffer": "tariff_managers"}
# areas a cashier must not reach: their URL prefixes
CLOSED_TO_CASHIERS = ("/tariffs", "/services", "/classes", "/timeranges", "/system/plugins", "/operators", "/bulk")
PARAM = re.compile(r"\{(\w+)(?::([^}]*))?\}")


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ConsoleStack]:
    need_chromium()
    plugin_dir, trusted = signed_example_plugin(tmp_path_factory.mktemp("signing"))
    async with console_stack(tmp_path_factory.mktemp("console-roles"),
                             plugins={"dir": str(plugin_dir), "key_dir": str(trusted)}) as stack:
        for login, group in GROUPS.items():
            await stack.operator(login, PASSWORDS[login], [group])
        # things with ids for the URLs to name
        service = (await stack.admin.call("services.add", {"name": "roles-traffic", "kind": "traffic"}))["id"]
        tariff = (await stack.admin.call("tariffs.add", {"name": "roles-tariff", "service_ids": [service]}))["id"]
        klass = (await stack.admin.call("classes.add", {"name": "roles-class"}))["id"]
        rule = await stack.admin.call("classes.add_rule", {"class_id": klass, "remote_net": "0.0.0.0/0"})
        night = await stack.admin.call("timeranges.add", {"name": "roles-night",
                                                            "windows": [{"days": "mon-sun", "time": "23:00-07:00"}]})
        user = await stack.admin.call("users.create", {"login": "rita", "password": "rita-office-pw"})
        await stack.admin.call("payments.add", {"account_id": user["basic_account_id"], "amount": 10_000_000,
                                                "method": "cash", "external_id": "roles-1"})
        operators = {row["login"]: row["id"] for row in await stack.admin.call("operators.list", {})}
        stack.extra["ids"] = {"service_id": service, "tariff_id": tariff, "class_id": klass, "rule_id": rule["id"],
                              "range_id": night["id"], "user_id": user["id"],
                              "account_id": user["basic_account_id"], "operator_id": operators["support"],
                              "name": "example", "nas_id": 1, "session": 1}
        yield stack


def console_routes() -> list[Route]:
    """Every page route the console serves, read from its page modules (none can be forgotten)."""
    from console.pages import PAGES

    return [route for module in PAGES for route in module.ROUTES.routes]


def concrete(path: str, ids: dict[str, Any]) -> str:
    """The path with real ids where the test made the thing; any id elsewhere (the rights come first)."""
    def value(m: re.Match[str]) -> str:
        if m.group(1) in ids:
            return str(ids[m.group(1)])
        pattern = m.group(2) or ""
        return pattern.split("|")[0] if re.fullmatch(r"[a-z]+(\|[a-z]+)*", pattern) else "1"   # {fmt:pdf|html}
    return PARAM.sub(value, path)


async def call_table(stack: ConsoleStack, login: str) -> frozenset[str]:
    """What the core lets ``login`` call: the operator's own session's sys.calls."""
    client = await stack.urfa_login(login, PASSWORDS[login])
    try:
        return frozenset(entry["name"] for entry in await client.call("sys.calls", {"limit": 500}))
    finally:
        await client.close()


async def logged_in(stack: ConsoleStack, login: str) -> ConsoleBrowser:
    browser = ConsoleBrowser(stack.url)
    await browser.login(login, PASSWORDS[login])
    return browser


# what a forged form would change if a page forgot its check
FORGED = {"name": "cashier-was-here", "login": "mallory", "password": "mallory-pw-123",
          "password_again": "mallory-pw-123", "groups": "superusers", "full_name": "Mallory", "path": "example",
          "service_ids": "1", "kind": "traffic", "remote_net": "0.0.0.0/0", "start": "00:00", "end": "23:59",
          "address": "192.0.2.66", "secret": "x", "price": "1.00"}


async def test_a_cashier_neither_sees_nor_reaches_tariffs_plugins_operators(stack: ConsoleStack) -> None:
    calls = await call_table(stack, "cashier")
    assert "payments.add" in calls and "tariffs.add" not in calls and "plugins.load" not in calls
    routes = console_routes()
    closed = [route for route in routes if not set(route.needs) <= calls]
    closed_paths = {route.path for route in closed}
    for area in CLOSED_TO_CASHIERS:       # the areas the issue names are among them, GET and POST
        assert any(path.startswith(area) for path in closed_paths), (area, sorted(closed_paths))
    assert {"GET", "POST"} <= {route.method for route in closed if route.path.startswith("/tariffs")}
    tariffs_before = await stack.admin.call("tariffs.list", {})
    services_before = await stack.admin.call("services.list", {})

    cashier = await logged_in(stack, "cashier")
    try:
        home = await cashier.get("/")
        links = re.findall(r'<a href="([^"]+)"', home.text.split('id="nav"', 1)[1].split("</nav>", 1)[0])
        assert links and not [href for href in links if href.startswith(CLOSED_TO_CASHIERS)], links
        assert "/subscribers" in links, links
        token = home.csrf
        served = {(route.method, route.path) for route in routes}
        tried = 0
        for path in sorted(closed_paths):
            url = concrete(path, stack.extra["ids"])
            for method in ("GET", "POST"):        # both, whichever the URL serves
                if method == "GET":
                    page = await cashier.get(url, allow_redirects=False)
                else:
                    page = await cashier.post(url, FORGED, csrf=token)
                tried += 1
                if (method, path) in served:
                    assert page.status == 403, (method, url, page.status, page.text[:400])
                    assert 'data-test="forbidden"' in page.text
                else:                             # a method the URL does not serve at all
                    assert page.status in (403, 405), (method, url, page.status, page.text[:400])
                assert "Traceback" not in page.text
        assert tried == 2 * len(closed_paths) >= 40, tried
        # and the pages a cashier may use still answer
        for path in ("/subscribers", f"/subscribers/{stack.extra['ids']['user_id']}"):
            assert (await cashier.get(path)).status == 200, path
    finally:
        await cashier.close()
    assert await stack.admin.call("tariffs.list", {}) == tariffs_before
    assert await stack.admin.call("services.list", {}) == services_before
    assert "mallory" not in {row["login"] for row in await stack.admin.call("operators.list", {})}
    assert all(row["name"] != "example" for row in await stack.admin.call("plugins.list", {}))


async def test_support_cannot_take_payments_anywhere(stack: ConsoleStack) -> None:
    ids = stack.extra["ids"]
    calls = await call_table(stack, "support")
    assert "payments.add" not in calls and "blocks.set" in calls
    paying = [route for route in console_routes() if "payments.add" in route.needs]
    assert paying, "no console page takes payments"
    before = (await stack.admin.call("accounts.get", {"account_id": ids["account_id"]}))["balance"]
    support = await logged_in(stack, "support")
    try:
        card = await support.get(f"/subscribers/{ids['user_id']}")
        assert card.status == 200
        assert format_money(before) in card.text.replace("\u202f", "").replace("\u00a0", "").replace(" ", "")
        for route in paying:                      # the card offers no payment form
            assert f'action="{concrete(route.path, ids)}"' not in card.text, route.path
        for route in paying:                      # and a forged one is refused
            page = await support.post(concrete(route.path, ids), {"amount": "100.00", "external_id": "support-tries",
                                                                  "method": "cash"}, csrf=card.csrf)
            assert page.status == 403, (route.path, page.status, page.text[:300])
    finally:
        await support.close()

    # the core refuses support the call whatever the client: billctl ...
    env = {**os.environ, "BILLCTL_PASSWORD": PASSWORDS["support"], "BILLCTL_PORT": str(stack.bc.urfa_port)}
    done = subprocess.run([sys.executable, "-m", "billcore.clients.billctl", "--login", "support",
                           "pay", str(ids["account_id"]), "100.00", "--external-id", "support-billctl"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode != 0 and "not_in_table" in done.stdout + done.stderr, done
    # ... and a plain URFA client
    client = await stack.urfa_login("support", PASSWORDS["support"])
    try:
        with pytest.raises(CallFailed) as refused:
            await client.call("payments.add", {"account_id": ids["account_id"], "amount": 100_000_000,
                                               "method": "cash", "external_id": "support-urfa"})
        assert refused.value.code == "not_in_table"
    finally:
        await client.close()
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
    console, core = stack.console_pid(), stack.core_pid()
    data_dir = (stack.bc.workdir / "var").resolve()
    pg_port, pg_socket_dir = postgres_endpoint(data_dir)
    dsn = environ_of(core).get("BILLCORE_DSN", "")
    assert dsn.startswith("postgres"), "the core's own DSN, the one the console must not know"

    # the browser logs the tariff manager in: it sends the console a SCRAM proof, never the password
    async with chromium(locale="en-US") as context:
        page = await context.new_page()
        await submit_login(page, stack.url, "tariffer", PASSWORDS["tariffer"])
        await page.wait_for_selector('[data-test="logout"]')          # logged in: the console's own page
        password_hits = memory_hits(console, encodings_of(PASSWORDS["tariffer"]))
        assert not any(password_hits.values()), {k: v[:3] for k, v in password_hits.items() if v}
        # what the console does hold, it is seen holding: the login on the page it just rendered
        assert any(memory_hits(console, encodings_of("tariffer")).values())

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


async def test_plugin_loads_are_in_the_audit_log(stack: ConsoleStack) -> None:
    await stack.admin.call("plugins.load", {"path": "example"})
    await stack.admin.call("plugins.unload", {"name": "example"})
    with pytest.raises(CallFailed):
        await stack.admin.call("plugins.load", {"path": "no-such-plugin"})
    rows = await stack.admin.call("audit.query", {"login": "root"})
    by_action = {row["action"]: row for row in rows}
    assert {"plugins.load", "plugins.unload", "plugins.load_refused"} <= set(by_action), sorted(by_action)
    assert by_action["plugins.load"]["object"] == "plugin:example"
    assert by_action["plugins.load"]["after"]["name"] == "example"
    assert by_action["plugins.unload"]["object"] == "plugin:example"
    refused = by_action["plugins.load_refused"]
    assert refused["object"] == "plugin-path:no-such-plugin" and refused["after"]["code"].startswith("plugin.")
