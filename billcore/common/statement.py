"""A bank statement (CSV) read into payment lines, and each line's account found: pure, no I/O.

Theory of operation
-------------------
A bank's export is a CSV file with a header row.  ``read_statement(data,
bank, …)`` decodes it (UTF-8, with or without BOM, else cp1251 — the two
encodings Russian and most other banks' exports come in; or the one named),
finds the delimiter (``;``, ``,``, tab or ``|``: the one the header row is
split by most), maps the header's columns by name (``COLUMNS``: English and
Russian names, case and spaces ignored) and turns each row into a
``StatementLine`` or a refusal that says why (``bad_amount``, ``no_amount``).
A debit (negative amount) or zero line is ``skipped``: a statement lists
money going out as well, and only money coming in is a payment.

Amounts are decimal strings with a point or a decimal comma (``1 234,56``,
``1234.56``, ``1,234.56``: spaces, no-break spaces and apostrophes group
thousands; when both ``,`` and ``.`` occur the last one is the decimal
separator), converted exactly to integer micro-units; more decimals than
the currency's minor units is a refusal, never a rounding.

Each line's identity (its payment's external id) is
``stmt:<bank>:<bank reference>`` when the statement has a reference column
(the bank's document or transaction number), else
``stmt:<bank>:<sha256 of the normalized line>`` — the date, amount, payer,
purpose, contract and account fields, trimmed and joined, plus the count of
identical lines before it in the same file (two equal payments on one day
stay two payments, and the same file imported again gives the same ids).
So importing a statement twice, or two overlapping statements, books every
line once.

Matching (``match_line``): an explicit ``contract`` or ``account`` column
wins; otherwise the purpose text is searched for contract numbers (every
word with a digit in it is asked about: a subscriber's contract number is
``users.external_id``) and for account ids after a marker ("л/с 42",
"лицевой счёт 42", "account 42", "acc #42", "ЛС:42").  The core answers
which of those exist (``payments.lookup``); one account found is
``matched``, none ``unmatched``, two different ones ``ambiguous`` — an
ambiguous line is never booked.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["COLUMNS", "StatementError", "StatementLine", "Refused", "Statement", "read_statement",
           "parse_amount", "candidates", "match_line", "BANK_NAME", "MAX_LINES"]

BANK_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}", re.ASCII)
MAX_LINES = 1_000_000
MAX_FIELD = 2000
MAX_WORDS = 20               # contract candidates asked about per line
MAX_EXTERNAL_ID = 128
MICRO = 1_000_000

# column → the header names it is known by (lower case, spaces collapsed)
COLUMNS: dict[str, tuple[str, ...]] = {
    "date": ("date", "дата", "дата операции", "дата платежа", "value date", "booking date"),
    "amount": ("amount", "credit", "сумма", "сумма платежа", "приход", "кредит", "поступление"),
    "reference": ("reference", "ref", "bank reference", "transaction id", "document", "номер",
                  "номер документа", "№ документа", "номер операции", "референс"),
    "payer": ("payer", "payer name", "плательщик", "наименование плательщика"),
    "purpose": ("purpose", "description", "details", "назначение", "назначение платежа",
                "основание", "комментарий"),
    "contract": ("contract", "contract number", "договор", "номер договора"),
    "account": ("account", "account id", "account_id", "лицевой счет", "лицевой счёт", "л/с"),
}
_DELIMITERS = (";", ",", "\t", "|")
_GROUPING = str.maketrans("", "", " \u00a0\u202f'")
_WORD = re.compile(r"[^\s,;()\"«»]+")
_ACCOUNT_MARK = re.compile(
    r"(?:л\s*/\s*с|лс|лицев\w*\s+сч[её]т\w*|account|acct|acc)\s*(?:id)?\s*[:№#N]?\s*(\d{1,18})\b",
    re.IGNORECASE)


class StatementError(ValueError):
    """The file as a whole cannot be read (encoding, no header, no amount column)."""


@dataclass(frozen=True, slots=True)
class StatementLine:
    line: int                     # the line number in the file (the header is 1)
    amount: int                   # micro-units, positive
    external_id: str
    date: str = ""
    reference: str = ""
    payer: str = ""
    purpose: str = ""
    contract: str = ""
    account: str = ""


@dataclass(frozen=True, slots=True)
class Refused:
    line: int
    status: str                   # "invalid" (the amount cannot be read) or "skipped" (a debit or zero)
    why: str
    text: str = ""


@dataclass
class Statement:
    lines: list[StatementLine] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)
    encoding: str = ""
    delimiter: str = ""
    columns: dict[str, str] = field(default_factory=dict)    # column → the header as written


def parse_amount(text: str, minor_units: int) -> int:
    """``"1 234,56"`` → 1_234_560_000 micro-units (signed); ``ValueError`` saying why not."""
    raw = text.strip().translate(_GROUPING)
    sign = -1 if raw.startswith("-") else 1
    raw = raw.lstrip("+-")
    if "," in raw and "." in raw:
        decimal = "," if raw.rfind(",") > raw.rfind(".") else "."
        raw = raw.replace("." if decimal == "," else ",", "").replace(",", ".")
    elif raw.count(",") == 1:
        raw = raw.replace(",", ".")
    match = re.fullmatch(r"([0-9]{1,12})(?:\.([0-9]{0,6}))?", raw, re.ASCII)
    if match is None:
        raise ValueError(f"not an amount: {text.strip()[:40]!r}")
    frac = (match.group(2) or "").rstrip("0")
    if len(frac) > minor_units:
        raise ValueError(f"more than the currency's {minor_units} decimal(s): {text.strip()[:40]!r}")
    return sign * (int(match.group(1)) * MICRO + int(frac.ljust(6, "0") or "0"))


def _decode(data: bytes, encoding: str) -> tuple[str, str]:
    if encoding != "auto":
        try:
            return data.decode(encoding), encoding
        except (UnicodeDecodeError, LookupError) as exc:
            raise StatementError(f"the file is not {encoding}: {exc}") from None
    try:
        return data.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError:
        return data.decode("cp1251"), "cp1251"    # cp1251 decodes every byte but one: 0x98


def _name(header: str) -> str:
    return " ".join(header.replace("\ufeff", "").strip().lower().split())


def _columns(header: Sequence[str]) -> dict[str, int]:
    found: dict[str, int] = {}
    for index, cell in enumerate(header):
        name = _name(cell)
        for column, names in COLUMNS.items():
            if name in names and column not in found:
                found[column] = index
    return found


def read_statement(data: bytes, bank: str, *, minor_units: int = 2, encoding: str = "auto",
                   delimiter: str = "auto") -> Statement:
    """The statement's payment lines and the lines refused (``StatementError`` for the file as a whole)."""
    if BANK_NAME.fullmatch(bank) is None:
        raise StatementError(f"bank name: 1 to 32 of A-Z a-z 0-9 _ -, got {bank!r}")
    text, used = _decode(data, encoding)
    first = text.split("\n", 1)[0]
    if delimiter == "auto":
        delimiter = max(_DELIMITERS, key=first.count)
    if len(delimiter) != 1:
        raise StatementError(f"delimiter: one character, got {delimiter!r}")
    rows = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = next(rows, None)
    if header is None:
        raise StatementError("the file is empty")
    columns = _columns(header)
    if "amount" not in columns:
        raise StatementError(f"no amount column in the header (known names: {', '.join(COLUMNS['amount'])});"
                             f" the header read: {delimiter.join(header)[:200]!r}")
    out = Statement(encoding=used, delimiter=delimiter,
                    columns={column: header[index].strip() for column, index in columns.items()})
    seen: dict[str, int] = {}
    prefix = f"stmt:{bank}:"
    for number, row in enumerate(rows, start=2):
        if number > MAX_LINES + 1:
            raise StatementError(f"more than {MAX_LINES} lines: split the statement")
        if not any(cell.strip() for cell in row):
            continue
        cells = {column: (row[index].strip()[:MAX_FIELD] if index < len(row) else "")
                 for column, index in columns.items()}
        if not cells["amount"]:
            out.refused.append(Refused(number, "invalid", "no amount", delimiter.join(row)[:200]))
            continue
        try:
            amount = parse_amount(cells["amount"], minor_units)
        except ValueError as exc:
            out.refused.append(Refused(number, "invalid", str(exc), delimiter.join(row)[:200]))
            continue
        if amount <= 0:
            out.refused.append(Refused(number, "skipped", "not a credit (debit or zero)", delimiter.join(row)[:200]))
            continue
        reference = " ".join(cells.get("reference", "").split())
        if reference and len(prefix) + len(reference) <= MAX_EXTERNAL_ID:
            external_id = prefix + reference
        else:
            normal = "\x1f".join([" ".join(cells.get(c, "").split()) for c in ("date", "payer", "purpose",
                                                                             "contract", "account", "reference")]
                                 + [str(amount)])
            seen[normal] = seen.get(normal, 0) + 1
            digest = hashlib.sha256(f"{normal}\x1f#{seen[normal]}".encode()).hexdigest()
            external_id = prefix + digest
        out.lines.append(StatementLine(number, amount, external_id, cells.get("date", ""), reference,
                                       cells.get("payer", ""), cells.get("purpose", ""),
                                       cells.get("contract", ""), cells.get("account", "")))
    return out


def candidates(line: StatementLine) -> tuple[list[str], list[int]]:
    """The contract numbers and account ids a line may name (to ask the core which exist)."""
    if line.contract or line.account:
        ids = [int(line.account)] if line.account.isascii() and line.account.isdecimal() else []
        return ([line.contract] if line.contract else []), [i for i in ids if 0 < i < 2**63]
    words: list[str] = []
    for word in _WORD.findall(line.purpose):
        word = word.strip(".:#№")
        if any(c.isdigit() for c in word) and 1 <= len(word) <= 64 and word not in words:
            words.append(word)
    ids = [int(m.group(1)) for m in _ACCOUNT_MARK.finditer(line.purpose)]
    return words[:MAX_WORDS], [i for i in dict.fromkeys(ids) if 0 < i < 2**63]


def match_line(line: StatementLine, contracts: Mapping[str, int], accounts: frozenset[int] | set[int]
               ) -> tuple[str, int | None, list[int]]:
    """``("matched", account, [account])``, ``("unmatched", None, [])`` or ``("ambiguous", None, [a, b…])``,
    given the contract numbers the core knows (→ account) and the account ids that exist."""
    words, ids = candidates(line)
    found = sorted({contracts[w] for w in words if w in contracts} | {i for i in ids if i in accounts})
    if not found:
        return "unmatched", None, []
    if len(found) > 1:
        return "ambiguous", None, found
    return "matched", found[0], found
