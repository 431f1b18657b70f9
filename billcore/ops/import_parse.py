"""Reading an import file: CSV or JSON rows into ``Subscriber`` values, every problem at its place.

Parsing never stops at the first problem: each one is collected with its
place (``line 12: balance: not a money string``, ``subscribers[3]: …`` for
JSON), sorted by place, and ``check_file`` adds the problems between rows
(duplicate logins and external ids, overlapping IPs).  Nothing here touches
the database; ``billcore.ops.importer`` checks the result against it and
writes it (docs/import.md).
"""

from __future__ import annotations

import csv
import io
import ipaddress
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from billcore.billing.accounts import MAX_CREDIT, MAX_FIELD, check_login
from billcore.billing.ledger_errors import InvalidValue
from billcore.common.errors import MoneyFormatError, MoneyRangeError
from billcore.common.money import parse_money
from urfa.scram import MAX_ITERATIONS, MIN_ITERATIONS, Verifier

__all__ = [
    "CSV_COLUMNS", "IPNetwork", "ImportFailed", "Parsed", "Subscriber", "AccountSpec",
    "check_file", "overlapping", "parse_csv", "parse_json", "sorted_errors",
]

CSV_COLUMNS = ("login", "password", "full_name", "email", "phone", "address", "external_id",
               "balance", "credit", "tariff", "ips")
_CONTACT = ("full_name", "email", "phone", "address", "external_id")
_ACCOUNT_KEYS = ("balance", "credit", "tariff", "ips")
JSON_FORMAT = "billcore-import/1"
MAX_ROWS = 5_000_000
MAX_ERRORS = 10_000
MAX_ACCOUNTS_PER_SUBSCRIBER = 100
MAX_IPS_PER_ACCOUNT = 1024
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ImportFailed(Exception):
    """The file cannot be imported; ``errors`` names every place and problem."""

    def __init__(self, errors: Sequence[str]) -> None:
        super().__init__(f"{len(errors)} error(s)")
        self.errors = list(errors)


@dataclass(frozen=True, slots=True)
class AccountSpec:
    balance: int
    credit: int
    tariff: str | None
    ips: tuple[IPNetwork, ...]


@dataclass(frozen=True, slots=True)
class Subscriber:
    where: str                      # "line 12" or "subscribers[3]"
    login: str
    password: str                   # cleartext, a SCRAM-SHA-256$ verifier, or ""
    contact: dict[str, str | None]
    accounts: tuple[AccountSpec, ...]


@dataclass(slots=True)
class Parsed:
    subscribers: list[Subscriber] = field(default_factory=list)
    services: list[tuple[str, dict[str, Any]]] = field(default_factory=list)   # (where, definition)
    tariffs: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def error(self, where: str, message: str) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(f"{where}: {message}")
        elif len(self.errors) == MAX_ERRORS:
            self.errors.append("… more errors not shown")


def _place(error: str) -> tuple[int, int]:
    """Sort key of an error line: file-wide places first, then by line or element number."""
    head = error.split(":", 1)[0]
    for rank, prefix in ((1, "line "), (2, "services["), (3, "tariffs["), (4, "subscribers[")):
        if head.startswith(prefix):
            digits = head[len(prefix):].split("]", 1)[0].split(" ", 1)[0]
            return (rank, int(digits) if digits.isdigit() else 0)
    return (9, 0) if error.startswith("…") else (0, 0)


def sorted_errors(errors: Sequence[str]) -> list[str]:
    """Errors in the order of their places in the file (stable within one place)."""
    return sorted(errors, key=_place)


# -- parsing (pure) ---------------------------------------------------------

def _money(parsed: Parsed, where: str, name: str, value: object, *, minimum: int | None = None,
           maximum: int | None = None) -> int:
    if value is None or value == "":
        return 0
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        parsed.error(where, f"{name}: money is a decimal string such as \"12.50\", got {value!r}")
        return 0
    try:
        amount = parse_money(value.strip())
    except (MoneyFormatError, MoneyRangeError) as exc:
        parsed.error(where, f"{name}: {exc}")
        return 0
    if minimum is not None and amount < minimum or maximum is not None and amount > maximum:
        parsed.error(where, f"{name}: {value} is outside {minimum}..{maximum} micro-units")
        return 0
    return amount


def _ips(parsed: Parsed, where: str, value: object) -> tuple[IPNetwork, ...]:
    if value is None or value == "":
        return ()
    items: list[object]
    if isinstance(value, str):
        items = [p for p in value.replace(",", " ").replace(";", " ").split() if p]
    elif isinstance(value, list):
        items = list(value)
    else:
        parsed.error(where, f"ips: a list of addresses or prefixes, got {value!r}")
        return ()
    if len(items) > MAX_IPS_PER_ACCOUNT:
        parsed.error(where, f"ips: more than {MAX_IPS_PER_ACCOUNT} per account")
        return ()
    out: list[IPNetwork] = []
    for item in items:
        if not isinstance(item, str):
            parsed.error(where, f"ips: not an address or prefix: {item!r}")
            continue
        try:
            out.append(ipaddress.ip_network(item.strip(), strict=True))
        except ValueError as exc:
            parsed.error(where, f"ips: bad IP {item!r}: {exc}")
    return tuple(out)


def _text(parsed: Parsed, where: str, name: str, value: object) -> str | None:
    if value is None or value == "":
        return None if name == "external_id" else ""
    if not isinstance(value, str) or len(value) > MAX_FIELD:
        parsed.error(where, f"{name}: a string of at most {MAX_FIELD} characters")
        return ""
    return value


def _account(parsed: Parsed, where: str, data: dict[str, Any]) -> AccountSpec:
    tariff = data.get("tariff")
    if tariff is not None and not isinstance(tariff, str):
        parsed.error(where, f"tariff: a tariff name, got {tariff!r}")
        tariff = None
    return AccountSpec(
        balance=_money(parsed, where, "balance", data.get("balance")),
        credit=_money(parsed, where, "credit", data.get("credit"), minimum=0, maximum=MAX_CREDIT),
        tariff=tariff.strip() or None if tariff else None,
        ips=_ips(parsed, where, data.get("ips")),
    )


def _subscriber(parsed: Parsed, where: str, data: dict[str, Any], accounts: list[dict[str, Any]]) -> None:
    try:
        login = check_login(data.get("login"))
    except InvalidValue as exc:
        parsed.error(where, f"login {data.get('login')!r}: {exc}")
        return
    password = data.get("password") or ""
    if not isinstance(password, str):
        parsed.error(where, "password: a string")
        password = ""
    if password.startswith("SCRAM-SHA-256$"):
        problem = _verifier_problem(password)
        if problem:
            parsed.error(where, f"password: {problem}")
    if not accounts or len(accounts) > MAX_ACCOUNTS_PER_SUBSCRIBER:
        parsed.error(where, f"accounts: 1..{MAX_ACCOUNTS_PER_SUBSCRIBER} per subscriber")
        return
    contact = {name: _text(parsed, where, name, data.get(name)) for name in _CONTACT}
    parsed.subscribers.append(Subscriber(where, login, password, contact,
                                         tuple(_account(parsed, where, account) for account in accounts)))


def _verifier_problem(text: str) -> str | None:
    try:
        verifier = Verifier.from_text(text)
    except ValueError as exc:
        return str(exc)
    if not MIN_ITERATIONS <= verifier.iterations <= MAX_ITERATIONS:
        return f"verifier iterations {verifier.iterations} outside {MIN_ITERATIONS}..{MAX_ITERATIONS}"
    if not verifier.salt or len(verifier.stored_key) != 32 or len(verifier.server_key) != 32:
        return "verifier has an empty salt or keys that are not 32 bytes"
    return None


def parse_csv(text: str) -> Parsed:
    """Subscribers from CSV with a header row of ``CSV_COLUMNS`` (any order, any subset with login)."""
    parsed = Parsed()
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        parsed.error("line 1", "empty file: a header row is needed")
        return parsed
    except csv.Error as exc:
        parsed.error("line 1", f"not CSV: {exc}")
        return parsed
    header = [h.strip().lstrip("\ufeff") for h in header]
    unknown = [h for h in header if h not in CSV_COLUMNS]
    if unknown:
        parsed.error("line 1", f"unknown column(s) {', '.join(map(repr, unknown))}; known: {', '.join(CSV_COLUMNS)}")
    if "login" not in header:
        parsed.error("line 1", "the login column is required")
    if len(set(header)) != len(header):
        parsed.error("line 1", "a column appears twice")
    if parsed.errors:
        return parsed
    rows = 0
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            parsed.error(f"line {start}", f"not CSV: {exc}")
            break
        if not row or all(not cell.strip() for cell in row):
            continue
        rows += 1
        if rows > MAX_ROWS:
            parsed.error(f"line {start}", f"more than {MAX_ROWS} rows")
            break
        where = f"line {start}"
        if len(row) != len(header):
            parsed.error(where, f"{len(row)} fields, the header has {len(header)}")
            continue
        data = dict(zip(header, row, strict=True))
        _subscriber(parsed, where, data, [{k: data.get(k) for k in _ACCOUNT_KEYS}])
    return parsed


def parse_json(text: str) -> Parsed:
    """The JSON export: ``{"format", "services", "tariffs", "subscribers"}`` (docs/import.md)."""
    parsed = Parsed()
    try:
        # floats stay their decimal text: money never passes through a float
        data = json.loads(text, parse_float=str)
    except json.JSONDecodeError as exc:
        parsed.error(f"line {exc.lineno}", f"not JSON: {exc.msg}")
        return parsed
    if not isinstance(data, dict):
        parsed.error("top level", "an object with format, services, tariffs and subscribers")
        return parsed
    if data.get("format", JSON_FORMAT) != JSON_FORMAT:
        parsed.error("format", f"expected {JSON_FORMAT!r}, got {data.get('format')!r}")
    unknown = set(data) - {"format", "services", "tariffs", "subscribers"}
    if unknown:
        parsed.error("top level", f"unknown key(s) {sorted(unknown)}")
    for key, target in (("services", parsed.services), ("tariffs", parsed.tariffs)):
        items = data.get(key, [])
        if not isinstance(items, list):
            parsed.error(key, "a list")
            continue
        for i, item in enumerate(items):
            where = f"{key}[{i}]"
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                parsed.error(where, "an object with a name")
                continue
            target.append((where, item))
    subscribers = data.get("subscribers", [])
    if not isinstance(subscribers, list) or len(subscribers) > MAX_ROWS:
        parsed.error("subscribers", f"a list of at most {MAX_ROWS} objects")
        return parsed
    allowed = {"login", "password", *_CONTACT, *_ACCOUNT_KEYS, "accounts"}
    for i, item in enumerate(subscribers):
        where = f"subscribers[{i}]"
        if not isinstance(item, dict):
            parsed.error(where, "an object")
            continue
        if isinstance(item.get("login"), str):
            where += f" ({item['login']})"
        extra = set(item) - allowed
        if extra:
            parsed.error(where, f"unknown key(s) {sorted(extra)}")
            continue
        accounts = item.get("accounts")
        if accounts is None:
            accounts = [{k: item.get(k) for k in _ACCOUNT_KEYS}]
        elif any(k in item for k in _ACCOUNT_KEYS) or not isinstance(accounts, list) \
                or not all(isinstance(account, dict) and set(account) <= set(_ACCOUNT_KEYS) for account in accounts):
            parsed.error(where, f"accounts: a list of objects with {', '.join(_ACCOUNT_KEYS)}"
                                " (and then no account keys on the subscriber itself)")
            continue
        _subscriber(parsed, where, item, accounts)
    return parsed


def check_file(parsed: Parsed) -> None:
    """Problems between rows: duplicate logins and external ids, overlapping IPs."""
    seen: dict[str, str] = {}
    external: dict[str, str] = {}
    for subscriber in parsed.subscribers:
        first = seen.setdefault(subscriber.login, subscriber.where)
        if first != subscriber.where:
            parsed.error(subscriber.where, f"duplicate login {subscriber.login!r} (first at {first})")
        ext = subscriber.contact.get("external_id")
        if ext:
            first = external.setdefault(ext, subscriber.where)
            if first != subscriber.where:
                parsed.error(subscriber.where, f"duplicate external_id {ext!r} (first at {first})")
    for problem in overlapping((net, subscriber.where) for subscriber in parsed.subscribers
                               for account in subscriber.accounts for net in account.ips):
        parsed.error(*problem)


def overlapping(items: Iterable[tuple[IPNetwork, str]]) -> list[tuple[str, str]]:
    """(where, message) for every prefix that overlaps an earlier one.  Two
    prefixes overlap only when one contains the other, so a sweep over
    prefixes sorted by start address finds every overlap."""
    ordered = sorted(items, key=lambda t: (t[0].version, int(t[0].network_address), t[0].prefixlen))
    problems: list[tuple[str, str]] = []
    holder: tuple[IPNetwork, str] | None = None
    for net, where in ordered:
        if holder is not None and holder[0].version == net.version \
                and int(net.network_address) <= int(holder[0].broadcast_address):
            problems.append((where, f"IP {net} overlaps {holder[0]} ({holder[1]})"))
            if int(net.broadcast_address) <= int(holder[0].broadcast_address):
                continue
        holder = (net, where)
    return problems
