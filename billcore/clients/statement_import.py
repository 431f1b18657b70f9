"""``billctl payments import-statement FILE --bank NAME``: a bank statement booked over URFA.

Theory of operation
-------------------
billctl is a client: it reads the file (``billcore.common.statement``,
pure), asks the core which accounts the lines name (``payments.lookup``, a
thousand references a call), and — unless ``--dry-run`` — books each
matched line with ``payments.add`` (method ``bank``, external id
``stmt:<bank>:<reference or line hash>``), so a line is booked once however
often the statement (or an overlapping one) is imported: a line booked
before answers ``created: false`` and counts as ``already``.  A line whose
external id is already a different payment (another amount or account) is
``conflict`` and books nothing.

Calls go ``CONCURRENCY`` at a time on the one session (URFA multiplexes);
each is its own transaction in the core, so a statement cut short by a
dropped connection is simply imported again.  Progress goes to stderr
every ``PROGRESS_EVERY`` lines; the result is one row per statement line
(its status: matched / booked / already / conflict / unmatched /
ambiguous / invalid / skipped) and a summary.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from urfa.client import Client
from urfa.errors import CallFailed

from billcore.common.money import format_money
from billcore.common.statement import Statement, StatementLine, match_line, candidates

__all__ = ["import_statement", "summary_text", "LOOKUP_PAGE", "CONCURRENCY"]

LOOKUP_PAGE = 1000         # payments.lookup's bound
CONCURRENCY = 8
PROGRESS_EVERY = 500
PURPOSE_SHOWN = 60


async def _lookup(client: Client, lines: list[StatementLine]) -> tuple[dict[str, int], set[int]]:
    words: list[str] = []
    ids: list[int] = []
    for line in lines:
        w, i = candidates(line)
        words.extend(w)
        ids.extend(i)
    words, ids = list(dict.fromkeys(words)), list(dict.fromkeys(ids))
    contracts: dict[str, int] = {}
    accounts: set[int] = set()
    for start in range(0, max(len(words), len(ids)), LOOKUP_PAGE):
        found = await client.call("payments.lookup", {"contracts": words[start:start + LOOKUP_PAGE],
                                                      "account_ids": ids[start:start + LOOKUP_PAGE]})
        contracts.update({row["contract"]: int(row["account_id"]) for row in found["contracts"]})
        accounts.update(int(a) for a in found["accounts"])
    return contracts, accounts


def _row(line: StatementLine, status: str, account_id: int | None, **more: Any) -> dict[str, Any]:
    return {"line": line.line, "status": status, "account_id": account_id, "amount": line.amount,
            "reference": line.reference, "payer": line.payer[:40], "purpose": line.purpose[:PURPOSE_SHOWN],
            "payment_id": None, **more}


async def import_statement(client: Client, statement: Statement, bank: str, *, dry_run: bool,
                           progress: TextIO = sys.stderr,
                           clock: Callable[[], float] = time.monotonic) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One row per line (file order) and the summary; books nothing when ``dry_run``."""
    contracts, accounts = await _lookup(client, statement.lines)
    rows: dict[int, dict[str, Any]] = {}
    todo: list[tuple[StatementLine, int]] = []
    for line in statement.lines:
        status, account_id, found = match_line(line, contracts, accounts)
        rows[line.line] = _row(line, status, account_id, **({"candidates": found} if status == "ambiguous" else {}))
        if status == "matched":
            todo.append((line, int(account_id or 0)))
    for refused in statement.refused:
        rows[refused.line] = {"line": refused.line, "status": refused.status, "account_id": None, "amount": None,
                              "reference": "", "payer": "", "purpose": refused.why[:PURPOSE_SHOWN],
                              "payment_id": None}
    started = clock()
    done = 0
    if not dry_run:
        gate = asyncio.Semaphore(CONCURRENCY)

        async def book(line: StatementLine, account_id: int) -> None:
            nonlocal done
            async with gate:
                try:
                    paid = await client.call("payments.add", {
                        "account_id": account_id, "amount": line.amount, "method": "bank",
                        "external_id": line.external_id,
                        "comment": f"statement {bank} line {line.line}: {line.purpose}"[:1000]})
                    rows[line.line].update(status="booked" if paid["created"] else "already",
                                           payment_id=paid["payment_id"])
                except CallFailed as exc:
                    if exc.code not in ("payments.conflict", "accounts.unknown", "billing.invalid",
                                        "billing.amount"):
                        raise
                    rows[line.line].update(status="conflict" if exc.code == "payments.conflict" else "refused",
                                           purpose=exc.message[:PURPOSE_SHOWN])
                done += 1
                if done % PROGRESS_EVERY == 0:
                    rate = done / max(clock() - started, 1e-6)
                    print(f"statement: {done}/{len(todo)} lines booked or found ({rate:.0f}/s)",
                          file=progress, flush=True)

        await asyncio.gather(*(book(line, account_id) for line, account_id in todo))
    ordered = [rows[n] for n in sorted(rows)]
    counts: dict[str, int] = {}
    for row in ordered:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    summary = {"lines": len(ordered), "dry_run": dry_run, **counts,
               "booked_amount": sum(r["amount"] for r in ordered if r["status"] == "booked"),
               "matched_amount": sum(r["amount"] for r in ordered if r["account_id"] is not None),
               "seconds": round(clock() - started, 3), "encoding": statement.encoding,
               "delimiter": {"\t": "tab"}.get(statement.delimiter, statement.delimiter)}
    return ordered, summary


def summary_text(summary: dict[str, Any]) -> str:
    parts = [f"{summary['lines']} line(s)"]
    for status in ("matched", "booked", "already", "conflict", "refused", "unmatched", "ambiguous",
                   "invalid", "skipped"):
        if summary.get(status):
            parts.append(f"{summary[status]} {status}")
    money = (f"{format_money(summary['booked_amount'])} booked" if not summary["dry_run"]
             else f"{format_money(summary['matched_amount'])} would be booked (dry run: nothing booked)")
    return f"statement: {', '.join(parts)}; {money}; read as {summary['encoding']}, delimiter {summary['delimiter']!r}"
