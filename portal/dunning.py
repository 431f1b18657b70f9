"""The office's payment-status banner: dunning and fair-usage restrictions, in the subscriber's words.

Theory of operation
-------------------
The overview asks ``me.dunning`` beside its other calls (``banner``; an
older core without the call shows no banner) and shows one line when
something restricts the subscriber: a grace period running (with the date
the service stops if nothing is paid), the speed limited for non-payment,
the service suspended, or the traffic allowance used up (reduced speed until
the period ends).  The core's answer holds steps, dates and flags only — no
operator text reaches the page.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

__all__ = ["WORDS", "banner"]

WORDS: dict[str, dict[str, str]] = {
    "en": {
        "grace": "Your payment is overdue. Please pay by {block_on} to keep your service.",
        "grace.no_date": "Your payment is overdue. Please pay to keep your service.",
        "throttled": "Your speed is limited because of an unpaid balance. Pay to get full speed back.",
        "blocked": "Your service is suspended because of an unpaid balance. Pay to resume it.",
        "closed": "Your contract was closed because of an unpaid balance.",
        "fup": "You have used your traffic allowance for this period: your speed is reduced until it ends.",
    },
    "ru": {
        "grace": "Оплата просрочена. Пожалуйста, оплатите до {block_on}, чтобы услуги не были приостановлены.",
        "grace.no_date": "Оплата просрочена. Пожалуйста, оплатите, чтобы услуги не были приостановлены.",
        "throttled": "Скорость ограничена из-за неоплаты. Оплатите, чтобы вернуть полную скорость.",
        "blocked": "Услуги приостановлены из-за неоплаты. Оплатите, чтобы их возобновить.",
        "closed": "Договор расторгнут из-за неоплаты.",
        "fup": "Лимит трафика на этот период исчерпан: скорость снижена до конца периода.",
    },
}


async def banner(request: web.Request, which: dict[str, Any]) -> dict[str, str] | None:
    """The banner for the overview's account, or None (nothing restricts it, or no such call)."""
    from . import app as office   # (it imports this module)

    state = await office.ask_optional(request, "me.dunning", **which)
    if not state:
        return None
    words = WORDS.get(office.translator(request).lang, WORDS["en"])
    step = state.get("step", "none")
    if step == "grace":
        block_on = state.get("block_on")
        text = words["grace"].format(block_on=block_on.date().isoformat()) if block_on else words["grace.no_date"]
    elif step in ("throttled", "blocked", "closed"):
        text = words[step]
    elif state.get("throttled"):
        text, step = words["fup"], "fup"
    else:
        return None
    return {"step": step, "text": text}
