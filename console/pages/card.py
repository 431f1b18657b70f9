"""The subscriber card: one subscriber, one of their accounts, everything an operator does to it.

Theory of operation
-------------------
The card is read with one round of concurrent calls (``asyncio.gather``):
the user, the account, its blocks, payments, ledger page, tariff links,
bindings, RADIUS logins, sessions online and past, traffic and audit trail
are independent, so the card answers in about the time of its slowest call,
not of their sum.  The list links to ``/subscribers/{user_id}?account=ID``,
so even the user and the account are asked at once; without ``account`` the
user comes first and the basic account is shown.

Each section is asked for only when the operator's call table has its call
(``can``), and each form posts to a route that ``needs`` its call: a cashier
neither sees the block or tariff controls nor reaches their URLs.

Every change is a POST that answers with a redirect back to the card and a
message (so a reload repeats nothing); a refusal by the core re-renders the
card with the core's reason beside the form (status 409), never an error
page.  A payment whose external id was taken already is the case an
operator meets most: the core answers the first payment (``created``
false), and the card says so kindly and marks that payment.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from datetime import date, datetime, timedelta, timezone
from typing import Any, Final

from aiohttp import web

from billcore.common.errors import BillingError
from billcore.common.money import parse_money
from console.page import Page, Refused, call, form, money_text, redirect, render, stream, t
from console.pages.automation import card_section
from console.pages.subscriber_filter import read_id, read_page
from console.pages.subscribers import can, tariff_choices
from webedge.chart import traffic_chart, traffic_table

__all__ = ["ROUTES", "MESSAGES", "PAGE_ROWS", "CHART_DAYS", "audit_change", "services_of", "tariff_state",
           "traffic_rows"]

ROUTES = Page.routes()

PAGE_ROWS: Final = 20                # ledger rows, payments, past sessions, audit rows per page
CHART_DAYS: Final = 30
PAYMENT_METHODS: Final = ("cash", "card", "bank", "online", "voucher", "correction")
LEDGER_KINDS: Final = ("payment", "payment_cancel", "charge", "charge_reversal", "periodic", "traffic", "correction")
_CARD: Final = r"/subscribers/{user_id:\d+}"
_CONTACTS: Final = ("full_name", "phone", "email", "address", "external_id")
_MAX_TEXT: Final = 500
_MONEY_FIELDS: Final = frozenset({"amount", "balance", "credit", "fee", "promised"})
# the new-subscriber form's messages land on the card too
_OTHER_NOTICES: Final = frozenset({"message.created", "message.created_without_ip", "message.created_without_tariff"})

MESSAGES = {
    "card.title": ("Subscriber {login}", "Абонент {login}"),
    "card.accounts": ("Accounts", "Лицевые счета"),
    "card.account": ("Account #{id}", "Счёт №{id}"),
    "card.basic": ("basic", "основной"),
    "card.contacts": ("Contacts", "Контакты"),
    "card.edit": ("Edit", "Изменить"),
    "card.save": ("Save", "Сохранить"),
    "card.contract": ("Contract", "Договор"),
    "card.created_at": ("Created", "Создан"),
    "card.deleted": ("This subscriber was deleted.", "Абонент удалён."),
    "card.money": ("Money", "Деньги"),
    "card.balance": ("Balance", "Баланс"),
    "card.credit": ("Credit", "Кредит"),
    "card.promised": ("Promised payment", "Обещанный платёж"),
    "card.promised_taken": ("This month's promised payment is used.", "Обещанный платёж в этом месяце использован."),
    "card.set_credit": ("Set credit", "Установить кредит"),
    "card.give_promised": ("Give a promised payment", "Дать обещанный платёж"),
    "card.amount_optional": ("Amount (empty: the usual)", "Сумма (пусто — обычная)"),
    "card.days_optional": ("Days (empty: the usual)", "Дней (пусто — обычно)"),
    "card.blocks": ("Blocks", "Блокировки"),
    "card.no_blocks": ("No active block: the subscriber may go online.",
                       "Активных блокировок нет: абонент может выходить в сеть."),
    "card.block": ("Block", "Заблокировать"),
    "card.confirm_block": ("Block this account?", "Заблокировать этот счёт?"),
    "card.confirm_disconnect": ("Disconnect this session?", "Отключить эту сессию?"),
    "card.unblock": ("Unblock", "Разблокировать"),
    "card.reason": ("Reason", "Причина"),
    "card.block_history": ("Earlier blocks", "Прошлые блокировки"),
    "block.admin": ("by an operator", "оператором"),
    "block.user": ("by the subscriber", "абонентом"),
    "block.system": ("for debt", "за долг"),
    "card.payments": ("Payments", "Платежи"),
    "card.take_payment": ("Take a payment", "Принять платёж"),
    "card.amount": ("Amount", "Сумма"),
    "card.method": ("Method", "Способ"),
    "card.external_id": ("External id (receipt, bank reference)", "Внешний номер (чек, банковская ссылка)"),
    "card.comment": ("Comment", "Комментарий"),
    "card.take": ("Take", "Принять"),
    "card.reverse": ("Reverse", "Сторнировать"),
    "card.reversed": ("reversed", "сторнирован"),
    "card.no_payments": ("No payments yet.", "Платежей ещё нет."),
    "method.cash": ("cash", "наличные"),
    "method.card": ("card", "карта"),
    "method.bank": ("bank transfer", "банковский перевод"),
    "method.online": ("online", "онлайн"),
    "method.voucher": ("voucher", "ваучер"),
    "method.correction": ("correction", "корректировка"),
    "method.credit": ("credit", "кредит"),
    "cancel.title": ("Reverse payment #{id}", "Сторнировать платёж №{id}"),
    "cancel.explain": ("The payment stays in the books; a reversal of exactly {amount} is booked against it.",
                       "Платёж остаётся в учёте; против него проводится сторно ровно на {amount}."),
    "cancel.confirm": ("Reverse this payment", "Сторнировать платёж"),
    "cancel.back": ("Back to the card", "Назад к карточке"),
    "cancel.unknown": ("This account has no such payment.", "У этого счёта нет такого платежа."),
    "card.ledger": ("Ledger", "Движение средств"),
    "ledger.payment": ("payment", "платёж"),
    "ledger.payment_cancel": ("payment reversed", "сторно платежа"),
    "ledger.charge": ("charge", "списание"),
    "ledger.charge_reversal": ("charge reversed", "сторно списания"),
    "ledger.periodic": ("periodic fee", "периодическая плата"),
    "ledger.traffic": ("traffic", "трафик"),
    "ledger.correction": ("correction", "корректировка"),
    "card.when": ("When", "Когда"),
    "card.kind": ("Kind", "Вид"),
    "card.balance_after": ("Balance after", "Баланс после"),
    "card.who": ("Who", "Кто"),
    "card.older": ("Older", "Раньше"),
    "card.newer": ("Newer", "Позже"),
    "card.tariff": ("Tariff", "Тариф"),
    "card.tariff_now": ("Now", "Сейчас"),
    "card.tariff_none": ("no tariff", "без тарифа"),
    "card.tariff_scheduled": ("From {when}", "С {when}"),
    "card.tariff_change": ("Change tariff", "Сменить тариф"),
    "card.start": ("From", "С какого момента"),
    "card.start_now": ("now", "сейчас"),
    "card.start_next": ("from the next period", "со следующего периода"),
    "card.services": ("Services", "Услуги"),
    "card.fee": ("Fee", "Плата"),
    "card.bindings": ("IP addresses", "IP-адреса"),
    "card.prefix": ("Address or prefix", "Адрес или префикс"),
    "card.bind": ("Bind", "Привязать"),
    "card.end": ("End", "Завершить"),
    "card.since": ("Since", "С"),
    "card.until": ("Until", "По"),
    "card.no_bindings": ("No IP address bound.", "IP-адреса не привязаны."),
    "card.radius": ("RADIUS logins", "Логины RADIUS"),
    "card.radius_login": ("Login", "Логин"),
    "card.radius_password": ("Password", "Пароль"),
    "card.radius_new_password": ("New password (empty: keep)", "Новый пароль (пусто — оставить)"),
    "card.static_ip": ("Static IP", "Статический IP"),
    "card.disabled": ("Disabled", "Отключён"),
    "card.add": ("Add", "Добавить"),
    "card.no_radius": ("No RADIUS login.", "Логинов RADIUS нет."),
    "card.online": ("Online now", "Сейчас в сети"),
    "card.not_online": ("Not online.", "Не в сети."),
    "card.disconnect": ("Disconnect", "Отключить"),
    "card.past_sessions": ("Past sessions", "Прошлые сессии"),
    "card.started": ("Started", "Начало"),
    "card.stopped": ("Stopped", "Конец"),
    "card.nas": ("NAS", "NAS"),
    "card.ip": ("IP", "IP"),
    "card.in": ("In", "Вход."),
    "card.out": ("Out", "Исход."),
    "card.cause": ("Cause", "Причина"),
    "card.duration": ("Duration", "Длительность"),
    "card.no_sessions": ("No sessions.", "Сессий нет."),
    "card.traffic": ("Traffic, last {days} days", "Трафик за {days} дней"),
    "card.class": ("Class", "Класс"),
    "card.bytes": ("Bytes", "Объём"),
    "card.no_traffic": ("No traffic in these days.", "Трафика за эти дни нет."),
    "card.audit": ("Audit trail", "Журнал изменений"),
    "card.action": ("Action", "Действие"),
    "card.from": ("From", "Откуда"),
    "card.change": ("Change", "Изменение"),
    "card.no_audit": ("No changes recorded.", "Изменений нет."),
    "card.password": ("Subscriber's password", "Пароль абонента"),
    "card.set_password": ("Set a new password", "Задать новый пароль"),
    "card.bad_amount": ("Type an amount like 100 or 12.50.", "Введите сумму, например 100 или 12.50."),
    "card.bad_days": ("Days are a whole number from 1 to 31.", "Дни — целое число от 1 до 31."),
    "card.need_reason": ("Say why: the reason is kept in the audit trail.",
                         "Укажите причину: она сохраняется в журнале."),
    "card.bad_method": ("Choose a payment method.", "Выберите способ оплаты."),
    "card.password_short": ("The password needs 8 characters or more.", "Пароль должен быть не короче 8 символов."),
    "card.refused": ("Not done: {reason}", "Не выполнено: {reason}"),
    "payment.conflict": ("This external id belongs to another payment already: {reason}",
                         "Этот внешний номер уже принадлежит другому платежу: {reason}"),
    "message.payment_taken": ("The payment was taken.", "Платёж принят."),
    "message.payment_repeated": ("This payment was already taken (payment #{payment}); nothing was booked twice.",
                                 "Этот платёж уже был принят (платёж №{payment}); повторно ничего не проведено."),
    "message.payment_reversed": ("The payment was reversed.", "Платёж сторнирован."),
    "message.credit_set": ("The credit limit was set.", "Кредит установлен."),
    "message.promised_given": ("The promised payment was given.", "Обещанный платёж предоставлен."),
    "message.blocked": ("The account is blocked.", "Счёт заблокирован."),
    "message.unblocked": ("The block was lifted.", "Блокировка снята."),
    "message.already": ("Nothing to change: it was so already.", "Менять нечего: так уже было."),
    "message.tariff_set": ("The tariff was changed.", "Тариф изменён."),
    "message.tariff_scheduled": ("The tariff will change from the next period.",
                                 "Тариф сменится со следующего периода."),
    "message.contacts_saved": ("The contacts were saved.", "Контакты сохранены."),
    "message.bound": ("The address was bound.", "Адрес привязан."),
    "message.unbound": ("The binding was ended.", "Привязка завершена."),
    "message.radius_added": ("The RADIUS login was added.", "Логин RADIUS добавлен."),
    "message.radius_saved": ("The RADIUS login was saved.", "Логин RADIUS сохранён."),
    "message.disconnect_sent": ("A Disconnect was sent to the NAS.", "Запрос на отключение отправлен на NAS."),
    "message.password_set": ("The subscriber's password was changed.", "Пароль абонента изменён."),
}


# -- reading the card ---------------------------------------------------------------------

def _instant(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, str) and value:
        try:
            return _instant(datetime.fromisoformat(value))
        except ValueError:
            return None
    return None


def tariff_state(links: list[dict[str, Any]], now: datetime) -> dict[str, Any]:
    """From an account's tariff links (``tariffs.history``): the one in force at ``now``
    and those scheduled after it (a change from the next period)."""
    current = None
    scheduled = []
    for link in links:
        start, end = _instant(link.get("valid_from")), _instant(link.get("valid_to"))
        if start is None:
            continue
        if start <= now and (end is None or end > now):
            current = link
        elif start > now:
            scheduled.append(link)
    return {"current": current, "scheduled": sorted(scheduled, key=lambda link: str(link["valid_from"]))}


def traffic_rows(chunks: list[Any], names: Mapping[int, str], first: date, last: date) -> list[dict[str, Any]]:
    """``reports.traffic`` rows of one account (``[account_id, class_id, day, quantity, amount]``
    or maps of those) as the chart reads them, within [first, last]."""
    out = []
    for row in chunks:
        if isinstance(row, Mapping):
            class_id, day, quantity, amount = row["class_id"], row["day"], row["quantity"], row["amount"]
        else:
            _, class_id, day, quantity, amount = row
        day = str(day)
        if class_id == -1 or not first.isoformat() <= day <= last.isoformat():
            continue
        out.append({"day": day, "class_id": class_id, "class": names.get(class_id, f"#{class_id}"),
                    "bytes": int(quantity), "amount": int(amount)})
    return out


def audit_change(before: Any, after: Any, limit: int = 300) -> str:
    """An audit row's change in one line: "field: old → new" for what differs, else what was written
    (amounts as money: the audit keeps micro-units)."""
    if isinstance(before, Mapping) and isinstance(after, Mapping):
        changed = [f"{name}: {_short(name, before.get(name))} → {_short(name, after.get(name))}"
                   for name in sorted(set(before) | set(after), key=str) if before.get(name) != after.get(name)]
        text = "; ".join(changed)
    elif isinstance(after, Mapping):
        text = "; ".join(f"{name}: {_short(name, value)}" for name, value in after.items() if value is not None)
    else:
        text = _short("", after if after is not None else before)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _short(name: str, value: Any) -> str:
    if value is None:
        return "—"
    if name in _MONEY_FIELDS and type(value) is int:
        return money_text(value)
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M")
    text = str(value)
    return text if len(text) <= 60 else text[:59] + "…"


async def _ready(value: Any = None) -> Any:
    return value


def _maybe(request: web.Request, name: str, **args: Any) -> Awaitable[Any]:
    """``call`` when the operator's table has ``name``, else a ready None (the section is hidden)."""
    return call(request, name, **args) if can(request, name) else _ready()


async def _traffic(request: web.Request, account_id: int) -> dict[str, Any] | None:
    if not can(request, "reports.traffic"):
        return None
    today = datetime.now(timezone.utc).date()
    first = today - timedelta(days=CHART_DAYS - 1)

    async def usage() -> list[Any]:
        # usage days are the operator's local days: ask one day either side of UTC
        rows: list[Any] = []
        async for chunk in stream(request, "reports.traffic", since=(first - timedelta(days=1)).isoformat(),
                                  until=(today + timedelta(days=2)).isoformat(), account_id=account_id):
            rows.extend(chunk)
        return rows

    rows, classes = await asyncio.gather(usage(), _maybe(request, "classes.list"))
    names = {row["id"]: row["name"] for row in classes or []}
    shaped = traffic_rows(rows, names, first, today + timedelta(days=1))
    last = max([today.isoformat(), *(row["day"] for row in shaped)])
    traffic = {"first": first.isoformat(), "last": last, "rows": shaped}
    return {"chart": traffic_chart(traffic, t("card.traffic", days=CHART_DAYS)) if shaped else "",
            "table": traffic_table(traffic)}


def services_of(tariff_id: int | None, tariffs: list[dict[str, Any]] | None,
                services: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The services of the tariff ``tariff_id`` (``tariffs.list`` rows carry their service ids)."""
    if tariff_id is None or not tariffs or not services:
        return []
    wanted = next((set(row.get("service_ids") or []) for row in tariffs if row["id"] == tariff_id), set())
    return [service for service in services if service["id"] in wanted]


async def _card(request: web.Request, user_id: int, account_id: int | None = None, *, status: int = 200,
                error: str = "", reason: str = "", section: str = "", typed: Mapping[str, str] | None = None,
                ) -> web.StreamResponse:
    """The card of ``user_id`` showing ``account_id`` (default: the basic account)."""
    query = request.query
    ledger_page, audit_page, past_page = (read_page(query.get(name)) for name in ("ledger", "audit", "past"))
    if account_id is None:
        user = await call(request, "users.get", user_id=user_id)
        account_id = next((account["id"] for account in user["accounts"] if account["is_basic"]),
                          user["accounts"][0]["id"] if user["accounts"] else None)
        user_call: Awaitable[Any] = _ready(user)
    else:
        user_call = call(request, "users.get", user_id=user_id)
    if account_id is None:      # a user without accounts: only the contacts to show
        user = await user_call
        return render(request, "card/card.html", status=status, user=user, account_id=None, parts={},
                      error=error, reason=reason, section=section, typed=typed or {}, notice=_notice(request))
    paged = {"limit": PAGE_ROWS}
    (user, account, blocks, payments, ledger, links, tariffs, services, bindings, radius_logins, online, past,
     audit, traffic, automation) = await asyncio.gather(
        user_call,
        _maybe(request, "accounts.get", account_id=account_id),
        _maybe(request, "blocks.list", account_id=account_id, limit=PAGE_ROWS),
        _maybe(request, "payments.list", account_id=account_id, **paged),
        _maybe(request, "accounts.history", account_id=account_id, **paged,
               offset=(ledger_page - 1) * PAGE_ROWS),
        _maybe(request, "tariffs.history", account_id=account_id, limit=1000),
        tariff_choices(request),
        _maybe(request, "services.list", limit=1000),
        _maybe(request, "bindings.list", account_id=account_id, limit=100),
        _maybe(request, "radius.link_list", account_id=account_id, limit=100),
        _maybe(request, "radius.sessions", account_id=account_id, limit=100),
        _maybe(request, "radius.history", account_id=account_id, **paged, offset=(past_page - 1) * PAGE_ROWS),
        _maybe(request, "accounts.audit", account_id=account_id, **paged, offset=(audit_page - 1) * PAGE_ROWS),
        _traffic(request, account_id),
        card_section(request, account_id),
    )
    if account_id not in {row["id"] for row in user["accounts"]} and user.get("accounts_total", 0) <= len(
            user["accounts"]):
        raise web.HTTPNotFound()
    now = datetime.now(timezone.utc)
    tariff = tariff_state(links, now) if links is not None else None
    current_id = tariff["current"]["tariff_id"] if tariff and tariff["current"] else None
    marked = read_id(query.get("payment", ""))
    if audit is not None:
        audit = [{**row, "change": audit_change(row.get("before"), row.get("after"))} for row in audit]
    parts = {
        "credit_text": money_text(account["credit"]) if account else "", "account": account,
        "blocks": blocks, "payments": payments, "ledger": ledger, "tariff": tariff, "tariffs": tariffs,
        "services": services_of(current_id, tariffs, services), "bindings": bindings, "radius_logins": radius_logins,
        "online": online, "past": past, "audit": audit, "traffic": traffic, "automation": automation,
    }
    pages = {"ledger": ledger_page, "audit": audit_page, "past": past_page}
    return render(request, "card/card.html", status=status, user=user, account_id=account_id, parts=parts,
                  pages=pages, page_rows=PAGE_ROWS, methods=PAYMENT_METHODS, ledger_kinds=LEDGER_KINDS,
                  marked=marked, error=error, reason=reason, section=section, typed=typed or {},
                  notice=_notice(request), chart_days=CHART_DAYS)


def _notice(request: web.Request) -> str:
    """The message a redirect back to the card carries (``m``, one of ours), with the payment it names."""
    key = request.query.get("m", "")
    if not key.startswith("message.") or (key not in MESSAGES and key not in _OTHER_NOTICES):
        return ""                     # only our own notices, never text from the URL
    return t(key, payment=read_id(request.query.get("payment", "")) or "")


@ROUTES.get(_CARD, needs=("users.get",))
async def card(request: web.Request) -> web.StreamResponse:
    user_id = _path_id(request, "user_id")
    account_id = read_id(request.query.get("account", ""))
    return await _card(request, user_id, account_id)


# -- changing it ---------------------------------------------------------------------------

def _path_id(request: web.Request, name: str) -> int:
    found = read_id(request.match_info[name])
    if found is None:
        raise web.HTTPNotFound()
    return found


class _Target:
    """The card a form was posted from: the user in the URL, the account in the form."""

    __slots__ = ("user_id", "account_id", "fields")

    def __init__(self, user_id: int, account_id: int | None, fields: Mapping[str, str]) -> None:
        self.user_id, self.account_id, self.fields = user_id, account_id, fields

    def text(self, name: str) -> str:
        return str(self.fields.get(name, "")).strip()[:_MAX_TEXT]

    def back(self, request: web.Request, message: str, **extra: Any) -> web.StreamResponse:
        return redirect(request, f"/subscribers/{self.user_id}", message="message." + message,
                        account=self.account_id, **extra)


async def _target(request: web.Request) -> _Target:
    fields = await form(request)
    return _Target(_path_id(request, "user_id"), read_id(fields.get("account_id", "")), fields)


async def _account_target(request: web.Request) -> _Target:
    target = await _target(request)
    if target.account_id is None:
        raise web.HTTPNotFound()
    return target


def _amount(text: str) -> int | None:
    try:
        return parse_money(text.replace(",", ".").replace(" ", ""))
    except BillingError:
        return None


async def _attempt(request: web.Request, target: _Target, section: str, action: Callable[[], Awaitable[Any]],
                   message: str) -> web.StreamResponse:
    """Do ``action``; back to the card with ``message``, or the card with the core's refusal."""
    try:
        await action()
    except Refused as refused:
        return await _refused(request, target, section, refused)
    return target.back(request, message)


async def _refused(request: web.Request, target: _Target, section: str, refused: Refused) -> web.StreamResponse:
    return await _card(request, target.user_id, target.account_id, status=409, error="card.refused",
                       reason=refused.message or refused.code, section=section, typed=target.fields)


async def _invalid(request: web.Request, target: _Target, section: str, error: str) -> web.StreamResponse:
    return await _card(request, target.user_id, target.account_id, status=400, error=error, section=section,
                       typed=target.fields)


@ROUTES.post(_CARD + "/contacts", needs=("users.edit",))
async def edit_contacts(request: web.Request) -> web.StreamResponse:
    target = await _target(request)
    fields = {name: target.text(name) for name in _CONTACTS}
    if not fields["external_id"]:
        del fields["external_id"]    # an empty contract number is no contract number, not ""
    return await _attempt(request, target, "contacts", lambda: call(
        request, "users.edit", user_id=target.user_id, fields=fields), "contacts_saved")


@ROUTES.post(_CARD + "/credit", needs=("accounts.set_credit",))
async def set_credit(request: web.Request) -> web.StreamResponse:
    target = await _account_target(request)
    credit = _amount(target.text("credit"))
    if credit is None or credit < 0:
        return await _invalid(request, target, "money", "card.bad_amount")
    return await _attempt(request, target, "money", lambda: call(
        request, "accounts.set_credit", account_id=target.account_id, credit=credit), "credit_set")


@ROUTES.post(_CARD + "/promised", needs=("payments.promised",))
async def give_promised(request: web.Request) -> web.StreamResponse:
    target = await _account_target(request)
    args: dict[str, Any] = {}
    if target.text("amount"):
        amount = _amount(target.text("amount"))
        if amount is None or amount <= 0:
            return await _invalid(request, target, "money", "card.bad_amount")
        args["amount"] = amount
    if target.text("days"):
        days = read_id(target.text("days"))
        if days is None or not 1 <= days <= 31:
            return await _invalid(request, target, "money", "card.bad_days")
        args["days"] = days
    return await _attempt(request, target, "money", lambda: call(
        request, "payments.promised", account_id=target.account_id, reason=target.text("reason"), **args),
        "promised_given")


@ROUTES.post(_CARD + "/block", needs=("blocks.set",))
async def block(request: web.Request) -> web.StreamResponse:
    target = await _account_target(request)
    reason = target.text("reason")
    if not reason:
        return await _invalid(request, target, "blocks", "card.need_reason")
    try:
        result = await call(request, "blocks.set", account_id=target.account_id, reason=reason, kind="admin")
    except Refused as refused:
        return await _refused(request, target, "blocks", refused)
    return target.back(request, "blocked" if result["changed"] else "already")


@ROUTES.post(_CARD + "/unblock", needs=("blocks.lift",))
async def unblock(request: web.Request) -> web.StreamResponse:
    target = await _account_target(request)
    kind = target.text("kind") or "admin"
    try:
        result = await call(request, "blocks.lift", account_id=target.account_id,
                            kind=kind if kind in ("admin", "user") else "admin")
    except Refused as refused:
        return await _refused(request, target, "blocks", refused)
    return target.back(request, "unblocked" if result["changed"] else "already")


@ROUTES.post(_CARD + "/payments", needs=("payments.add",))
async def take_payment(request: web.Request) -> web.StreamResponse:
    target = await _account_target(request)
    amount = _amount(target.text("amount"))
    if amount is None or amount <= 0:
        return await _invalid(request, target, "payments", "card.bad_amount")
    method = target.text("method")
    if method not in PAYMENT_METHODS:
        return await _invalid(request, target, "payments", "card.bad_method")
    external_id = target.text("external_id")
    try:
        result = await call(request, "payments.add", account_id=target.account_id, amount=amount, method=method,
                            comment=target.text("comment"), **({"external_id": external_id} if external_id else {}))
    except Refused as refused:
        if refused.code == "payments.conflict":
            return await _card(request, target.user_id, target.account_id, status=409, error="payment.conflict",
                               reason=refused.message, section="payments", typed=target.fields)
        return await _refused(request, target, "payments", refused)
    if not result["created"]:
        return target.back(request, "payment_repeated", payment=result["payment_id"])
    return target.back(request, "payment_taken", payment=result["payment_id"])


async def _payment_of(request: web.Request, account_id: int, payment_id: int) -> dict[str, Any] | None:
    # payments.list is newest first and paged: a payment old enough to fall past
    # the pages an operator reaches is not reversed from the card
    for page in range(10):
        rows = await call(request, "payments.list", account_id=account_id, limit=100, offset=page * 100)
        found = next((row for row in rows if row["id"] == payment_id), None)
        if found is not None or len(rows) < 100 or rows[-1]["id"] < payment_id:
            return found
    return None


@ROUTES.get(_CARD + r"/payments/{payment_id:\d+}/reverse", needs=("payments.cancel", "payments.list"))
async def reverse_form(request: web.Request) -> web.StreamResponse:
    user_id, payment_id = _path_id(request, "user_id"), _path_id(request, "payment_id")
    account_id = read_id(request.query.get("account", ""))
    payment = await _payment_of(request, account_id, payment_id) if account_id is not None else None
    if payment is None:
        raise web.HTTPNotFound()
    return render(request, "card/reverse.html", user_id=user_id, account_id=account_id, payment=payment)


@ROUTES.post(_CARD + r"/payments/{payment_id:\d+}/reverse", needs=("payments.cancel",))
async def reverse_payment(request: web.Request) -> web.StreamResponse:
    target = await _account_target(request)
    payment_id = _path_id(request, "payment_id")
    return await _attempt(request, target, "payments", lambda: call(
        request, "payments.cancel", payment_id=payment_id, reason=target.text("reason")), "payment_reversed")


@ROUTES.post(_CARD + "/tariff", needs=("tariffs.link",))
async def link_tariff(request: web.Request) -> web.StreamResponse:
    target = await _account_target(request)
    start = "next_period" if target.text("start") == "next_period" else "now"
    tariff_id = read_id(target.text("tariff_id"))
    return await _attempt(request, target, "tariff", lambda: call(
        request, "tariffs.link", account_id=target.account_id, tariff_id=tariff_id, start=start),
        "tariff_scheduled" if start == "next_period" else "tariff_set")


@ROUTES.post(_CARD + "/bindings", needs=("bindings.add",))
async def bind_address(request: web.Request) -> web.StreamResponse:
    target = await _account_target(request)
    return await _attempt(request, target, "bindings", lambda: call(
        request, "bindings.add", account_id=target.account_id, prefix=target.text("ip")), "bound")


@ROUTES.post(_CARD + r"/bindings/{binding_id:\d+}/end", needs=("bindings.end",))
async def end_binding(request: web.Request) -> web.StreamResponse:
    target = await _account_target(request)
    binding_id = _path_id(request, "binding_id")
    return await _attempt(request, target, "bindings", lambda: call(
        request, "bindings.end", binding_id=binding_id), "unbound")


@ROUTES.post(_CARD + "/radius", needs=("radius.link_add",))
async def add_radius_login(request: web.Request) -> web.StreamResponse:
    target = await _account_target(request)
    extra = {"static_ip": target.text("static_ip")} if target.text("static_ip") else {}
    return await _attempt(request, target, "radius", lambda: call(
        request, "radius.link_add", account_id=target.account_id, login=target.text("login"),
        password=str(target.fields.get("password", "")), **extra), "radius_added")


@ROUTES.post(_CARD + r"/radius/{link_id:\d+}", needs=("radius.link_edit",))
async def edit_radius_login(request: web.Request) -> web.StreamResponse:
    target = await _account_target(request)
    link_id = _path_id(request, "link_id")
    changes: dict[str, Any] = {"disabled": target.text("disabled") == "1", "static_ip": target.text("static_ip")}
    if target.fields.get("password"):
        changes["password"] = str(target.fields["password"])
    return await _attempt(request, target, "radius", lambda: call(
        request, "radius.link_edit", id=link_id, **changes), "radius_saved")


@ROUTES.post(_CARD + r"/sessions/{session_id:\d+}/disconnect", needs=("radius.disconnect",))
async def disconnect(request: web.Request) -> web.StreamResponse:
    target = await _account_target(request)
    session_id = _path_id(request, "session_id")
    return await _attempt(request, target, "online", lambda: call(
        request, "radius.disconnect", session=session_id), "disconnect_sent")


@ROUTES.post(_CARD + "/password", needs=("users.set_password",))
async def set_password(request: web.Request) -> web.StreamResponse:
    target = await _target(request)
    password = str(target.fields.get("password", ""))
    if len(password) < 8:
        return await _invalid(request, target, "password", "card.password_short")
    return await _attempt(request, target, "password", lambda: call(
        request, "users.set_password", user_id=target.user_id, password=password), "password_set")
