"""``/notify/templates`` and ``/notify/webhooks``: notification templates (edit, preview) and webhook endpoints.

Every action is the core's ``notify.*`` / ``webhooks.*`` call as the
operator at the browser, so the core's rights (``notify.read`` /
``notify.write``, ``webhooks.read`` / ``webhooks.write``) and its audit
log apply; the navigation shows each page only to an operator whose table
has its list call, and the forms only to one whose table has the write
call.  A template is previewed by the core (``notify.templates_preview``,
the same sandbox that renders real notifications) before or instead of
saving.  A new webhook's secret is shown in the answer to the add form
itself, once, never in a URL or a redirect's message.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from console.page import Page, Refused, call, form, operator_of, redirect, render, t
from webedge.http import ascii_int

ROUTES = Page.routes()

MESSAGES: dict[str, tuple[str, str]] = {
    "nav.notify": ("Notifications", "Уведомления"),
    "nav.webhooks": ("Webhooks", "Вебхуки"),
    "notify.title": ("Notification templates", "Шаблоны уведомлений"),
    "notify.event": ("Event", "Событие"),
    "notify.lang": ("Language", "Язык"),
    "notify.channel": ("Channel", "Канал"),
    "notify.subject": ("Subject", "Тема"),
    "notify.body": ("Text", "Текст"),
    "notify.overridden": ("edited", "изменён"),
    "notify.default": ("default", "по умолчанию"),
    "notify.essential": ("essential: always sent", "обязательное: отправляется всегда"),
    "notify.edit": ("Edit", "Изменить"),
    "notify.preview": ("Preview", "Просмотр"),
    "notify.save": ("Save", "Сохранить"),
    "notify.reset": ("Back to the default", "Вернуть по умолчанию"),
    "notify.saved": ("The template is saved.", "Шаблон сохранён."),
    "notify.was_reset": ("The default template applies again.", "Снова действует шаблон по умолчанию."),
    "notify.refused": ("Not done: {message}", "Не выполнено: {message}"),
    "notify.variables": ("Variables: {{ login }}, {{ full_name }}, {{ account_id }}, {{ event_id }}, {{ created_at }},"
                         " {{ data.… }} (the event's data; money with |money).",
                         "Переменные: {{ login }}, {{ full_name }}, {{ account_id }}, {{ event_id }},"
                         " {{ created_at }}, {{ data.… }} (данные события; суммы через |money)."),
    "webhooks.title": ("Webhooks", "Вебхуки"),
    "webhooks.name": ("Name", "Имя"),
    "webhooks.url": ("URL", "URL"),
    "webhooks.events": ("Events (names separated by commas, * for all)",
                        "События (имена через запятую, * — все)"),
    "webhooks.enabled": ("Enabled", "Включён"),
    "webhooks.none": ("No webhooks yet.", "Вебхуков пока нет."),
    "webhooks.new": ("New webhook", "Новый вебхук"),
    "webhooks.add": ("Add", "Добавить"),
    "webhooks.delete": ("Delete", "Удалить"),
    "webhooks.delete_confirm": ("Delete this webhook?", "Удалить вебхук?"),
    "webhooks.test": ("Send a test", "Отправить тест"),
    "webhooks.toggle_off": ("Disable", "Выключить"),
    "webhooks.toggle_on": ("Enable", "Включить"),
    "webhooks.shown_once": ("Copy this signing secret now: it is shown this once.",
                            "Скопируйте секрет подписи сейчас: он показан один раз."),
    "webhooks.tested": ("A test event is on its way (event {event_id}).", "Тестовое событие отправлено (событие {event_id})."),
    "webhooks.deleted": ("The webhook is deleted.", "Вебхук удалён."),
    "webhooks.changed": ("The webhook is changed.", "Вебхук изменён."),
}

PAGE_SIZE = 100


@ROUTES.get("/notify/templates", needs=("notify.templates_list",), nav="notify")
async def templates(request: web.Request) -> web.StreamResponse:
    rows = await call(request, "notify.templates_list")
    return render(request, "notify/templates.html", rows=[r for r in rows if r["channel"] == "email"])


def _key(request: web.Request) -> dict[str, str]:
    event, lang = request.match_info["event"], request.match_info["lang"]
    if len(event) > 64 or lang not in ("en", "ru"):
        raise web.HTTPNotFound()
    return {"event": event, "lang": lang}


async def _edit_page(request: web.Request, status: int = 200, **values: Any) -> web.StreamResponse:
    key = _key(request)
    try:
        row = await call(request, "notify.templates_get", **key)
    except Refused as refused:
        if refused.code == "billing.invalid":
            raise web.HTTPNotFound() from None
        raise
    values.setdefault("subject", row["subject"])
    values.setdefault("body", row["body"])
    values.setdefault("preview", None)
    values.setdefault("error", "")
    return render(request, "notify/edit.html", status, row=row, **values)


@ROUTES.get("/notify/templates/{event}/{lang}", needs=("notify.templates_get",))
async def template_edit(request: web.Request) -> web.StreamResponse:
    return await _edit_page(request)


@ROUTES.post("/notify/templates/{event}/{lang}", needs=("notify.templates_get", "notify.templates_preview"))
async def template_post(request: web.Request) -> web.StreamResponse:
    fields = await form(request)
    key = _key(request)
    subject, body = fields.get("subject", "")[:1000], fields.get("body", "")[:20000]
    action = fields.get("action", "preview")
    try:
        if action == "reset":
            await call(request, "notify.templates_reset", **key)
            return redirect(request, f"/notify/templates/{key['event']}/{key['lang']}", message="notify.was_reset")
        if action == "save":
            await call(request, "notify.templates_set", subject=subject, body=body, **key)
            return redirect(request, f"/notify/templates/{key['event']}/{key['lang']}", message="notify.saved")
        shown = await call(request, "notify.templates_preview", subject=subject, body=body, **key)
    except Refused as refused:
        return await _edit_page(request, 400, subject=subject, body=body,
                                error=t("notify.refused", message=refused.message or refused.code))
    return await _edit_page(request, subject=subject, body=body, preview=shown)


async def _hooks_page(request: web.Request, status: int = 200, **values: Any) -> web.StreamResponse:
    offset = ascii_int(request.query.get("offset", "0"), 9) or 0
    rows = await call(request, "webhooks.list", limit=PAGE_SIZE, offset=offset)
    values.setdefault("error", "")
    values.setdefault("created", None)
    values.setdefault("values", {"name": "", "url": "", "events": ""})
    return render(request, "notify/webhooks.html", status, rows=rows, **values)


@ROUTES.get("/notify/webhooks", needs=("webhooks.list",), nav="webhooks")
async def webhooks(request: web.Request) -> web.StreamResponse:
    return await _hooks_page(request)


@ROUTES.post("/notify/webhooks", needs=("webhooks.add", "webhooks.list"))
async def webhook_add(request: web.Request) -> web.StreamResponse:
    fields = await form(request)
    values = {"name": fields.get("name", "").strip()[:64], "url": fields.get("url", "").strip()[:2000],
              "events": fields.get("events", "")[:4000]}
    events = [e.strip() for e in values["events"].split(",") if e.strip()][:100]
    try:
        created = await call(request, "webhooks.add", name=values["name"], url=values["url"], events=events)
    except Refused as refused:
        return await _hooks_page(request, 400, values=values,
                                 error=t("notify.refused", message=refused.message or refused.code))
    return await _hooks_page(request, created=created)


@ROUTES.post("/notify/webhooks/{webhook_id}/{action}", needs=("webhooks.list",))
async def webhook_action(request: web.Request) -> web.StreamResponse:
    await form(request)
    webhook_id = ascii_int(request.match_info["webhook_id"], 18)
    action = request.match_info["action"]
    calls = {"delete": "webhooks.delete", "test": "webhooks.test", "enable": "webhooks.edit",
             "disable": "webhooks.edit"}
    if webhook_id is None or action not in calls:
        raise web.HTTPNotFound()
    if not operator_of(request).can(calls[action]):
        raise web.HTTPForbidden()
    args: dict[str, Any] = {"webhook_id": webhook_id}
    if action in ("enable", "disable"):
        args["enabled"] = action == "enable"
    try:
        done = await call(request, calls[action], **args)
    except Refused as refused:
        if refused.code == "core.unknown":
            raise web.HTTPNotFound() from None
        return await _hooks_page(request, 400, error=t("notify.refused", message=refused.message or refused.code))
    if action == "test":
        return await _hooks_page(request, notice=t("webhooks.tested", event_id=done["event_id"]))
    return redirect(request, "/notify/webhooks", message="webhooks.deleted" if action == "delete" else
                    "webhooks.changed")
