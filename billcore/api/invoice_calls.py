"""Invoices, credit notes and statements over URFA.

Admin calls: ``invoices.list``, ``invoices.get`` and the streaming
``statements.get`` (right ``invoices.read``); ``invoices.issue``,
``invoices.run`` and ``invoices.credit`` (right ``invoices.write``; each is
audited).  Subscriber calls (kinds ``{"user"}``): ``me.invoices``,
``me.invoice`` and ``me.statement`` see the principal's own accounts only;
another subscriber's invoice answers ``invoices.unknown`` exactly as one that
does not exist, another's account ``accounts.unknown``.

Shapes (SUMMARY, DOCUMENT, the statement's rows and result) are those of
/work/wt/DOCS_CONTRACT.md, documented in docs/api.md; the documents are
computed in ``billcore.billing.invoices`` and ``billcore.billing.statements``.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from typing import Any, Final

from billcore.api import ADMIN, USER, handler, need_int, page, who
from billcore.api.me import _own
from billcore.billing import audit, invoices
from billcore.billing.ledger_errors import InvalidValue, UnknownAccount
from billcore.billing.statements import statement_rows
from billcore.db.rows import DbConnection
from billcore.server.call_context import CallContext
from billcore.server.calls import CallSpec
from billcore.server.context import CoreContext

__all__ = ["calls"]

MAX_STATEMENT_DAYS: Final = 3660
_SUMMARY_SQL: Final = (
    f"SELECT i.id, i.kind, i.series || '-' || i.year || '-' || {invoices._SEQ_SQL.format(n='i.number')} AS number,"
    " i.account_id, i.period_start, i.period_end, i.issued_at, i.total, i.credits, count(*) OVER () AS total_rows"
    " FROM invoices i WHERE ($1::bigint[] IS NULL OR i.account_id = ANY($1::bigint[]))"
    " AND ($2::timestamptz IS NULL OR i.issued_at >= $2) AND ($3::timestamptz IS NULL OR i.issued_at < $3)"
    " AND ($4::text IS NULL OR i.kind = $4) ORDER BY i.id DESC LIMIT $5 OFFSET $6")
SUMMARY_FIELDS: Final = {"invoices": "list", "invoices.total": "money", "total": "int"}
DOCUMENT_FIELDS: Final = {"net": "money", "vat": "money", "total": "money", "lines": "list",
                          "lines.net": "money", "lines.vat": "money", "lines.total": "money",
                          "credited_by": "list", "credited_by.total": "money"}
STATEMENT_FIELDS: Final = {"ledger_id": "int", "created_at": "str", "kind": "str", "amount": "money",
                           "balance_after": "money", "reference": "str"}


def _day(value: object, name: str, tz: Any) -> datetime | None:
    if value is None:
        return None
    if type(value) is not str:
        raise InvalidValue(f"{name} must be a date YYYY-MM-DD")
    try:
        day = date.fromisoformat(value)
    except ValueError:
        raise InvalidValue(f"{name} must be a date YYYY-MM-DD, got {value!r}") from None
    return datetime.combine(day, datetime.min.time(), tzinfo=tz).astimezone(timezone.utc)


def _aware(value: object, name: str) -> datetime:
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise InvalidValue(f"{name} must be an ISO datetime with a zone")
    if not 2000 <= value.year <= 9000:
        raise InvalidValue(f"{name} must be in the years 2000..9000")
    return value


async def _summaries(conn: DbConnection, account_ids: list[int] | None, since: datetime | None,
                     until: datetime | None, kind: str | None, limit: int, offset: int) -> dict[str, Any]:
    if kind is not None and kind not in ("invoice", "credit_note"):
        raise InvalidValue("kind must be 'invoice' or 'credit_note'")
    rows = await conn.fetch(_SUMMARY_SQL, account_ids, since, until, kind, limit, offset)
    total = rows[0]["total_rows"] if rows else 0
    if not rows and offset:
        total = await conn.fetchval(
            "SELECT count(*) FROM invoices i WHERE ($1::bigint[] IS NULL OR i.account_id = ANY($1::bigint[]))"
            " AND ($2::timestamptz IS NULL OR i.issued_at >= $2) AND ($3::timestamptz IS NULL OR i.issued_at < $3)"
            " AND ($4::text IS NULL OR i.kind = $4)", account_ids, since, until, kind)
    return {"invoices": [{"id": r["id"], "kind": r["kind"], "number": r["number"], "account_id": r["account_id"],
                          "period_start": r["period_start"].isoformat(), "period_end": r["period_end"].isoformat(),
                          "issued_at": r["issued_at"].isoformat(), "total": r["total"], "credits": r["credits"]}
                         for r in rows], "total": int(total)}


def calls(core: CoreContext) -> list[CallSpec]:
    tz = core.config.zone
    cfg = core.config.invoices
    currency, minor = core.config.billing.currency, core.config.billing.minor_units

    async def doc(conn: DbConnection, invoice_id: int) -> dict[str, Any]:
        return await invoices.document(conn, invoice_id, currency=currency, minor_units=minor)

    async def customer(conn: DbConnection, account_id: int) -> dict[str, Any]:
        row = await conn.fetchrow(
            "SELECT u.id AS user_id, u.login, u.full_name, u.address, u.email FROM accounts a"
            " JOIN users u ON u.id = a.user_id WHERE a.id = $1", account_id)
        if row is None:
            raise UnknownAccount(f"account {account_id} does not exist")
        return dict(row)

    async def statement(ctx: CallContext, account_id: int, since: datetime, until: datetime) -> dict[str, Any]:
        since, until = _aware(since, "since"), _aware(until, "until")
        if not since < until or until - since > timedelta(days=MAX_STATEMENT_DAYS):
            raise InvalidValue(f"since must be before until, at most {MAX_STATEMENT_DAYS} days apart")
        async with core.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            who_is = await customer(conn, account_id)
            st = await statement_rows(conn, account_id, since, until)
            async for chunk in st.rows():
                await ctx.stream(chunk)
            await st.check()
        return {"account_id": account_id, "since": since.isoformat(), "until": until.isoformat(),
                "opening": st.opening, "closing": st.closing, "entries": st.entries, "customer": who_is,
                "currency": currency, "minor_units": minor}

    @handler
    async def invoices_list(ctx: CallContext, account_id: int | None = None, since: str | None = None,
                            until: str | None = None, kind: str | None = None, limit: int = 100,
                            offset: int = 0) -> dict[str, Any]:
        """Invoices and credit notes, newest first, issued in [since, until) (local dates), of one account
        or all: {"invoices": [summary], "total": n}."""
        limit, offset = page(limit, offset, 1000)
        ids = None if account_id is None else [need_int("account_id", account_id)]
        async with core.pool.acquire() as conn:
            return await _summaries(conn, ids, _day(since, "since", tz), _day(until, "until", tz), kind, limit,
                                    offset)

    @handler
    async def invoices_get(ctx: CallContext, invoice_id: int) -> dict[str, Any]:
        """One invoice or credit note with its lines, customer and credit notes."""
        async with core.pool.acquire() as conn:
            return await doc(conn, need_int("invoice_id", invoice_id))

    @handler
    async def invoices_issue(ctx: CallContext, account_id: int, until: datetime | None = None) -> dict[str, Any]:
        """Invoice one account now: from its last invoice's end (never invoiced: from its previous accounting
        period's start) up to until (default now). Refused invoices.nothing_to_invoice when there is no charge in the range."""
        now = core.now()
        end = now if until is None else _aware(until, "until")
        async with core.pool.acquire() as conn, conn.transaction():
            invoice_id = await invoices.issue(conn, need_int("account_id", account_id), None, end,
                                              actor=who(ctx).actor, now=now, series=cfg.series, tz=tz)
            await audit.record(conn, who(ctx), "invoices.issue", f"invoice:{invoice_id}",
                               after={"account_id": account_id, "until": end}, now=now)
            return await doc(conn, invoice_id)

    @handler
    async def invoices_run(ctx: CallContext, period_end: datetime | None = None) -> dict[str, Any]:
        """The monthly run now: every account whose accounting period ended at least the grace ago (or by
        period_end, when earlier) and is not invoiced yet. Idempotent. Streams one progress row per
        committed batch: [last account id, accounts, issued, total] so far."""
        now = core.now()
        until = None if period_end is None else _aware(period_end, "period_end")
        done = [0, 0, 0]

        async def progress(batch: invoices.RunResult, last: int) -> None:
            done[0], done[1], done[2] = done[0] + batch.accounts, done[1] + batch.issued, done[2] + batch.total
            await ctx.stream([[last, *done]])

        result = await invoices.run(core.pool, now, timedelta(seconds=cfg.grace), series=cfg.series, tz=tz,
                                    batch_size=cfg.batch_size, workers=cfg.workers, until=until, progress=progress)
        async with core.pool.acquire() as conn:
            await audit.record(conn, who(ctx), "invoices.run", "invoices",
                               after={"issued": result.issued, "accounts": result.accounts}, now=now)
        return {"issued": result.issued, "accounts": result.accounts, "total": result.total}

    @handler
    async def invoices_credit(ctx: CallContext, invoice_id: int, reason: str,
                              lines: list[Any] | None = None) -> dict[str, Any]:
        """A credit note for an invoice: lines [{line_no, total}] with positive amounts to credit, at most
        what is left of each; no lines: all that is left. The account is credited in the ledger."""
        now = core.now()
        async with core.pool.acquire() as conn, conn.transaction():
            note = await invoices.credit(conn, need_int("invoice_id", invoice_id), reason, lines,
                                         actor=who(ctx).actor, now=now, series=cfg.credit_series, tz=tz)
            await audit.record(conn, who(ctx), "invoices.credit", f"invoice:{invoice_id}",
                               after={"credit_note": note, "reason": reason}, now=now)
            return await doc(conn, note)

    @handler
    async def statements_get(ctx: CallContext, account_id: int, since: datetime, until: datetime) -> dict[str, Any]:
        """An account's statement for [since, until): streamed rows [ledger_id, created_at, kind, amount,
        balance_after, reference]; result opening, closing (the ledger's balance at until), entries,
        customer."""
        return await statement(ctx, need_int("account_id", account_id), since, until)

    @handler
    async def me_invoices(ctx: CallContext, limit: int = 100, offset: int = 0) -> dict[str, Any]:
        """My invoices and credit notes, newest first."""
        limit, offset = page(limit, offset, 1000)
        async with core.pool.acquire() as conn:
            return await _summaries(conn, await _own(conn, int(ctx.principal.id), None), None, None, None,
                                    limit, offset)

    @handler
    async def me_invoice(ctx: CallContext, invoice_id: int) -> dict[str, Any]:
        """One of my invoices or credit notes."""
        async with core.pool.acquire() as conn:
            owner = await conn.fetchval("SELECT account_id FROM invoices WHERE id = $1",
                                        need_int("invoice_id", invoice_id))
            if owner is None or owner not in await _own(conn, int(ctx.principal.id), None):
                raise invoices.UnknownInvoice(f"invoice {invoice_id} does not exist")
            return await doc(conn, invoice_id)

    @handler
    async def me_statement(ctx: CallContext, account_id: int, since: datetime, until: datetime) -> dict[str, Any]:
        """My account's statement for [since, until), streamed like statements.get."""
        async with core.pool.acquire() as conn:
            await _own(conn, int(ctx.principal.id), need_int("account_id", account_id))
        return await statement(ctx, account_id, since, until)

    list_args = {"account_id": "int?", "since": "str?", "until": "str?", "kind": "str?", "limit": "int?",
                 "offset": "int?"}
    stmt_args = {"account_id": "int", "since": "time", "until": "time"}
    return [
        CallSpec("invoices.list", invoices_list, right="invoices.read", kinds=ADMIN, args=list_args, result="map",
                 doc=invoices_list.__doc__ or "", fields=SUMMARY_FIELDS, bound="page:1000"),
        CallSpec("invoices.get", invoices_get, right="invoices.read", kinds=ADMIN, args={"invoice_id": "int"},
                 result="map", doc=invoices_get.__doc__ or "", fields=DOCUMENT_FIELDS, bound="fixed"),
        CallSpec("invoices.issue", invoices_issue, right="invoices.write", kinds=ADMIN,
                 args={"account_id": "int", "until": "time?"}, result="map", doc=invoices_issue.__doc__ or "",
                 fields=DOCUMENT_FIELDS, bound="fixed"),
        CallSpec("invoices.run", invoices_run, right="invoices.write", kinds=ADMIN, args={"period_end": "time?"},
                 streaming=True, result="map", doc=invoices_run.__doc__ or "", bound="stream",
                 fields={"last_account_id": "int", "accounts": "int", "issued": "int", "total": "money"}),
        CallSpec("invoices.credit", invoices_credit, right="invoices.write", kinds=ADMIN,
                 args={"invoice_id": "int", "reason": "str", "lines": "list?"}, result="map",
                 doc=invoices_credit.__doc__ or "", fields=DOCUMENT_FIELDS, bound="fixed"),
        CallSpec("statements.get", statements_get, right="invoices.read", kinds=ADMIN, streaming=True,
                 args=stmt_args, result="map", doc=statements_get.__doc__ or "", fields=STATEMENT_FIELDS,
                 bound="stream"),
        CallSpec("me.invoices", me_invoices, kinds=USER, args={"limit": "int?", "offset": "int?"}, result="map",
                 doc=me_invoices.__doc__ or "", fields=SUMMARY_FIELDS, bound="page:1000"),
        CallSpec("me.invoice", me_invoice, kinds=USER, args={"invoice_id": "int"}, result="map",
                 doc=me_invoice.__doc__ or "", fields=DOCUMENT_FIELDS, bound="fixed"),
        CallSpec("me.statement", me_statement, kinds=USER, streaming=True, args=stmt_args, result="map",
                 doc=me_statement.__doc__ or "", fields=STATEMENT_FIELDS, bound="stream"),
    ]
