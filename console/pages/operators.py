"""``/operators``: the ISP's staff — list, create with roles, edit roles, disable or enable,
set a password, reset a second factor.

Every action is the core's ``operators.*`` call as the operator at the
browser, so the core's rights (``operators.read`` / ``operators.write``)
and its audit log apply; the page only hides what the call table lacks.
A new operator's password passes through the console once, on its way to
the core's verifier (the core keeps no password either).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from console.page import Page, Refused, call, form, operator_of, redirect, render, t
from webedge.http import ascii_int

ROUTES = Page.routes()

MESSAGES: dict[str, tuple[str, str]] = {
    "nav.operators": ("Operators", "Операторы"),
    "operators.title": ("Operators", "Операторы"),
    "operators.new": ("New operator", "Новый оператор"),
    "operators.login": ("Login", "Логин"),
    "operators.full_name": ("Full name", "Полное имя"),
    "operators.roles": ("Roles", "Роли"),
    "operators.state": ("State", "Состояние"),
    "operators.active": ("active", "активен"),
    "operators.disabled": ("disabled", "отключён"),
    "operators.otp": ("Two-factor", "Второй фактор"),
    "operators.otp_on": ("on", "включён"),
    "operators.otp_off": ("off", "нет"),
    "operators.created": ("Created", "Создан"),
    "operators.none": ("No operators yet.", "Операторов пока нет."),
    "operators.password": ("Password", "Пароль"),
    "operators.password_again": ("Password again", "Пароль ещё раз"),
    "operators.password_differ": ("The two passwords differ.", "Пароли не совпадают."),
    "operators.create": ("Create", "Создать"),
    "operators.save": ("Save", "Сохранить"),
    "operators.edit": ("Name and roles", "Имя и роли"),
    "operators.roles_note": ("Changing the roles ends the operator's sessions: a call table is fixed at login.",
                             "Смена ролей завершает сеансы оператора: набор вызовов фиксируется при входе."),
    "operators.disable": ("Disable", "Отключить"),
    "operators.enable": ("Enable", "Включить"),
    "operators.disable_confirm": ("Disable this operator and end their sessions?",
                                  "Отключить оператора и завершить его сеансы?"),
    "operators.set_password": ("Set a new password", "Задать новый пароль"),
    "operators.reset_otp": ("Reset two-factor", "Сбросить второй фактор"),
    "operators.reset_otp_confirm": ("Remove this operator's second factor? They log in with the password alone "
                                    "until they enroll again.", "Удалить второй фактор оператора? До новой "
                                    "настройки он будет входить только по паролю."),
    "operators.refused": ("Not done: {message}", "Не выполнено: {message}"),
    "operators.done_created": ("The operator is created.", "Оператор создан."),
    "operators.done_saved": ("Saved.", "Сохранено."),
    "operators.done_disabled": ("The operator is disabled; their sessions are ended.",
                                "Оператор отключён, его сеансы завершены."),
    "operators.done_enabled": ("The operator is enabled.", "Оператор включён."),
    "operators.done_password": ("The password is set; the operator's sessions are ended.",
                                "Пароль задан, сеансы оператора завершены."),
    "operators.done_otp_reset": ("The second factor is removed.", "Второй фактор удалён."),
    "operators.prev": ("Previous", "Назад"),
    "operators.next": ("Next", "Далее"),
}

PAGE_SIZE = 50


def _operator_id(request: web.Request) -> int:
    operator_id = ascii_int(request.match_info["operator_id"], 18)
    if operator_id is None:
        raise web.HTTPNotFound()
    return operator_id


def _groups(fields: Any, roles: list[dict[str, Any]]) -> list[str]:
    """The ticked roles among those the core offers (a made-up name in the form is dropped)."""
    known = {role["name"] for role in roles}
    return [name for name in fields.getall("groups", []) if name in known]


async def _roles(request: web.Request) -> list[dict[str, Any]]:
    return list(await call(request, "operators.roles")) if operator_of(request).can("operators.roles") else []


@ROUTES.get("/operators", needs=("operators.list",), nav="operators")
async def operators_list(request: web.Request) -> web.StreamResponse:
    offset = ascii_int(request.query.get("offset", "0"), 9) or 0
    rows = await call(request, "operators.list", limit=PAGE_SIZE + 1, offset=offset)
    return render(request, "operators/list.html", rows=rows[:PAGE_SIZE], offset=offset, page_size=PAGE_SIZE,
                  more=len(rows) > PAGE_SIZE)


@ROUTES.get("/operators/new", needs=("operators.create", "operators.roles"))
async def new_form(request: web.Request) -> web.StreamResponse:
    return render(request, "operators/new.html", roles=await _roles(request), error="", values={}, ticked=[])


@ROUTES.post("/operators/new", needs=("operators.create", "operators.roles"))
async def create(request: web.Request) -> web.StreamResponse:
    fields = await form(request)
    posted = await request.post()
    roles = await _roles(request)
    ticked = _groups(posted, roles)
    values = {"login": fields.get("login", "").strip()[:128], "full_name": fields.get("full_name", "").strip()[:256]}
    if fields.get("password", "") != fields.get("password_again", ""):
        error = t("operators.password_differ")
    else:
        try:
            created = await call(request, "operators.create", login=values["login"],
                                 password=fields.get("password", ""), full_name=values["full_name"],
                                 groups=ticked)
        except Refused as refused:
            error = t("operators.refused", message=refused.message or refused.code)
        else:
            return redirect(request, f"/operators/{created['id']}", message="operators.done_created")
    return render(request, "operators/new.html", 400, roles=roles, values=values, ticked=ticked, error=error)


@ROUTES.get("/operators/{operator_id}", needs=("operators.get",))
async def card(request: web.Request, error: str = "", status: int = 200) -> web.StreamResponse:
    operator_id = _operator_id(request)
    try:
        shown = await call(request, "operators.get", operator_id=operator_id)
    except Refused as exc:
        if exc.code.endswith("unknown"):
            raise web.HTTPNotFound() from None
        raise
    return render(request, "operators/card.html", status, shown=shown, roles=await _roles(request), error=error)


async def _act(request: web.Request, fn: str, done: str, **args: Any) -> web.StreamResponse:
    """Do ``fn`` on the operator of the URL; back to their card, saying ``done`` or the refusal."""
    operator_id = _operator_id(request)
    try:
        await call(request, fn, operator_id=operator_id, **args)
    except Refused as refused:
        return await card(request, t("operators.refused", message=refused.message or refused.code), 400)
    return redirect(request, f"/operators/{operator_id}", message=done)


@ROUTES.post("/operators/{operator_id}/edit", needs=("operators.edit", "operators.get", "operators.roles"))
async def edit(request: web.Request) -> web.StreamResponse:
    fields = await form(request)
    groups = _groups(await request.post(), await _roles(request))
    return await _act(request, "operators.edit", "operators.done_saved",
                      full_name=fields.get("full_name", "").strip()[:256], groups=groups)


@ROUTES.post("/operators/{operator_id}/disable", needs=("operators.disable", "operators.get"))
async def disable(request: web.Request) -> web.StreamResponse:
    return await _act(request, "operators.disable", "operators.done_disabled")


@ROUTES.post("/operators/{operator_id}/enable", needs=("operators.enable", "operators.get"))
async def enable(request: web.Request) -> web.StreamResponse:
    return await _act(request, "operators.enable", "operators.done_enabled")


@ROUTES.post("/operators/{operator_id}/password", needs=("operators.set_password", "operators.get"))
async def set_password(request: web.Request) -> web.StreamResponse:
    fields = await form(request)
    if fields.get("new_operator_password", "") != fields.get("new_operator_password_again", ""):
        return await card(request, t("operators.password_differ"), 400)
    return await _act(request, "operators.set_password", "operators.done_password",
                      password=fields.get("new_operator_password", ""))


@ROUTES.post("/operators/{operator_id}/reset_otp", needs=("operators.reset_otp", "operators.get"))
async def reset_otp(request: web.Request) -> web.StreamResponse:
    return await _act(request, "operators.reset_otp", "operators.done_otp_reset")
