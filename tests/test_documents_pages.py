"""Documents end to end: invoices issued by the core's invoice calls, downloaded as PDF from the web office
and the console in headless Chromium and with billctl, and read back with pdftotext.

The core is the real call layer on a real PostgreSQL (``LiveCore``, in this process); charges are posted
through the ledger's own ``post_charges`` (the kind of row an invoice is made from), a payment through
``payments.add``, and the invoice by ``invoices.issue`` — the calls of the invoices helper's
billcore/api/invoice_calls.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import itertools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from billcore.common.config import PortalSection
from billcore.common.money import MICRO
from console.context import CONSOLE
from documents.view import Issuer
from portal.app import serve as serve_office
from tests.conftest import free_port, need_peer
from tests.console_harness import ConsoleWorld, chromium, console_world, submit_login  # noqa: F401 - the fixture
from tests.test_portal_e2e import http_login
from tests.test_portal_harness import ADMIN_PASSWORD, LiveCore, live_core  # noqa: F401 - the fixture
from urfa import client as uc
from webedge.render import Currency
from webedge.settings import read_or_make_secret


ISSUER = Issuer(name="ООО «Сеть Плюс»", address="Москва, ул. Тверская, 1", tax_id="7701234567", timezone="UTC")
_seq = itertools.count(1)


def pdftotext(path: Path) -> str:
    need_peer(shutil.which("pdftotext") is not None, "pdftotext is not installed (Debian: poppler-utils)")
    done = subprocess.run(["pdftotext", "-layout", str(path), "-"], capture_output=True, check=True, timeout=60)
    return " ".join(done.stdout.decode("utf-8").split())


async def charge(core: LiveCore, account_id: int, amount: int, reference: str) -> None:
    """A charge row an hour ago, as a one-off charge is booked."""
    from billcore.billing.ledger import Entry, post_charges

    at = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
    async with core.pool.acquire() as conn, conn.transaction():
        await post_charges(conn, [Entry(account_id, -amount, "charge", f"manual:doc:{account_id}:{next(_seq)}",
                                        reference=reference)], actor="test", now=at)


async def invoiced(core: LiveCore, login: str, password: str, amount: int) -> tuple[int, int, dict[str, Any]]:
    """A subscriber (Иван Иванов) with a payment of 500.00 and a charge of ``amount``, and the invoice the core
    issues for it: (account, user, DOCUMENT)."""
    admin = await core.admin()
    try:
        user = await admin.call("users.create", {"login": login, "password": password, "full_name": "Иван Иванов"})
        account_id = int(user["basic_account_id"])
        await admin.call("payments.add", {"account_id": account_id, "amount": 500 * MICRO, "method": "bank",
                                          "external_id": f"doc-{login}"})
        await charge(core, account_id, amount, "Router rental")
        doc: dict[str, Any] = await admin.call("invoices.issue", {"account_id": account_id})
    finally:
        await admin.close()
    return account_id, int(user["id"]), doc


def total_text(amount: int) -> str:
    return f"{amount // MICRO}.{amount % MICRO // 10_000:02d}"


# -- billctl ------------------------------------------------------------------------------

async def billctl(core: LiveCore, *args: str) -> subprocess.CompletedProcess[str]:
    """billctl as a process (in a thread: the core answering it runs on this test's loop)."""
    env = {**os.environ, "BILLCTL_PASSWORD": ADMIN_PASSWORD, "BILLCTL_PORT": str(core.port)}
    return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "billcore.clients.billctl", "--login", "root", *args],
                          capture_output=True, text=True, env=env, timeout=120)


async def test_billctl_writes_an_invoice_and_a_statement(live_core: LiveCore, tmp_path: Path) -> None:
    account_id, _, doc = await invoiced(live_core, "dora", "dora-password-1", 123_450_000)
    config = tmp_path / "billcore.toml"
    config.write_text('[documents]\nname = "ООО «Сеть Плюс»"\ntax_id = "7701234567"\nlanguage = "ru"\n'
                      '[billing]\ncurrency = "RUB"\nminor_units = 2\n')
    pdf, html, statement = tmp_path / "inv.pdf", tmp_path / "inv.html", tmp_path / "st.pdf"
    done = await billctl(live_core, "invoices", "pdf", str(doc["id"]), "--out", str(pdf), "--config", str(config))
    assert done.returncode == 0, done.stderr
    text = pdftotext(pdf)
    assert f"Счёт {doc['number']}" in text and "ООО «Сеть Плюс»" in text and "Иван Иванов" in text
    assert f"Итого к оплате, RUB {total_text(doc['total'])}" in text and doc["total"] == 123_450_000
    done = await billctl(live_core, "invoices", "html", str(doc["id"]), "--out", str(html), "--lang", "en",
                   "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert f'<td id="doc-total">{total_text(doc["total"])}</td>' in html.read_text()
    today = dt.date.today()
    done = await billctl(live_core, "statement-pdf", str(account_id), "--since", (today - dt.timedelta(days=1)).isoformat(),
                   "--until", (today + dt.timedelta(days=1)).isoformat(), "--out", str(statement), "--lang", "en",
                   "--config", str(config))
    assert done.returncode == 0, done.stderr
    text = pdftotext(statement)
    assert "Opening balance: 0.00 RUB" in text and "Closing balance: 376.55 RUB" in text
    assert "500.00" in text and "-123.45" in text
    done = await billctl(live_core, "statement-html", str(account_id), "--since", (today - dt.timedelta(days=1)).isoformat(),
                         "--until", (today + dt.timedelta(days=1)).isoformat(), "--out", str(html), "--lang", "en",
                         "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert '<span id="closing">376.55</span> RUB' in html.read_text()
    # an unknown invoice is the core's refusal, no file written
    done = await billctl(live_core, "invoices", "pdf", "999999", "--out", str(tmp_path / "none.pdf"))
    assert done.returncode == 1 and not (tmp_path / "none.pdf").exists()


# -- the web office --------------------------------------------------------------------------

async def test_a_subscriber_downloads_invoices_and_a_statement_in_the_office(live_core: LiveCore,
                                                                             tmp_path: Path) -> None:
    account_id, _, doc = await invoiced(live_core, "olga", "olga-password-1", 99_990_000)
    await invoiced(live_core, "mallory", "mallory-password-1", 1_000_000)
    port = free_port()
    section = dataclasses.replace(PortalSection(), enabled=True, port=port, cookie_secure=False)
    runner = await serve_office(section, live_core.link(), read_or_make_secret(tmp_path / "portal.secret"),
                                currency=Currency("RUB", 2), issuer=ISSUER)
    url = f"http://127.0.0.1:{port}"
    try:
        async with chromium(locale="ru-RU", accept_downloads=True) as context:
            page = await context.new_page()
            await page.goto(url + "/login")
            await page.fill("input[name=login]", "olga")
            await page.fill("input[name=password]", "olga-password-1")
            await page.click("button[type=submit]")
            await page.wait_for_url(url + "/")
            await page.click("#nav-documents")
            await page.wait_for_url(url + "/documents")
            rows = page.locator("#invoices tbody tr")
            assert await rows.count() == 1                       # hers only, not mallory's
            assert doc["number"] in await rows.first.inner_text()
            assert "99.99\u00a0RUB" in await rows.first.inner_text()
            async with page.expect_download() as info:
                await page.click(f'tr[data-invoice="{doc["id"]}"] a.pdf')
            download = await info.value
            saved = tmp_path / download.suggested_filename
            await download.save_as(saved)
            assert download.suggested_filename == f"{doc['number']}.pdf"
            text = pdftotext(saved)
            assert f"Счёт {doc['number']}" in text and "Итого к оплате, RUB 99.99" in text
            today = dt.date.today()
            await page.fill("#since", (today - dt.timedelta(days=1)).isoformat())
            await page.fill("#until", today.isoformat())
            async with page.expect_download() as info:
                await page.click("#get-statement")
            statement = tmp_path / "statement.pdf"
            await (await info.value).save_as(statement)
            text = pdftotext(statement)
            assert "Выписка по счёту" in text and "Исходящий остаток: 400.01 RUB" in text
            async with page.expect_download() as info:
                await page.click("#get-statement-html")
            await (await info.value).save_as(tmp_path / "statement.html")
            assert '<span id="closing">400.01</span> RUB' in (tmp_path / "statement.html").read_text()
        # another subscriber's invoice is the 404 page, not a document
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            (await http_login(http, url, "mallory", "mallory-password-1")).release()
            async with http.get(f"{url}/documents/{doc['id']}.pdf") as r:
                assert r.status == 404 and r.content_type == "text/html"
            for fmt in ("pdf", "html"):
                async with http.get(f"{url}/documents/statement.{fmt}?account_id={account_id}&since=2026-01-01"
                                    "&until=2026-01-31") as r:
                    assert r.status == 404
            async with http.get(f"{url}/documents/statement.pdf?account_id={account_id}&since=2026-02-01"
                                "&until=2026-01-31") as r:
                assert r.status == 400
    finally:
        await runner.cleanup()


# -- the console ------------------------------------------------------------------------------

async def test_an_operator_views_downloads_and_credits_an_invoice(console_world: ConsoleWorld,
                                                                 tmp_path: Path) -> None:
    account_id, user_id, doc = await invoiced(console_world.core, "ivan", "ivan-password-1", 120_000_000)
    console_world.console.runner.app[CONSOLE].issuer = ISSUER
    password = await console_world.admin("anna")
    async with chromium(accept_downloads=True) as context:
        page = await context.new_page()
        await submit_login(page, console_world.url, "anna", password)
        await page.wait_for_url(re.compile(r".*/$"))
        await page.goto(f"{console_world.url}/subscribers/{user_id}?account={account_id}")
        await page.click("#card-invoices")
        await page.wait_for_url(f"{console_world.url}/accounts/{account_id}/invoices")
        assert "120.00\u00a0RUB" in await page.inner_text("#invoices")
        await page.click(f'tr[data-invoice="{doc["id"]}"] a[href="/invoices/{doc["id"]}"]')
        await page.wait_for_url(f"{console_world.url}/invoices/{doc['id']}")
        assert doc["number"] in await page.inner_text("#invoice-title")
        async with page.expect_download() as info:
            await page.click("#invoice-pdf")
        saved = tmp_path / "invoice.pdf"
        await (await info.value).save_as(saved)
        text = pdftotext(saved)
        assert f"Invoice {doc['number']}" in text and "Total due, RUB 120.00" in text and "ООО «Сеть Плюс»" in text
        # a credit note of 20.00 on the first line, with its reason
        line_no = doc["lines"][0]["line_no"]
        await page.fill(f'input[name="line.{line_no}"]', "20.00")
        await page.fill("#credit-reason", "Outage on the 12th")
        await page.click("#credit-submit")
        await page.wait_for_url(re.compile(r".*/invoices/\d+\?m=documents\.credited$"))
        assert doc["number"] in await page.inner_text("#credits")
        async with page.expect_download() as info:
            await page.click("#invoice-pdf")
        note = tmp_path / "note.pdf"
        await (await info.value).save_as(note)
        text = pdftotext(note)
        assert re.search(rf"Credit note \S+ for invoice {re.escape(doc['number'])}", text)
        assert "Reason: Outage on the 12th" in text and "Total credited, RUB -20.00" in text
        # a credit note needs a reason
        await page.goto(f"{console_world.url}/invoices/{doc['id']}")
        await page.evaluate("document.querySelector('#credit-reason').removeAttribute('required')")
        await page.click("#credit-submit")
        assert "Give the reason" in await page.inner_text("#credit-error")
        # more than is left is the core's refusal, shown on the page
        await page.fill(f'input[name="line.{line_no}"]', "1000.00")
        await page.fill("#credit-reason", "Too much")
        await page.click("#credit-submit")
        assert "Not done:" in await page.inner_text("#credit-error")
        assert (await page.goto(f"{console_world.url}/invoices/999999")).status == 404
        # the statement, as PDF
        await page.goto(f"{console_world.url}/accounts/{account_id}/invoices")
        today = dt.date.today()
        await page.fill("#since", (today - dt.timedelta(days=1)).isoformat())
        await page.fill("#until", today.isoformat())
        async with page.expect_download() as info:
            await page.click("#get-statement")
        statement = tmp_path / "statement.pdf"
        await (await info.value).save_as(statement)
        text = pdftotext(statement)
        assert "Statement of account" in text and "Closing balance: 400.00 RUB" in text
        async with page.expect_download() as info:
            await page.click("#get-statement-html")
        await (await info.value).save_as(tmp_path / "statement.html")
        assert '<span id="closing">400.00</span> RUB' in (tmp_path / "statement.html").read_text()


async def test_an_operator_without_invoice_rights_sees_no_link(console_world: ConsoleWorld) -> None:
    await console_world.group("cashiers_doc", ["users.read", "payments.write"])
    browser = await console_world.operator("cash", groups=["cashiers_doc"])
    admin: uc.Client = console_world.root
    user = await admin.call("users.create", {"login": "petr", "password": "petr-password-1"})
    page = await browser.get(f"/subscribers/{user['id']}")
    assert page.status == 200 and "card-invoices" not in page.text
    page = await browser.get(f"/accounts/{user['basic_account_id']}/invoices")
    assert page.status == 403
