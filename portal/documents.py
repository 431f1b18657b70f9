"""The office's "Documents" page: the subscriber's invoices as PDF and HTML, and a statement as PDF.

Theory of operation
-------------------
``GET /documents`` lists ``me.invoices`` (newest first, the core decides
which are the subscriber's) with a PDF and an HTML download each, and a
form for a statement of one of the subscriber's accounts over chosen days.
``GET /documents/{id}.pdf`` / ``.html`` fetch ``me.invoice`` and render it
with ``documents.render`` in the office's language, with the ISP's details
(``[documents]``); ``GET /documents/statement.pdf|html?account_id&since&until``
streams ``me.statement`` for the days ``since`` to ``until`` (both
included: midnight to midnight in the operator's zone) and renders it.
Nothing is stored: a download is rendered when asked.  An id the core does
not give this subscriber is the 404 page, like any other.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import zoneinfo
from typing import Any

from aiohttp import web

from documents.render import invoice_html, invoice_pdf, statement_html, statement_pdf
from documents.view import DocumentError, Issuer, period_text
from webedge.core_link import Refused, SessionGone
from webedge.http import ascii_int

from . import app as office

__all__ = ["add_routes", "ISSUER", "MAX_STATEMENT_ROWS"]

ISSUER: web.AppKey[Issuer] = web.AppKey("issuer", Issuer)
MAX_STATEMENT_ROWS = 100_000
MAX_LIST = 200


def _download(data: bytes, filename: str, content_type: str) -> web.Response:
    response = web.Response(body=data, content_type=content_type,
                            headers={"Content-Disposition": f'attachment; filename="{filename}"'})
    if content_type == "text/html":
        response.charset = "utf-8"
    return response


def _file_name(number: Any, ext: str) -> str:
    safe = "".join(c for c in str(number) if c.isascii() and (c.isalnum() or c in "-_")) or "document"
    return f"{safe}.{ext}"


def _day(text: str) -> dt.date | None:
    try:
        return dt.date.fromisoformat(text) if len(text) == 10 else None
    except ValueError:
        return None


async def documents_page(request: web.Request, status: int = 200, error: str = "") -> web.StreamResponse:
    listed = await office.ask_optional(request, "me.invoices", limit=MAX_LIST) or {}
    accounts = await office.ask(request, "me.accounts")
    today = dt.date.today()
    first = today.replace(day=1)
    issuer = request.app[ISSUER]
    invoices = []
    for row in listed.get("invoices", []):
        try:
            period = period_text(row["period_start"], row["period_end"], issuer.timezone)
        except (DocumentError, KeyError):
            period = ""
        invoices.append({**row, "period": period})
    return office.page(request, "documents.html", status, invoices=invoices,
                       total=listed.get("total", 0), accounts=accounts, error=error,
                       since=request.query.get("since", first.isoformat())[:10],
                       until=request.query.get("until", today.isoformat())[:10])


async def invoice_file(request: web.Request) -> web.StreamResponse:
    invoice_id = ascii_int(request.match_info["invoice_id"], 18)
    fmt = request.match_info["fmt"]
    if invoice_id is None:
        raise office.PageError(404, "error.404")
    doc = await office.ask(request, "me.invoice", invoice_id=invoice_id)
    issuer, lang = request.app[ISSUER], office.translator(request).lang
    if fmt == "pdf":
        return _download(await asyncio.to_thread(invoice_pdf, doc, issuer, lang), _file_name(doc.get("number"), "pdf"), "application/pdf")
    return _download(invoice_html(doc, issuer, lang).encode("utf-8"), _file_name(doc.get("number"), "html"),
                     "text/html")


async def statement_file(request: web.Request) -> web.StreamResponse:
    query = request.query
    account_id = ascii_int(query.get("account_id", ""), 18)
    first, last = _day(query.get("since", "")), _day(query.get("until", ""))
    t = office.translator(request)
    if account_id is None:
        raise office.PageError(404, "error.404")
    if first is None or last is None or first > last:
        return await documents_page(request, 400, t("documents.bad_range"))
    issuer = request.app[ISSUER]
    try:
        zone = zoneinfo.ZoneInfo(issuer.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        zone = zoneinfo.ZoneInfo("UTC")
    since = dt.datetime.combine(first, dt.time(), zone)
    until = dt.datetime.combine(last + dt.timedelta(days=1), dt.time(), zone)
    sid = request.get(office.SID)
    if sid is None:
        raise SessionGone("no cookie")
    try:
        rows, result = await request.app[office.LINK].stream_all(
            sid, office.client_ip(request), "me.statement", {"account_id": account_id, "since": since, "until": until},
            max_rows=MAX_STATEMENT_ROWS)
    except Refused as exc:
        if exc.code in ("accounts.unknown", "users.unknown", "invoices.unknown"):
            raise office.PageError(404, "error.404") from None
        if exc.code in ("not_in_table", "deleted", "forbidden"):
            raise office.PageError(403, "error.403", code=exc.code) from None
        return await documents_page(request, 400, exc.message or exc.code)
    name = f"statement-{account_id}-{first.isoformat()}-{last.isoformat()}"
    if request.path.endswith(".html"):
        return _download(statement_html(result, rows, issuer, t.lang).encode("utf-8"), name + ".html", "text/html")
    data = await asyncio.to_thread(statement_pdf, result, rows, issuer, t.lang)   # seconds for a long one: off the loop
    return _download(data, name + ".pdf", "application/pdf")


async def documents_get(request: web.Request) -> web.StreamResponse:
    return await documents_page(request)


def add_routes(app: web.Application, issuer: Issuer | None) -> None:
    app[ISSUER] = issuer or Issuer()
    app.router.add_get("/documents", documents_get)
    app.router.add_get("/documents/statement.pdf", statement_file)
    app.router.add_get("/documents/statement.html", statement_file)
    app.router.add_get(r"/documents/{invoice_id:\d+}.{fmt:pdf|html}", invoice_file)
