"""Network: NAS devices, the sessions online now, NetFlow workers and RADIUS rates.

Theory of operation
-------------------
* **NAS** (``radius.nas_*``): the shared secret is write-only.  The core
  never answers it to an operator (``radius.nas_show`` has no secret), the
  form's secret field is always empty, and an edit sends a secret only when
  one was typed (replacing the old one).
* **Online** (``radius.sessions``): the table is a live region: the
  console's script listens to ``/network/online/events`` (``live`` for the
  RADIUS session topics) and, on each ``changed``, fetches the page again as
  the operator and swaps the table in: events carry nothing to the browser,
  so what the table shows is what the operator's own call answers.
  Disconnect asks ``radius.disconnect`` after a confirmation.
* **NetFlow** and **RADIUS** read ``sys.health`` (what the core knows of its
  workers and rates; missing parts are shown as unknown).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from aiohttp import web

from console.page import Page, call, form, live, redirect, render
from console.pages.tariff_forms import FieldError, given, parse_int
from console.pages.form_calls import attempt, button, every_row, find_row

__all__ = ["ROUTES", "MESSAGES", "SESSION_TOPICS"]

ROUTES = Page.routes()

SESSIONS_PAGE: Final = 100       # online sessions per page of the console
SESSION_TOPICS: Final = ("radius.sessions", "radius.disconnect")
DISCONNECT_MODES: Final = ("disconnect", "coa")
NAS_WORDS: Final = (("secret", "secret"), ("address", "address"), ("coa_port", "coa_port"), ("port", "coa_port"),
                    ("disconnect_mode", "disconnect_mode"), ("name", "name"))


def nas_args(fields: Mapping[str, str], *, adding: bool) -> dict[str, Any]:
    """``radius.nas_add``/``nas_edit`` arguments; an empty secret on an edit keeps the old one."""
    args = given(name=fields.get("name", "").strip(), address=fields.get("address", "").strip(),
                 secret=fields.get("secret", ""), coa_port=parse_int(fields.get("coa_port", ""), "coa_port"),
                 disconnect_mode=fields.get("disconnect_mode", ""))
    args["require_message_authenticator"] = bool(fields.get("require_message_authenticator"))
    if adding:
        args.setdefault("secret", "")   # the core says a NAS needs one, beside the field
    return args


async def nas_page(request: web.Request, fields: Mapping[str, str] | None = None,
                   errors: Mapping[str, FieldError] | None = None) -> web.StreamResponse:
    devices = await every_row(request, "radius.nas_show")
    return render(request, "network/nas.html", status=422 if errors else 200, devices=devices,
                  fields=fields or {"require_message_authenticator": "on", "coa_port": "3799"},
                  errors=errors or {}, modes=DISCONNECT_MODES)


@ROUTES.get("/network/nas", needs=("radius.nas_show",), nav="network.nas")
async def nas(request: web.Request) -> web.StreamResponse:
    return await nas_page(request)


@ROUTES.post("/network/nas", needs=("radius.nas_add", "radius.nas_show"))
async def add_nas(request: web.Request) -> web.StreamResponse:
    fields = await form(request)
    made, errors = await attempt(lambda: call(request, "radius.nas_add", **nas_args(fields, adding=True)),
                                 NAS_WORDS, "name")
    if errors or made is None:
        return await nas_page(request, without_secret(fields), errors)
    return redirect(request, "/network/nas", message="nas.saved_ma" if made.get("notice") else "nas.saved")


def without_secret(fields: Mapping[str, str]) -> dict[str, str]:
    """What was typed, to fill the form again: never the secret."""
    return {name: value for name, value in fields.items() if name != "secret"}


async def nas_form(request: web.Request, nas_id: int, fields: Mapping[str, str] | None = None,
                   errors: Mapping[str, FieldError] | None = None) -> web.StreamResponse:
    device = find_row(await every_row(request, "radius.nas_show"), nas_id)
    if fields is None:
        fields = {"name": device["name"], "address": device["address"], "coa_port": str(device["coa_port"]),
                  "disconnect_mode": device["disconnect_mode"],
                  "require_message_authenticator": "on" if device["require_message_authenticator"] else ""}
    return render(request, "network/nas_edit.html", status=422 if errors else 200, device=device, fields=fields,
                  errors=errors or {}, modes=DISCONNECT_MODES)


@ROUTES.get(r"/network/nas/{nas_id:\d+}", needs=("radius.nas_edit", "radius.nas_show"))
async def edit_nas_form(request: web.Request) -> web.StreamResponse:
    return await nas_form(request, int(request.match_info["nas_id"]))


@ROUTES.post(r"/network/nas/{nas_id:\d+}", needs=("radius.nas_edit", "radius.nas_show"))
async def edit_nas(request: web.Request) -> web.StreamResponse:
    nas_id = int(request.match_info["nas_id"])
    fields = await form(request)
    _, errors = await attempt(lambda: call(request, "radius.nas_edit", id=nas_id,
                                           **nas_args(fields, adding=False)), NAS_WORDS, "name")
    if errors:
        return await nas_form(request, nas_id, without_secret(fields), errors)
    return redirect(request, "/network/nas", message="nas.changed")


@ROUTES.post(r"/network/nas/{nas_id:\d+}/delete", needs=("radius.nas_delete",))
async def delete_nas(request: web.Request) -> web.StreamResponse:
    nas_id = int(request.match_info["nas_id"])
    force = bool((await form(request)).get("force"))
    return await button(request, "radius.nas_delete", {"id": nas_id, "force": force},
                        back=f"/network/nas/{nas_id}", done="/network/nas", message="nas.deleted")


# -- sessions online ---------------------------------------------------------------------

def page_offset(request: web.Request) -> int:
    try:
        offset = int(request.query.get("offset", "0"))
    except ValueError:
        return 0
    return max(0, min(offset, 10**9))


@ROUTES.get("/network/online", needs=("radius.sessions",), nav="network.online")
async def online(request: web.Request) -> web.StreamResponse:
    offset = page_offset(request)
    rows = await call(request, "radius.sessions", limit=SESSIONS_PAGE + 1, offset=offset)
    return render(request, "network/online.html", sessions=rows[:SESSIONS_PAGE], offset=offset,
                  more=len(rows) > SESSIONS_PAGE, page=SESSIONS_PAGE)


@ROUTES.get("/network/online/events", needs=("radius.sessions",))
async def online_events(request: web.Request) -> web.StreamResponse:
    return await live(request, list(SESSION_TOPICS))


@ROUTES.post(r"/network/online/{session:\d+}/disconnect", needs=("radius.disconnect",))
async def disconnect(request: web.Request) -> web.StreamResponse:
    return await button(request, "radius.disconnect", {"session": int(request.match_info["session"])},
                        back="/network/online", done="/network/online", message="online.disconnect_sent")


# -- health: NetFlow workers and RADIUS rates -------------------------------------------------

def health_of(health: dict[str, Any], role: str) -> dict[str, Any]:
    """The processes of ``role`` and what the core says it cannot know about them."""
    return {"processes": [row for row in health.get("processes") or [] if role in str(row.get("role", ""))],
            "missing": [line for line in health.get("missing") or [] if role in str(line).lower()]}


@ROUTES.get("/network/netflow", needs=("sys.health",), nav="network.netflow")
async def netflow(request: web.Request) -> web.StreamResponse:
    health = await call(request, "sys.health")
    return render(request, "network/netflow.html", workers=health.get("netflow") or [],
                  **health_of(health, "netflow"))


@ROUTES.get("/network/radius", needs=("sys.health",), nav="network.radius")
async def radius_rates(request: web.Request) -> web.StreamResponse:
    health = await call(request, "sys.health")
    return render(request, "network/radius.html", rates=health.get("radius") or {},
                  rate_names=("access", "accounting", "rejects"), **health_of(health, "radius"))


MESSAGES: dict[str, tuple[str, str]] = {
    "nav.network.nas": ("NAS", "NAS"),
    "nav.network.online": ("Online", "В сети"),
    "nav.network.netflow": ("NetFlow", "NetFlow"),
    "nav.network.radius": ("RADIUS", "RADIUS"),
    "nas.title": ("NAS devices", "NAS-устройства"),
    "nas.none": ("No NAS devices yet.", "NAS-устройств пока нет."),
    "nas.new": ("New NAS", "Новый NAS"),
    "nas.name": ("Name", "Название"),
    "nas.address": ("Address", "Адрес"),
    "nas.secret": ("Shared secret", "Общий секрет"),
    "nas.secret_hint": ("Write-only: it is never shown again.", "Только для записи: больше не показывается."),
    "nas.new_secret": ("New shared secret (empty: keep the current one)",
                       "Новый общий секрет (пусто — оставить прежний)"),
    "nas.coa_port": ("CoA/Disconnect port", "Порт CoA/Disconnect"),
    "nas.disconnect_mode": ("Disconnect by", "Отключать через"),
    "nas.mode.disconnect": ("Disconnect-Request", "Disconnect-Request"),
    "nas.mode.coa": ("CoA to the blocked profile", "CoA в профиль блокировки"),
    "nas.require_ma": ("Require Message-Authenticator (BlastRADIUS protection)",
                       "Требовать Message-Authenticator (защита от BlastRADIUS)"),
    "nas.ma_yes": ("required", "требуется"),
    "nas.ma_no": ("not required", "не требуется"),
    "nas.add": ("Add NAS", "Добавить NAS"),
    "nas.saved": ("The NAS is added.", "NAS добавлен."),
    "nas.saved_ma": ("The NAS is added. Access-Requests from it without a Message-Authenticator attribute "
                     "are dropped: configure the NAS to send it.",
                     "NAS добавлен. Access-Request от него без атрибута Message-Authenticator отбрасываются: "
                     "настройте NAS, чтобы он его отправлял."),
    "nas.edit": ("Edit", "Изменить"),
    "nas.save": ("Save NAS", "Сохранить NAS"),
    "nas.changed": ("The NAS is saved; the RADIUS server reloads its table.",
                    "NAS сохранён; RADIUS-сервер перечитает таблицу."),
    "nas.delete": ("Delete NAS", "Удалить NAS"),
    "nas.force": ("End its active sessions", "Завершить его активные сессии"),
    "nas.delete_confirm": ("Delete this NAS and its session history?", "Удалить NAS и историю его сессий?"),
    "nas.deleted": ("The NAS is deleted.", "NAS удалён."),
    "online.title": ("Online now", "Сейчас в сети"),
    "online.live": ("Updates as sessions start and end.", "Обновляется, когда сессии начинаются и кончаются."),
    "online.none": ("Nobody is online.", "В сети никого нет."),
    "online.login": ("Login", "Логин"),
    "online.account": ("Account", "Счёт"),
    "online.ip": ("IP address", "IP-адрес"),
    "online.nas": ("NAS", "NAS"),
    "online.started": ("Started", "Начало"),
    "online.time": ("Time", "Время"),
    "online.in": ("In", "Вход."),
    "online.out": ("Out", "Исход."),
    "online.disconnect": ("Disconnect", "Отключить"),
    "online.disconnect_confirm": ("Disconnect this session?", "Отключить эту сессию?"),
    "online.disconnect_sent": ("Disconnect is sent to the NAS.", "Запрос на отключение отправлен на NAS."),
    "online.next": ("Next page", "Следующая страница"),
    "online.previous": ("Previous page", "Предыдущая страница"),
    "netflow.title": ("NetFlow workers", "Обработчики NetFlow"),
    "netflow.none": ("The core knows of no NetFlow worker.", "Ядру не известно ни одного обработчика NetFlow."),
    "netflow.worker": ("Worker", "Обработчик"),
    "netflow.lag": ("Journal lag", "Отставание журнала"),
    "netflow.classifier": ("Classifier version", "Версия классификатора"),
    "netflow.exporters": ("Exporters", "Экспортёры"),
    "netflow.exporter": ("Exporter", "Экспортёр"),
    "netflow.last_packet": ("Last packet", "Последний пакет"),
    "netflow.packets": ("Packets", "Пакеты"),
    "netflow.drops": ("Drops", "Потери"),
    "netflow.connected": ("Connected to the core", "Связь с ядром"),
    "netflow.yes": ("yes", "да"),
    "netflow.no": ("no", "нет"),
    "netflow.watermark": ("Committed up to", "Зафиксировано до"),
    "netflow.watermark_at": ("Committed at", "Когда зафиксировано"),
    "health.unknown": ("unknown", "неизвестно"),
    "health.processes": ("Processes", "Процессы"),
    "health.role": ("Role", "Роль"),
    "health.pid": ("PID", "PID"),
    "health.state": ("State", "Состояние"),
    "health.restarts": ("Restarts", "Перезапуски"),
    "health.started": ("Started", "Запущен"),
    "radius.title": ("RADIUS rates", "Нагрузка RADIUS"),
    "radius.access": ("Access-Requests", "Access-Request"),
    "radius.accounting": ("Accounting-Requests", "Accounting-Request"),
    "radius.rejects": ("Access-Rejects sent", "Отправлено Access-Reject"),
    "radius.per_second": ("A second", "В секунду"),
    "radius.total": ("Since the start", "С запуска"),
    "radius.rates_hint": ("A rate is per second since the page was last read (none on the first reading).",
                          "Частота — в секунду с прошлого открытия страницы (при первом открытии её нет)."),
    "health.missing": ("What the core cannot know", "Чего ядро знать не может"),
}
