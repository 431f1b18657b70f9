"""The operator's subscriber list: ``subscribers.search`` (a page) and ``subscribers.export`` (streamed).

Both take the same filters (``billcore.billing.subscribers.FILTER_ARGS``) and
answer the same row maps; right ``users.read``.  The export pages by key
(account id) in chunks that each fit a frame, so it holds no long transaction
and no cursor while a slow client reads, and stops at ``MAX_EXPORT`` rows.
"""

from __future__ import annotations

from typing import Any

from billcore.api import ADMIN, handler
from billcore.billing.subscribers import (
    FILTER_ARGS, ROW_FIELDS, SubscriberFilter, find_subscribers, search_subscribers,
)
from billcore.server.call_context import CallContext
from billcore.server.calls import CallSpec
from billcore.server.context import CoreContext

__all__ = ["CHUNK_BYTES", "EXPORT_PAGE", "MAX_EXPORT", "calls"]

EXPORT_PAGE = 1000          # rows read per statement
CHUNK_BYTES = 256 * 1024    # a chunk is sent when its rows may reach this (a frame holds 1 MiB)
MAX_EXPORT = 1_000_000      # rows per export, at most


def _size(row: dict[str, Any]) -> int:
    """Bytes ``row`` may take in a frame, at most (4 per character of text, 16 per other value)."""
    return sum(4 * len(value) + 16 if isinstance(value, str) else 16 + len(name) for name, value in row.items())


def calls(core: CoreContext) -> list[CallSpec]:
    @handler
    async def subscribers_search(ctx: CallContext, text: str | None = None, tariff_id: int | None = None,
                                 blocked: bool | None = None, debtors: bool | None = None,
                                 balance_min: int | None = None, balance_max: int | None = None,
                                 online: bool | None = None, limit: int | None = None,
                                 offset: int | None = None) -> dict[str, Any]:
        """Subscribers (one row per basic account) matching every filter given, in account id order:
        {total, total_capped, total_estimated, rows}. text finds a part of a login, name, phone, e-mail, address or contract
        (at least 3 characters, through the trigram index), an exact account id or an IP address; blocked: an
        active block; debtors: balance below zero; online: an open RADIUS session; tariff_id: the tariff in
        force now. total counts up to 1,000 (total_capped: there are more); total_estimated: the matches
        were counted among the first 10,000 rows the search starts from (all accounts, or the smallest
        indexed set) and extrapolated, since counting a rare match over a million costs seconds (rows stay
        exact); limit is 1..1000 (50 by default)."""
        wanted = SubscriberFilter.of({"text": text, "tariff_id": tariff_id, "blocked": blocked,
                                      "debtors": debtors, "balance_min": balance_min,
                                      "balance_max": balance_max, "online": online})
        async with core.pool.acquire() as conn:
            return await search_subscribers(conn, wanted, core.now(), limit=50 if limit is None else limit,
                                            offset=offset or 0)

    @handler
    async def subscribers_export(ctx: CallContext, text: str | None = None, tariff_id: int | None = None,
                                 blocked: bool | None = None, debtors: bool | None = None,
                                 balance_min: int | None = None, balance_max: int | None = None,
                                 online: bool | None = None) -> dict[str, Any]:
        """Every subscriber subscribers.search finds with the same filters, streamed in chunks of row maps
        in account id order; answers {rows, truncated} (truncated: stopped at 1,000,000 rows)."""
        wanted = SubscriberFilter.of({"text": text, "tariff_id": tariff_id, "blocked": blocked,
                                      "debtors": debtors, "balance_min": balance_min,
                                      "balance_max": balance_max, "online": online})
        now = core.now()   # one instant for the whole export: the tariff in force does not move under it
        sent, after = 0, 0
        chunk: list[dict[str, Any]] = []
        chunk_size = 0
        while sent < MAX_EXPORT:
            async with core.pool.acquire() as conn, conn.transaction(readonly=True):
                rows = await find_subscribers(conn, wanted, now, limit=min(EXPORT_PAGE, MAX_EXPORT - sent),
                                              after=after)
            for row in rows:
                if chunk and chunk_size + _size(row) > CHUNK_BYTES:
                    await ctx.stream(chunk)
                    chunk, chunk_size = [], 0
                chunk.append(row)
                chunk_size += _size(row)
            sent += len(rows)
            if len(rows) < EXPORT_PAGE:
                break
            after = rows[-1]["account_id"]
        if chunk:
            await ctx.stream(chunk)
        return {"rows": sent, "truncated": sent >= MAX_EXPORT}

    return [
        CallSpec("subscribers.search", subscribers_search, right="users.read", kinds=ADMIN,
                 args={**FILTER_ARGS, "limit": "int?", "offset": "int?"}, result="map",
                 doc=subscribers_search.__doc__ or "", bound="page:1000",
                 fields={"total": "int", "total_capped": "bool", "total_estimated": "bool", "rows": "list",
                         **{f"rows.{name}": kind for name, kind in ROW_FIELDS.items()}}),
        CallSpec("subscribers.export", subscribers_export, right="users.read", kinds=ADMIN,
                 args=dict(FILTER_ARGS), result="map", doc=subscribers_export.__doc__ or "", streaming=True,
                 bound="stream", fields=dict(ROW_FIELDS)),
    ]
