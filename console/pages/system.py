"""``/system/…``: plugins (list, load, unload), the core's health, the audit log with search.

Health is ``sys.health`` (processes, NetFlow workers, RADIUS rates, the
database, and what the core cannot know), and beside it what the console
itself knows: its link to the core, the core's clock and the round trip.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any

from aiohttp import web

from console.context import CONSOLE
from console.page import Page, Refused, call, form, redirect, render, t
from webedge.http import ascii_int

ROUTES = Page.routes()

MESSAGES: dict[str, tuple[str, str]] = {
    "nav.plugins": ("Plugins", "Модули"),
    "nav.health": ("Health", "Состояние"),
    "nav.audit": ("Audit log", "Журнал аудита"),
    "system.plugins.title": ("Plugins", "Модули"),
    "system.plugins.name": ("Name", "Имя"),
    "system.plugins.version": ("Version", "Версия"),
    "system.plugins.state": ("State", "Состояние"),
    "system.plugins.signer": ("Signed by", "Подпись"),
    "system.plugins.licence_until": ("Licence until", "Лицензия до"),
    "system.plugins.licence_forever": ("no end", "бессрочно"),
    "system.plugins.calls": ("Calls", "Вызовы"),
    "system.plugins.none": ("No plugins are known to this core.", "Ядру не известно ни одного модуля."),
    "system.plugins.load": ("Load a plugin", "Загрузить модуль"),
    "system.plugins.load_name": ("Name in the plugin directory", "Имя в каталоге модулей"),
    "system.plugins.load_submit": ("Load", "Загрузить"),
    "system.plugins.unload": ("Unload", "Выгрузить"),
    "system.plugins.unload_confirm": ("Unload this plugin? Its calls stop for new sessions now.",
                               "Выгрузить модуль? Его вызовы сразу станут недоступны новым сеансам."),
    "system.plugins.refused": ("Not done: {message}", "Не выполнено: {message}"),
    "system.plugins.done_loaded": ("The plugin is loaded.", "Модуль загружен."),
    "system.plugins.done_unloaded": ("The plugin is being unloaded.", "Модуль выгружается."),
    "system.health.title": ("Health", "Состояние"),
    "system.health.processes": ("Processes", "Процессы"),
    "system.health.role": ("Role", "Роль"),
    "system.health.pid": ("PID", "PID"),
    "system.health.state": ("State", "Состояние"),
    "system.health.restarts": ("Restarts", "Перезапуски"),
    "system.health.started": ("Started", "Запущен"),
    "system.health.netflow": ("NetFlow collectors", "Сборщики NetFlow"),
    "system.health.worker": ("Worker", "Обработчик"),
    "system.health.packets": ("Packets", "Пакетов"),
    "system.health.drops": ("Drops", "Потерь"),
    "system.health.journal_lag": ("Journal lag", "Отставание журнала"),
    "system.health.classifier": ("Classifier version", "Версия классификатора"),
    "system.health.committed": ("Committed up to", "Учтено до"),
    "system.health.database": ("Database", "База данных"),
    "system.health.database_up": ("answering", "отвечает"),
    "system.health.database_down": ("not answering", "не отвечает"),
    "system.health.missing": ("What the core cannot know", "Чего ядро знать не может"),
    "system.health.radius": ("RADIUS", "RADIUS"),
    "system.health.access_per_s": ("Access requests per second", "Запросов доступа в секунду"),
    "system.health.accounting_per_s": ("Accounting requests per second", "Запросов учёта в секунду"),
    "system.health.rejects_per_s": ("Rejects per second", "Отказов в секунду"),
    "system.health.link": ("The console's link to the core", "Связь консоли с ядром"),
    "system.health.link_up": ("connected", "есть"),
    "system.health.link_down": ("down", "нет"),
    "system.health.reconnects": ("Reconnects", "Переподключений"),
    "system.health.core_time": ("Core's clock", "Часы ядра"),
    "system.health.latency": ("Round trip", "Задержка"),
    "system.audit.title": ("Audit log", "Журнал аудита"),
    "system.audit.object": ("Object (e.g. account:5)", "Объект (например, account:5)"),
    "system.audit.action": ("Action", "Действие"),
    "system.audit.login": ("Who (login)", "Кто (логин)"),
    "system.audit.since": ("From", "С"),
    "system.audit.until": ("To", "По"),
    "system.audit.search": ("Search", "Найти"),
    "system.audit.when": ("When", "Когда"),
    "system.audit.ip": ("Address", "Адрес"),
    "system.audit.change": ("Change", "Изменение"),
    "system.audit.none": ("Nothing found.", "Ничего не найдено."),
    "system.audit.bad_date": ("A date is YYYY-MM-DD.", "Дата пишется как ГГГГ-ММ-ДД."),
    "system.audit.prev": ("Newer", "Новее"),
    "system.audit.next": ("Older", "Старше"),
}

PLUGINS_PAGE = 100
AUDIT_PAGE = 50


# -- plugins ---------------------------------------------------------------------------

@ROUTES.get("/system/plugins", needs=("plugins.list",), nav="plugins")
async def plugins(request: web.Request, error: str = "", status: int = 200) -> web.StreamResponse:
    rows = await call(request, "plugins.list", limit=PLUGINS_PAGE)
    return render(request, "system/plugins.html", status, rows=rows, error=error)


async def _plugin_action(request: web.Request, fn: str, done: str, **args: Any) -> web.StreamResponse:
    try:
        await call(request, fn, **args)
    except Refused as refused:
        return await plugins(request, t("system.plugins.refused", message=refused.message or refused.code), 400)
    return redirect(request, "/system/plugins", message=done)


@ROUTES.post("/system/plugins/load", needs=("plugins.load", "plugins.list"))
async def plugin_load(request: web.Request) -> web.StreamResponse:
    fields = await form(request)
    return await _plugin_action(request, "plugins.load", "system.plugins.done_loaded",
                                  path=fields.get("path", "").strip())


@ROUTES.post("/system/plugins/{name}/unload", needs=("plugins.unload", "plugins.list"))
async def plugin_unload(request: web.Request) -> web.StreamResponse:
    return await _plugin_action(request, "plugins.unload", "system.plugins.done_unloaded",
                                  name=request.match_info["name"])


# -- health ----------------------------------------------------------------------------

@ROUTES.get("/system/health", needs=("sys.health",), nav="health")
async def health(request: web.Request) -> web.StreamResponse:
    report = await call(request, "sys.health")
    link = request.app[CONSOLE].link
    sent = time.monotonic()
    core_time = await call(request, "sys.time")
    round_trip_ms = round((time.monotonic() - sent) * 1000, 1)
    return render(request, "system/health.html", report=report, link_up=link.link.up.is_set(),
                  reconnects=link.reconnects, core_time=core_time, round_trip_ms=round_trip_ms)


# -- audit -----------------------------------------------------------------------------

def _day(text: str) -> dt.datetime | None:
    """'2026-12-07' → that day's start (UTC); '' → None; anything else → ValueError."""
    if not text:
        return None
    return dt.datetime.combine(dt.date.fromisoformat(text), dt.time(), dt.timezone.utc)


def _shown(value: Any) -> str:
    return "" if value is None else json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)[:2000]


@ROUTES.get("/system/audit", needs=("audit.query",), nav="audit")
async def audit(request: web.Request) -> web.StreamResponse:
    query = request.query
    wanted = {name: query.get(name, "").strip()[:200] for name in ("object", "action", "login", "since", "until")}
    offset = ascii_int(query.get("offset", "0"), 9) or 0
    filters: dict[str, Any] = {name: wanted[name] for name in ("object", "action", "login") if wanted[name]}
    error = ""
    rows: list[dict[str, Any]] = []
    try:
        since, until = _day(wanted["since"]), _day(wanted["until"])
    except ValueError:
        error = t("system.audit.bad_date")
    else:
        if since is not None:
            filters["since"] = since
        if until is not None:
            filters["until"] = until + dt.timedelta(days=1)     # "to" a day includes it
        try:
            rows = await call(request, "audit.query", limit=AUDIT_PAGE + 1, offset=offset, **filters)
        except Refused as refused:
            error = refused.message or refused.code
    shown = [{**row, "before_text": _shown(row.get("before")), "after_text": _shown(row.get("after"))}
             for row in rows[:AUDIT_PAGE]]
    paging = {name: value for name, value in wanted.items() if value}
    return render(request, "system/audit.html", 400 if error else 200, rows=shown, wanted=wanted, error=error,
                  offset=offset, page_size=AUDIT_PAGE, more=len(rows) > AUDIT_PAGE, paging=paging)
