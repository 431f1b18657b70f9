"""Traffic classes with their rules, and time ranges: one list page each,
with the forms that add and delete them.

A class's rules are what the NetFlow workers classify with (prefixes, ports,
protocol, exporter, interface; docs/tariffs.md recipe 2); a time range is
weekly windows such as "all 23:00-07:00" plus whole dates.  As on the tariff
pages, the console sends what was typed and the core's refusal is shown
beside the field it names; the list is shown again with the typed values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from aiohttp import web

from console.page import Page, call, form, redirect, render
from console.pages.tariff_forms import (
    PROTOCOLS, FieldError, given, parse_int, parse_ports, show_ports, window_text,
)
from console.pages.form_calls import CLASS_PAGE, attempt, button, every_row

__all__ = ["ROUTES", "MESSAGES"]

ROUTES = Page.routes()

WINDOW_ROWS: Final = 3           # window rows the range form offers (the core takes up to 64)
CLASS_WORDS: Final = (("name", "name"), ("position", "position"), ("comment", "comment"))
RULE_WORDS: Final = (("local_net", "local_net"), ("remote_net", "remote_net"), ("local_ports", "local_ports"),
                     ("remote_ports", "remote_ports"), ("protocol", "protocol"), ("exporter", "exporter"),
                     ("iface", "iface"), ("position", "position"), ("prefix", "remote_net"),
                     ("network", "remote_net"), ("port", "remote_ports"))
RANGE_WORDS: Final = (("name", "name"), ("priority", "priority"), ("date", "dates"), ("window", "windows"),
                      ("day", "windows"), ("span", "windows"), ("time", "windows"), ("matches nothing", "windows"))


def class_rows(classes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Classes with their rules' ports as typed ("1024-65535")."""
    return [{**traffic_class, "rules": [{**rule, "local_ports": show_ports(rule["local_ports"]),
                                         "remote_ports": show_ports(rule["remote_ports"])}
                                        for rule in traffic_class["rules"]]}
            for traffic_class in classes]


async def classes_page(request: web.Request, fields: Mapping[str, str] | None = None,
                       errors: Mapping[str, FieldError] | None = None, form_id: str = ""
                       ) -> web.StreamResponse:
    """The list; ``form_id`` names the form the typed ``fields`` and ``errors`` belong to."""
    classes = class_rows(await every_row(request, "classes.list", page=CLASS_PAGE))
    return render(request, "tariffs/classes.html", status=422 if errors else 200, classes=classes,
                  fields=fields or {}, errors=errors or {},
                  form_id=form_id, protocols=PROTOCOLS)


@ROUTES.get("/classes", needs=("classes.list",), nav="classes")
async def classes(request: web.Request) -> web.StreamResponse:
    return await classes_page(request)


@ROUTES.post("/classes", needs=("classes.add", "classes.list"))
async def add_class(request: web.Request) -> web.StreamResponse:
    fields = await form(request)
    _, errors = await attempt(lambda: call(request, "classes.add", **given(
        name=fields.get("name", ""), comment=fields.get("comment", ""),
        position=parse_int(fields.get("position", ""), "position"))), CLASS_WORDS, "name")
    if errors:
        return await classes_page(request, fields, errors, "new-class")
    return redirect(request, "/classes", message="classes.saved")


def rule_args(fields: Mapping[str, str]) -> dict[str, Any]:
    """``classes.add_rule``'s criteria from the rule form (empty: matches anything)."""
    protocol = fields.get("protocol", "").strip()
    return given(position=parse_int(fields.get("position", ""), "position"),
                 skip=True if fields.get("skip") else None,
                 local_net=fields.get("local_net", "").strip(), remote_net=fields.get("remote_net", "").strip(),
                 local_ports=parse_ports(fields.get("local_ports", ""), "local_ports"),
                 remote_ports=parse_ports(fields.get("remote_ports", ""), "remote_ports"),
                 protocol=parse_int(protocol, "protocol"), exporter=fields.get("exporter", "").strip(),
                 iface=parse_int(fields.get("iface", ""), "iface"))


@ROUTES.post(r"/classes/{class_id:\d+}/rules", needs=("classes.add_rule", "classes.list"))
async def add_rule(request: web.Request) -> web.StreamResponse:
    class_id = int(request.match_info["class_id"])
    fields = await form(request)
    _, errors = await attempt(lambda: call(request, "classes.add_rule", class_id=class_id, **rule_args(fields)),
                              RULE_WORDS, "remote_net")
    if errors:
        return await classes_page(request, fields, errors, f"rule-{class_id}")
    return redirect(request, "/classes", message="classes.rule_saved")


@ROUTES.post(r"/classes/rules/{rule_id:\d+}/delete", needs=("classes.delete_rule",))
async def delete_rule(request: web.Request) -> web.StreamResponse:
    return await button(request, "classes.delete_rule", {"rule_id": int(request.match_info["rule_id"])},
                        back="/classes", done="/classes", message="classes.rule_deleted")


@ROUTES.post(r"/classes/{class_id:\d+}/delete", needs=("classes.delete",))
async def delete_class(request: web.Request) -> web.StreamResponse:
    return await button(request, "classes.delete", {"class_id": int(request.match_info["class_id"])},
                        back="/classes", done="/classes", message="classes.deleted")


# -- time ranges ----------------------------------------------------------------------------

async def ranges_page(request: web.Request, fields: Mapping[str, str] | None = None,
                      errors: Mapping[str, FieldError] | None = None) -> web.StreamResponse:
    ranges = [{**time_range, "windows": [window_text(window) for window in time_range["windows"]]}
              for time_range in await every_row(request, "timeranges.list")]
    return render(request, "tariffs/timeranges.html", status=422 if errors else 200, ranges=ranges,
                  fields=fields or {}, errors=errors or {},
                  window_rows=range(WINDOW_ROWS))


@ROUTES.get("/timeranges", needs=("timeranges.list",), nav="timeranges")
async def timeranges(request: web.Request) -> web.StreamResponse:
    return await ranges_page(request)


def range_args(fields: Mapping[str, str]) -> dict[str, Any]:
    """``timeranges.add``'s arguments: each window row as the core reads it
    ({"days": "mon-fri", "time": "08:00-24:00"}), dates one per line or comma."""
    windows = []
    for row in range(WINDOW_ROWS):
        days = fields.get(f"days_{row}", "").strip()
        start, end = fields.get(f"start_{row}", "").strip(), fields.get(f"end_{row}", "").strip()
        if days or start or end:
            windows.append({"days": days, "time": f"{start}-{end}"})
    dates = [text for text in fields.get("dates", "").replace(",", "\n").split() if text]
    return given(name=fields.get("name", ""), priority=parse_int(fields.get("priority", ""), "priority"),
                 windows=windows or None, dates=dates or None)


@ROUTES.post("/timeranges", needs=("timeranges.add", "timeranges.list"))
async def add_range(request: web.Request) -> web.StreamResponse:
    fields = await form(request)
    _, errors = await attempt(lambda: call(request, "timeranges.add", **range_args(fields)), RANGE_WORDS, "name")
    if errors:
        return await ranges_page(request, fields, errors)
    return redirect(request, "/timeranges", message="timeranges.saved")


@ROUTES.post(r"/timeranges/{range_id:\d+}/delete", needs=("timeranges.delete",))
async def delete_range(request: web.Request) -> web.StreamResponse:
    return await button(request, "timeranges.delete", {"range_id": int(request.match_info["range_id"])},
                        back="/timeranges", done="/timeranges", message="timeranges.deleted")


MESSAGES: dict[str, tuple[str, str]] = {
    "nav.classes": ("Traffic classes", "Классы трафика"),
    "nav.timeranges": ("Time ranges", "Временные диапазоны"),
    "classes.title": ("Traffic classes", "Классы трафика"),
    "classes.hint": ("A flow's leg belongs to the class of the first rule it matches: classes in position "
                     "order, then their rules in position order. An empty criterion matches anything.",
                     "Направление потока относится к классу первого подходящего правила: классы по порядку "
                     "позиций, затем их правила по порядку. Пустой критерий подходит ко всему."),
    "classes.none": ("No traffic classes yet.", "Классов трафика пока нет."),
    "classes.new": ("New class", "Новый класс"),
    "classes.name": ("Name", "Название"),
    "classes.position": ("Position", "Позиция"),
    "classes.comment": ("Comment", "Комментарий"),
    "classes.add": ("Add class", "Добавить класс"),
    "classes.saved": ("The class is added.", "Класс добавлен."),
    "classes.delete": ("Delete class", "Удалить класс"),
    "classes.delete_confirm": ("Delete this class and its rules?", "Удалить класс и его правила?"),
    "classes.deleted": ("The class is deleted.", "Класс удалён."),
    "classes.rules": ("Rules", "Правила"),
    "classes.no_rules": ("No rules: the class matches nothing.", "Правил нет: класс ни к чему не подходит."),
    "classes.add_rule": ("Add rule", "Добавить правило"),
    "classes.rule_saved": ("The rule is added.", "Правило добавлено."),
    "classes.rule_delete": ("Delete", "Удалить"),
    "classes.rule_delete_confirm": ("Delete this rule?", "Удалить правило?"),
    "classes.rule_deleted": ("The rule is deleted.", "Правило удалено."),
    "classes.skip": ("Skip (neither charged nor counted)", "Пропускать (не тарифицировать и не считать)"),
    "classes.skipped": ("skip", "пропуск"),
    "classes.local_net": ("Local prefix", "Локальная сеть"),
    "classes.remote_net": ("Remote prefix", "Удалённая сеть"),
    "classes.local_ports": ("Local ports", "Локальные порты"),
    "classes.remote_ports": ("Remote ports", "Удалённые порты"),
    "classes.protocol": ("Protocol", "Протокол"),
    "classes.any": ("any", "любой"),
    "classes.exporter": ("Exporter address", "Адрес экспортёра"),
    "classes.iface": ("Interface index", "Индекс интерфейса"),
    "timeranges.title": ("Time ranges", "Временные диапазоны"),
    "timeranges.hint": ("Days: all, mon … sun, spans such as mon-fri, lists such as sat,sun. A time ending at "
                        "or before its start crosses midnight (23:00-07:00).",
                        "Дни: all, mon … sun, промежутки вроде mon-fri, списки вроде sat,sun. Время, "
                        "кончающееся не позже начала, переходит через полночь (23:00-07:00)."),
    "timeranges.none": ("No time ranges yet.", "Временных диапазонов пока нет."),
    "timeranges.new": ("New time range", "Новый временной диапазон"),
    "timeranges.name": ("Name", "Название"),
    "timeranges.priority": ("Priority", "Приоритет"),
    "timeranges.windows": ("Weekly windows", "Недельные окна"),
    "timeranges.days": ("Days", "Дни"),
    "timeranges.start": ("From", "С"),
    "timeranges.end": ("To", "До"),
    "timeranges.dates": ("Whole dates (YYYY-MM-DD, one a line)", "Целые даты (ГГГГ-ММ-ДД, по одной в строке)"),
    "timeranges.add": ("Add time range", "Добавить диапазон"),
    "timeranges.saved": ("The time range is added.", "Диапазон добавлен."),
    "timeranges.delete": ("Delete", "Удалить"),
    "timeranges.delete_confirm": ("Delete this time range?", "Удалить временной диапазон?"),
    "timeranges.deleted": ("The time range is deleted.", "Диапазон удалён."),
}
