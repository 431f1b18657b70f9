"""documents/: invoices, credit notes and statements read back from their PDFs by a real reader.

pdftotext and pdfimages (poppler-utils) read what a subscriber's PDF viewer
reads; the HTML is checked as text.  Documents are built as dicts of the
shape ``invoices.get`` and ``statements.get`` return (docs/documents.md).
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from documents.labels import LABELS, human_quantity, human_rate
from documents.render import invoice_html, invoice_pdf, statement_html, statement_pdf
from documents.view import DocumentError, Issuer
from tests.conftest import need_peer

ISSUER = Issuer(name="ООО «Сеть Плюс»", address="125009, Москва\nул. Тверская, 1", tax_id="7701234567",
                bank_details="ПАО Сбербанк\nр/с 40702810900000000001", timezone="Europe/Moscow")


def invoice(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": 7, "kind": "invoice", "number": "INV-2026-000007", "series": "INV", "year": 2026, "seq": 7,
        "account_id": 12, "period_start": "2026-10-31T21:00:00+00:00", "period_end": "2026-11-30T21:00:00+00:00",
        "issued_at": "2026-11-30T21:05:00+00:00", "issued_by": "periodic",
        "vat_bp": 2000, "net": 83_333_333, "vat": 16_666_667, "total": 100_000_000, "reason": "",
        "credits": None, "credited_by": [],
        "customer": {"user_id": 5, "login": "ivanov", "full_name": "Иван Иванов", "address": "Москва, ул. Ленина, 1",
                     "email": "ivanov@example.org"},
        "lines": [
            {"line_no": 1, "line_kind": "periodic", "service_id": 3, "class_id": None, "description": "Monthly fee",
             "quantity": None, "net": 41_666_667, "vat": 8_333_333, "total": 50_000_000},
            {"line_no": 2, "line_kind": "traffic", "service_id": 4, "class_id": 1, "description": "Internet traffic",
             "quantity": 12_345_678_901, "net": 33_333_333, "vat": 6_666_667, "total": 40_000_000},
            {"line_no": 3, "line_kind": "time", "service_id": 5, "class_id": None, "description": "Dial-up time",
             "quantity": 5_430, "net": 8_333_333, "vat": 1_666_667, "total": 10_000_000},
        ],
        "currency": "RUB", "minor_units": 2,
    }
    doc.update(changes)
    return doc


def credit_note() -> dict[str, Any]:
    return invoice(id=9, kind="credit_note", number="CN-2026-000001", series="CN", seq=1,
                   net=-8_333_333, vat=-1_666_667, total=-10_000_000, reason="Outage on 12 November",
                   credits={"id": 7, "number": "INV-2026-000007"}, issued_by="admin",
                   lines=[{"line_no": 1, "line_kind": "other", "service_id": None, "class_id": None,
                           "description": "Credit for the outage", "quantity": None, "net": -8_333_333,
                           "vat": -1_666_667, "total": -10_000_000}])


STATEMENT = {"account_id": 12, "since": "2026-11-01T00:00:00+03:00", "until": "2026-12-01T00:00:00+03:00",
             "opening": 5_000_000, "closing": 55_500_001, "entries": 3,
             "customer": {"login": "ivanov", "full_name": "Иван Иванов"}, "currency": "RUB", "minor_units": 2}
ROWS = [[101, "2026-11-01T09:00:00+00:00", "payment", 150_000_000, 155_000_000, "cash desk 4"],
        [102, "2026-11-01T21:00:00+00:00", "periodic", -100_000_000, 55_000_000, "periodic:12:3:2026-11"],
        [103, "2026-11-15T10:00:00+00:00", "correction", 500_001, 55_500_001, "goodwill <b>bonus</b>"]]


def pdftotext(pdf: bytes, *flags: str) -> str:
    need_peer(shutil.which("pdftotext") is not None, "pdftotext is not installed (Debian: poppler-utils)")
    done = subprocess.run(["pdftotext", *flags, "-", "-"], input=pdf, capture_output=True, check=True, timeout=60)
    return done.stdout.decode("utf-8")


def pages(pdf: bytes) -> int:
    need_peer(shutil.which("pdfinfo") is not None, "pdfinfo is not installed (Debian: poppler-utils)")
    done = subprocess.run(["pdfinfo", "-"], input=pdf, capture_output=True, check=True, timeout=60, text=False)
    line = next(raw for raw in done.stdout.decode().splitlines() if raw.startswith("Pages:"))
    return int(line.split()[1])


def words(text: str) -> str:
    """pdftotext's text with runs of spaces made one (a layout's columns are spaces)."""
    return " ".join(text.split())


# -- PDF ------------------------------------------------------------------------------

def test_an_english_invoice_shows_its_number_totals_and_lines_exactly() -> None:
    text = words(pdftotext(invoice_pdf(invoice(), ISSUER, "en"), "-layout"))
    assert "Invoice INV-2026-000007" in text
    assert "Total due, RUB 100.00" in text                  # the currency's two decimals
    assert "Net 83.333333" in text and "VAT 20% 16.666667" in text   # more only where the amount has them
    assert "Monthly fee 41.666667 8.333333 50.00" in text
    assert "Internet traffic 12.35 GB 33.333333 6.666667 40.00" in text
    assert "Dial-up time 1:30 8.333333 1.666667 10.00" in text
    # the period in the operator's zone, its last day included
    assert "Period: 2026-11-01 – 2026-11-30" in text
    assert "Issued: 2026-12-01 00:05" in text


def test_a_russian_invoice_is_real_cyrillic_text() -> None:
    text = words(pdftotext(invoice_pdf(invoice(), ISSUER, "ru"), "-layout"))
    assert "Счёт INV-2026-000007" in text
    assert "Итого к оплате, RUB 100.00" in text
    assert "НДС 20% 16.666667" in text
    assert "Иван Иванов" in text and "ООО «Сеть Плюс»" in text and "ИНН: 7701234567" in text
    assert "12.35 ГБ" in text and "Без НДС 83.333333" in text


@pytest.mark.parametrize("currency,units,total,shown", [
    ("JPY", 0, 1_500_000_000, "1500"), ("KWD", 3, 12_345_000, "12.345"), ("KWD", 3, 12_000_000, "12.000"),
    ("USD", 2, 1_234_567, "1.234567")])
def test_every_amount_takes_the_currencys_minor_units(currency: str, units: int, total: int, shown: str) -> None:
    doc = invoice(currency=currency, minor_units=units, total=total, net=total, vat=0, vat_bp=0,
                  lines=[{"line_no": 1, "line_kind": "once", "description": "Connection", "quantity": None,
                          "net": total, "vat": 0, "total": total}])
    text = words(pdftotext(invoice_pdf(doc, ISSUER, "en"), "-layout"))
    assert f"Total due, {currency} {shown}" in text
    assert f"Connection {shown} 0{'.' + '0' * units if units else ''} {shown}" in text


def test_a_300_line_invoice_continues_over_pages_under_its_header() -> None:
    lines = [{"line_no": n, "line_kind": "traffic", "description": f"Traffic class {n}", "quantity": n * 1_000_000,
              "net": 1_000_000, "vat": 200_000, "total": 1_200_000} for n in range(1, 301)]
    doc = invoice(lines=lines, net=300_000_000, vat=60_000_000, total=360_000_000)
    pdf = invoice_pdf(doc, ISSUER, "en")
    count = pages(pdf)
    assert count >= 5
    per_page = pdftotext(pdf, "-layout").split("\f")[:count]
    # every page with lines has the table's header again, and each its own page number in the footer
    for number, text in enumerate(per_page, start=1):
        if "Traffic class" in text:
            assert "Description" in text and "Quantity" in text, f"page {number} has no table header"
        assert f"INV-2026-000007 · {number}" in text
    text = words(" ".join(per_page))
    assert "300 Traffic class 300 300.00 MB 1.00 0.20 1.20" in text
    assert text.count("Traffic class") == 300
    assert "Total due, RUB 360.00" in words(per_page[-1])


def test_a_credit_note_names_its_invoice_and_reason() -> None:
    en = words(pdftotext(invoice_pdf(credit_note(), ISSUER, "en"), "-layout"))
    assert "Credit note CN-2026-000001 for invoice INV-2026-000007" in en
    assert "Reason: Outage on 12 November" in en
    assert "Total credited, RUB -10.00" in en
    ru = words(pdftotext(invoice_pdf(credit_note(), ISSUER, "ru"), "-layout"))
    assert "Корректировочный счёт CN-2026-000001 к счёту INV-2026-000007" in ru
    assert "Итого к возврату, RUB -10.00" in ru


def test_an_invoice_names_its_credit_notes() -> None:
    doc = invoice(credited_by=[{"id": 9, "number": "CN-2026-000001", "total": -10_000_000}])
    assert "Credited by: CN-2026-000001 (-10.00)" in words(pdftotext(invoice_pdf(doc, ISSUER, "en")))


def test_the_logo_is_drawn(tmp_path: Path) -> None:
    need_peer(shutil.which("pdfimages") is not None, "pdfimages is not installed (Debian: poppler-utils)")
    from PIL import Image   # reportlab's own dependency

    logo = tmp_path / "logo.png"
    Image.new("RGB", (120, 40), (200, 30, 40)).save(logo)
    with_logo = Issuer(name="Net", logo=str(logo))

    def images(issuer: Issuer) -> list[list[str]]:
        pdf = tmp_path / "doc.pdf"
        pdf.write_bytes(invoice_pdf(invoice(), issuer, "en"))
        listed = subprocess.run(["pdfimages", "-list", str(pdf)], capture_output=True, check=True, timeout=60)
        return [row.split()[3:5] for row in listed.stdout.decode().splitlines()[2:]]

    assert images(with_logo) == [["120", "40"]]          # width, height of the one image
    assert images(ISSUER) == []
    assert 'src="data:image/png;base64,' in invoice_html(invoice(), with_logo, "en")


def test_a_broken_logo_or_font_is_a_clear_error(tmp_path: Path) -> None:
    not_png = tmp_path / "logo.png"
    not_png.write_bytes(b"GIF89a")
    with pytest.raises(DocumentError, match="not a PNG"):
        invoice_pdf(invoice(), Issuer(logo=str(not_png)), "en")
    with pytest.raises(DocumentError, match="cannot read"):
        invoice_pdf(invoice(), Issuer(logo=str(tmp_path / "missing.png")), "en")
    with pytest.raises(DocumentError, match="documents.font"):
        invoice_pdf(invoice(), Issuer(font=str(tmp_path / "missing.ttf")), "en")


def test_a_malformed_document_is_refused_not_guessed() -> None:
    with pytest.raises(DocumentError, match="'total' must be int"):
        invoice_pdf(invoice(total=100.0), ISSUER, "en")
    broken = invoice()
    del broken["number"]
    with pytest.raises(DocumentError, match="no 'number'"):
        invoice_html(broken, ISSUER, "en")
    with pytest.raises(DocumentError, match="ISO 8601"):
        invoice_html(invoice(issued_at="yesterday"), ISSUER, "en")
    with pytest.raises(ValueError, match="document language"):
        invoice_html(invoice(), ISSUER, "de")


def test_the_same_document_gives_the_same_bytes() -> None:
    assert invoice_pdf(invoice(), ISSUER, "ru") == invoice_pdf(copy.deepcopy(invoice()), ISSUER, "ru")


def test_a_statement_shows_opening_every_row_and_closing() -> None:
    for lang, opening, closing, payment in (("en", "Opening balance: 5.00 RUB", "Closing balance: 55.500001 RUB",
                                             "Payment"),
                                            ("ru", "Входящий остаток: 5.00 RUB", "Исходящий остаток: 55.500001 RUB",
                                             "Платёж")):
        text = words(pdftotext(statement_pdf(STATEMENT, iter(ROWS), ISSUER, lang), "-layout"))
        assert opening in text and closing in text
        assert f"2026-11-01 12:00 {payment} cash desk 4 150.00 155.00" in text
        assert "goodwill <b>bonus</b> 0.500001 55.500001" in text     # markup is text, not formatting
    empty = {**STATEMENT, "entries": 0, "closing": 5_000_000}
    text = words(pdftotext(statement_pdf(empty, [], ISSUER, "en")))
    assert "No entries in this period." in text and "Closing balance: 5.00 RUB" in text


# -- HTML ------------------------------------------------------------------------------

def test_html_escapes_what_the_customer_typed() -> None:
    doc = invoice(customer={"login": "x", "full_name": "<script>alert(1)</script>", "address": "a & b"})
    doc["lines"][0]["description"] = '"><img src=x onerror=alert(2)>'
    html = invoice_html(doc, ISSUER, "en")
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<img src=x" not in html and "&#34;&gt;&lt;img src=x onerror=alert(2)&gt;" in html
    assert "a &amp; b" in html
    statement = statement_html(STATEMENT, ROWS, ISSUER, "en")
    assert "goodwill &lt;b&gt;bonus&lt;/b&gt;" in statement


def test_html_says_what_the_pdf_says() -> None:
    html = invoice_html(invoice(), ISSUER, "ru")
    assert '<h1 id="doc-title">Счёт INV-2026-000007</h1>' in html
    assert '<td id="doc-total">100.00</td>' in html and "Итого к оплате, RUB" in html
    note = invoice_html(credit_note(), ISSUER, "en")
    assert "Credit note CN-2026-000001 for invoice INV-2026-000007" in note and "Reason: Outage on 12 November" in note


# -- the pure parts ---------------------------------------------------------------------

def test_quantities_and_rates_are_humanised_in_integers() -> None:
    assert human_quantity("traffic", 1_000_000_000, "en") == "1.00 GB"
    assert human_quantity("traffic", 999_995_000, "en") == "1000.00 MB"     # rounded half up, never a float
    assert human_quantity("traffic", 1_500_000, "ru") == "1.50 МБ"
    assert human_quantity("traffic", 512, "en") == "512 B"
    assert human_quantity("time", 3_599, "en") == "0:59" and human_quantity("time", 90_000, "en") == "25:00"
    assert human_quantity("periodic", None, "en") == ""
    assert human_rate(2000) == "20%" and human_rate(1050) == "10.5%" and human_rate(0) == "0%"


def test_both_languages_have_every_label() -> None:
    assert LABELS["en"].keys() == LABELS["ru"].keys()


def test_issuer_comes_from_the_config() -> None:
    from billcore.common.config import config_from_dict

    config = config_from_dict({"documents": {"name": "Net", "tax_id": "1", "language": "ru"},
                               "billing": {"currency": "KWD", "minor_units": 3}, "core": {"timezone": "Asia/Kuwait"}})
    issuer = Issuer.of(config)
    assert (issuer.name, issuer.language, issuer.currency, issuer.minor_units, issuer.timezone) == (
        "Net", "ru", "KWD", 3, "Asia/Kuwait")
    from billcore.common.config import ConfigError

    with pytest.raises(ConfigError, match="documents.language"):
        config_from_dict({"documents": {"language": "de"}})
    with pytest.raises(ConfigError, match="documents.logo"):
        config_from_dict({"documents": {"logo": "logo.svg"}})
