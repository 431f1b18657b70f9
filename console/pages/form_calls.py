"""Sending a page's calls: a form's call with its errors beside the fields,
a button's call, and the core's paged lists read whole.

Theory of operation
-------------------
A form is sent as typed; what decides whether it is valid is the core.  So a
form handler builds its call's arguments and sends it inside ``attempt``:
a value that cannot even be sent (``tariff_forms.FormInvalid``: text where a
number goes) and the core's refusal (``Refused``, its own message) both come
back as errors keyed by the field they are about, for the page to show the
form again with what was typed.  The core's messages name what they refuse
("tier price must be …"), so a table of (word, field) per form places them
(``tariff_forms.field_of``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, TypeVar

from aiohttp import web

from console.page import Refused, call, form, operator_of, redirect, render
from console.pages.tariff_forms import FieldError, FormInvalid, field_of

__all__ = ["CLASS_PAGE", "attempt", "button", "can", "every_row", "find_row", "refused_at"]

Result = TypeVar("Result")

PAGE: Final = 1000            # the core's page for the catalogue lists (billcore.billing.tariffs.MAX_PAGE)
CLASS_PAGE: Final = 100       # classes.list's (a class carries its rules)
MAX_ROWS: Final = 20_000      # what one page of the console reads of such a list


async def every_row(request: web.Request, name: str, page: int = PAGE, **args: Any) -> list[dict[str, Any]]:
    """All rows of a paged list call, up to ``MAX_ROWS``."""
    rows: list[dict[str, Any]] = []
    while len(rows) < MAX_ROWS:
        chunk = await call(request, name, limit=page, offset=len(rows), **args)
        rows.extend(chunk)
        if len(chunk) < page:
            break
    return rows


def find_row(rows: Sequence[Mapping[str, Any]], row_id: int) -> dict[str, Any]:
    """The row with ``id``; the 404 page when there is none."""
    for row in rows:
        if row["id"] == row_id:
            return dict(row)
    raise web.HTTPNotFound()


async def button(request: web.Request, name: str, args: dict[str, Any], *, back: str, done: str,
                 message: str) -> web.StreamResponse:
    """One call behind a button (delete, disconnect): on to ``done`` with
    ``message``, or the core's refusal (still in use…) on its own page with a
    way ``back``."""
    await form(request)
    try:
        await call(request, name, **args)
    except Refused as refused:
        return render(request, "tariffs/refused.html", status=409, refused=refused, back=back)
    return redirect(request, done, message=message)


async def attempt(send: Callable[[], Awaitable[Result]], words: Sequence[tuple[str, str]], default: str
                  ) -> tuple[Result | None, dict[str, FieldError]]:
    """Send a form's call (building its arguments from what was typed is part
    of ``send``): its answer and no errors, or no answer and the errors to
    show beside the fields — what could not even be sent, or the core's
    refusal beside the field its message names."""
    try:
        return await send(), {}
    except FormInvalid as invalid:
        return None, {invalid.field: invalid.error}
    except Refused as refused:
        return None, refused_at(refused, words, default)


def refused_at(refused: Refused, words: Sequence[tuple[str, str]], default: str) -> dict[str, FieldError]:
    """The core's refusal placed beside the field its message names."""
    return {field_of(refused.message, words, default): FieldError(text=refused.message)}


def can(request: web.Request, name: str) -> bool:
    """Whether ``name`` is in the operator's call table (what ``can`` answers in templates)."""
    return name in operator_of(request).calls
