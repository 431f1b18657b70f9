"""``invoices.export``: the accounting export of a period — invoices, credit notes, payments, cancellations.

Theory of operation
-------------------
An accountant books documents by the day they happened, so a row belongs to
the period ``[since, until)`` by the instant of its own event: an invoice or
a credit note by ``issued_at``, a payment by ``created_at``, a payment's
cancellation by ``cancelled_at`` (its own row, a negative amount, naming the
payment it cancels).  A payment made in November and cancelled in December
is a payment in November's export and a cancellation in December's.

Every column is a fact that cannot change once it happened (issued
documents are immutable, schema 0020; a payment's amount, method, operator
and comment are written once, and its cancellation is another row), so
exporting the same period again gives the same rows in the same order:
``ORDER BY at, record rank, id``, which is total (``id`` is unique within a
record kind).  The customer of an invoice is as it was at issue
(``invoices.customer``); payments carry the account only.

Admin call, right ``invoices.read``, streaming: chunks of rows in
``COLUMNS`` order (money in micro-units, times as instants), read through a
server-side cursor in one READ ONLY repeatable-read transaction; the result
counts and sums each record kind.  ``billctl invoices export`` writes CSV or
JSON from it (``billcore.clients.billctl_export``, docs/documents.md ("Accounting export")).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar, Final

from billcore.api import ADMIN, handler
from billcore.common.errors import BillingError
from billcore.server.call_context import CallContext
from billcore.server.calls import CallSpec
from billcore.server.context import CoreContext

__all__ = ["COLUMNS", "EXPORT_SQL", "ExportError", "calls", "document_number", "export_row"]

CHUNK: Final = 1_000
MAX_RANGE_DAYS: Final = 3_700

COLUMNS: Final = ("record", "id", "number", "at", "account_id", "customer_login", "customer_name",
                  "period_start", "period_end", "refers_to", "method", "vat_bp", "net", "vat", "total",
                  "text", "operator")
"""The wire columns of each row, in order (docs/documents.md ("Accounting export") describes each)."""

_RECORDS: Final = ("invoice", "credit_note", "payment", "payment_cancellation")

# One statement, four branches, one total order.  rank breaks ties of the same instant (a monthly run
# issues many invoices at one issued_at; a payment and its cancellation can share a second).
EXPORT_SQL: Final = """
SELECT e.record, e.id, e.series, e.year, e.seq, e.external_id, e.at, e.account_id, e.customer_login,
       e.customer_name, e.period_start, e.period_end, e.c_series, e.c_year, e.c_seq, e.refers_payment,
       e.method, e.vat_bp, e.net, e.vat, e.total, e.text, e.operator
  FROM (
    SELECT i.kind AS record, CASE i.kind WHEN 'invoice' THEN 1 ELSE 2 END AS rank, i.id, i.series, i.year,
           i.number AS seq, NULL::text AS external_id, i.issued_at AS at, i.account_id,
           i.customer->>'login' AS customer_login, i.customer->>'full_name' AS customer_name,
           i.period_start, i.period_end, c.series AS c_series, c.year AS c_year, c.number AS c_seq,
           NULL::bigint AS refers_payment, NULL::text AS method, i.vat_bp, i.net, i.vat, i.total,
           i.reason AS text, i.issued_by AS operator
      FROM invoices i LEFT JOIN invoices c ON c.id = i.credits
     WHERE i.issued_at >= $1 AND i.issued_at < $2
    UNION ALL
    SELECT 'payment', 3, p.id, NULL, NULL, NULL, p.external_id, p.created_at, p.account_id, NULL, NULL,
           NULL, NULL, NULL, NULL, NULL, NULL, p.method, NULL, NULL, NULL, p.amount, p.comment, p.operator
      FROM payments p WHERE p.created_at >= $1 AND p.created_at < $2
    UNION ALL
    SELECT 'payment_cancellation', 4, p.id, NULL, NULL, NULL, p.external_id, p.cancelled_at, p.account_id,
           NULL, NULL, NULL, NULL, NULL, NULL, NULL, p.id, p.method, NULL, NULL, NULL, -p.amount,
           coalesce(p.cancel_reason, ''), coalesce(p.cancelled_by, '')
      FROM payments p WHERE p.cancelled_at >= $1 AND p.cancelled_at < $2
  ) e
 ORDER BY e.at, e.rank, e.id
"""


class ExportError(BillingError, ValueError):
    """An export that cannot be asked: a range that is empty, reversed or too long."""

    code: ClassVar[str] = "export.invalid"


def document_number(series: str, year: int, seq: int) -> str:
    """The contract's number text: ``INV-2026-000007`` (more digits once past 999 999)."""
    return f"{series}-{year}-{seq:06d}"


def export_row(row: Any) -> list[Any]:
    """One row of ``EXPORT_SQL`` in ``COLUMNS`` order."""
    record = row["record"]
    if record in ("invoice", "credit_note"):
        number = document_number(row["series"], row["year"], row["seq"])
        refers = "" if row["c_series"] is None else document_number(row["c_series"], row["c_year"], row["c_seq"])
    else:
        number = row["external_id"] or ""
        refers = "" if row["refers_payment"] is None else str(row["refers_payment"])
    return [record, row["id"], number, row["at"], row["account_id"], row["customer_login"] or "",
            row["customer_name"] or "", row["period_start"], row["period_end"], refers, row["method"] or "",
            row["vat_bp"], row["net"], row["vat"], row["total"], row["text"] or "", row["operator"] or ""]


def calls(core: CoreContext) -> list[CallSpec]:
    billing = core.config.billing

    @handler
    async def invoices_export(ctx: CallContext, since: datetime, until: datetime) -> dict[str, Any]:
        """The accounting export of [since, until): invoices and credit notes by the time they were issued,
        payments by the time they were taken, payment cancellations by the time they were cancelled (a
        row of their own with a negative total); streamed rows in a fixed order, so exporting a period
        again gives the same rows (docs/documents.md ("Accounting export") describes the columns)."""
        for name, value in (("since", since), ("until", until)):
            if not isinstance(value, datetime) or value.utcoffset() is None:
                raise ExportError(f"{name} must be a time with its zone")
        if not since < until:
            raise ExportError("since must be before until")
        if (until - since).days > MAX_RANGE_DAYS:
            raise ExportError(f"an export covers at most {MAX_RANGE_DAYS} days")
        counts = dict.fromkeys(_RECORDS, 0)
        sums = dict.fromkeys(_RECORDS, 0)
        chunk: list[list[Any]] = []
        async with core.pool.acquire() as conn, conn.transaction(readonly=True, isolation="repeatable_read"):
            async for row in conn.cursor(EXPORT_SQL, since, until, prefetch=CHUNK):
                out = export_row(row)
                counts[out[0]] += 1
                sums[out[0]] += out[14]
                chunk.append(out)
                if len(chunk) >= CHUNK:
                    await ctx.stream(chunk)
                    chunk = []
        if chunk:
            await ctx.stream(chunk)
        return {"since": since, "until": until, "rows": sum(counts.values()),
                "currency": billing.currency, "minor_units": billing.minor_units,
                "invoices": counts["invoice"], "credit_notes": counts["credit_note"],
                "payments": counts["payment"], "cancellations": counts["payment_cancellation"],
                "invoiced": sums["invoice"], "credited": sums["credit_note"], "paid": sums["payment"],
                "cancelled": sums["payment_cancellation"]}

    return [
        CallSpec("invoices.export", invoices_export, right="invoices.read", kinds=ADMIN, streaming=True,
                 args={"since": "time", "until": "time"}, doc=invoices_export.__doc__ or "", result="map",
                 fields={"record": "str", "id": "int", "number": "str", "at": "time", "account_id": "int",
                         "customer_login": "str", "customer_name": "str", "period_start": "time?",
                         "period_end": "time?", "refers_to": "str", "method": "str", "vat_bp": "int?",
                         "net": "money?", "vat": "money?", "total": "money", "text": "str", "operator": "str"},
                 bound="stream"),
    ]
