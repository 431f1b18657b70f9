"""``/system/tokens``: API tokens of the HTTP API — list, create (the token shown once), revoke.

Every action is the core's ``tokens.*`` call as the operator at the
browser, so the core's rights (``tokens.read`` / ``tokens.write``) and its
audit log apply; the navigation shows the page only to an operator whose
table has ``tokens.list``.  A new token is shown in the answer to the
create form itself, never in a URL or a redirect's message, and the page
is ``no-store`` like every console page: the token passes through the
console once, on its way to the operator's screen.  The groups offered
are the role templates (``operators.roles``); without that call the form
takes group names typed by hand, and the core checks them.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from aiohttp import web

from console.page import Page, Refused, call, form, operator_of, redirect, render, t
from webedge.http import ascii_int

ROUTES = Page.routes()

MESSAGES: dict[str, tuple[str, str]] = {
    "nav.tokens": ("API tokens", "API-токены"),
    "tokens.title": ("API tokens", "API-токены"),
    "tokens.name": ("Name", "Имя"),
    "tokens.groups": ("Roles", "Роли"),
    "tokens.groups_typed": ("Roles (names, separated by commas)", "Роли (имена через запятую)"),
    "tokens.created_by": ("Created by", "Создал"),
    "tokens.created": ("Created", "Создан"),
    "tokens.expires": ("Expires", "Истекает"),
    "tokens.never": ("never", "никогда"),
    "tokens.last_used": ("Last used", "Использован"),
    "tokens.not_used": ("not yet", "ещё нет"),
    "tokens.state": ("State", "Состояние"),
    "tokens.active": ("active", "действует"),
    "tokens.revoked": ("revoked", "отозван"),
    "tokens.expired": ("expired", "истёк"),
    "tokens.none": ("No API tokens yet.", "API-токенов пока нет."),
    "tokens.new": ("New token", "Новый токен"),
    "tokens.expires_on": ("Expires on (optional, UTC)", "Истекает (необязательно, UTC)"),
    "tokens.create": ("Create", "Создать"),
    "tokens.revoke": ("Revoke", "Отозвать"),
    "tokens.revoke_confirm": ("Revoke this token? Every program using it is refused from now on.",
                              "Отозвать токен? Все программы, использующие его, сразу получат отказ."),
    "tokens.shown_once": ("Copy this token now: it is shown this once, and only its hash is kept.",
                          "Скопируйте токен сейчас: он показан один раз, хранится только его хеш."),
    "tokens.refused": ("Not done: {message}", "Не выполнено: {message}"),
    "tokens.bad_date": ("The expiry is not a date (YYYY-MM-DD).", "Срок — не дата (ГГГГ-ММ-ДД)."),
    "tokens.done_revoked": ("The token is revoked; its sessions are ended.", "Токен отозван, его сеансы завершены."),
    "tokens.prev": ("Previous", "Назад"),
    "tokens.next": ("Next", "Далее"),
}

PAGE_SIZE = 50


async def _roles(request: web.Request) -> list[dict[str, Any]]:
    return list(await call(request, "operators.roles")) if operator_of(request).can("operators.roles") else []


def _ticked(posted: Any, fields: dict[str, str], roles: list[dict[str, Any]]) -> list[str]:
    """The groups the form asks for: the ticked role templates, or the names typed when none are offered."""
    if roles:
        known = {role["name"] for role in roles}
        return [name for name in posted.getall("groups", []) if name in known]
    return [name.strip()[:64] for name in fields.get("groups_typed", "").split(",") if name.strip()][:64]


def _expiry(text: str) -> dt.datetime | None:
    """The end of the day given (UTC), ``None`` for no expiry; ``ValueError`` for a text that is no date."""
    text = text.strip()
    if not text:
        return None
    day = dt.date.fromisoformat(text[:10]) if len(text) == 10 else None
    if day is None:
        raise ValueError(text)
    return dt.datetime.combine(day, dt.time(23, 59, 59), dt.timezone.utc)


async def _page(request: web.Request, status: int = 200, **values: Any) -> web.StreamResponse:
    offset = ascii_int(request.query.get("offset", "0"), 9) or 0
    rows = await call(request, "tokens.list", limit=PAGE_SIZE + 1, offset=offset)
    values.setdefault("error", "")
    values.setdefault("created", None)
    values.setdefault("values", {"name": "", "expires": "", "groups_typed": ""})
    values.setdefault("ticked", [])
    return render(request, "system/tokens.html", status, rows=rows[:PAGE_SIZE], offset=offset,
                  page_size=PAGE_SIZE, more=len(rows) > PAGE_SIZE, roles=await _roles(request),
                  now=dt.datetime.now(dt.timezone.utc), **values)


@ROUTES.get("/system/tokens", needs=("tokens.list",), nav="tokens")
async def tokens_list(request: web.Request) -> web.StreamResponse:
    return await _page(request)


@ROUTES.post("/system/tokens", needs=("tokens.create", "tokens.list"))
async def tokens_create(request: web.Request) -> web.StreamResponse:
    fields = await form(request)
    roles = await _roles(request)
    ticked = _ticked(await request.post(), fields, roles)
    values = {"name": fields.get("name", "").strip()[:128], "expires": fields.get("expires", "").strip()[:32],
              "groups_typed": fields.get("groups_typed", "")[:1024]}
    try:
        expires_at = _expiry(values["expires"])
    except ValueError:
        return await _page(request, 400, error=t("tokens.bad_date"), values=values, ticked=ticked)
    args: dict[str, Any] = {"name": values["name"], "groups": ticked}
    if expires_at is not None:
        args["expires_at"] = expires_at
    try:
        created = await call(request, "tokens.create", **args)
    except Refused as refused:
        return await _page(request, 400, error=t("tokens.refused", message=refused.message or refused.code),
                           values=values, ticked=ticked)
    return await _page(request, created=created)


@ROUTES.post("/system/tokens/{token_id}/revoke", needs=("tokens.revoke", "tokens.list"))
async def tokens_revoke(request: web.Request) -> web.StreamResponse:
    token_id = ascii_int(request.match_info["token_id"], 18)
    if token_id is None:
        raise web.HTTPNotFound()
    try:
        await call(request, "tokens.revoke", token_id=token_id)
    except Refused as refused:
        if refused.code == "tokens.not_found":
            raise web.HTTPNotFound() from None
        return await _page(request, 400, error=t("tokens.refused", message=refused.message or refused.code))
    return redirect(request, "/system/tokens", message="tokens.done_revoked")
