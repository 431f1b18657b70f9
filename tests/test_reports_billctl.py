"""``billctl report``: against a running core (billcore serve), rows stream to stdout as a table, CSV or JSON
lines, the summary goes to stderr, and a report missing an option is a usage error."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
from datetime import datetime, timedelta, timezone

import asyncpg

from billcore.billing.payments import add_payment, cancel_payment
from billcore.clients.billctl import build_parser
from billcore.common.money import format_money
from tests.running import BillcoreProcess
from tests.test_ops_cli import books, db_rows, run_billctl  # noqa: F401 - the fixture

UTC = timezone.utc
M = 1_000_000


def seed_payments(dsn: str, account: int) -> None:
    async def seed() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            at = datetime(2024, 3, 1, 10, tzinfo=UTC)
            await add_payment(conn, account_id=account, amount=12_500_000, method="cash", actor="anna", now=at)
            card = await add_payment(conn, account_id=account, amount=7_250_000, method="card", actor="anna", now=at)
            await add_payment(conn, account_id=account, amount=1_000_001, method="bank", actor="boris", now=at)
            await cancel_payment(conn, card.payment_id, actor="boris", now=at + timedelta(days=1))
        finally:
            await conn.close()

    asyncio.run(seed())


def test_billctl_report_payments_and_traffic(books: tuple[BillcoreProcess, dict[str, object]], db_dsn: str) -> None:
    bc, seeded = books
    account = seeded["traffic"][0]                                      # type: ignore[index]
    seed_payments(db_dsn, account)                                      # type: ignore[arg-type]
    window = ["--since", "2024-03-01", "--until", "2024-04-01"]

    as_csv = run_billctl(bc, "report", "payments", *window, "--group", "method", "--format", "csv")
    assert as_csv.returncode == 0, as_csv.stderr
    assert list(csv.reader(io.StringIO(as_csv.stdout))) == [
        ["key", "payments", "paid", "cancellations", "cancelled", "net"],
        ["bank", "1", format_money(1_000_001), "0", format_money(0), format_money(1_000_001)],
        ["card", "1", format_money(7_250_000), "1", format_money(7_250_000), format_money(0)],
        ["cash", "1", format_money(12_500_000), "0", format_money(0), format_money(12_500_000)],
    ]
    assert re.search(r"net\s+" + re.escape(format_money(13_500_001)), as_csv.stderr), as_csv.stderr

    as_json = run_billctl(bc, "report", "payments", *window, "--group", "operator", "--format", "json")
    assert as_json.returncode == 0, as_json.stderr
    assert [json.loads(line) for line in as_json.stdout.splitlines()] == [
        {"key": "anna", "payments": 2, "paid": 19_750_000, "cancellations": 0, "cancelled": 0, "net": 19_750_000},
        {"key": "boris", "payments": 1, "paid": 1_000_001, "cancellations": 1, "cancelled": 7_250_000,
         "net": -6_249_999}]

    # traffic: the three seeded accounts, the busiest first; a table on stdout, the summary on stderr
    daily = db_rows(db_dsn, "SELECT account_id, sum(quantity)::bigint AS q FROM usage_daily GROUP BY 1 ORDER BY 2 DESC")
    table = run_billctl(bc, "report", "traffic-top", "--since", str(seeded["since"]), "--until", str(seeded["until"]))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["class_id", "class", "rank", "account_id", "login", "quantity", "amount"]
    assert [int(line.split()[3]) for line in lines[2:]] == [r["account_id"] for r in daily]
    assert [int(line.split()[5]) for line in lines[2:]] == [r["q"] for r in daily]
    assert re.search(r"rows\s+3\b", table.stderr), table.stderr


def test_billctl_report_usage_errors(books: tuple[BillcoreProcess, dict[str, object]]) -> None:
    bc, _ = books
    missing = run_billctl(bc, "report", "payments", "--since", "2024-03-01")
    assert missing.returncode != 0 and "needs --until" in missing.stderr and not missing.stdout
    wrong = run_billctl(bc, "report", "arpu", "--month", "2024-03", "--group", "day")
    assert wrong.returncode != 0 and "takes no --group" in wrong.stderr
    refused = run_billctl(bc, "report", "churn", "--since", "2024-05", "--until", "2024-01")
    assert refused.returncode != 0 and "billing.invalid" in refused.stderr and not refused.stdout
    assert build_parser().parse_args(["report", "debtors"]).run is not None
