"""The office's "Notifications" page: the subscriber's email opt-outs and language.

Theory of operation
-------------------
``GET /notifications`` shows ``me.notify_get``: the language notifications
come in, and one checkbox per notification event for the email channel
(checked: send it).  Essential events (the core says which) are shown checked
and cannot be unchecked: the core refuses an opt-out of them anyway.
``POST /notifications`` sends ``me.notify_set`` with the unchecked events as
opt-outs.  The page asks only what the subscriber's call table holds: a core
without ``me.notify_get`` shows the page's "not available" text.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from . import app as office

__all__ = ["add_routes", "WORDS"]

WORDS: dict[str, dict[str, str]] = {
    "en": {
        "title": "Notifications", "intro": "Choose which emails we send you and in which language.",
        "email": "Email address", "no_email": "We have no email address of yours: ask your provider to add one.",
        "language": "Language", "lang.": "As the provider's", "lang.en": "English", "lang.ru": "Русский",
        "event": "Event", "send": "Send by email", "essential": "always sent",
        "save": "Save", "saved": "Your notification settings are saved.",
        "unavailable": "Notification settings are not available.",
        "texts": "Short messages (SMS) to my phone, besides the ones always sent",
        "balance.low": "Balance below the threshold", "balance.runout_soon": "Balance runs out soon",
        "payment.added": "Payment received", "account.blocked": "Service suspended",
        "account.unblocked": "Service resumed", "fup.quota_reached": "Traffic allowance used up",
        "fup.restored": "Full speed back", "dunning.grace": "Payment overdue (grace period)",
        "dunning.throttled": "Speed limited for non-payment", "dunning.blocked": "Suspended for non-payment",
        "dunning.closed": "Contract closed for non-payment", "invoice.issued": "Invoice issued",
        "credit_note.issued": "Credit note issued",
    },
    "ru": {
        "title": "Уведомления", "intro": "Выберите, какие письма мы вам отправляем и на каком языке.",
        "email": "Адрес почты", "no_email": "У нас нет вашего адреса почты: попросите провайдера его добавить.",
        "language": "Язык", "lang.": "Как у провайдера", "lang.en": "English", "lang.ru": "Русский",
        "event": "Событие", "send": "Отправлять письмом", "essential": "отправляется всегда",
        "save": "Сохранить", "saved": "Настройки уведомлений сохранены.",
        "unavailable": "Настройки уведомлений недоступны.",
        "texts": "Короткие сообщения (SMS) на мой телефон, кроме тех, что отправляются всегда",
        "balance.low": "Баланс ниже порога", "balance.runout_soon": "Баланс скоро закончится",
        "payment.added": "Платёж получен", "account.blocked": "Услуги приостановлены",
        "account.unblocked": "Услуги возобновлены", "fup.quota_reached": "Лимит трафика исчерпан",
        "fup.restored": "Скорость восстановлена", "dunning.grace": "Просрочка оплаты (льготный период)",
        "dunning.throttled": "Скорость ограничена из-за неоплаты", "dunning.blocked": "Приостановлено из-за неоплаты",
        "dunning.closed": "Договор расторгнут из-за неоплаты", "invoice.issued": "Выставлен счёт",
        "credit_note.issued": "Выставлен корректировочный счёт",
    },
}


def _words(request: web.Request) -> dict[str, str]:
    return WORDS.get(office.translator(request).lang, WORDS["en"])


def _view(prefs: dict[str, Any]) -> list[dict[str, Any]]:
    off = {o["event"] for o in prefs.get("optouts", []) if o.get("channel") == "email"}
    return [{"event": e["event"], "essential": bool(e["essential"]),
             "send": bool(e["essential"]) or (e["event"] not in off and "*" not in off)}
            for e in prefs.get("events", [])]


async def notifications_get(request: web.Request) -> web.StreamResponse:
    prefs = await office.ask_optional(request, "me.notify_get")
    texts = not any(o.get("channel") == "text" and o.get("event") == "*" for o in (prefs or {}).get("optouts", []))
    return office.page(request, "notifications.html", w=_words(request), prefs=prefs, texts=texts,
                       rows=_view(prefs) if prefs else [], saved=request.query.get("m") == "saved")


async def notifications_post(request: web.Request) -> web.StreamResponse:
    form = request[office.FORM]
    prefs = await office.ask(request, "me.notify_get")
    language = form.get("language", "")
    if language not in ("", "en", "ru"):
        raise office.PageError(400, "error.403")
    optouts = [{"event": e["event"], "channel": "email"} for e in prefs["events"]
               if not e["essential"] and form.get("send." + e["event"]) != "on"]
    if form.get("texts") != "on":
        optouts.append({"event": "*", "channel": "text"})
    await office.ask(request, "me.notify_set", language=language, optouts=optouts)
    return office.redirect("/notifications", m="saved")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/notifications", notifications_get)
    app.router.add_post("/notifications", notifications_post)
