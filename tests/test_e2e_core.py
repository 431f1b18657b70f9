"""End to end through a real ``billcore serve``: an administrator and two
subscribers over URFA on TCP, and billctl as an operator uses it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.running import BillcoreProcess
from urfa.client import connect
from urfa.errors import CallFailed, LoginFailed


def billcore_cli(config: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "billcore.cli", "-c", str(config), *args],
        capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=60,
    )


def billctl(bc: BillcoreProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BILLCTL_PASSWORD": "admin-password", "BILLCTL_PORT": str(bc.urfa_port)}
    return subprocess.run([sys.executable, "-m", "billcore.clients.billctl", "--login", "root", *args],
                          capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture
def core(tmp_path: Path, db_dsn: str):  # type: ignore[no-untyped-def]
    with BillcoreProcess(tmp_path, dsn=db_dsn) as bc:
        bc.child_pid("core")
        done = billcore_cli(bc.config_path, "admin", "create", "root", "--password-env", "PW",
                            env={"PW": "admin-password"})
        assert done.returncode == 0, done.stderr
        yield bc


async def test_subscribers_see_only_their_own_money(core: BillcoreProcess) -> None:
    admin = await connect("127.0.0.1", core.urfa_port)
    await admin.login("admin", "root", "admin-password")
    ids = {}
    for name in ("alice", "bob"):
        user = await admin.call("users.create", {"login": name, "password": f"{name}-password", "full_name": name.title()})
        ids[name] = user["basic_account_id"]
    paid = await admin.call("payments.add", {"account_id": ids["alice"], "amount": 25_500_000,
                                             "method": "cash", "external_id": "receipt-1"})
    again = await admin.call("payments.add", {"account_id": ids["alice"], "amount": 25_500_000,
                                              "method": "cash", "external_id": "receipt-1"})
    assert again["payment_id"] == paid["payment_id"], "the same external id is one payment"

    alice = await connect("127.0.0.1", core.urfa_port)
    await alice.login("user", "alice", "alice-password")
    mine = await alice.call("me.accounts")
    assert [a["id"] for a in mine] == [ids["alice"]]
    assert mine[0]["balance"] == 25_500_000
    # bob's account through alice's session: refused, and admin calls are not in her table
    with pytest.raises(CallFailed):
        await alice.call("me.history", {"account_id": ids["bob"]})
    with pytest.raises(CallFailed) as err:
        await alice.call("accounts.get", {"account_id": ids["bob"]})
    assert err.value.code == "not_in_table"
    names = {c["name"] for c in await alice.call("sys.calls")}
    assert "me.accounts" in names and "payments.add" not in names

    # her own internet switch becomes a user block the administrator sees
    await alice.call("me.block", {"on": True})
    blocks = await admin.call("blocks.list", {"account_id": ids["alice"], "active_only": True})
    assert [b["kind"] for b in blocks] == ["user"]

    with pytest.raises(LoginFailed):
        bad = await connect("127.0.0.1", core.urfa_port)
        try:
            await bad.login("user", "alice", "wrong-password")
        finally:
            await bad.close()
    for c in (admin, alice):
        await c.close()

    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{core.metrics_port}/metrics", timeout=5).read().decode()
    assert 'billcore_urfa_calls_total{code="ok",fn="users.create"} 2.0' in text, "calls counted by function and code"
    assert 'billcore_urfa_calls_total{code="accounts.unknown",fn="me.history"} 1.0' in text, "refusals by code"


def test_billctl_as_an_operator_uses_it(core: BillcoreProcess) -> None:
    made = billctl(core, "--json", "call", "users.create", "login=carol", "password=carol-password")
    assert made.returncode == 0, made.stderr
    account_id = json.loads(made.stdout)["basic_account_id"]
    pay = billctl(core, "pay", str(account_id), "12.50", "--external-id", "bank-77")
    assert pay.returncode == 0, pay.stderr
    shown = billctl(core, "account", str(account_id))
    assert shown.returncode == 0
    assert "12.50" in shown.stdout, shown.stdout
    bad = billctl(core, "call", "payments.add", f"account_id={account_id}", "amount=1.2.3", "method=cash")
    assert bad.returncode == 2 and "amount: not a valid money" in bad.stderr
    listing = billctl(core, "calls")
    assert "payments.add" in listing.stdout and "account_id:int" in listing.stdout


def test_billcore_verify_names_a_broken_account(core: BillcoreProcess, db_dsn: str) -> None:
    made = billctl(core, "--json", "call", "users.create", "login=dave", "password=dave-password")
    account_id = json.loads(made.stdout)["basic_account_id"]
    assert billctl(core, "pay", str(account_id), "5.00").returncode == 0
    ok = billcore_cli(core.config_path, "verify")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "every invariant holds" in ok.stdout

    import asyncio

    import asyncpg

    async def corrupt() -> None:
        conn = await asyncpg.connect(db_dsn)
        try:
            await conn.execute("UPDATE accounts SET balance = balance + 1 WHERE id = $1", account_id)
        finally:
            await conn.close()

    asyncio.run(corrupt())
    bad = billcore_cli(core.config_path, "verify")
    assert bad.returncode == 1
    assert f"account {account_id}" in bad.stdout
