"""Issue 22's done-when, over a live stack: the served openapi.json validates with
openapi-spec-validator, and a client generated from it by openapi-python-client
(its CLI, into a temporary directory, then imported) creates a subscriber,
takes a payment twice with one Idempotency-Key (one booking in payments.list),
reads the balance and reads a streamed traffic report.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from openapi_spec_validator import validate

from billcore.billing.rating import TrafficUsage
from billcore.billing.usage import commit_usage
from billcore.common.money import format_money
from tests.httpapi_stack import ApiStack, httpapi_stack
from tests.test_netflow_worker_support import setup_accounts

GENERATOR = Path(sys.executable).parent / "openapi-python-client"


async def seed_traffic(dsn: str) -> list[tuple[int, int, str, int, int]]:
    """Traffic of two accounts on two days, booked by the billing code itself (as the NetFlow path does),
    at 1 micro-unit a byte: sub-cent amounts. The rows usage_daily then holds, in the report's order."""
    accounts = list((await setup_accounts(dsn, ["10.22.0.1", "10.22.0.2"])).values())
    conn = await asyncpg.connect(dsn)
    try:
        inet = await conn.fetchval("SELECT id FROM traffic_classes WHERE name = 'inet'")
        now = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
        usage = [TrafficUsage(a, inet, now - timedelta(days=d), 1_234_567 * (i + 1) + d)
                 for i, a in enumerate(accounts) for d in (2, 1)]
        await commit_usage(conn, "netflow:seed", 1, usage, now)
        rows = await conn.fetch("SELECT account_id, class_id, day, quantity, amount FROM usage_daily"
                                " ORDER BY account_id, day, class_id")
        return [(r["account_id"], r["class_id"], r["day"].isoformat(), r["quantity"], r["amount"]) for r in rows]
    finally:
        await conn.close()


@pytest.fixture
async def stack(tmp_path: Path, db_dsn: str) -> AsyncIterator[ApiStack]:
    traffic = await seed_traffic(db_dsn)
    async with httpapi_stack(tmp_path / "httpapi-client", dsn=db_dsn) as s:
        s.extra["traffic"] = traffic
        yield s


def _generate(spec: dict[str, Any], where: Path) -> tuple[Any, str]:
    """Run openapi-python-client's CLI on ``spec``; the generated package (imported) and its output."""
    (where / "openapi.json").write_text(json.dumps(spec))
    done = subprocess.run([str(GENERATOR), "generate", "--path", "openapi.json", "--meta", "none"],
                          cwd=where, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    sys.path.insert(0, str(where))
    try:
        return importlib.import_module("billcore_http_api_client"), done.stdout + done.stderr
    finally:
        sys.path.remove(str(where))


async def test_a_generated_client_books_a_payment_once_and_reads_balance_and_traffic(
        stack: ApiStack, tmp_path: Path) -> None:
    token = await stack.token("crm", ["superusers"])
    served = stack.request("GET", "/api/v1/openapi.json", token=token)
    assert served.status == 200
    spec = served.json()
    assert spec["openapi"].startswith("3.1")
    validate(spec)                       # openapi-spec-validator: raises on an invalid document
    assert "/api/v1/calls/payments.add" in spec["paths"]

    pkg, output = _generate(spec, tmp_path)
    # the only parts a generator may skip are the NDJSON answers (it reads them as raw bytes)
    streamed = sorted(name for name, item in spec["paths"].items()
                      if "application/x-ndjson" in item["post"]["responses"]["200"]["content"])
    assert "/api/v1/calls/reports.traffic" in streamed
    warned = sorted("/api/v1/calls/" + line.split("/api/v1/calls/", 1)[1].split()[0]
                    for line in output.splitlines() if line.startswith("WARNING parsing"))
    assert warned == streamed, output
    assert output.count("Unsupported content_type application/x-ndjson") == len(streamed)

    client_mod = importlib.import_module("billcore_http_api_client.client")
    users_create = importlib.import_module("billcore_http_api_client.api.users.users_create")
    payments_add = importlib.import_module("billcore_http_api_client.api.payments.payments_add")
    payments_list = importlib.import_module("billcore_http_api_client.api.payments.payments_list")
    accounts_get = importlib.import_module("billcore_http_api_client.api.accounts.accounts_get")
    reports_traffic = importlib.import_module("billcore_http_api_client.api.reports.reports_traffic")
    models = importlib.import_module("billcore_http_api_client.models")
    client = client_mod.AuthenticatedClient(base_url=stack.url, token=token, raise_on_unexpected_status=True)

    made = users_create.sync(client=client, body=models.UsersCreateBody(login="gen-alice", password="alice-pw-123",
                                                                         full_name="Alice Generated"))
    assert not isinstance(made, models.Problem), made
    account = made["basic_account_id"]

    body = models.PaymentsAddBody(account_id=account, amount="12.50", method="cash")
    first = payments_add.sync_detailed(client=client, body=body, idempotency_key="crm-pay-0001")
    again = payments_add.sync_detailed(client=client, body=body, idempotency_key="crm-pay-0001")
    assert first.status_code == again.status_code == 200
    assert first.parsed.balance == again.parsed.balance == "12.50"
    assert first.parsed["payment_id"] == again.parsed["payment_id"]

    booked = payments_list.sync(client=client, body=models.PaymentsListBody(account_id=account))
    assert [(row.amount, row["external_id"]) for row in booked] == [("12.50", "crm-pay-0001")]

    balance = accounts_get.sync(client=client, body=models.AccountsGetBody(account_id=account))
    assert balance.balance == "12.50" and balance.credit == "0.00"

    # the generated client reads the NDJSON answer as raw bytes (it does not parse that content type)
    raw_client = client_mod.AuthenticatedClient(base_url=stack.url, token=token)
    report = reports_traffic.sync_detailed(
        client=raw_client, body=models.ReportsTrafficBody(since="2020-01-01", until="2100-01-01"))
    assert report.status_code == 200
    assert report.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in report.content.splitlines()]
    rows, last = lines[:-1], lines[-1]
    booked = stack.extra["traffic"]
    assert len(booked) == 4 and any(amount % 10_000 for *_, amount in booked)     # sub-cent: exact or wrong
    assert rows == [{"account_id": a, "class_id": c, "day": d, "quantity": q, "amount": format_money(m)}
                    for a, c, d, q, m in booked]
    assert [list(row) for row in rows][0] == ["account_id", "class_id", "day", "quantity", "amount"]
    assert last == {"_result": {"rows": 4, "truncated": False}}

    # an error reaches the generated client as its Problem model, with the wire code
    missing = accounts_get.sync(client=client, body=models.AccountsGetBody(account_id=10**9))
    assert isinstance(missing, models.Problem) and missing.status == 404 and missing.code == "accounts.unknown"
