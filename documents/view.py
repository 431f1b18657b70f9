"""What a document shows, as text: the pure half of rendering (no files, no PDF, no HTML).

Theory of operation
-------------------
``invoice_view`` and ``statement_view`` turn what the core returns (the
DOCUMENT of ``invoices.get`` and the result of ``statements.get``, shapes in
docs/documents.md) into ready strings: every amount through billcore's one
money formatter with the currency's minor units (``format_money(min_decimals
= minor_units)``: exact, more decimals only where the amount has them),
dates in the operator's time zone, quantities humanised, labels in the
document's language.  The HTML and PDF writers of ``documents.render`` lay
out these strings and compute nothing, so both formats always say the same.

A document's period is half-open, ``[period_start, period_end)``, as the
ledger is; it is shown with its last day included (``period_end`` minus one
microsecond), which is what a person means by "1–30 November".

A malformed document (a missing key, a float amount) raises
``DocumentError`` naming what is wrong: a document with a guessed number is
worse than none.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from billcore.common.config import Config
from billcore.common.money import format_money

from .labels import human_quantity, human_rate, labels

__all__ = ["DocumentError", "Issuer", "InvoiceView", "LineView", "StatementView", "RowView",
           "invoice_view", "statement_view", "money_text", "period_text"]

MAX_TEXT = 2000   # a longer field of a document (a description, an address) is cut: the layout stays bounded


class DocumentError(Exception):
    """A document cannot be rendered: malformed input, or an unreadable font or logo."""


@dataclass(frozen=True, slots=True)
class Issuer:
    """The ISP as its documents show it (``[documents]``), with the installation's currency (``[billing]``)."""

    name: str = ""
    address: str = ""
    tax_id: str = ""
    bank_details: str = ""
    logo: str = ""                       # PNG path ('' = none)
    font: str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    font_bold: str = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"
    language: str = "en"
    currency: str = "RUB"
    minor_units: int = 2
    timezone: str = "UTC"

    @classmethod
    def of(cls, config: Config) -> Issuer:
        """From billcore's config (an edge's stand-in config without these sections: the defaults)."""
        if not all(hasattr(config, name) for name in ("documents", "billing", "core")):
            return cls()
        d = config.documents
        return cls(name=d.name, address=d.address, tax_id=d.tax_id, bank_details=d.bank_details, logo=d.logo,
                   font=d.font, font_bold=d.font_bold, language=d.language, currency=config.billing.currency,
                   minor_units=config.billing.minor_units, timezone=config.core.timezone)

    def logo_png(self) -> bytes | None:
        """The logo's bytes, or None when none is configured; an unreadable one is an error."""
        if not self.logo:
            return None
        try:
            data = Path(self.logo).read_bytes()
        except OSError as exc:
            raise DocumentError(f"documents.logo: cannot read {self.logo}: {exc.strerror}") from None
        if not data.startswith(b"\x89PNG\r\n\x1a\n"):
            raise DocumentError(f"documents.logo: {self.logo} is not a PNG file")
        return data


@dataclass(frozen=True, slots=True)
class LineView:
    line_no: str
    description: str
    quantity: str
    net: str
    vat: str
    total: str


@dataclass(frozen=True, slots=True)
class InvoiceView:
    lang: str
    words: Mapping[str, str]
    title: str                       # "Invoice" / "Credit note"
    number: str
    issued: str
    period: str
    account: str
    issuer: Issuer
    issuer_lines: list[str]
    customer_lines: list[str]
    lines: list[LineView]
    net: str
    vat: str
    total: str
    total_label: str
    vat_rate: str
    currency: str
    credit_for: str                  # "Credit note CN-… for invoice INV-…" or ''
    reason: str
    credited_by: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class RowView:
    date: str
    kind: str
    amount: str
    balance: str
    reference: str


@dataclass(frozen=True, slots=True)
class StatementView:
    lang: str
    words: Mapping[str, str]
    title: str
    account: str
    since: str
    until: str
    issuer: Issuer
    issuer_lines: list[str]
    customer_lines: list[str]
    opening: str
    closing: str
    entries: str
    currency: str
    rows: list[RowView]


def _cut(value: Any) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT - 1] + "…"


def _get(doc: Mapping[str, Any], key: str) -> Any:
    try:
        return doc[key]
    except (KeyError, TypeError):
        raise DocumentError(f"document: no {key!r}") from None


def _amount(doc: Mapping[str, Any], key: str) -> int:
    value = _get(doc, key)
    if type(value) is not int:
        raise DocumentError(f"document: {key!r} must be int micro-units, got {type(value).__name__}")
    return value


def _minor_units(doc: Mapping[str, Any], issuer: Issuer) -> int:
    units = doc.get("minor_units", issuer.minor_units)
    if type(units) is not int or not 0 <= units <= 6:
        raise DocumentError(f"document: minor_units 0 to 6, got {units!r}")
    return units


def money_text(amount: int, minor_units: int) -> str:
    """An amount as every document shows it: exact, at least ``minor_units`` decimals, no grouping."""
    return format_money(amount, min_decimals=minor_units)


def _moment(text: Any, zone: zoneinfo.ZoneInfo, key: str) -> dt.datetime:
    if isinstance(text, dt.datetime):
        moment = text
    else:
        try:
            moment = dt.datetime.fromisoformat(str(text))
        except ValueError:
            raise DocumentError(f"document: {key!r} is not an ISO 8601 time: {str(text)[:40]!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return moment.astimezone(zone)


def _zone(issuer: Issuer) -> zoneinfo.ZoneInfo:
    try:
        return zoneinfo.ZoneInfo(issuer.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise DocumentError(f"unknown time zone {issuer.timezone!r}") from None


def _day(moment: dt.datetime) -> str:
    return moment.date().isoformat()


def _last_day(text: Any, zone: zoneinfo.ZoneInfo, key: str) -> str:
    """The inclusive last day of a half-open range ending at ``text``."""
    return _day(_moment(text, zone, key) - dt.timedelta(microseconds=1))


def period_text(start: Any, end: Any, timezone: str) -> str:
    """A half-open period as people read it, its last day included: '2026-11-01 – 2026-11-30'."""
    zone = _zone(Issuer(timezone=timezone))
    return f"{_day(_moment(start, zone, 'period_start'))} – {_last_day(end, zone, 'period_end')}"


def _issuer_lines(issuer: Issuer, words: Mapping[str, str]) -> list[str]:
    lines = [_cut(issuer.name)] if issuer.name else []
    lines += [_cut(part) for part in issuer.address.splitlines() if part.strip()]
    if issuer.tax_id:
        lines.append(f"{words['tax_id']}: {_cut(issuer.tax_id)}")
    bank = [_cut(part) for part in issuer.bank_details.splitlines() if part.strip()]
    if bank:
        lines.append(f"{words['bank']}: {bank[0]}")
        lines += bank[1:]
    return lines


def _customer_lines(customer: Any, account_id: Any, words: Mapping[str, str]) -> list[str]:
    customer = customer if isinstance(customer, Mapping) else {}
    lines = []
    if customer.get("full_name"):
        lines.append(_cut(customer["full_name"]))
    if customer.get("login"):
        lines.append(f"{words['login']}: {_cut(customer['login'])}")
    lines.append(f"{words['account']}: {_cut(account_id)}")
    lines += [_cut(part) for part in str(customer.get("address") or "").splitlines() if part.strip()]
    if customer.get("email"):
        lines.append(_cut(customer["email"]))
    return lines


def invoice_view(doc: Mapping[str, Any], issuer: Issuer, lang: str) -> InvoiceView:
    """The invoice or credit note ``doc`` (``invoices.get``'s DOCUMENT) as the strings it shows."""
    words = labels(lang)
    units = _minor_units(doc, issuer)
    zone = _zone(issuer)
    kind = _get(doc, "kind")
    if kind not in ("invoice", "credit_note"):
        raise DocumentError(f"document: kind invoice or credit_note, got {kind!r}")
    number = _cut(_get(doc, "number"))
    lines = []
    for i, line in enumerate(_get(doc, "lines")):
        if not isinstance(line, Mapping):
            raise DocumentError(f"document: line {i} is not a table")
        lines.append(LineView(
            line_no=str(line.get("line_no", i + 1)), description=_cut(line.get("description", "")),
            quantity=human_quantity(str(line.get("line_kind", "")), line.get("quantity"), lang),
            net=money_text(_amount(line, "net"), units), vat=money_text(_amount(line, "vat"), units),
            total=money_text(_amount(line, "total"), units)))
    credits = doc.get("credits")
    credit_for = ""
    if kind == "credit_note":
        invoice = _cut(credits.get("number", "")) if isinstance(credits, Mapping) else ""
        credit_for = words["credit_for"].format(number=number, invoice=invoice)
    credited_by = [f"{_cut(c.get('number', ''))} ({money_text(_amount(c, 'total'), units)})"
                   for c in doc.get("credited_by") or [] if isinstance(c, Mapping)]
    vat_bp = _get(doc, "vat_bp")
    if type(vat_bp) is not int:
        raise DocumentError(f"document: vat_bp must be an int, got {type(vat_bp).__name__}")
    currency = str(doc.get("currency") or issuer.currency)
    return InvoiceView(
        lang=lang, words=words, title=words[kind], number=number,
        issued=_moment(_get(doc, "issued_at"), zone, "issued_at").strftime("%Y-%m-%d %H:%M"),
        period=period_text(_get(doc, "period_start"), _get(doc, "period_end"), issuer.timezone),
        account=_cut(_get(doc, "account_id")), issuer=issuer, issuer_lines=_issuer_lines(issuer, words),
        customer_lines=_customer_lines(doc.get("customer"), doc.get("account_id"), words), lines=lines,
        net=money_text(_amount(doc, "net"), units), vat=money_text(_amount(doc, "vat"), units),
        total=money_text(_amount(doc, "total"), units),
        total_label=words["credit_total" if kind == "credit_note" else "amount_due"],
        vat_rate=human_rate(vat_bp), currency=currency, credit_for=credit_for,
        reason=_cut(doc.get("reason") or ""), credited_by=credited_by)


def statement_view(statement: Mapping[str, Any], rows: Iterable[Sequence[Any]], issuer: Issuer,
                   lang: str) -> StatementView:
    """``statements.get``'s result and its streamed rows
    (``[ledger_id, created_at, kind, amount, balance_after, reference]``) as the strings they show."""
    words = labels(lang)
    units = _minor_units(statement, issuer)
    zone = _zone(issuer)
    shown = []
    for row in rows:
        if not isinstance(row, Sequence) or len(row) < 6:
            raise DocumentError(f"statement: a row is [ledger_id, created_at, kind, amount, balance_after,"
                                f" reference], got {str(row)[:60]!r}")
        _, created_at, kind, amount, balance, reference = row[:6]
        if type(amount) is not int or type(balance) is not int:
            raise DocumentError("statement: amounts must be int micro-units")
        shown.append(RowView(date=_moment(created_at, zone, "created_at").strftime("%Y-%m-%d %H:%M"),
                             kind=words.get(f"kind.{kind}", _cut(kind)), amount=money_text(amount, units),
                             balance=money_text(balance, units), reference=_cut(reference or "")))
    return StatementView(
        lang=lang, words=words, title=words["statement"], account=_cut(_get(statement, "account_id")),
        since=_moment(_get(statement, "since"), zone, "since").strftime("%Y-%m-%d %H:%M"),
        until=_moment(_get(statement, "until"), zone, "until").strftime("%Y-%m-%d %H:%M"),
        issuer=issuer, issuer_lines=_issuer_lines(issuer, words),
        customer_lines=_customer_lines(statement.get("customer"), statement.get("account_id"), words),
        opening=money_text(_amount(statement, "opening"), units),
        closing=money_text(_amount(statement, "closing"), units),
        entries=str(statement.get("entries", len(shown))), currency=str(statement.get("currency") or issuer.currency),
        rows=shown)
