"""Tariffs and services: lists, the forms that make them, and the sample month.

Theory of operation
-------------------
Every form posts to the console, which sends the core's own call
(``tariffs.add``, ``services.add``, ``services.set_rate`` …) as the
operator.  The core decides what is valid: its refusal comes back as
``Refused`` and is shown beside the field it names (``field_of``), with
what the operator typed still in the form.  Prices are typed as money per
GB/MB/hour and sent as micro-units per ``unit_size`` (``tariff_forms``).

The sample month is ``tariffs.quote``: the chosen services and a traffic
volume per class the operator may change, rated by the same code that
charges.  The form shows it on request (a button, no script needed);
``tariffs.js`` refreshes it as the operator ticks services or edits
volumes, fetching the fragment at ``/tariffs/quote``.

The catalogue lists are paged by the core; a page here reads them whole
(``form_calls.every_row``: tariffs and services number in the hundreds).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from aiohttp import web

from billcore.common.money import GB
from console.page import Page, call, form, redirect, render
from console.pages.form_calls import CLASS_PAGE, attempt, button, can, every_row, find_row
from console.pages.tariff_forms import (
    MAX_TIERS_TYPED, TIME_UNITS, TRAFFIC_UNITS, FieldError, given, parse_int, parse_price, parse_quantity,
    show_price, show_quantity, unit_size,
)

__all__ = ["ROUTES", "MESSAGES"]

ROUTES = Page.routes()

SAMPLE_GB: Final = "10"       # the sample month's default volume per traffic class
SERVICE_KINDS: Final = ("periodic", "once", "traffic", "time")
PERIOD_KINDS: Final = ("monthly", "weekly", "daily", "yearly", "custom")
CHARGE_MODES: Final = ("start", "end", "daily")
SERVICE_WORDS: Final = (("name", "name"), ("kind", "kind"), ("fee", "fee"), ("charge_mode", "charge_mode"),
                        ("anchor", "anchor"), ("period", "period_kind"), ("session_limit", "session_limit"),
                        ("max_sessions", "max_sessions"), ("comment", "comment"))
RATE_WORDS: Final = (("tier price", "tiers"), ("price", "tiers"), ("tier", "tiers"), ("prepaid", "prepaid"),
                     ("unit_size", "unit"), ("class", "class_id"), ("range", "range_id"))
TARIFF_WORDS: Final = (("name", "name"), ("service", "services"), ("comment", "comment"))


def checked_ids(fields: Mapping[str, str], prefix: str) -> list[int]:
    """Ids of the ticked boxes named ``<prefix><id>``."""
    return sorted(int(name[len(prefix):]) for name in fields
                  if name.startswith(prefix) and name[len(prefix):].isdigit() and len(name) < len(prefix) + 19)


# -- tariffs ---------------------------------------------------------------------------

@ROUTES.get("/tariffs", needs=("tariffs.list", "services.list"), nav="tariffs")
async def tariffs(request: web.Request) -> web.StreamResponse:
    services = {row["id"]: row for row in await every_row(request, "services.list")}
    return render(request, "tariffs/tariffs.html", tariffs=await every_row(request, "tariffs.list"),
                  services=services)


@ROUTES.get("/tariffs/history", needs=("tariffs.history",))
async def history(request: web.Request) -> web.StreamResponse:
    typed = request.query.get("account_id", "")

    async def read() -> list[dict[str, Any]]:
        account_id = parse_int(typed, "account_id")
        return [] if account_id is None else await every_row(request, "tariffs.history", account_id=account_id)
    rows, errors = await attempt(read, (), "account_id")
    return render(request, "tariffs/history.html", account_id=typed, rows=rows or [], errors=errors)


async def tariff_form(request: web.Request, tariff: Mapping[str, Any] | None, fields: Mapping[str, str],
                      errors: Mapping[str, FieldError] | None = None, quote: Mapping[str, Any] | None = None,
                      quote_errors: Mapping[str, FieldError] | None = None) -> web.StreamResponse:
    services = await every_row(request, "services.list")
    classes = await every_row(request, "classes.list", page=CLASS_PAGE) if can(request, "classes.list") else []
    return render(request, "tariffs/tariff_form.html", status=422 if errors else 200, tariff=tariff,
                  fields=fields, errors=errors or {}, services=services, classes=classes, quote=quote,
                  quote_errors=quote_errors or {}, sample_gb=SAMPLE_GB)


@ROUTES.get("/tariffs/new", needs=("tariffs.add", "services.list"))
async def new_tariff(request: web.Request) -> web.StreamResponse:
    return await tariff_form(request, None, {})


@ROUTES.get(r"/tariffs/{tariff_id:\d+}", needs=("tariffs.list", "services.list"))
async def tariff(request: web.Request) -> web.StreamResponse:
    found = find_row(await every_row(request, "tariffs.list"), int(request.match_info["tariff_id"]))
    return await tariff_form(request, found, {f"service_{service_id}": "on" for service_id in found["service_ids"]})


async def save_tariff(request: web.Request, found: Mapping[str, Any] | None) -> web.StreamResponse:
    """The tariff form saved: ``tariffs.add`` for a new one, ``tariffs.set_services`` for ``found``."""
    fields = await form(request)
    service_ids = checked_ids(fields, "service_")
    if found is None:
        saved, errors = await attempt(lambda: call(request, "tariffs.add", **given(
            name=fields.get("name", ""), service_ids=service_ids, comment=fields.get("comment", ""))),
            TARIFF_WORDS, "name")
    else:
        saved, errors = await attempt(lambda: call(request, "tariffs.set_services", tariff_id=found["id"],
                                                   service_ids=service_ids), TARIFF_WORDS, "services")
    if errors or saved is None:
        return await tariff_form(request, found, fields, errors)
    return redirect(request, f"/tariffs/{saved['id']}", message="tariffs.saved")


@ROUTES.post("/tariffs/new", needs=("tariffs.add", "services.list"))
async def add_tariff(request: web.Request) -> web.StreamResponse:
    return await save_tariff(request, None)


@ROUTES.post(r"/tariffs/{tariff_id:\d+}", needs=("tariffs.set_services", "tariffs.list", "services.list"))
async def set_services(request: web.Request) -> web.StreamResponse:
    return await save_tariff(request, find_row(await every_row(request, "tariffs.list"),
                                               int(request.match_info["tariff_id"])))


@ROUTES.post(r"/tariffs/{tariff_id:\d+}/delete", needs=("tariffs.delete",))
async def delete_tariff(request: web.Request) -> web.StreamResponse:
    tariff_id = int(request.match_info["tariff_id"])
    return await button(request, "tariffs.delete", {"tariff_id": tariff_id}, back=f"/tariffs/{tariff_id}",
                        done="/tariffs", message="tariffs.deleted")


async def sample_month(request: web.Request, fields: Mapping[str, str], service_ids: list[int]
                       ) -> tuple[dict[str, Any] | None, dict[str, FieldError]]:
    """``tariffs.quote`` for the typed services and a volume per class in GB:
    the quote, or the errors to show in the sample-month box."""
    async def quote() -> dict[str, Any]:
        traffic = {name.removeprefix("traffic_"): parse_quantity(value, GB, name) for name, value in fields.items()
                   if name.startswith("traffic_") and name.removeprefix("traffic_").isdigit() and value.strip()}
        days = parse_int(fields.get("days", ""), "days")
        answer: dict[str, Any] = await call(request, "tariffs.quote", **given(service_ids=service_ids,
                                                                              traffic=traffic, days=days))
        return answer
    return await attempt(quote, (("day", "days"), ("class", "traffic")), "quote")


@ROUTES.post("/tariffs/quote", needs=("tariffs.quote", "services.list"))
async def quote_page(request: web.Request) -> web.StreamResponse:
    """The tariff form again with its sample month (the button, without script): a
    reader with ``tariffs.quote`` may try services without the right to save them."""
    fields = await form(request)
    tariff_id = fields.get("tariff_id", "")
    found = (find_row(await every_row(request, "tariffs.list"), int(tariff_id))
             if tariff_id.isdigit() and len(tariff_id) < 19 else None)
    quote, quote_errors = await sample_month(request, fields, checked_ids(fields, "service_"))
    return await tariff_form(request, found, fields, quote=quote, quote_errors=quote_errors)


@ROUTES.get("/tariffs/quote", needs=("tariffs.quote",))
async def quote_fragment(request: web.Request) -> web.StreamResponse:
    """The sample-month box alone, for ``tariffs.js``."""
    fields = dict(request.query)
    quote, quote_errors = await sample_month(request, fields, checked_ids(fields, "service_"))
    return render(request, "tariffs/quote.html", quote=quote, quote_errors=quote_errors)


# -- services ----------------------------------------------------------------------------

def service_view(service: Mapping[str, Any], classes: Mapping[int, str], ranges: Mapping[int, str]
                 ) -> dict[str, Any]:
    """A service with its rates as an operator reads them (GB, hours, money per unit)."""
    kind = str(service["kind"])
    rates = []
    for rate in service.get("rates", []):
        size = int(rate["unit_size"])
        rates.append({
            "class_id": rate["class_id"], "range_id": rate["range_id"],
            "class": classes.get(rate["class_id"], f"#{rate['class_id']}") if rate["class_id"] else "",
            "range": ranges.get(rate["range_id"], f"#{rate['range_id']}") if rate["range_id"] else "",
            "prepaid": show_quantity(int(rate["prepaid"]), size) if rate["prepaid"] else "",
            "tiers": [(show_quantity(int(start), size), show_price(int(price), size, kind))
                      for start, price in zip(rate["tier_starts"], rate["tier_prices"])],
        })
    return {**service, "rates": rates}


async def names_of(request: web.Request) -> tuple[dict[int, str], dict[int, str]]:
    """Traffic class and time range names by id (empty where the operator may not read them)."""
    classes = ({row["id"]: row["name"] for row in await every_row(request, "classes.list", page=CLASS_PAGE)}
               if can(request, "classes.list") else {})
    ranges = ({row["id"]: row["name"] for row in await every_row(request, "timeranges.list")}
              if can(request, "timeranges.list") else {})
    return classes, ranges


@ROUTES.get("/services", needs=("services.list",), nav="services")
async def services(request: web.Request) -> web.StreamResponse:
    classes, ranges = await names_of(request)
    rows = [service_view(row, classes, ranges) for row in await every_row(request, "services.list")]
    return render(request, "tariffs/services.html", services=rows)


def service_form(request: web.Request, fields: Mapping[str, str], errors: Mapping[str, FieldError]
                 ) -> web.StreamResponse:
    return render(request, "tariffs/service_form.html", status=422 if errors else 200, fields=fields,
                  errors=errors, kinds=SERVICE_KINDS, period_kinds=PERIOD_KINDS, charge_modes=CHARGE_MODES)


@ROUTES.get("/services/new", needs=("services.add",))
async def new_service(request: web.Request) -> web.StreamResponse:
    return service_form(request, {"kind": "periodic", "period_kind": "monthly", "charge_mode": "start"}, {})


def service_args(fields: Mapping[str, str]) -> dict[str, Any]:
    """``services.add``'s arguments: the fee as money, the period only for a periodic service."""
    kind = fields.get("kind", "")
    args = given(name=fields.get("name", ""), kind=kind, comment=fields.get("comment", ""),
                 session_limit=parse_int(fields.get("session_limit", ""), "session_limit"),
                 max_sessions=parse_int(fields.get("max_sessions", ""), "max_sessions"))
    if fields.get("fee", "").strip():
        args["fee"] = parse_price(fields["fee"], "fee")
    if kind == "periodic":
        args["period"] = given(kind=fields.get("period_kind", ""), anchor=fields.get("anchor", "").strip(),
                               days=parse_int(fields.get("days", ""), "days"))
        args["charge_mode"] = fields.get("charge_mode", "")
    return args


@ROUTES.post("/services/new", needs=("services.add",))
async def add_service(request: web.Request) -> web.StreamResponse:
    fields = await form(request)
    made, errors = await attempt(lambda: call(request, "services.add", **service_args(fields)), SERVICE_WORDS,
                                 "name")
    if errors or made is None:
        return service_form(request, fields, errors)
    return redirect(request, f"/services/{made['id']}", message="services.saved")


async def service_page(request: web.Request, service_id: int, fields: Mapping[str, str],
                       errors: Mapping[str, FieldError]) -> web.StreamResponse:
    classes, ranges = await names_of(request)
    found = service_view(find_row(await every_row(request, "services.list"), service_id), classes, ranges)
    units = TIME_UNITS if found["kind"] == "time" else TRAFFIC_UNITS
    fields = {"unit": "hour" if found["kind"] == "time" else "GB", **fields}
    return render(request, "tariffs/service.html", status=422 if errors else 200, service=found,
                  classes=classes, ranges=ranges,
                  units=[name for name, _ in units], fields=fields, errors=errors,
                  tier_rows=range(MAX_TIERS_TYPED))


@ROUTES.get(r"/services/{service_id:\d+}", needs=("services.list",))
async def service(request: web.Request) -> web.StreamResponse:
    return await service_page(request, int(request.match_info["service_id"]), {}, {})


def rate_args(fields: Mapping[str, str], kind: str) -> dict[str, Any]:
    """``services.set_rate``'s arguments from the rate form: prices in money
    per the chosen unit, prepaid and tier starts in that unit."""
    size = unit_size(fields.get("unit", ""))
    tiers: list[list[int]] = []
    for row in range(MAX_TIERS_TYPED):
        price = fields.get(f"tier_price_{row}", "").strip()
        if not price:
            continue
        start = parse_quantity(fields.get(f"tier_from_{row}", "") or "0", size, "tiers")
        tiers.append([start, parse_price(price, "tiers")])
    args = given(unit_size=size, tiers=tiers,
                 range_id=parse_int(fields.get("range_id", ""), "range_id"),
                 prepaid=parse_quantity(fields.get("prepaid", "") or "0", size, "prepaid") or None)
    if kind != "time":
        args.update(given(class_id=parse_int(fields.get("class_id", ""), "class_id")))
    return args


@ROUTES.post(r"/services/{service_id:\d+}/rate", needs=("services.set_rate", "services.list"))
async def set_rate(request: web.Request) -> web.StreamResponse:
    service_id = int(request.match_info["service_id"])
    fields = await form(request)
    kind = "time" if fields.get("kind") == "time" else "traffic"
    _, errors = await attempt(lambda: call(request, "services.set_rate", service_id=service_id,
                                           **rate_args(fields, kind)), RATE_WORDS, "tiers")
    if errors:
        return await service_page(request, service_id, fields, errors)
    return redirect(request, f"/services/{service_id}", message="services.rate_saved")


@ROUTES.post(r"/services/{service_id:\d+}/delete", needs=("services.delete",))
async def delete_service(request: web.Request) -> web.StreamResponse:
    service_id = int(request.match_info["service_id"])
    return await button(request, "services.delete", {"service_id": service_id}, back=f"/services/{service_id}",
                        done="/services", message="services.deleted")


MESSAGES: dict[str, tuple[str, str]] = {
    "nav.tariffs": ("Tariffs", "Тарифы"),
    "nav.services": ("Services", "Услуги"),
    "tariffs.title": ("Tariffs", "Тарифы"),
    "tariffs.new": ("New tariff", "Новый тариф"),
    "tariffs.none": ("No tariffs yet.", "Тарифов пока нет."),
    "tariffs.name": ("Name", "Название"),
    "tariffs.comment": ("Comment", "Комментарий"),
    "tariffs.services": ("Services", "Услуги"),
    "tariffs.save": ("Save tariff", "Сохранить тариф"),
    "tariffs.saved": ("The tariff is saved.", "Тариф сохранён."),
    "tariffs.delete": ("Delete tariff", "Удалить тариф"),
    "tariffs.delete_confirm": ("Delete this tariff? Only a tariff no account was ever on can be deleted.",
                               "Удалить тариф? Удалить можно только тариф, на котором не было ни одного счёта."),
    "tariffs.deleted": ("The tariff is deleted.", "Тариф удалён."),
    "tariffs.history": ("Tariff history of an account", "История тарифов счёта"),
    "tariffs.account_id": ("Account id", "Номер счёта"),
    "tariffs.show": ("Show", "Показать"),
    "tariffs.from": ("From", "С"),
    "tariffs.to": ("To", "По"),
    "tariffs.by": ("By", "Кто"),
    "tariffs.no_history": ("No tariff was ever linked to this account.", "У счёта не было тарифов."),
    "tariffs.back": ("Back", "Назад"),
    "tariffs.refused": ("The core refused", "Ядро отказало"),
    "quote.title": ("Sample month", "Пример месяца"),
    "quote.hint": ("What a month would cost with the ticked services and this traffic, by the same rating "
                   "code that charges.", "Сколько стоил бы месяц с отмеченными услугами и таким трафиком — "
                   "по тому же коду тарификации, что и списания."),
    "quote.traffic": ("Traffic of class {name}, GB", "Трафик класса {name}, ГБ"),
    "quote.days": ("Days", "Дней"),
    "quote.show": ("Show sample month", "Показать пример месяца"),
    "quote.total": ("Total", "Итого"),
    "quote.service": ("Service", "Услуга"),
    "quote.kind": ("Kind", "Вид"),
    "quote.amount": ("Amount", "Сумма"),
    "quote.period": ("The month from {start} to {end}.", "Месяц с {start} по {end}."),
    "quote.unrated": ("{bytes} of class #{class_id} would not be charged: {reason}",
                      "{bytes} класса #{class_id} не тарифицировались бы: {reason}"),
    "quote.empty": ("Tick services to see a month's cost.", "Отметьте услуги, чтобы увидеть стоимость месяца."),
    "services.title": ("Services", "Услуги"),
    "services.new": ("New service", "Новая услуга"),
    "services.none": ("No services yet.", "Услуг пока нет."),
    "services.kind": ("Kind", "Вид"),
    "services.kind.periodic": ("periodic fee", "периодическая плата"),
    "services.kind.once": ("once-off fee", "разовая плата"),
    "services.kind.traffic": ("traffic", "трафик"),
    "services.kind.time": ("session time", "время сессий"),
    "services.fee": ("Fee", "Плата"),
    "services.period": ("Period", "Период"),
    "services.period.monthly": ("monthly", "ежемесячно"),
    "services.period.weekly": ("weekly", "еженедельно"),
    "services.period.daily": ("daily", "ежедневно"),
    "services.period.yearly": ("yearly", "ежегодно"),
    "services.period.custom": ("every N days", "каждые N дней"),
    "services.anchor": ("Periods start on (YYYY-MM-DD)", "Периоды начинаются с (ГГГГ-ММ-ДД)"),
    "services.days": ("Days (every N days)", "Дней (каждые N дней)"),
    "services.charge_mode": ("Charged", "Списание"),
    "services.charge_mode.start": ("at the start of the period", "в начале периода"),
    "services.charge_mode.end": ("at the end of the period", "в конце периода"),
    "services.charge_mode.daily": ("a share each day", "по дням"),
    "services.session_limit": ("Longest session, seconds", "Самая долгая сессия, секунд"),
    "services.max_sessions": ("Sessions at once", "Сессий одновременно"),
    "services.save": ("Save service", "Сохранить услугу"),
    "services.saved": ("The service is saved.", "Услуга сохранена."),
    "services.delete": ("Delete service", "Удалить услугу"),
    "services.delete_confirm": ("Delete this service?", "Удалить услугу?"),
    "services.deleted": ("The service is deleted.", "Услуга удалена."),
    "services.rates": ("Prices", "Цены"),
    "services.no_rates": ("No prices yet: its traffic or time is not charged.",
                          "Цен пока нет: трафик или время не тарифицируются."),
    "services.class": ("Traffic class", "Класс трафика"),
    "services.range": ("Time range", "Временной диапазон"),
    "services.any_range": ("any time", "в любое время"),
    "services.prepaid": ("Prepaid", "Предоплачено"),
    "services.tiers": ("Price", "Цена"),
    "services.set_rate": ("Set a price", "Задать цену"),
    "services.set_rate_hint": ("Setting a price again for the same class and range replaces it.",
                               "Новая цена для того же класса и диапазона заменяет прежнюю."),
    "services.unit": ("Per", "За"),
    "services.tier_from": ("From (beyond prepaid)", "Начиная с (сверх предоплаты)"),
    "services.tier_price": ("Price per unit", "Цена за единицу"),
    "services.rate_save": ("Save price", "Сохранить цену"),
    "services.rate_saved": ("The price is saved.", "Цена сохранена."),
    "form.bad_unit": ("Choose a unit.", "Выберите единицу."),
    "form.bad_quantity": ("A number such as 10 or 1.5, in whole bytes or seconds.",
                          "Число вроде 10 или 1.5, в целых байтах или секундах."),
    "form.bad_int": ("A whole number.", "Целое число."),
    "form.bad_ports": ("A port or a range such as 1024-65535.", "Порт или диапазон вроде 1024-65535."),
}
