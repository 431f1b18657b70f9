"""``billcore import``: subscribers, accounts, opening balances, tariffs,
tariff links and static IPs from another billing system (docs/import.md).

Theory of operation
-------------------
1. *Parse* the CSV or JSON file into ``Subscriber`` values, collecting
   every problem with its place instead of stopping at the first
   (``billcore.ops.import_parse``).
2. *Check against the database*: tariffs named must exist (or be defined in
   the JSON file), logins already present are skipped (so re-running an
   import is a no-op), external ids and IPs must not collide with existing
   rows.  Any error: ``ImportFailed`` with every line, nothing written.
3. *Verifiers*: cleartext passwords become SCRAM verifiers at the normal
   iteration count, computed in a process pool across cores (PBKDF2 is
   the slow part by far); ``SCRAM-SHA-256$…`` verifiers are taken as they
   are; an empty password gets a verifier no password matches.
4. *Write*, in one transaction, with COPY: users, accounts (with their
   opening balance), one ledger row per non-zero balance (kind
   ``correction``, idempotency key ``import:opening:<login>:<n>``: the
   unique index makes a second booking impossible), system blocks for the
   accounts the debt rule blocks, tariff links and IP bindings, one audit
   row.  The accounts are new, so the ledger's per-account work (locking,
   promised payments) has nothing to do; the invariants it would keep are
   asserted set-wise before commit (balance = ledger sum, system block
   exactly when in debt) and a broken one rolls everything back.

Steps 1–2 and the catalogue part of step 4 run to the end whatever they
find, so one pass lists every error (sorted by place); only then does the
import stop.  ``--dry-run`` does steps 1–2, then rehearses step 4 (with
placeholder verifiers) inside a transaction that is rolled back, so what the
database would refuse is found too.  Sequences are not transactional, so
the rehearsal takes no id from them: its rows carry negative ids, which no
real row has, and a real import after a dry run starts where it would have.

The summary's total is a sum of amounts, each within ``MAX_AMOUNT``; the sum
need not be, so it is formatted without the single-amount range check.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import secrets
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import asyncpg

from billcore.common.errors import InvariantViolation, TariffError
from billcore.common.money import format_money, parse_money
from billcore.db.rows import DbConnection
from billcore.ops.import_parse import (
    CSV_COLUMNS, ImportFailed, Parsed, Subscriber, check_file, parse_csv, parse_json, sorted_errors,
)
from urfa.scram import DEFAULT_ITERATIONS, SALT_BYTES, Verifier, make_verifier

__all__ = [
    "ACTOR",
    "ImportReport",
    "Progress",
    "compute_verifiers",
    "import_file",
    "import_text",
    "iter_csv_rows",
]

ACTOR = "import"
COPY_CHUNK = 10_000


@dataclass(slots=True)
class ImportReport:
    dry_run: bool
    subscribers: int = 0
    accounts: int = 0
    opening_entries: int = 0
    opening_total: int = 0
    blocked: int = 0
    links: int = 0
    ips: int = 0
    services_created: int = 0
    tariffs_created: int = 0
    skipped: list[str] = field(default_factory=list)     # logins already in the database
    verifiers_computed: int = 0
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)   # seconds per phase

    def summary(self) -> str:
        head = "dry run, nothing written: would import" if self.dry_run else "imported"
        lines = [f"{head} {self.subscribers} subscriber(s), {self.accounts} account(s),"
                 f" {self.opening_entries} opening balance(s) totalling {format_money(self.opening_total)},"
                 f" {self.links} tariff link(s), {self.ips} IP binding(s),"
                 f" {self.services_created} service(s) and {self.tariffs_created} tariff(s) created,"
                 f" {self.blocked} account(s) blocked for debt; {self.seconds:.1f} s"]
        if self.skipped:
            shown = ", ".join(self.skipped[:10]) + (" …" if len(self.skipped) > 10 else "")
            lines.append(f"skipped {len(self.skipped)} login(s) already in the database: {shown}")
        return "\n".join(lines)


# -- progress ---------------------------------------------------------------

class Progress:
    """One progress line on a terminal (redrawn in place), else a plain
    line every ``interval`` seconds: rate and ETA either way."""

    def __init__(self, stream: IO[str] | None, label: str, total: int, *, interval: float = 5.0,
                 clock: Any = time.monotonic) -> None:
        self.stream, self.label, self.total, self.clock = stream, label, max(total, 0), clock
        self.tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self.interval = 0.1 if self.tty else interval
        self.done = 0
        self.started = self.last = clock()

    def line(self) -> str:
        elapsed = max(self.clock() - self.started, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = "--:--" if left == float("inf") else f"{int(left) // 60}:{int(left) % 60:02d}"
        pct = 100 * self.done / self.total if self.total else 100.0
        bar = ""
        if self.tty:
            filled = int(24 * pct / 100)
            bar = "[" + "#" * filled + "-" * (24 - filled) + "] "
        return f"{self.label} {bar}{self.done:,}/{self.total:,} ({pct:.0f}%) {rate:,.0f}/s ETA {eta}"

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if self.stream is not None and now - self.last >= self.interval:
            self.last = now
            self._write(self.line())

    def finish(self) -> None:
        if self.stream is None:
            return
        elapsed = self.clock() - self.started
        self._write(f"{self.label} {self.done:,}/{self.total:,} done in {elapsed:.1f} s", end=True)

    def _write(self, text: str, end: bool = False) -> None:
        assert self.stream is not None
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if end else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


# -- verifiers --------------------------------------------------------------

def locked_verifier() -> Verifier:
    """A verifier no password matches (random keys): the login exists but
    cannot log in until an administrator sets a password."""
    return Verifier(secrets.token_bytes(SALT_BYTES), DEFAULT_ITERATIONS,
                    secrets.token_bytes(32), secrets.token_bytes(32))


def _make(password: str) -> tuple[bytes, int, bytes, bytes]:
    verifier = make_verifier(password)
    return verifier.salt, verifier.iterations, verifier.stored_key, verifier.server_key


def compute_verifiers(passwords: Sequence[str], *, workers: int, progress: Progress | None) -> list[Verifier]:
    """SCRAM verifiers for cleartext passwords, across ``workers`` processes."""
    if len(passwords) < 64 or workers == 1:
        out = []
        for password in passwords:
            out.append(make_verifier(password))
            if progress:
                progress.advance()
        return out
    import multiprocessing

    chunk = max(1, min(256, len(passwords) // (workers * 8)))
    # spawn: the importer runs threads (asyncio, pgserver), and fork with threads can deadlock
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        result = []
        for fields in pool.map(_make, passwords, chunksize=chunk):
            result.append(Verifier(*fields))
            if progress:
                progress.advance()
    return result


# -- the database part ------------------------------------------------------

async def _db_checks(conn: DbConnection, parsed: Parsed, now: dt.datetime,
                     report: ImportReport) -> tuple[list[Subscriber], dict[str, int]]:
    logins = [subscriber.login for subscriber in parsed.subscribers]
    existing = {row["login"] for row in await conn.fetch(
        "SELECT login FROM users WHERE login = ANY($1::text[])", logins)}
    todo = [subscriber for subscriber in parsed.subscribers if subscriber.login not in existing]
    report.skipped = [subscriber.login for subscriber in parsed.subscribers if subscriber.login in existing]

    ext = [subscriber.contact["external_id"] for subscriber in todo if subscriber.contact.get("external_id")]
    taken = {row["external_id"] for row in await conn.fetch(
        "SELECT external_id FROM users WHERE external_id = ANY($1::text[])", ext)}
    for subscriber in todo:
        if subscriber.contact.get("external_id") in taken:
            parsed.error(subscriber.where,
                         f"external_id {subscriber.contact['external_id']!r} belongs to a user in the database")

    tariffs = {row["name"]: row["id"] for row in await conn.fetch("SELECT id, name FROM tariffs")}
    defined = {tariff["name"] for _, tariff in parsed.tariffs}
    for subscriber in todo:
        for account in subscriber.accounts:
            if account.tariff is not None and account.tariff not in tariffs and account.tariff not in defined:
                parsed.error(subscriber.where, f"unknown tariff {account.tariff!r}")
    services = {row["name"] for row in await conn.fetch("SELECT name FROM services")}
    service_names = services | {service["name"] for _, service in parsed.services}
    for where, tariff in parsed.tariffs:
        names = tariff.get("services", [])
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            parsed.error(where, "services: a list of service names")
            continue
        for name in names:
            if name not in service_names:
                parsed.error(where, f"unknown service {name!r}")

    nets = [(net, subscriber.where) for subscriber in todo for account in subscriber.accounts for net in account.ips]
    if nets:
        clash = await conn.fetch(
            "SELECT p.i, b.prefix::text AS prefix, b.account_id FROM unnest($1::cidr[]) WITH ORDINALITY AS p(net, i)"
            " JOIN ip_bindings b ON b.prefix && p.net AND (b.valid_to IS NULL OR b.valid_to > $2)",
            [net for net, _ in nets], now)
        for row in clash:
            net, where = nets[row["i"] - 1]
            parsed.error(where, f"IP {net} overlaps {row['prefix']} bound to account {row['account_id']}")
    return todo, tariffs


async def _copy(conn: DbConnection, table: str, columns: Sequence[str], records: list[tuple[Any, ...]],
                progress: Progress | None) -> None:
    for start in range(0, len(records), COPY_CHUNK):
        chunk = records[start:start + COPY_CHUNK]
        await conn.copy_records_to_table(table, columns=list(columns), records=chunk)
        if progress:
            progress.advance(len(chunk))


async def _ids(conn: DbConnection, sequence: str, n: int, rehearsal: bool) -> list[int]:
    """``n`` ids for new rows; a rehearsal's are negative and leave the sequence alone."""
    if n == 0:
        return []
    if rehearsal:
        return list(range(-1, -n - 1, -1))
    rows = await conn.fetch("SELECT nextval($1::regclass) AS id FROM generate_series(1, $2)", sequence, n)
    return [row["id"] for row in rows]


async def _create_catalogue(conn: DbConnection, parsed: Parsed, report: ImportReport,
                            tariffs: dict[str, int], rehearsal: bool) -> None:
    """Create the file's services and tariffs; every problem goes to ``parsed.errors``."""
    from datetime import date

    from billcore.billing.tariffs import create_service, create_tariff

    services = {row["name"]: row["id"] for row in await conn.fetch("SELECT id, name FROM services")}
    fake = iter(range(-1, -len(parsed.services) - len(parsed.tariffs) - 1, -1))  # a rehearsal's ids
    for where, service in parsed.services:
        if service["name"] in services:
            continue
        try:
            period = service.get("period")
            if isinstance(period, dict) and isinstance(period.get("anchor"), str):
                period = {**period, "anchor": date.fromisoformat(period["anchor"])}
            fee = parse_money(str(service.get("fee", "0")))
            async with conn.transaction():
                services[service["name"]] = await create_service(
                    conn, service["name"], str(service.get("kind")), fee=fee, period=period,
                    charge_mode=service.get("charge_mode"), comment=str(service.get("comment", "")),
                    row_id=next(fake) if rehearsal else None)
            report.services_created += 1
        except (TariffError, ValueError, TypeError, asyncpg.DataError) as exc:
            parsed.error(where, str(exc))
    for where, tariff in parsed.tariffs:
        if tariff["name"] in tariffs:
            continue
        try:
            async with conn.transaction():
                tariffs[tariff["name"]] = await create_tariff(
                    conn, tariff["name"], [services[name] for name in tariff.get("services", [])],
                    str(tariff.get("comment", "")), row_id=next(fake) if rehearsal else None)
            report.tariffs_created += 1
        except (KeyError, TypeError):
            pass  # services that failed above, are unknown or are not a list: reported already
        except TariffError as exc:
            parsed.error(where, str(exc))


async def _write(conn: DbConnection, todo: list[Subscriber], verifiers: list[Verifier],
                 tariffs: dict[str, int], now: dt.datetime, report: ImportReport, source: str,
                 progress_stream: IO[str] | None) -> None:
    rehearsal = report.dry_run
    n_accounts = sum(len(subscriber.accounts) for subscriber in todo)
    user_ids = await _ids(conn, "users_id_seq", len(todo), rehearsal)
    account_ids = await _ids(conn, "accounts_id_seq", n_accounts, rehearsal)
    users: list[tuple[Any, ...]] = []
    accounts: list[tuple[Any, ...]] = []
    ledger: list[tuple[Any, ...]] = []
    links: list[tuple[Any, ...]] = []
    bindings: list[tuple[Any, ...]] = []
    next_account = iter(account_ids)
    for subscriber, user_id, verifier in zip(todo, user_ids, verifiers, strict=True):
        contact = subscriber.contact
        users.append((user_id, subscriber.login, contact["full_name"], contact["email"], contact["phone"],
                      contact["address"], contact["external_id"],
                      verifier.salt, verifier.iterations, verifier.stored_key, verifier.server_key, now))
        for position, account in enumerate(subscriber.accounts):
            account_id = next(next_account)
            accounts.append((account_id, user_id, position == 0, account.balance, account.credit, now))
            if account.balance:
                ledger.append((account_id, account.balance, account.balance, "correction", "opening balance (import)",
                               f"import:opening:{subscriber.login}:{position}", ACTOR, now))
                report.opening_total += account.balance
            if account.tariff is not None:
                links.append((account_id, tariffs[account.tariff], now, now, ACTOR))
            bindings.extend((account_id, net, "static", ACTOR, now) for net in account.ips)
    # every row gets its id here, so that a rehearsal takes none from the sequences
    for table, rows in (("ledger", ledger), ("account_tariffs", links), ("ip_bindings", bindings)):
        ids = await _ids(conn, f"{table}_id_seq", len(rows), rehearsal)
        rows[:] = [(i, *row) for i, row in zip(ids, rows, strict=True)]
    total = len(users) + len(accounts) + len(ledger) + len(links) + len(bindings)
    progress = Progress(progress_stream, "writing", total)
    await _copy(conn, "users", ("id", "login", "full_name", "email", "phone", "address", "external_id",
                                "scram_salt", "scram_iterations", "scram_stored_key", "scram_server_key",
                                "created_at"), users, progress)
    await _copy(conn, "accounts", ("id", "user_id", "is_basic", "balance", "credit", "created_at"),
                accounts, progress)
    await _copy(conn, "ledger", ("id", "account_id", "amount", "balance_after", "kind", "reference", "idem_key",
                                 "actor", "created_at"), ledger, progress)
    await _copy(conn, "account_tariffs", ("id", "account_id", "tariff_id", "valid_from", "created_at", "created_by"),
                links, progress)
    await _copy(conn, "ip_bindings", ("id", "account_id", "prefix", "kind", "source", "valid_from"), bindings, progress)
    progress.finish()
    # the debt rule of the ledger (new accounts are never unlimited); _assert_invariants checks it in SQL
    debtors = [account[0] for account in accounts if account[3] < -account[4]]
    blocked = await conn.fetchval(
        "WITH b AS (INSERT INTO blocks(id, account_id, kind, reason, set_at, set_by)"
        " SELECT d.id, a.id, 'system', 'balance ' || a.balance || ' below -(credit ' || a.credit"
        " || ' + promised 0)', $3, $4 FROM unnest($1::bigint[], $2::bigint[]) AS d(id, account_id)"
        " JOIN accounts a ON a.id = d.account_id RETURNING 1)"
        " SELECT count(*) FROM b", await _ids(conn, "blocks_id_seq", len(debtors), rehearsal), debtors, now, ACTOR)
    await _assert_invariants(conn, account_ids)
    audit_id, = await _ids(conn, "audit_log_id_seq", 1, rehearsal)
    await conn.execute(
        "INSERT INTO audit_log(id, at, principal_kind, principal_id, principal_login, ip, action, object, after)"
        " VALUES ($5, $1, 'system', 0, $2, '', 'import', $3, $4::jsonb)", now, ACTOR, f"import:{source}",
        json.dumps({"subscribers": len(users), "accounts": len(accounts), "opening_entries": len(ledger),
                    "opening_total": report.opening_total, "links": len(links), "ips": len(bindings)}), audit_id)
    report.subscribers, report.accounts, report.opening_entries = len(users), len(accounts), len(ledger)
    report.links, report.ips, report.blocked = len(links), len(bindings), int(blocked)


async def _assert_invariants(conn: DbConnection, account_ids: list[int]) -> None:
    """What post_charges and sync_system_block guarantee, checked set-wise."""
    bad = await conn.fetchval(
        "SELECT count(*) FROM accounts a LEFT JOIN (SELECT account_id, sum(amount) AS s FROM ledger"
        " WHERE account_id = ANY($1::bigint[]) GROUP BY account_id) l ON l.account_id = a.id"
        " WHERE a.id = ANY($1::bigint[]) AND a.balance <> coalesce(l.s, 0)", account_ids)
    if bad:
        raise InvariantViolation(f"{bad} imported account(s) whose balance is not their ledger sum")
    bad = await conn.fetchval(
        "SELECT count(*) FROM accounts a LEFT JOIN blocks b ON b.account_id = a.id AND b.kind = 'system'"
        " AND b.lifted_at IS NULL WHERE a.id = ANY($1::bigint[])"
        " AND (NOT a.unlimited AND a.balance < -a.credit) <> (b.id IS NOT NULL)", account_ids)
    if bad:
        raise InvariantViolation(f"{bad} imported account(s) whose system block disagrees with the debt rule")


class _Rehearsal(Exception):
    """Raised to roll back a dry run's rehearsal."""


def _detect(path: Path, fmt: str | None) -> str:
    if fmt:
        return fmt
    return "json" if path.suffix.lower() == ".json" else "csv"


async def import_file(conn: DbConnection, path: Path, *, fmt: str | None = None, dry_run: bool = False,
                      workers: int = 0, progress_stream: IO[str] | None = None,
                      now: dt.datetime | None = None) -> ImportReport:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ImportFailed([f"{path}: not UTF-8 ({exc})"]) from None
    return await import_text(conn, text, fmt=_detect(path, fmt), source=path.name, dry_run=dry_run,
                             workers=workers, progress_stream=progress_stream, now=now)


async def import_text(conn: DbConnection, text: str, *, fmt: str, source: str = "stdin",
                      dry_run: bool = False, workers: int = 0, progress_stream: IO[str] | None = None,
                      now: dt.datetime | None = None) -> ImportReport:
    """Validate and import; ``ImportFailed`` (nothing written) on any error."""
    started = time.monotonic()
    now = now or dt.datetime.now(dt.timezone.utc)
    report = ImportReport(dry_run=dry_run)
    parsed = parse_json(text) if fmt == "json" else parse_csv(text)
    check_file(parsed)
    report.phases["parse"] = time.monotonic() - started
    # the rows that parsed are checked against the database even when others did not: one pass
    # lists every error
    todo, tariffs = await _db_checks(conn, parsed, now, report)
    if parsed.errors:
        # the catalogue's own problems too, in a rehearsal that takes no ids; nothing more can be
        # rehearsed (the rows with errors would only add the database's view of the same errors)
        with_catalogue = dict(tariffs)
        try:
            async with conn.transaction():
                await _create_catalogue(conn, parsed, ImportReport(dry_run=True), with_catalogue, rehearsal=True)
                raise _Rehearsal
        except _Rehearsal:
            pass
        raise ImportFailed(sorted_errors(parsed.errors))
    report.phases["check"] = time.monotonic() - started - report.phases["parse"]
    mark = time.monotonic()

    clear = [subscriber.password for subscriber in todo
             if subscriber.password and not subscriber.password.startswith("SCRAM-SHA-256$")]
    if dry_run:
        verifiers = [locked_verifier() for _ in todo]
    else:
        progress = Progress(progress_stream, "passwords", len(clear))
        computed = iter(compute_verifiers(clear, workers=workers or os.cpu_count() or 1,
                                          progress=progress if clear else None))
        if clear:
            progress.finish()
        report.verifiers_computed = len(clear)
        verifiers = [
            Verifier.from_text(subscriber.password) if subscriber.password.startswith("SCRAM-SHA-256$")
            else next(computed) if subscriber.password else locked_verifier()
            for subscriber in todo]
    report.phases["passwords"] = time.monotonic() - mark
    mark = time.monotonic()
    try:
        async with conn.transaction():
            await _create_catalogue(conn, parsed, report, tariffs, rehearsal=dry_run)
            if parsed.errors:
                raise _Rehearsal
            await _write(conn, todo, verifiers, tariffs, now, report, source, progress_stream)
            if dry_run:
                raise _Rehearsal
    except _Rehearsal:
        if parsed.errors:
            raise ImportFailed(sorted_errors(parsed.errors)) from None
    except asyncpg.IntegrityConstraintViolationError as exc:
        raise ImportFailed([f"the database refused the import: {exc}"]) from None
    report.phases["write"] = time.monotonic() - mark
    report.seconds = time.monotonic() - started
    return report


def iter_csv_rows(subscribers: Iterable[dict[str, str]]) -> Iterator[str]:
    """CSV text lines for rows keyed by ``CSV_COLUMNS`` (the benchmark's and tests' writer)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    yield out.getvalue()
    for row in subscribers:
        out.seek(0)
        out.truncate()
        writer.writerow([row.get(column, "") for column in CSV_COLUMNS])
        yield out.getvalue()
