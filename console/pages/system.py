"""``/system/…``: plugins (list, load, unload), the core's health, the audit log with search.

Health is ``sys.health`` when the core has it; a core without it still
shows what the console can know: the plugins, its own link to the core and
the core's clock.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any

from aiohttp import web

from console.context import CONSOLE
from console.page import Page, Refused, call, form, operator_of, redirect, render, t
from webedge.http import ascii_int

ROUTES = Page.routes()

MESSAGES: dict[str, tuple[str, str]] = {
    "nav.plugins": ("Plugins", "Модули"),
    "nav.health": ("Health", "Состояние"),
    "nav.audit": ("Audit log", "Журнал аудита"),
    "plugins.title": ("Plugins", "Модули"),
    "plugins.name": ("Name", "Имя"),
    "plugins.version": ("Version", "Версия"),
    "plugins.state": ("State", "Состояние"),
    "plugins.signer": ("Signed by", "Подпись"),
    "plugins.licence_until": ("Licence until", "Лицензия до"),
    "plugins.licence_forever": ("no end", "бессрочно"),
    "plugins.calls": ("Calls", "Вызовы"),
    "plugins.none": ("No plugins are known to this core.", "Ядру не известно ни одного модуля."),
    "plugins.load": ("Load a plugin", "Загрузить модуль"),
    "plugins.load_name": ("Name in the plugin directory", "Имя в каталоге модулей"),
    "plugins.load_submit": ("Load", "Загрузить"),
    "plugins.unload": ("Unload", "Выгрузить"),
    "plugins.unload_confirm": ("Unload this plugin? Its calls stop for new sessions now.",
                               "Выгрузить модуль? Его вызовы сразу станут недоступны новым сеансам."),
    "plugins.refused": ("Not done: {message}", "Не выполнено: {message}"),
    "plugins.done_loaded": ("The plugin is loaded.", "Модуль загружен."),
    "plugins.done_unloaded": ("The plugin is being unloaded.", "Модуль выгружается."),
    "health.title": ("Health", "Состояние"),
    "health.processes": ("Processes", "Процессы"),
    "health.role": ("Role", "Роль"),
    "health.pid": ("PID", "PID"),
    "health.state": ("State", "Состояние"),
    "health.restarts": ("Restarts", "Перезапуски"),
    "health.started": ("Started", "Запущен"),
    "health.netflow": ("NetFlow collectors", "Сборщики NetFlow"),
    "health.worker": ("Worker", "Обработчик"),
    "health.exporter": ("Exporter", "Экспортёр"),
    "health.last_packet": ("Last packet", "Последний пакет"),
    "health.packets": ("Packets", "Пакетов"),
    "health.drops": ("Drops", "Потерь"),
    "health.journal_lag": ("Journal lag", "Отставание журнала"),
    "health.classifier": ("Classifier version", "Версия классификатора"),
    "health.radius": ("RADIUS", "RADIUS"),
    "health.access_per_s": ("Access requests per second", "Запросов доступа в секунду"),
    "health.accounting_per_s": ("Accounting requests per second", "Запросов учёта в секунду"),
    "health.rejects_per_s": ("Rejects per second", "Отказов в секунду"),
    "health.no_sys_health": ("This core does not report its processes (no sys.health): shown is what the console "
                             "itself knows.", "Это ядро не сообщает о своих процессах (нет sys.health): показано то, "
                             "что знает сама консоль."),
    "health.link": ("The console's link to the core", "Связь консоли с ядром"),
    "health.link_up": ("connected", "есть"),
    "health.link_down": ("down", "нет"),
    "health.reconnects": ("Reconnects", "Переподключений"),
    "health.core_time": ("Core's clock", "Часы ядра"),
    "health.latency": ("Round trip", "Задержка"),
    "health.plugins_loaded": ("Plugins loaded", "Загружено модулей"),
    "audit.title": ("Audit log", "Журнал аудита"),
    "audit.object": ("Object (e.g. account:5)", "Объект (например, account:5)"),
    "audit.action": ("Action", "Действие"),
    "audit.login": ("Who (login)", "Кто (логин)"),
    "audit.since": ("From", "С"),
    "audit.until": ("To", "По"),
    "audit.search": ("Search", "Найти"),
    "audit.when": ("When", "Когда"),
    "audit.ip": ("Address", "Адрес"),
    "audit.change": ("Change", "Изменение"),
    "audit.none": ("Nothing found.", "Ничего не найдено."),
    "audit.bad_date": ("A date is YYYY-MM-DD.", "Дата пишется как ГГГГ-ММ-ДД."),
    "audit.prev": ("Newer", "Новее"),
    "audit.next": ("Older", "Старше"),
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
        return await plugins(request, t("plugins.refused", message=refused.message or refused.code), 400)
    return redirect(request, "/system/plugins", message=done)


@ROUTES.post("/system/plugins/load", needs=("plugins.load", "plugins.list"))
async def plugin_load(request: web.Request) -> web.StreamResponse:
    fields = await form(request)
    return await _plugin_action(request, "plugins.load", "plugins.done_loaded", path=fields.get("name", "").strip())


@ROUTES.post("/system/plugins/{name}/unload", needs=("plugins.unload", "plugins.list"))
async def plugin_unload(request: web.Request) -> web.StreamResponse:
    return await _plugin_action(request, "plugins.unload", "plugins.done_unloaded", name=request.match_info["name"])


# -- health ----------------------------------------------------------------------------

@ROUTES.get("/system/health", nav="health")
async def health(request: web.Request) -> web.StreamResponse:
    operator = operator_of(request)
    report = await call(request, "sys.health") if operator.can("sys.health") else None
    link = request.app[CONSOLE].link
    sent = time.monotonic()
    core_time = await call(request, "sys.time")
    round_trip_ms = round((time.monotonic() - sent) * 1000, 1)
    loaded = None
    if report is None and operator.can("plugins.list"):
        loaded = sum(1 for plugin in await call(request, "plugins.list", limit=PLUGINS_PAGE)
                     if plugin.get("state") == "loaded")
    return render(request, "system/health.html", report=report, link_up=link.link.up.is_set(),
                  reconnects=link.reconnects, core_time=core_time, round_trip_ms=round_trip_ms, loaded=loaded)


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
        error = t("audit.bad_date")
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
