"""Subscribers: the search list, its CSV export and the "new subscriber" form.

The list is one ``subscribers.search`` call per page (50 rows; the core
counts the total up to a cap, shown as "1,000+" beyond it, and the pages
go on past the cap).  The CSV
is ``subscribers.export`` streamed straight through: each chunk of rows the
core sends is written out as CSV before the next is asked for, so an export
of a million rows holds one chunk in memory, not the file.  The first chunk
is awaited before the answer starts, so a refusal is still a proper page.

A new subscriber is ``users.create``, then (when typed and allowed) an IP
binding and a tariff for the basic account.  Those two are separate calls:
when one is refused the subscriber exists already, so the operator lands on
the new card with a note saying what is missing, not on an error page.
"""

from __future__ import annotations

import asyncio
import codecs
import csv
import io
from collections.abc import Awaitable, Iterable, Mapping
from datetime import datetime, timezone
from typing import Any, Final

from aiohttp import web

from billcore.common.csvcell import safe_text
from console.context import CONSOLE
from console.page import (Page, Refused, call, form, keep_going, money_text, operator_of, redirect, render,
                          start_download, stream)
from console.pages.subscriber_filter import MAX_OFFSET, PAGE_SIZE, SubscriberFilter, read_filter, read_id, read_page
from webedge.http import security_headers

__all__ = ["ROUTES", "MESSAGES", "CSV_COLUMNS", "can", "csv_lines", "tariff_choices"]

ROUTES = Page.routes()

CSV_COLUMNS: Final = ("user_id", "login", "full_name", "phone", "email", "contract", "account_id",
                      "balance", "credit", "tariff_id", "tariff_name", "blocked", "online")
_MONEY_COLUMNS: Final = frozenset({"balance", "credit"})
_TEXT_COLUMNS: Final = frozenset({"login", "full_name", "phone", "email", "contract", "tariff_name"})
_NEW_FIELDS: Final = ("login", "full_name", "phone", "email", "address", "contract", "ip", "tariff_id")

MESSAGES = {
    "nav.subscribers": ("Subscribers", "Абоненты"),
    "subscribers.title": ("Subscribers", "Абоненты"),
    "subscribers.search": ("Search", "Найти"),
    "subscribers.search_hint": ("Login, name, account, IP, phone or contract",
                                "Логин, имя, лицевой счёт, IP, телефон или договор"),
    "subscribers.found": ("Found: {total}", "Найдено: {total}"),
    "subscribers.found_capped": ("Found: {total}+", "Найдено: {total}+"),
    "subscribers.found_about": ("Found: about {total}", "Найдено: около {total}"),
    "subscribers.none": ("No subscriber matches.", "Ни один абонент не подходит."),
    "subscribers.csv": ("CSV", "CSV"),
    "subscribers.new": ("New subscriber", "Новый абонент"),
    "subscribers.page": ("Page {page} of {pages}", "Страница {page} из {pages}"),
    "subscribers.previous": ("Previous", "Назад"),
    "subscribers.next": ("Next", "Дальше"),
    "filter.tariff": ("Tariff", "Тариф"),
    "filter.any": ("any", "любой"),
    "filter.blocked": ("Blocked", "Блокировка"),
    "filter.blocked_yes": ("blocked", "заблокированы"),
    "filter.blocked_no": ("not blocked", "не заблокированы"),
    "filter.debtors": ("Debtors", "Должники"),
    "filter.online": ("Online now", "Сейчас в сети"),
    "filter.balance_min": ("Balance from", "Баланс от"),
    "filter.balance_max": ("Balance to", "Баланс до"),
    "filter.apply": ("Apply", "Применить"),
    "filter.reset": ("Reset", "Сбросить"),
    "filter.bad_amount": ("Type an amount like 100 or -12.50.", "Введите сумму, например 100 или -12.50."),
    "filter.bad_range": ("“Balance to” is below “Balance from”.", "«Баланс до» меньше «Баланс от»."),
    "filter.bad_tariff": ("Choose a tariff from the list.", "Выберите тариф из списка."),
    "filter.bad_choice": ("Choose from the list.", "Выберите из списка."),
    "column.login": ("Login", "Логин"),
    "column.name": ("Name", "Имя"),
    "column.account": ("Account", "Счёт"),
    "column.contract": ("Contract", "Договор"),
    "column.phone": ("Phone", "Телефон"),
    "column.balance": ("Balance", "Баланс"),
    "column.credit": ("Credit", "Кредит"),
    "column.tariff": ("Tariff", "Тариф"),
    "column.state": ("State", "Состояние"),
    "state.blocked": ("blocked", "заблокирован"),
    "state.online": ("online", "в сети"),
    "state.offline": ("offline", "не в сети"),
    "new.title": ("New subscriber", "Новый абонент"),
    "new.login": ("Login", "Логин"),
    "new.password": ("Password (8 characters or more)", "Пароль (не менее 8 символов)"),
    "new.full_name": ("Full name", "ФИО"),
    "new.phone": ("Phone", "Телефон"),
    "new.email": ("E-mail", "E-mail"),
    "new.address": ("Address", "Адрес"),
    "new.contract": ("Contract number", "Номер договора"),
    "new.ip": ("IP address or prefix (optional)", "IP-адрес или префикс (необязательно)"),
    "new.tariff": ("Tariff (optional)", "Тариф (необязательно)"),
    "new.tariff_none": ("no tariff", "без тарифа"),
    "new.create": ("Create", "Создать"),
    "new.refused": ("The subscriber was not created: {reason}", "Абонент не создан: {reason}"),
    "new.password_short": ("The password needs 8 characters or more.", "Пароль должен быть не короче 8 символов."),
    "new.login_missing": ("Type a login.", "Введите логин."),
    "message.created": ("The subscriber was created.", "Абонент создан."),
    "message.created_without_ip": ("The subscriber was created, but the IP binding was refused: add it below.",
                                   "Абонент создан, но привязка IP отклонена: добавьте её ниже."),
    "message.created_without_tariff": ("The subscriber was created, but the tariff was refused: set it below.",
                                       "Абонент создан, но тариф не назначен: назначьте его ниже."),
}


def can(request: web.Request, name: str) -> bool:
    """Is ``name`` in the operator's call table (what ``can`` answers in a template)?"""
    return name in operator_of(request).calls


def _pager(result: Mapping[str, Any] | None, page: int) -> dict[str, Any]:
    """Pages the count covers, and whether a next page exists: past a capped or estimated count, while
    pages are full."""
    if result is None:
        return {"pages": 1, "more": False, "next": False}
    pages = max(1, -(-int(result["total"]) // PAGE_SIZE), page)
    capped = bool(result["total_capped"]) or bool(result.get("total_estimated"))
    full = len(result["rows"]) == PAGE_SIZE
    return {"pages": pages, "more": capped, "next": page < MAX_OFFSET // PAGE_SIZE
            and (page < pages or (capped and full))}


async def tariff_choices(request: web.Request) -> list[dict[str, Any]]:
    """The tariffs for a select box, or none when this operator may not list them."""
    if not can(request, "tariffs.list"):
        return []
    rows = await call(request, "tariffs.list", limit=1000)
    return [{"id": row["id"], "name": row["name"]} for row in rows]


async def _search(request: web.Request, chosen: SubscriberFilter, page: int) -> dict[str, Any] | None:
    if chosen.errors:
        return None
    result: dict[str, Any] = await call(request, "subscribers.search", **chosen.args,
                                        limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
    return result


@ROUTES.get("/subscribers", needs=("subscribers.search",), nav="subscribers")
async def subscriber_list(request: web.Request) -> web.StreamResponse:
    chosen = read_filter(request.query)
    page = read_page(request.query.get("page"))
    result, tariffs = await asyncio.gather(_search(request, chosen, page), tariff_choices(request))
    return render(request, "subscribers/list.html", status=400 if chosen.errors else 200, chosen=chosen,
                  result=result, tariffs=tariffs, page=page, pager=_pager(result, page))


# -- CSV ------------------------------------------------------------------------------

def _cell(column: str, value: Any) -> str:
    if value is None:
        return ""
    if column in _MONEY_COLUMNS:
        return money_text(int(value))
    if isinstance(value, bool):
        return "1" if value else "0"
    text = str(value)
    return safe_text(text) if column in _TEXT_COLUMNS else text    # a name "=HYPERLINK(…)" stays text


def csv_lines(rows: Iterable[Mapping[str, Any]], header: bool = False) -> str:
    """``rows`` as CSV text (RFC 4180, CRLF), money as decimals; with the header row first if asked."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    if header:
        writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow([_cell(column, row.get(column)) for column in CSV_COLUMNS])
    return out.getvalue()


@ROUTES.get("/subscribers/export.csv", needs=("subscribers.export",))
async def export_csv(request: web.Request) -> web.StreamResponse:
    chosen = read_filter(request.query)
    if chosen.errors:
        return await subscriber_list(request)
    chunks = aiter(stream(request, "subscribers.export", **chosen.args))
    first: list[Any] = await anext(chunks, [])       # a refusal here is still a page
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M")
    response = web.StreamResponse(headers={
        "Content-Type": "text/csv; charset=utf-8",
        "Content-Disposition": f'attachment; filename="subscribers-{stamp}.csv"',
    })
    section = request.app[CONSOLE].section
    # the headers go out now, before the middleware sees the answer: set them here
    security_headers(response, https=section.cookie_secure or bool(section.tls_cert))
    await start_download(request, response)
    # UTF-8 with a byte order mark: Excel opens Cyrillic names right only so
    await response.write(codecs.BOM_UTF8 + csv_lines(first, header=True).encode())
    async for chunk in chunks:
        keep_going(request)
        await response.write(csv_lines(chunk).encode())
    await response.write_eof()
    return response


# -- a new subscriber -------------------------------------------------------------------

async def _new_form(request: web.Request, typed: Mapping[str, str], error: str = "",
                    status: int = 200, reason: str = "") -> web.StreamResponse:
    tariffs = await tariff_choices(request) if can(request, "tariffs.link") else []
    return render(request, "subscribers/new.html", status=status, tariffs=tariffs, error=error, reason=reason,
                  typed={name: typed.get(name, "") for name in _NEW_FIELDS})


async def _done(action: Awaitable[Any]) -> bool:
    """Whether the core did ``action`` (a refusal is an answer here, not an error)."""
    try:
        await action
    except Refused:
        return False
    return True


@ROUTES.get("/subscribers/new", needs=("users.create",))
async def new_subscriber_form(request: web.Request) -> web.StreamResponse:
    return await _new_form(request, {})


@ROUTES.post("/subscribers/new", needs=("users.create",))
async def new_subscriber(request: web.Request) -> web.StreamResponse:
    fields = await form(request)
    login, password = fields.get("login", "").strip(), fields.get("password", "")
    if not login:
        return await _new_form(request, fields, "new.login_missing", 400)
    if len(password) < 8:
        return await _new_form(request, fields, "new.password_short", 400)
    contacts = {name: fields.get(name, "").strip() for name in ("full_name", "phone", "email", "address")}
    contract = fields.get("contract", "").strip()
    try:
        user = await call(request, "users.create", login=login, password=password,
                          **({"external_id": contract} if contract else {}), **contacts)
    except Refused as refused:
        return await _new_form(request, fields, "new.refused", 409, refused.message or refused.code)
    user_id, account_id = user["id"], user["basic_account_id"]
    message = "message.created"
    ip = fields.get("ip", "").strip()
    if ip and can(request, "bindings.add"):
        if not await _done(call(request, "bindings.add", account_id=account_id, prefix=ip)):
            message = "message.created_without_ip"
    tariff = fields.get("tariff_id", "").strip()
    if tariff and can(request, "tariffs.link"):
        tariff_id = read_id(tariff)
        if tariff_id is None or not await _done(call(request, "tariffs.link", account_id=account_id,
                                                     tariff_id=tariff_id, start="now")):
            message = "message.created_without_tariff"
    return redirect(request, f"/subscribers/{user_id}", message=message, account=account_id)
