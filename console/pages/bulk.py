"""Bulk actions: one change for every subscriber a filter finds, previewed, then confirmed.

The operator chooses the filter (the search page's) and the action; the
preview (``bulk.preview``) answers how many accounts match, a sample of
them and a token naming exactly that filter and action.  Confirming sends
the token and the count the operator saw (``bulk.apply``): the core applies
it in one transaction, or refuses with ``bulk.changed`` when the filter now
finds a different number — a subscriber paid or was blocked meanwhile.  That
refusal is explained and the operator is offered a fresh preview; it is
never a crash, and nothing was changed.

Which actions are offered follows the call table: setting a tariff needs
``tariffs.link``, blocking ``blocks.set``, unblocking ``blocks.lift`` (the
core checks the same rights again in ``bulk.apply``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from aiohttp import web

from console.page import Page, Refused, call, form, render
from console.pages.subscriber_filter import FIELDS, SubscriberFilter, read_filter, read_id
from console.pages.subscribers import can, tariff_choices

__all__ = ["ROUTES", "MESSAGES", "ACTIONS", "offered_actions", "read_action"]

ROUTES = Page.routes()

# action → the call whose right it also needs
ACTIONS: Final = {"set_tariff": "tariffs.link", "block": "blocks.set", "unblock": "blocks.lift"}
_MAX_REASON: Final = 500

MESSAGES = {
    "nav.bulk": ("Bulk actions", "Массовые действия"),
    "bulk.title": ("Bulk actions", "Массовые действия"),
    "bulk.explain": ("Choose the subscribers with a filter, choose what to do, look at the preview, then confirm.",
                     "Выберите абонентов фильтром, выберите действие, посмотрите предпросмотр и подтвердите."),
    "bulk.who": ("Whom", "Кого"),
    "bulk.what": ("What", "Что сделать"),
    "bulk.action.set_tariff": ("Set the tariff", "Сменить тариф"),
    "bulk.action.block": ("Block", "Заблокировать"),
    "bulk.action.unblock": ("Unblock", "Разблокировать"),
    "bulk.tariff": ("Tariff", "Тариф"),
    "bulk.start": ("From", "С какого момента"),
    "bulk.start_now": ("now", "сейчас"),
    "bulk.start_next": ("the next period", "со следующего периода"),
    "bulk.reason": ("Reason (for a block)", "Причина (для блокировки)"),
    "bulk.preview": ("Preview", "Предпросмотр"),
    "bulk.count": ("Accounts to change: {count}.", "Будет изменено счетов: {count}."),
    "bulk.none": ("No account matches this filter: nothing to do.", "Ни один счёт не подходит: делать нечего."),
    "bulk.sample": ("For example:", "Например:"),
    "bulk.expires": ("This preview is valid until {when}.", "Предпросмотр действует до {when}."),
    "bulk.confirm": ("Confirm the change ({count})", "Подтвердить изменение ({count})"),
    "bulk.again": ("Change the choice", "Изменить выбор"),
    "bulk.done": ("Done: accounts changed: {changed} (operation #{bulk_id}; one entry in the audit log per account).",
                  "Готово: изменено счетов: {changed} (операция №{bulk_id}; по записи в журнале на каждый счёт)."),
    "bulk.changed": ("Nothing was changed: the filter now finds a different number of accounts than the"
                     " preview showed ({expected}). Someone paid, was blocked or was added meanwhile."
                     " Look at a fresh preview and confirm again.",
                     "Ничего не изменено: фильтр теперь находит другое число счетов, чем показал"
                     " предпросмотр ({expected}). Кто-то заплатил, был заблокирован или добавлен."
                     " Посмотрите новый предпросмотр и подтвердите снова."),
    "bulk.expired": ("Nothing was changed: this preview has expired. Look at a fresh preview.",
                     "Ничего не изменено: предпросмотр устарел. Посмотрите новый."),
    "bulk.used": ("Nothing more was changed: this preview was confirmed already (see the audit log).",
                  "Больше ничего не изменено: этот предпросмотр уже был подтверждён (см. журнал)."),
    "bulk.refused": ("Nothing was changed: {reason}", "Ничего не изменено: {reason}"),
    "bulk.need_action": ("Choose what to do.", "Выберите действие."),
    "bulk.need_tariff": ("Choose the tariff.", "Выберите тариф."),
    "bulk.need_reason": ("Say why: the reason is kept with each block.",
                         "Укажите причину: она сохраняется в каждой блокировке."),
    "bulk.fresh_preview": ("Preview again", "Новый предпросмотр"),
}


def offered_actions(request: web.Request) -> list[str]:
    """The actions this operator's call table allows."""
    return [action for action, needed in ACTIONS.items() if can(request, needed)]


def read_action(values: Mapping[str, str], offered: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """``bulk.preview``'s action arguments from the form, and the form's errors."""
    action = str(values.get("action", ""))
    if action not in offered:
        return {}, {"action": "bulk.need_action"}
    args: dict[str, Any] = {"action": action}
    errors: dict[str, str] = {}
    if action == "set_tariff":
        tariff_id = read_id(str(values.get("tariff_id", "")))
        if tariff_id is None:
            errors["tariff_id"] = "bulk.need_tariff"
        args["tariff_id"] = tariff_id
        args["start"] = "next_period" if values.get("start") == "next_period" else "now"
    elif action == "block":
        reason = str(values.get("reason", "")).strip()[:_MAX_REASON]
        if not reason:
            errors["reason"] = "bulk.need_reason"
        args["reason"] = reason
    return args, errors


def _typed(values: Mapping[str, str]) -> dict[str, str]:
    return {name: str(values.get(name, ""))[:_MAX_REASON] for name in ("action", "tariff_id", "start", "reason")}


async def _page(request: web.Request, chosen: SubscriberFilter, typed: Mapping[str, str], *, status: int = 200,
                action_errors: Mapping[str, str] | None = None, preview: Mapping[str, Any] | None = None,
                done: Mapping[str, Any] | None = None, error: str = "", reason: str = "",
                expected: int = 0) -> web.StreamResponse:
    tariffs = await tariff_choices(request)
    return render(request, "bulk/bulk.html", status=status, chosen=chosen, typed=typed, tariffs=tariffs,
                  actions=offered_actions(request), action_errors=action_errors or {}, preview=preview,
                  done=done, error=error, reason=reason, expected=expected, filter_fields=FIELDS)


@ROUTES.get("/bulk", needs=("bulk.preview", "subscribers.search"), nav="bulk")
async def bulk_form(request: web.Request) -> web.StreamResponse:
    return await _page(request, read_filter(request.query), _typed(request.query))


@ROUTES.post("/bulk/preview", needs=("bulk.preview",))
async def bulk_preview(request: web.Request) -> web.StreamResponse:
    fields = await form(request)
    chosen = read_filter(fields)
    action, action_errors = read_action(fields, offered_actions(request))
    if chosen.errors or action_errors:
        return await _page(request, chosen, _typed(fields), status=400, action_errors=action_errors)
    try:
        preview = await call(request, "bulk.preview", filter=chosen.args, **action)
    except Refused as refused:
        return await _page(request, chosen, _typed(fields), status=409, error="bulk.refused",
                           reason=refused.message or refused.code)
    return await _page(request, chosen, _typed(fields), preview=preview)


@ROUTES.post("/bulk/apply", needs=("bulk.apply",))
async def bulk_apply(request: web.Request) -> web.StreamResponse:
    fields = await form(request)
    chosen = read_filter(fields)
    expected = read_id(str(fields.get("expect_count", ""))) or 0
    token = str(fields.get("token", ""))[:_MAX_REASON]
    try:
        done = await call(request, "bulk.apply", token=token, expect_count=expected)
    except Refused as refused:
        error = {"bulk.changed": "bulk.changed", "bulk.token": "bulk.expired",
                 "bulk.used": "bulk.used"}.get(refused.code, "bulk.refused")
        return await _page(request, chosen, _typed(fields), status=409, error=error,
                           reason=refused.message or refused.code, expected=expected)
    return await _page(request, chosen, _typed(fields), done=done)
