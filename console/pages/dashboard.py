"""``/``: a few figures the operator may see (each only when its call is in their table)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from console.page import Page, Refused, call, operator_of, render

ROUTES = Page.routes()

MESSAGES: dict[str, tuple[str, str]] = {
    "dashboard.title": ("Dashboard", "Сводка"),
    "dashboard.welcome": ("Logged in as {login}.", "Вы вошли как {login}."),
    "dashboard.subscribers": ("Subscribers", "Абоненты"),
    "dashboard.online": ("Online sessions", "Сессий онлайн"),
    "dashboard.plugins": ("Plugins loaded", "Загружено модулей"),
    "dashboard.operators": ("Operators", "Операторы"),
    "dashboard.nothing": ("Your role shows no figures here; use the menu above.",
                          "Вашей роли здесь нечего показать; воспользуйтесь меню выше."),
}


async def _figure(request: web.Request, name: str, **args: Any) -> Any:
    try:
        return await call(request, name, **args)
    except Refused:
        return None


@ROUTES.get("/", nav="dashboard")
async def dashboard(request: web.Request) -> web.StreamResponse:
    can = operator_of(request).calls
    figures: list[tuple[str, str, Any]] = []
    if "subscribers.search" in can:
        found = await _figure(request, "subscribers.search", limit=1)
        if found is not None:
            # the core counts up to a cap (total_capped: more than that)
            figures.append(("subscribers", "dashboard.subscribers",
                            f"{found['total']}+" if found.get("total_capped") else found["total"]))
    if "radius.sessions" in can:
        online = await _figure(request, "radius.sessions")
        if online is not None:
            figures.append(("online", "dashboard.online", len(online)))
    if "plugins.list" in can:
        plugins = await _figure(request, "plugins.list")
        if plugins is not None:
            loaded = sum(1 for plugin in plugins if plugin.get("state") == "loaded")
            figures.append(("plugins", "dashboard.plugins", loaded))
    if "operators.list" in can:
        operators = await _figure(request, "operators.list", limit=1000)
        if operators is not None:
            figures.append(("operators", "dashboard.operators", len(operators)))
    return render(request, "dashboard.html", figures=figures)
