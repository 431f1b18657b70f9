"""``/reports``: the operator reports (docs/reports.md) with a form each, a chart, the table and a CSV download.

Every report is the core's streamed ``reports.*`` call as the operator at
the browser, so the core's right ``reports.read`` decides who sees it: the
navigation shows the section only to an operator whose table has the
reports, and each report only when its call is there. The page reads the
whole stream but keeps at most `MAX_SHOWN` rows for the table and the chart
(the CSV download streams every row straight to the browser); a report
that sums over all rows (the debtors' buckets) folds them as they pass.
The chart is inline SVG drawn here (``report_chart``), no script.

The options go to the core as typed: the core checks dates, ranges and
limits, and its refusal (``billing.invalid``) is shown on the form.
"""

from __future__ import annotations

import codecs
import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Any, Final
from urllib.parse import urlencode

from aiohttp import web

from billcore.common.csvcell import safe_text
from billcore.common.money import format_money
from console.context import CONSOLE
from console.page import Page, Refused, keep_going, operator_of, render, start_download, stream
from console.pages.report_chart import bar_chart
from webedge.http import ascii_int, security_headers
from webedge.render import human_bytes, money

ROUTES = Page.routes()

MAX_SHOWN: Final = 1_000


@dataclass(frozen=True, slots=True)
class View:
    """One report as the console shows it: the call, its options, its row fields (the call's declared
    ``fields``, in order), which of them are money or bytes, and what the chart draws."""

    name: str
    call: str
    options: tuple[str, ...]
    fields: tuple[str, ...]
    shown: tuple[str, ...]
    money: frozenset[str]
    label: str
    series: tuple[str, ...]
    bytes: frozenset[str] = frozenset()
    required: tuple[str, ...] = ()


VIEWS: Final = {v.name: v for v in (
    View("revenue", "reports.revenue_daily", ("since", "until", "group"),
         ("key_id", "key", "accounts", "final_amount", "provisional_amount", "amount", "periodic_amount",
          "usage_amount", "once_amount"),
         ("key", "accounts", "final_amount", "provisional_amount", "amount", "periodic_amount", "usage_amount",
          "once_amount"),
         frozenset({"final_amount", "provisional_amount", "amount", "periodic_amount", "usage_amount", "once_amount"}),
         "key", ("final_amount", "provisional_amount")),
    View("payments", "reports.payments", ("since", "until", "group"),
         ("key", "payments", "paid", "cancellations", "cancelled", "net"),
         ("key", "payments", "paid", "cancellations", "cancelled", "net"),
         frozenset({"paid", "cancelled", "net"}), "key", ("net",)),
    View("debtors", "reports.debtors", ("as_of",),
         ("account_id", "user_id", "login", "full_name", "balance", "credit", "since", "days", "bucket"),
         ("account_id", "login", "full_name", "balance", "credit", "since", "days", "bucket"),
         frozenset({"balance", "credit"}), "bucket", ("balance",)),
    View("arpu", "reports.arpu", ("month",),
         ("tariff_id", "name", "subscribers", "charged", "amount", "final_amount", "arpu"),
         ("name", "subscribers", "charged", "amount", "final_amount", "arpu"),
         frozenset({"amount", "final_amount", "arpu"}), "name", ("arpu",), required=("month",)),
    View("churn", "reports.churn", ("since", "until"),
         ("month", "active", "left", "stayed_blocked", "churned", "churn_bp"),
         ("month", "active", "left", "stayed_blocked", "churned", "churn_bp"),
         frozenset(), "month", ("left", "stayed_blocked")),
    View("traffic-top", "reports.traffic_top", ("since", "until", "class_id", "limit"),
         ("class_id", "class", "rank", "account_id", "login", "quantity", "amount"),
         ("class", "rank", "account_id", "login", "quantity", "amount"),
         frozenset({"amount"}), "login", ("quantity",), bytes=frozenset({"quantity"})),
    View("flows", "reports.flows", ("account_id", "since", "until", "by", "limit"),
         ("key", "bytes", "packets", "flows"), ("key", "bytes", "packets", "flows"),
         frozenset(), "key", ("bytes",), bytes=frozenset({"bytes"}), required=("account_id", "since", "until")),
)}

CHOICES: Final = {
    ("revenue", "group"): ("day", "service", "tariff"),
    ("payments", "group"): ("day", "method", "operator"),
    ("flows", "by"): ("host", "port", "proto"),
}
INTS: Final = frozenset({"class_id", "account_id", "limit"})

MESSAGES: dict[str, tuple[str, str]] = {
    "nav.reports": ("Reports", "Отчёты"),
    "reports.title": ("Reports", "Отчёты"),
    "reports.run": ("Show", "Показать"),
    "reports.csv": ("Download CSV", "Скачать CSV"),
    "reports.none": ("Nothing in this range.", "За этот период ничего нет."),
    "reports.refused": ("Not shown: {message}", "Не показано: {message}"),
    "reports.more": ("The first {shown} of {rows} rows; the CSV has them all.",
                     "Первые {shown} из {rows} строк; в CSV — все."),
    "reports.rows": ("{rows} rows", "Строк: {rows}"),
    "reports.fill": ("Fill in the form to see the report.", "Заполните форму, чтобы увидеть отчёт."),
    "reports.final_note": ("Final amounts can no longer change; provisional ones are the open periods' charges so far.",
                           "Окончательные суммы больше не изменятся; предварительные — начисления открытых периодов."),
    "report.revenue": ("Revenue", "Выручка"),
    "report.payments": ("Payments", "Платежи"),
    "report.debtors": ("Debtors", "Должники"),
    "report.arpu": ("ARPU per tariff", "ARPU по тарифам"),
    "report.churn": ("Churn", "Отток"),
    "report.traffic-top": ("Top traffic", "Топ трафика"),
    "report.flows": ("Flows of an account", "Потоки абонента"),
    "opt.since": ("From", "С"),
    "opt.until": ("Until (not included)", "По (не включая)"),
    "opt.group": ("By", "По"),
    "opt.as_of": ("As of the end of (empty: now)", "На конец дня (пусто — сейчас)"),
    "opt.month": ("Month (YYYY-MM)", "Месяц (ГГГГ-ММ)"),
    "opt.class_id": ("Traffic class id (empty: all)", "Класс трафика (пусто — все)"),
    "opt.account_id": ("Account", "Лицевой счёт"),
    "opt.by": ("By", "По"),
    "opt.limit": ("Rows", "Строк"),
    "col.key_id": ("id", "id"), "col.key": ("Key", "Ключ"), "col.accounts": ("Accounts", "Счетов"),
    "col.final_amount": ("Final", "Окончательно"), "col.provisional_amount": ("Provisional", "Предварительно"),
    "col.amount": ("Amount", "Сумма"), "col.periodic_amount": ("Periodic", "Периодические"),
    "col.usage_amount": ("Usage", "Трафик/время"), "col.once_amount": ("Once-off", "Разовые"),
    "col.payments": ("Payments", "Платежей"), "col.paid": ("Paid", "Оплачено"),
    "col.cancellations": ("Cancellations", "Отмен"), "col.cancelled": ("Cancelled", "Отменено"),
    "col.net": ("Net", "Итого"), "col.account_id": ("Account", "Счёт"), "col.user_id": ("User", "Абонент"),
    "col.login": ("Login", "Логин"), "col.full_name": ("Name", "Имя"), "col.balance": ("Balance", "Баланс"),
    "col.credit": ("Credit", "Кредит"), "col.since": ("In debt since", "В долгу с"), "col.days": ("Days", "Дней"),
    "col.bucket": ("Aging", "Срок"), "col.tariff_id": ("Tariff id", "id тарифа"), "col.name": ("Tariff", "Тариф"),
    "col.subscribers": ("Subscribers", "Абонентов"), "col.charged": ("Charged", "Начислено счетам"),
    "col.arpu": ("ARPU", "ARPU"), "col.month": ("Month", "Месяц"), "col.active": ("Active", "Активных"),
    "col.left": ("Left", "Ушли"), "col.stayed_blocked": ("Stayed blocked", "Весь месяц заблокированы"),
    "col.churned": ("Churned", "Отток"), "col.churn_bp": ("Churn, bp", "Отток, б.п."),
    "col.class_id": ("Class id", "id класса"), "col.class": ("Class", "Класс"), "col.rank": ("#", "№"),
    "col.quantity": ("Volume", "Объём"), "col.bytes": ("Bytes", "Байт"), "col.packets": ("Packets", "Пакетов"),
    "col.flows": ("Flows", "Потоков"),
}


def _month(day: date) -> str:
    return day.isoformat()[:7]


def defaults(name: str, today: date) -> dict[str, str]:
    """The options a report opens with: this month (churn: the last twelve months)."""
    first = today.replace(day=1)
    following = date(first.year + first.month // 12, first.month % 12 + 1, 1)
    if name == "churn":
        return {"since": _month(date(first.year - 1, first.month, 1)), "until": _month(following)}
    if name == "arpu":
        return {"month": _month(first)}
    if name == "debtors":
        return {"as_of": ""}
    if name == "flows":
        return {"account_id": "", "since": today.isoformat(), "until": "", "by": "host", "limit": "20"}
    out = {"since": first.isoformat(), "until": following.isoformat()}
    if name in ("revenue", "payments"):
        out["group"] = "day"
    if name == "traffic-top":
        out.update(class_id="", limit="20")
    return out


def chosen(view: View, query: Mapping[str, str], today: date) -> dict[str, str]:
    """The form's values: the query's, else the defaults (text, at most 40 characters each)."""
    values = defaults(view.name, today)
    for option in view.options:
        if option in query:
            values[option] = query[option][:40].strip()
    return values


def call_args(view: View, values: Mapping[str, str]) -> dict[str, Any] | None:
    """The call's arguments from the form's values (empty ones left out); None when a required one is missing
    or a number is not one (the form is shown to be filled in)."""
    args: dict[str, Any] = {}
    for option in view.options:
        text = values.get(option, "")
        if not text:
            continue
        if option in INTS:
            number = ascii_int(text.lstrip("-"), 18)
            if number is None:
                return None
            args[option] = -number if text.startswith("-") else number
        else:
            args[option] = text
    if any(option not in args for option in view.required):
        return None
    return args


def _cell(view: View, field: str, value: Any) -> str:
    if value is None:
        return ""
    if field in view.money and type(value) is int:
        return money(value)
    if field in view.bytes and type(value) is int:
        return human_bytes(value)
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    return str(value)


def _csv_cell(view: View, field: str, value: Any) -> str:
    if value is None:
        return ""
    if field in view.money and type(value) is int:
        return format_money(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return safe_text(str(value))


def csv_text(view: View, rows: Iterable[Sequence[Any]], header: bool = False) -> str:
    """Rows as CSV (RFC 4180, CRLF), every field of the call, money as exact decimals."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    if header:
        writer.writerow(view.fields)
    for row in rows:
        writer.writerow([_csv_cell(view, f, v) for f, v in zip(view.fields, row)])
    return out.getvalue()


def chart(view: View, rows: Sequence[Mapping[str, Any]], words: Any) -> str:
    if view.name == "debtors":       # the buckets' debt, in bucket order
        order = ("0-30", "31-60", "61-90", "90+")
        debt = {b: 0 for b in order}
        for row in rows:
            debt[row["bucket"]] -= row["balance"]
        labels: list[str] = list(order)
        series = [(words("col.balance"), [debt[b] for b in order])]
    else:
        labels = [str(row[view.label]) for row in rows]
        series = [(words("col." + s), [int(row[s] or 0) for row in rows]) for s in view.series]
    fmt = money if view.series[0] in view.money else human_bytes if view.series[0] in view.bytes else str
    return bar_chart(labels, series, fmt)


def _today() -> date:
    return datetime.now(timezone.utc).date()


def _view(request: web.Request) -> View:
    view = VIEWS.get(request.match_info["name"])
    if view is None or view.call not in operator_of(request).calls:
        raise web.HTTPNotFound()
    return view


@ROUTES.get("/reports", needs=("reports.revenue_daily",), nav="reports")
async def reports_index(request: web.Request) -> web.StreamResponse:
    calls = operator_of(request).calls
    return render(request, "reports/index.html", views=[v for v in VIEWS.values() if v.call in calls])


@ROUTES.get("/reports/{name:[a-z-]+}", needs=("reports.revenue_daily",))
async def report_page(request: web.Request) -> web.StreamResponse:
    from console.context import current_words

    view = _view(request)
    values = chosen(view, request.query, _today())
    args = call_args(view, values)
    calls = operator_of(request).calls
    common: dict[str, Any] = {"error": "", "view": view, "views": [v for v in VIEWS.values() if v.call in calls], "values": values,
              "choices": {o: CHOICES.get((view.name, o)) for o in view.options}}
    if args is None:
        return render(request, "reports/report.html", rows=None, **common)
    kept: list[dict[str, Any]] = []
    count = 0
    debt = {"0-30": 0, "31-60": 0, "61-90": 0, "90+": 0}    # the debtors' chart folds every row, not the kept
    try:
        async for chunk in stream(request, view.call, **args):
            for row in chunk:
                count += 1
                named = dict(zip(view.fields, row))
                if view.name == "debtors":
                    debt[named["bucket"]] += named["balance"]
                if len(kept) < MAX_SHOWN:
                    kept.append(named)
    except Refused as refused:
        common["error"] = refused.message or refused.code
        return render(request, "reports/report.html", 400, rows=None, **common)
    words = current_words.get()
    buckets = [{"bucket": b, "balance": v} for b, v in debt.items()]
    svg = chart(view, buckets if view.name == "debtors" else kept, words)
    table = [[_cell(view, f, row.get(f)) for f in view.shown] for row in kept]
    query = urlencode({k: values[k] for k in view.options if values.get(k)})
    return render(request, "reports/report.html", rows=table, count=count, shown=len(kept), svg=svg,
                  csv_href=f"/reports/{view.name}.csv" + (f"?{query}" if query else ""), **common)


@ROUTES.get("/reports/{name:[a-z-]+}.csv", needs=("reports.revenue_daily",))
async def report_csv(request: web.Request) -> web.StreamResponse:
    view = _view(request)
    args = call_args(view, chosen(view, request.query, _today()))
    if args is None:
        raise web.HTTPBadRequest(text="fill in the report's form first")
    chunks = aiter(stream(request, view.call, **args))
    try:
        first: list[Any] = await anext(chunks, [])      # a refusal here is still an answer with a reason
    except Refused as refused:
        raise web.HTTPBadRequest(text=refused.message or refused.code) from None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M")
    response = web.StreamResponse(headers={
        "Content-Type": "text/csv; charset=utf-8",
        "Content-Disposition": f'attachment; filename="{view.name}-{stamp}.csv"',
    })
    section = request.app[CONSOLE].section
    security_headers(response, https=section.cookie_secure or bool(section.tls_cert))
    await start_download(request, response)
    await response.write(codecs.BOM_UTF8 + csv_text(view, first, header=True).encode())
    async for chunk in chunks:
        keep_going(request)
        await response.write(csv_text(view, chunk).encode())
    await response.write_eof()
    return response
