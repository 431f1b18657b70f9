"""The invoice calls over a real URFA service and a real database: rights and shapes.

A cashier reads nothing of invoices and issues nothing; an accountant
issues, runs and credits; a subscriber sees only their own invoices and
statements, and another's invoice answers exactly as one that does not
exist.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from billcore.billing import accounts, payments
from billcore.server.principals import create_admin
from tests.test_invoices import APRIL, MARCH, charge, services
from tests.test_notify_calls import PW, Live, refused
from urfa.scram import make_verifier

NOW = APRIL + dt.timedelta(days=2)


@pytest.fixture
async def live(pool: asyncpg.Pool) -> AsyncIterator[Live]:
    core = await Live(pool).start()
    core.core.now = lambda: NOW   # type: ignore[method-assign]
    async with pool.acquire() as conn:
        await create_admin(conn, "accountant", PW, ["accountants"])
    yield core
    await core.stop()


async def subscriber(conn: asyncpg.Connection, login: str) -> int:
    user = await accounts.create_user(conn, login, make_verifier(PW, iterations=4096), full_name=login.title())
    return int(user["basic_account_id"])


async def collect(stream: Any) -> tuple[list[list[Any]], dict[str, Any]]:
    rows = [row async for chunk in stream for row in chunk]
    return rows, stream.result


async def test_rights_and_shapes(live: Live, pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        svc = await services(conn)
        anna, boris = await subscriber(conn, "anna"), await subscriber(conn, "boris")
        for acc in (anna, boris):
            await payments.add_payment(conn, account_id=acc, amount=200_000_000, method="cash", actor="t",
                                       now=MARCH + dt.timedelta(days=1))
            await charge(conn, acc, "periodic", 120_000_000, MARCH + dt.timedelta(days=1), svc)
            await charge(conn, acc, "traffic", 3_000_000, MARCH + dt.timedelta(days=9), svc)
    cashier = await live.login("admin", "cashier")
    accountant = await live.login("admin", "accountant")
    await refused("not_in_table", cashier.call("invoices.issue", {"account_id": 1}))
    await refused("not_in_table", cashier.call("invoices.issue", {"account_id": anna}))
    await refused("not_in_table", cashier.call("invoices.credit", {"invoice_id": 1, "reason": "x"}))

    progress, ran = await collect(accountant.stream("invoices.run", {}))
    assert ran["issued"] == 2 and ran["total"] == 246_000_000
    assert progress[-1][1:] == [ran["accounts"], 2, 246_000_000]
    listed = await accountant.call("invoices.list", {"kind": "invoice"})
    assert listed["total"] == 2 and {s["account_id"] for s in listed["invoices"]} == {anna, boris}
    annas = next(s for s in listed["invoices"] if s["account_id"] == anna)
    doc = await accountant.call("invoices.get", {"invoice_id": annas["id"]})
    assert doc["number"] == annas["number"] and doc["total"] == 123_000_000 and doc["currency"] == "RUB"
    assert [line["description"] for line in doc["lines"]] == ["Monthly fee", "Internet — World"]
    await refused("invoices.unknown", accountant.call("invoices.get", {"invoice_id": 987_654}))
    await refused("invoices.nothing_to_invoice", accountant.call("invoices.issue", {"account_id": anna}))
    await refused("billing.invalid", accountant.call("invoices.credit", {"invoice_id": annas["id"], "reason": " "}))
    note = await accountant.call("invoices.credit", {"invoice_id": annas["id"], "reason": "outage",
                                                     "lines": [{"line_no": 2, "total": 1_000_000}]})
    assert note["kind"] == "credit_note" and note["total"] == -1_000_000 and note["credits"]["id"] == annas["id"]
    await refused("invoices.credit_refused", accountant.call(
        "invoices.credit", {"invoice_id": annas["id"], "reason": "x", "lines": [{"line_no": 2, "total": 2_000_001}]}))

    rows, result = await collect(accountant.stream("statements.get", {"account_id": anna, "since": MARCH,
                                                                       "until": APRIL + dt.timedelta(days=3)}))
    assert result["opening"] == 0 and result["entries"] == len(rows) == 4
    assert result["closing"] == sum(row[3] for row in rows) == 200_000_000 - 123_000_000 + 1_000_000
    assert result["customer"]["login"] == "anna"

    # a subscriber sees their own only; another's invoice is "unknown", like one that does not exist
    me = await live.login("user", "anna")
    mine = await me.call("me.invoices", {})
    assert {s["account_id"] for s in mine["invoices"]} == {anna} and mine["total"] == 2
    assert (await me.call("me.invoice", {"invoice_id": annas["id"]}))["total"] == 123_000_000
    boris_invoice = next(s["id"] for s in listed["invoices"] if s["account_id"] == boris)
    other = await refused("invoices.unknown", me.call("me.invoice", {"invoice_id": boris_invoice}))
    missing = await refused("invoices.unknown", me.call("me.invoice", {"invoice_id": 987_654}))
    assert other.message.replace(str(boris_invoice), "N") == missing.message.replace("987654", "N")
    rows, result = await collect(me.stream("me.statement", {"account_id": anna, "since": MARCH, "until": APRIL}))
    assert result["closing"] == 200_000_000 - 123_000_000
    with pytest.raises(Exception) as caught:
        await collect(me.stream("me.statement", {"account_id": boris, "since": MARCH, "until": APRIL}))
    assert getattr(caught.value, "code", None) == "accounts.unknown"
    await refused("not_in_table", me.call("invoices.list", {}))


async def test_the_automation_pass_invoices_once_per_day_after_the_grace(pool: asyncpg.Pool) -> None:
    from billcore.common.config import Config
    from billcore.server.automation import invoice_pass
    from billcore.server.context import CoreContext

    from billcore.common.config import CoreSection

    clock = [APRIL + dt.timedelta(minutes=30)]               # March (Moscow) ended, the grace (1 h) not yet
    core = CoreContext(pool, Config(core=CoreSection(timezone="Europe/Moscow")), now=lambda: clock[0])
    async with pool.acquire() as conn:
        svc = await services(conn)
        acc = await subscriber(conn, "vera")
        await charge(conn, acc, "periodic", 10_000_000, MARCH + dt.timedelta(days=3), svc)
    first = await invoice_pass(core)
    assert first is not None and first.issued == 0
    clock[0] = APRIL + dt.timedelta(minutes=50)
    assert await invoice_pass(core) is None                   # once per local day of now - grace
    clock[0] = APRIL + dt.timedelta(hours=2)                  # past the grace: a new day of now - grace
    again = await invoice_pass(core)
    assert again is not None and again.issued == 1
    clock[0] = APRIL + dt.timedelta(hours=9)
    assert await invoice_pass(core) is None
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM invoices WHERE account_id = $1", acc) == 1


async def test_billctl_runs_lists_shows_credits_and_prints_statements(live: Live, pool: asyncpg.Pool) -> None:
    import asyncio
    import json
    import os
    import subprocess
    import sys

    async with pool.acquire() as conn:
        svc = await services(conn)
        acc = await subscriber(conn, "gleb")
        await payments.add_payment(conn, account_id=acc, amount=50_000_000, method="cash", actor="t",
                                   now=MARCH + dt.timedelta(days=1))
        await charge(conn, acc, "periodic", 12_000_000, MARCH + dt.timedelta(days=2), svc)
        await charge(conn, acc, "traffic", 1_500_000, MARCH + dt.timedelta(days=3), svc)
    env = dict(os.environ, BILLCTL_PASSWORD=PW)
    env.pop("BILLCTL_OTP", None)
    base = [sys.executable, "-m", "billcore.clients.billctl", "--port", str(live.port), "--login", "accountant"]

    async def billctl(*args: str) -> subprocess.CompletedProcess[str]:
        done = await asyncio.to_thread(subprocess.run, [*base, *args], env=env, capture_output=True, text=True,
                                       timeout=60)
        return done

    ran = await billctl("invoices", "run")
    assert ran.returncode == 0, ran.stderr
    assert "invoices: up to account" in ran.stderr and "13.50" in ran.stdout
    listed = await billctl("--json", "invoices", "list", "--account", str(acc))
    assert listed.returncode == 0, listed.stderr
    (summary,) = json.loads(listed.stdout)
    assert summary["total"] == 13_500_000 and summary["number"] == "INV-2026-000001"
    shown = await billctl("invoices", "show", str(summary["id"]))
    assert shown.returncode == 0 and "Internet — World" in shown.stdout and "1.50" in shown.stdout
    assert "INV-2026-000001" in shown.stderr and "total 13.50" in shown.stderr
    credited = await billctl("--json", "invoices", "credit", str(summary["id"]), "--reason", "outage",
                             "--line", "2=0.50")
    assert credited.returncode == 0, credited.stderr
    assert [line["total"] for line in json.loads(credited.stdout)["lines"]] == [-500_000]
    over = await billctl("invoices", "credit", str(summary["id"]), "--reason", "again", "--line", "2=1.01")
    assert over.returncode != 0 and "invoices.credit_refused" in over.stderr
    bad = await billctl("invoices", "credit", str(summary["id"]), "--reason", "x", "--line", "2")
    assert bad.returncode == 2 and "LINE_NO=AMOUNT" in bad.stderr
    statement = await billctl("--csv", "statement", str(acc), "--since", "2026-02-01", "--until", "2026-05-01")
    assert statement.returncode == 0, statement.stderr
    lines = statement.stdout.splitlines()
    assert lines[0] == "ledger_id,created_at,kind,amount,balance_after,reference" and len(lines) == 5
    assert "opening 0.00" in statement.stderr and "closing 37.00" in statement.stderr
    cashier = [*base[:-1], "cashier"]
    refused_run = await asyncio.to_thread(subprocess.run, [*cashier, "invoices", "run"], env=env,
                                          capture_output=True, text=True, timeout=60)
    assert refused_run.returncode != 0 and "not_in_table" in refused_run.stderr


async def test_a_refused_invoice_run_is_logged_and_leaves_the_pass_going(pool: asyncpg.Pool,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    from billcore.common.config import Config, InvoicesSection
    from billcore.server.automation import invoice_pass
    from billcore.server.context import CoreContext

    core = CoreContext(pool, Config(invoices=InvoicesSection(series="not a series")), now=lambda: NOW)
    assert await invoice_pass(core) is None
    assert "invoice run failed" in caplog.text and "invoices_run_on" not in core.extras   # tried again next pass
