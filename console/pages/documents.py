"""An account's invoices and statements in the console: list, view, PDF/HTML, credit note, statement PDF.

Theory of operation
-------------------
``/accounts/{id}/invoices`` lists ``invoices.list`` of one account (the
subscriber card links to it) with a statement form;
``/invoices/{id}`` shows ``invoices.get`` — lines, totals, the credit notes
against it — with PDF and HTML downloads (``/invoices/{id}.pdf|html``,
rendered by ``documents.render`` in the operator's language with the ISP's
``[documents]`` details), and, for an operator holding
``invoices.credit``, the credit-note form: a reason and, per line, the
amount to credit (all blank: the whole invoice; the core refuses more than
what is left).  ``/accounts/{id}/statement.pdf|html?since&until`` streams
``statements.get`` for the days ``since`` to ``until`` (both included,
midnight to midnight in the operator's zone).  Every call is the
operator's own, so the core's rights (``invoices.read``,
``invoices.write``) decide; the routes' ``needs`` keep the console from
offering what the core would refuse.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import zoneinfo
from typing import Any

from aiohttp import web

from billcore.common.errors import BillingError
from billcore.common.money import parse_money
from console.context import CONSOLE
from console.page import Forbidden, Page, Refused, call, form, operator_of, redirect, render, t
from console.page import browser_ip
from console.pages.subscriber_filter import read_id
from documents.labels import human_rate
from documents.render import invoice_html, invoice_pdf, statement_html, statement_pdf
from documents.view import DocumentError, Issuer, period_text

ROUTES = Page.routes()

MESSAGES: dict[str, tuple[str, str]] = {
    "documents.link": ("Invoices and statements", "Счета и выписки"),
    "documents.title": ("Invoices of account {id}", "Счета лицевого счёта {id}"),
    "documents.none": ("No invoices for this account yet.", "Счетов по этому лицевому счёту пока нет."),
    "documents.number": ("Number", "Номер"),
    "documents.kind": ("Document", "Документ"),
    "documents.kind.invoice": ("Invoice", "Счёт"),
    "documents.kind.credit_note": ("Credit note", "Корректировочный счёт"),
    "documents.period": ("Period", "Период"),
    "documents.issued": ("Issued", "Выставлен"),
    "documents.issued_by": ("Issued by", "Кем выставлен"),
    "documents.total": ("Total", "Сумма"),
    "documents.net": ("Net", "Без НДС"),
    "documents.vat": ("VAT", "НДС"),
    "documents.vat_rate": ("VAT rate", "Ставка НДС"),
    "documents.description": ("Description", "Наименование"),
    "documents.quantity": ("Quantity", "Количество"),
    "documents.customer": ("Customer", "Абонент"),
    "documents.credits": ("Credits invoice", "Корректирует счёт"),
    "documents.credited_by": ("Credit notes", "Корректировочные счета"),
    "documents.reason": ("Reason", "Основание"),
    "documents.credit": ("Issue a credit note", "Выставить корректировочный счёт"),
    "documents.credit_explain": ("Leave the amounts blank to credit the whole invoice, or give the amount to credit"
                                 " per line.", "Оставьте суммы пустыми, чтобы скорректировать весь счёт, или укажите"
                                 " сумму по строкам."),
    "documents.credit_amount": ("Credit", "Вернуть"),
    "documents.credit_confirm": ("Issue credit note", "Выставить"),
    "documents.credited": ("The credit note is issued.", "Корректировочный счёт выставлен."),
    "documents.bad_amount": ("Amounts are positive numbers like 12.50.", "Суммы — положительные числа, например 12.50."),
    "documents.no_reason": ("Give the reason for the credit note.", "Укажите основание корректировки."),
    "documents.refused": ("Not done: {message}", "Не выполнено: {message}"),
    "documents.statement": ("Statement of account", "Выписка по счёту"),
    "documents.since": ("From", "С"),
    "documents.until": ("To (included)", "По (включительно)"),
    "documents.get_statement": ("Statement (PDF)", "Выписка (PDF)"),
    "documents.get_statement_html": ("Statement (HTML)", "Выписка (HTML)"),
    "documents.bad_range": ("Choose a first and last day, the first not after the last.",
                            "Выберите первый и последний день; первый не позже последнего."),
    "documents.back": ("Back to the subscriber", "К абоненту"),
    "documents.all": ("All invoices of the account", "Все счета лицевого счёта"),
}

MAX_LIST = 200
MAX_STATEMENT_ROWS = 100_000
MAX_REASON = 1000


def _path_id(request: web.Request, name: str) -> int:
    found = read_id(request.match_info[name])
    if found is None:
        raise web.HTTPNotFound()
    return found


def _issuer(request: web.Request) -> Issuer:
    issuer = request.app[CONSOLE].issuer
    return issuer if isinstance(issuer, Issuer) else Issuer()


def _period(row: dict[str, Any], issuer: Issuer) -> str:
    try:
        return period_text(row["period_start"], row["period_end"], issuer.timezone)
    except (DocumentError, KeyError):
        return ""


def _download(data: bytes, number: Any, ext: str, content_type: str) -> web.Response:
    safe = "".join(c for c in str(number) if c.isascii() and (c.isalnum() or c in "-_")) or "document"
    response = web.Response(body=data, content_type=content_type,
                            headers={"Content-Disposition": f'attachment; filename="{safe}.{ext}"'})
    if content_type == "text/html":
        response.charset = "utf-8"
    return response


async def _account_page(request: web.Request, account_id: int, status: int = 200, error: str = "") -> web.Response:
    listed = await call(request, "invoices.list", account_id=account_id, limit=MAX_LIST)
    issuer = _issuer(request)
    rows = [{**row, "period": _period(row, issuer)} for row in listed.get("invoices", [])]
    today = dt.date.today()
    return render(request, "documents/list.html", status, account_id=account_id, invoices=rows,
                  total=listed.get("total", len(rows)), error=error,
                  since=request.query.get("since", today.replace(day=1).isoformat())[:10],
                  until=request.query.get("until", today.isoformat())[:10])


@ROUTES.get(r"/accounts/{account_id:\d+}/invoices", needs=("invoices.list",))
async def account_invoices(request: web.Request) -> web.StreamResponse:
    return await _account_page(request, _path_id(request, "account_id"))


async def _document(request: web.Request, invoice_id: int) -> dict[str, Any]:
    """``invoices.get``; an invoice the core does not know is the 404 page."""
    try:
        doc: dict[str, Any] = await call(request, "invoices.get", invoice_id=invoice_id)
    except Refused as exc:
        if exc.code == "invoices.unknown":
            raise web.HTTPNotFound() from None
        raise
    return doc


async def _invoice_page(request: web.Request, invoice_id: int, status: int = 200, error: str = "",
                        typed: dict[str, str] | None = None) -> web.Response:
    doc = await _document(request, invoice_id)
    issuer = _issuer(request)
    return render(request, "documents/invoice.html", status, doc=doc, period=_period(doc, issuer), error=error,
                  typed=typed or {}, vat_rate=human_rate(int(doc.get("vat_bp") or 0)))


@ROUTES.get(r"/invoices/{invoice_id:\d+}", needs=("invoices.get",))
async def invoice(request: web.Request) -> web.StreamResponse:
    return await _invoice_page(request, _path_id(request, "invoice_id"))


@ROUTES.get(r"/invoices/{invoice_id:\d+}.{fmt:pdf|html}", needs=("invoices.get",))
async def invoice_file(request: web.Request) -> web.StreamResponse:
    doc = await _document(request, _path_id(request, "invoice_id"))
    lang = _lang()
    if request.match_info["fmt"] == "pdf":
        return _download(await asyncio.to_thread(invoice_pdf, doc, _issuer(request), lang), doc.get("number"), "pdf", "application/pdf")
    return _download(invoice_html(doc, _issuer(request), lang).encode("utf-8"), doc.get("number"), "html",
                     "text/html")


def _lang() -> str:
    from console.context import current_words

    return current_words.get().lang


@ROUTES.post(r"/invoices/{invoice_id:\d+}/credit", needs=("invoices.credit",))
async def credit(request: web.Request) -> web.StreamResponse:
    invoice_id = _path_id(request, "invoice_id")
    fields = await form(request)
    reason = fields.get("reason", "").strip()[:MAX_REASON]
    if not reason:
        return await _invoice_page(request, invoice_id, 400, t("documents.no_reason"), fields)
    lines = []
    for name, value in fields.items():
        if not name.startswith("line.") or not value.strip():
            continue
        line_no = read_id(name.removeprefix("line."))
        try:
            amount = parse_money(value.strip().replace(",", ".").replace(" ", ""))
        except BillingError:
            amount = 0
        if line_no is None or amount <= 0:
            return await _invoice_page(request, invoice_id, 400, t("documents.bad_amount"), fields)
        lines.append({"line_no": line_no, "total": amount})
    args: dict[str, Any] = {"invoice_id": invoice_id, "reason": reason}
    if lines:
        args["lines"] = sorted(lines, key=lambda line: int(line["line_no"]))
    try:
        note = await call(request, "invoices.credit", **args)
    except Refused as exc:
        return await _invoice_page(request, invoice_id, 409, t("documents.refused", message=exc.message or exc.code),
                                   fields)
    return redirect(request, f"/invoices/{int(note['id'])}", message="documents.credited")


@ROUTES.get(r"/accounts/{account_id:\d+}/statement.{fmt:pdf|html}", needs=("statements.get",))
async def statement(request: web.Request) -> web.StreamResponse:
    account_id = _path_id(request, "account_id")
    first, last = _day(request.query.get("since", "")), _day(request.query.get("until", ""))
    if first is None or last is None or first > last:
        return await _account_page(request, account_id, 400, t("documents.bad_range"))
    issuer = _issuer(request)
    try:
        zone = zoneinfo.ZoneInfo(issuer.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        zone = zoneinfo.ZoneInfo("UTC")
    args = {"account_id": account_id, "since": dt.datetime.combine(first, dt.time(), zone),
            "until": dt.datetime.combine(last + dt.timedelta(days=1), dt.time(), zone)}
    console = request.app[CONSOLE]
    try:
        rows, result = await console.link.stream_all(operator_of(request).sid, browser_ip(request), "statements.get",
                                                     args, max_rows=MAX_STATEMENT_ROWS)
    except Refused as exc:
        if exc.code in ("not_in_table", "forbidden", "deleted"):
            raise Forbidden(exc.code) from None
        return await _account_page(request, account_id, 409, t("documents.refused", message=exc.message or exc.code))
    name = f"statement-{account_id}-{first.isoformat()}-{last.isoformat()}"
    if request.match_info["fmt"] == "html":
        return _download(statement_html(result, rows, issuer, _lang()).encode("utf-8"), name, "html", "text/html")
    data = await asyncio.to_thread(statement_pdf, result, rows, issuer, _lang())   # seconds for a long one: off the loop
    return _download(data, name, "pdf", "application/pdf")


def _day(text: str) -> dt.date | None:
    try:
        return dt.date.fromisoformat(text) if len(text) == 10 else None
    except ValueError:
        return None
