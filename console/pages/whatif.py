"""``/whatif``: a past month re-rated under another tariff — a form, the accounts' table, the totals.

The form is a GET (it writes nothing; the URL can be bookmarked and
shared): the candidate tariff (chosen from ``tariffs.list`` when the
operator may read it, else typed), the month, and which accounts (all,
those of a tariff, one account).  The answer is the core's
``reports.whatif`` as the operator, read to its end: the first
``SHOWN`` rows are shown, the totals cover every account.  Refusals (a
month not over yet, an unknown tariff) are shown above the form.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from console.page import Page, Refused, call, operator_of, render, stream, t
from webedge.http import ascii_int

__all__ = ["ROUTES", "MESSAGES", "SHOWN"]

ROUTES = Page.routes()

SHOWN = 500
_MONTH = re.compile(r"^\d{4}-\d{2}$")

MESSAGES: dict[str, tuple[str, str]] = {
    "nav.whatif": ("What if", "Что если"),
    "whatif.title": ("What if: another tariff for a past month", "Что если: другой тариф за прошлый месяц"),
    "whatif.intro": ("Rates the month's usage and tariff links again under the candidate tariff with the same"
                     " code as live charging. Nothing is posted.",
                     "Пересчитывает трафик и подключения месяца по другому тарифу тем же кодом, что и"
                     " тарификация. Ничего не проводится."),
    "whatif.tariff": ("Candidate tariff", "Тариф-кандидат"),
    "whatif.tariff_id": ("Candidate tariff id", "Номер тарифа-кандидата"),
    "whatif.month": ("Month", "Месяц"),
    "whatif.who": ("Accounts", "Лицевые счета"),
    "whatif.all": ("all", "все"),
    "whatif.of_tariff": ("of the tariff", "тарифа"),
    "whatif.account": ("one account", "один счёт"),
    "whatif.run": ("Compare", "Сравнить"),
    "whatif.account_id": ("Account", "Счёт"),
    "whatif.charged": ("Charged", "Начислено"),
    "whatif.would_pay": ("Would pay", "Было бы"),
    "whatif.difference": ("Difference", "Разница"),
    "whatif.note": ("Note", "Примечание"),
    "whatif.totals": ("Totals", "Итого"),
    "whatif.accounts": ("Accounts", "Счетов"),
    "whatif.rerated": ("Re-rated", "Пересчитано"),
    "whatif.cannot": ("Cannot be re-rated", "Нельзя пересчитать"),
    "whatif.charged_rerated": ("Charged (re-rated accounts)", "Начислено (пересчитанные счета)"),
    "whatif.more": ("The first {shown} of {total} accounts are shown; the totals cover all of them.",
                    "Показаны первые {shown} из {total} счетов; итоги — по всем."),
    "whatif.none": ("No account has an accounting period starting in that month.",
                    "Ни у одного счёта нет расчётного периода, начинающегося в этом месяце."),
    "whatif.refused": ("Not done: {message}", "Не выполнено: {message}"),
    "whatif.bad_input": ("Give a tariff, a month (YYYY-MM) and the accounts.",
                         "Укажите тариф, месяц (ГГГГ-ММ) и счета."),
}


async def _tariffs(request: web.Request) -> list[dict[str, Any]]:
    if not operator_of(request).can("tariffs.list"):
        return []
    return list(await call(request, "tariffs.list", limit=1000))


def _args(query: Any) -> dict[str, Any] | None:
    """The call's arguments from the form, or None when the form is incomplete."""
    tariff = ascii_int(query.get("tariff", ""), 18)
    month = query.get("month", "").strip()
    who = query.get("who", "all")
    if tariff is None or not _MONTH.match(month):
        return None
    args: dict[str, Any] = {"tariff_id": tariff, "month": month}
    if who == "all":
        args["all"] = True
    elif who == "of_tariff" and (of := ascii_int(query.get("of_tariff", ""), 18)) is not None:
        args["of_tariff"] = of
    elif who == "account" and (account := ascii_int(query.get("account", ""), 18)) is not None:
        args["account_id"] = account
    else:
        return None
    return args


@ROUTES.get("/whatif", needs=("reports.whatif",), nav="whatif")
async def whatif_page(request: web.Request) -> web.StreamResponse:
    query = request.query
    values = {key: query.get(key, "") for key in ("tariff", "month", "of_tariff", "account")}
    values["who"] = query.get("who", "all")
    rows: list[list[Any]] = []
    totals: dict[str, Any] | None = None
    error = ""
    status = 200
    if "tariff" in query:
        args = _args(query)
        if args is None:
            error, status = t("whatif.bad_input"), 400
        else:
            try:
                totals = {"accounts": 0, "rerated": 0, "cannot_rerate": 0, "charged": 0, "charged_rerated": 0,
                          "would_pay": 0}
                async for chunk in stream(request, "reports.whatif", **args):
                    for account_id, charged, would_pay, _difference, note in chunk:
                        if len(rows) < SHOWN:
                            rows.append([account_id, charged, would_pay, _difference, note])
                        # the core's totals are the result, which a page's stream does not hand on:
                        # the same sums over the same rows
                        totals["accounts"] += 1
                        totals["charged"] += charged
                        if would_pay is None:
                            totals["cannot_rerate"] += 1
                        else:
                            totals["rerated"] += 1
                            totals["charged_rerated"] += charged
                            totals["would_pay"] += would_pay
                totals["difference"] = totals["would_pay"] - totals["charged_rerated"]
            except Refused as refused:
                error, status, totals, rows = t("whatif.refused", message=refused.message or refused.code), 400, None, []
    return render(request, "whatif/whatif.html", status, values=values, rows=rows, totals=totals, error=error,
                  tariffs=await _tariffs(request), shown=SHOWN)
