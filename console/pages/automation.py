"""The subscriber card's "Dunning and fair usage" section.

Theory of operation
-------------------
Two reads, asked only when the operator's call table has them (``can``):
``dunning.state`` (the cycle, step, debt start, the date of the block if
nothing is paid, the policy and the step log) and ``fup.state`` (the rate
profile in force and the last throttles).  ``card_section`` answers both at
once for the card's ``asyncio.gather``; the template is
``card/_automation.html``.  Nothing here writes: policies and quotas are
set over URFA (``dunning.policies_set``, ``fup.quotas_set``), see
docs/automation/dunning.md and fup.md.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from console.page import Page, call
from console.pages.subscribers import can

__all__ = ["ROUTES", "MESSAGES", "card_section"]

ROUTES = Page.routes()

MESSAGES: dict[str, tuple[str, str]] = {
    "auto.title": ("Dunning and fair usage", "Взыскание и справедливое использование"),
    "auto.step": ("Dunning step", "Этап взыскания"),
    "auto.step.none": ("none", "нет"),
    "auto.step.grace": ("grace period", "льготный период"),
    "auto.step.throttled": ("speed limited", "скорость ограничена"),
    "auto.step.blocked": ("blocked for debt", "заблокирован за долг"),
    "auto.step.closed": ("closed", "закрыт"),
    "auto.step.cleared": ("debt paid", "долг погашен"),
    "auto.step.reminder": ("reminder sent", "напоминание отправлено"),
    "auto.debt_since": ("In debt since", "В долгу с"),
    "auto.block_on": ("Blocked on, if nothing is paid", "Блокировка, если не будет оплаты"),
    "auto.no_policy": ("The tariff has no dunning policy.", "У тарифа нет политики взыскания."),
    "auto.policy": ("Policy: reminder {reminder} days before, grace {grace} days, block after {block} days",
                    "Политика: напоминание за {reminder} дн., льгота {grace} дн., блокировка через {block} дн."),
    "auto.log": ("Steps", "Этапы"),
    "auto.rate": ("Speed", "Скорость"),
    "auto.rate.full": ("the link's own", "по логину"),
    "auto.rate.limited": ("limited to {profile}: {down} / {up} kbit/s",
                          "ограничена профилем {profile}: {down} / {up} кбит/с"),
    "auto.throttles": ("Speed limits", "Ограничения скорости"),
    "auto.restored": ("restored", "снято"),
}


async def _maybe(request: web.Request, name: str, **args: Any) -> Any:
    return await call(request, name, **args) if can(request, name) else None


async def card_section(request: web.Request, account_id: int) -> dict[str, Any] | None:
    """The section's data, or None when the operator may read neither."""
    dunning, fup = await asyncio.gather(_maybe(request, "dunning.state", account_id=account_id),
                                        _maybe(request, "fup.state", account_id=account_id))
    if dunning is None and fup is None:
        return None
    return {"dunning": dunning, "fup": fup}
