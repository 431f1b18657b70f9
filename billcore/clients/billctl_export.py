"""``billctl invoices export``: the accounting export of a period as a CSV or JSON file.

    billctl invoices export --since 2026-11-01 --until 2026-12-01 --format csv --out nov.csv
    billctl invoices export --since 2026-11-01 --until 2026-12-01 --zone Europe/Moscow --format json --out nov.json

Theory of operation
-------------------
One ``invoices.export`` call (``billcore.api.invoice_export``) streams the
period's rows in a total order.  The rows are spooled to a temporary file
as they arrive (bounded memory however long the period), because the money
columns need the currency's decimals (``[billing] minor_units``), which
the core reports in the call's result at the end.  Then the output is
written next to ``--out`` and renamed into place: a failed export never
leaves half a file behind.

The bytes depend only on the rows: fixed column order (``CSV_COLUMNS``),
times in UTC ISO 8601, amounts as decimal strings with at least
``minor_units`` decimals and more only when exact micro-units need them,
plus the raw micro-units; CSV per RFC 4180 (CRLF line ends, quotes only
where needed) in UTF-8 without a byte-order mark; JSON one document with
sorted keys.  So exporting the same period again gives the same bytes.  A
date without a time (``--since 2026-11-01``) is midnight in ``--zone``
(default UTC).  docs/documents.md ("Accounting export") describes every column.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import io
import json
import os
import sys
import tempfile
import zoneinfo
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Final

from urfa.client import Client

from billcore.common.money import format_money
from billcore.clients.exits import UsageError
from billcore.common.csvcell import safe_text
from billcore.clients.subcommands import actions_of

__all__ = ["CSV_COLUMNS", "MONEY", "register", "csv_line", "json_row"]

CALL: Final = "invoices.export"
WIRE: Final = ("record", "id", "number", "at", "account_id", "customer_login", "customer_name", "period_start",
               "period_end", "refers_to", "method", "vat_bp", "net", "vat", "total", "text", "operator")
"""The call's row columns, in order (``billcore.api.invoice_export.COLUMNS``)."""
MONEY: Final = ("net", "vat", "total")
CSV_COLUMNS: Final = ("record", "id", "number", "at", "account_id", "customer_login", "customer_name",
                      "period_start", "period_end", "refers_to", "method", "vat_bp", "currency", "net", "vat",
                      "total", "net_micro", "vat_micro", "total_micro", "text", "operator")


def _instant(value: Any) -> Any:
    """A wire time as UTC ISO 8601 text (the one spelling every export uses)."""
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.timezone.utc).isoformat()
    return value


def _named(row: Sequence[Any]) -> dict[str, Any]:
    if len(row) != len(WIRE):
        raise UsageError(f"{CALL} sent a row of {len(row)} columns, this billctl knows {len(WIRE)}: update billctl")
    return {key: _instant(value) for key, value in zip(WIRE, row)}


def _money(micro: Any, minor_units: int) -> str | None:
    return None if micro is None else format_money(int(micro), min_decimals=minor_units)


def json_row(row: Mapping[str, Any], currency: str, minor_units: int) -> dict[str, Any]:
    """A row as the JSON document holds it: decimal strings and micro-units for each amount."""
    out = dict(row)
    out["currency"] = currency
    for key in MONEY:
        out[f"{key}_micro"] = row[key]
        out[key] = _money(row[key], minor_units)
    return out


def csv_line(row: Mapping[str, Any], currency: str, minor_units: int) -> list[str]:
    """A row as CSV cells in ``CSV_COLUMNS`` order (absent values empty)."""
    full = json_row(row, currency, minor_units)
    return ["" if full[key] is None else safe_text(str(full[key])) for key in CSV_COLUMNS]


def _moment(name: str, text: str, zone: str) -> dt.datetime:
    try:
        tz = zoneinfo.ZoneInfo(zone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise UsageError(f"--zone: unknown time zone {zone!r}") from None
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--{name}: a date or time, ISO 8601 (2026-11-01 or 2026-11-01T00:00+03:00), got {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=tz)


def _spooled(spool: IO[str]) -> Iterator[dict[str, Any]]:
    spool.seek(0)
    for line in spool:
        yield json.loads(line)


def _write_csv(out: IO[str], rows: Iterator[dict[str, Any]], currency: str, minor_units: int) -> None:
    writer = csv.writer(out, lineterminator="\r\n")    # RFC 4180: CRLF, quotes only where a cell needs them
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow(csv_line(row, currency, minor_units))


def _write_json(out: IO[str], rows: Iterator[dict[str, Any]], result: Mapping[str, Any]) -> None:
    """One document with sorted keys, a row per line: {"columns", "currency", "minor_units", "rows",
    "since", "totals", "until"}."""
    currency, minor_units = str(result["currency"]), int(result["minor_units"])

    def dump(value: Any) -> str:
        return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))

    out.write(f'{{"columns":{dump(list(CSV_COLUMNS))},"currency":{dump(currency)},'
              f'"minor_units":{minor_units},"rows":[')
    first = True
    for row in rows:
        out.write(("\n" if first else ",\n") + dump(json_row(row, currency, minor_units)))
        first = False
    totals = {key: value for key, value in result.items() if key not in ("since", "until", "currency", "minor_units")}
    out.write(f'\n],"since":{dump(_instant(result["since"]))},"totals":{dump(totals)},'
              f'"until":{dump(_instant(result["until"]))}}}\n')


def _replace(target: Path, write: Any) -> int:
    """Write through ``write(text_file)`` into a temporary file next to ``target``, then rename it there."""
    try:
        fd, temp = tempfile.mkstemp(dir=target.parent if str(target.parent) else ".", prefix=f".{target.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
                write(f)
            os.replace(temp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        return target.stat().st_size
    except OSError as exc:
        raise UsageError(f"{target}: {exc.strerror}") from None


async def run_export(client: Client, args: argparse.Namespace) -> Any:
    since = _moment("since", args.since, args.zone)
    until = _moment("until", args.until, args.zone)
    fmt = args.format
    with tempfile.TemporaryFile("w+", encoding="utf-8") as spool:
        stream = client.stream(CALL, {"since": since, "until": until})
        async for chunk in stream:
            for row in chunk:
                spool.write(json.dumps(_named(row), ensure_ascii=False) + "\n")
        result = dict(stream.result)
        currency, minor_units = str(result["currency"]), int(result["minor_units"])
        if args.out == "-":
            text = io.StringIO(newline="")
            (_write_csv(text, _spooled(spool), currency, minor_units) if fmt == "csv"
             else _write_json(text, _spooled(spool), result))
            sys.stdout.buffer.write(text.getvalue().encode("utf-8"))
            sys.stdout.flush()
            args.printed = True
            return result
        size = _replace(Path(args.out), lambda f: _write_csv(f, _spooled(spool), currency, minor_units)
                        if fmt == "csv" else _write_json(f, _spooled(spool), result))
    return {"out": args.out, "bytes": size, "rows": result["rows"], "invoices": result["invoices"],
            "credit_notes": result["credit_notes"], "payments": result["payments"],
            "cancellations": result["cancellations"]}


def register(sub: Any) -> None:
    """``billctl invoices export --since … --until … [--format csv|json] --out F``."""
    invoices = actions_of(sub, "invoices", "invoices and credit notes")
    c = invoices.add_parser("export", help="the accounting export of a period (invoices, credit notes, payments,"
                                           " cancellations) as CSV or JSON, the same bytes every time")
    c.add_argument("--since", required=True, help="first moment, ISO 8601 (a date: midnight in --zone)")
    c.add_argument("--until", required=True, help="end of the period, excluded")
    c.add_argument("--zone", default="UTC", help="time zone of a date without a time (default UTC)")
    c.add_argument("--format", choices=["csv", "json"], default="csv")
    c.add_argument("--out", required=True, help="the file to write ('-': standard output)")
    c.set_defaults(run=run_export)
