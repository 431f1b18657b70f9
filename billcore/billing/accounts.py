"""Subscribers (users) and their accounts.

Theory of operation
-------------------
A user logs in with a SCRAM verifier (never a password) and owns accounts;
``create_user`` also opens the *basic* account (a partial unique index
keeps one per user).  Deleting a user is a soft delete (``deleted_at``): the
ledger must keep referring to its accounts.

Account settings that change the debt rule — credit and the unlimited flag —
lock the account and re-sync its system block in the same transaction, and
return the block change for the caller to publish after commit.  Every
write returns ``(before, after)`` snapshots for the audit log.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from billcore.billing.blocks import BlockChange, sync_system_block
from billcore.common.errors import InvariantViolation
from billcore.billing.ledger import lock_accounts, utcnow
from billcore.billing.ledger_errors import (
    AmountError, InvalidValue, LoginTaken, UnknownAccount, UnknownUser,
)
from billcore.common.money import MAX_AMOUNT, format_money
from billcore.db.rows import DbConnection, expect_row
from urfa.scram import Verifier

__all__ = [
    "USER_FIELDS",
    "AccountChange",
    "create_user",
    "edit_user",
    "delete_user",
    "get_user",
    "search_users",
    "text_match",
    "users_at_ip",
    "set_verifier",
    "create_account",
    "get_account",
    "user_accounts",
    "edit_account",
]

USER_FIELDS = ("full_name", "email", "phone", "address", "external_id")
MAX_FIELD = 1000
MAX_CREDIT = 10**13
MAX_PAGE = 1000
_LOGIN = re.compile(r"[A-Za-z0-9_.@+-]{1,128}", re.ASCII)
_USER_COLS = "id, login, full_name, email, phone, address, external_id, created_at, deleted_at"
_ACCOUNT_COLS = "id, user_id, is_basic, balance, credit, vat_bp, unlimited, status, created_at"


@dataclass(frozen=True, slots=True)
class AccountChange:
    before: dict[str, Any]
    after: dict[str, Any]
    block_changes: tuple[BlockChange, ...]


def check_login(login: object) -> str:
    if type(login) is not str or not _LOGIN.fullmatch(login):
        raise InvalidValue("login: 1..128 characters of letters, digits and _ . @ + -")
    return login


def _check_fields(fields: dict[str, Any]) -> dict[str, Any]:
    for name, value in fields.items():
        if name not in USER_FIELDS:
            raise InvalidValue(f"unknown user field {name!r} (known: {', '.join(USER_FIELDS)})")
        if name == "external_id" and value is None:
            continue
        if type(value) is not str or len(value) > MAX_FIELD:
            raise InvalidValue(f"{name} must be a string of at most {MAX_FIELD} characters")
    return fields


def check_page(limit: object, offset: object) -> tuple[int, int]:
    if type(limit) is not int or not 1 <= limit <= MAX_PAGE:
        raise InvalidValue(f"limit must be an int in 1..{MAX_PAGE}")
    if type(offset) is not int or not 0 <= offset <= 10**9:
        raise InvalidValue("offset must be a non-negative int")
    return limit, offset


def _check_credit(credit: object) -> int:
    if type(credit) is not int or not 0 <= credit <= MAX_CREDIT:
        raise AmountError(f"credit must be an amount within 0..{format_money(MAX_CREDIT)}")
    return credit


def _check_vat(vat_bp: object) -> int:
    if type(vat_bp) is not int or not 0 <= vat_bp <= 10_000:
        raise InvalidValue("vat_bp must be an int of basis points in 0..10000")
    return vat_bp


async def create_user(conn: DbConnection, login: str, verifier: Verifier, *,
                      same_password: Callable[[bytes, int, bytes], bool] | None = None,
                      **fields: Any) -> dict[str, Any]:
    """Create a user and its basic account; returns the user with ``basic_account_id`` and
    ``created``.

    Idempotent by ``external_id``, as payments are: when a live user already has it, with the same
    login and contact fields and a password that ``same_password(salt, iterations, stored_key)``
    says is theirs, that user is the answer (``created`` false, nothing written) — a CRM's retried
    request makes one subscriber.  Anything different is ``LoginTaken``."""
    check_login(login)
    _check_fields(fields)
    try:
        async with conn.transaction():
            cols = list(fields)
            row = await conn.fetchrow(
                f"INSERT INTO users(login, scram_salt, scram_iterations, scram_stored_key,"
                f" scram_server_key{''.join(', ' + c for c in cols)})"
                f" VALUES ($1, $2, $3, $4, $5{''.join(f', ${i + 6}' for i in range(len(cols)))})"
                f" RETURNING {_USER_COLS}",
                login, verifier.salt, verifier.iterations, verifier.stored_key, verifier.server_key,
                *fields.values())
            user = expect_row(row, "new user")
            basic_account_id = await conn.fetchval(
                "INSERT INTO accounts(user_id, is_basic) VALUES ($1, true) RETURNING id", user["id"])
    except asyncpg.UniqueViolationError as exc:
        # both the login and the external id are taken by a retried request: whichever PostgreSQL
        # names, the external id decides whether it is the same subscriber
        again = await _same_user(conn, login, fields, same_password)
        if again is not None:
            return again
        # the constraint's name says which (users_login_key, users_external_id_key); only that word
        # leaves the core, never the database's own names
        taken = "external id" if "external_id" in (exc.constraint_name or "") else "login"
        raise LoginTaken(f"{taken} already taken") from None
    return {**dict(user), "basic_account_id": basic_account_id, "created": True}


async def _same_user(conn: DbConnection, login: str, fields: dict[str, Any],
                     same_password: Callable[[bytes, int, bytes], bool] | None) -> dict[str, Any] | None:
    """The live user holding ``fields``' external id, when a retried create describes them exactly."""
    external_id = fields.get("external_id")
    if external_id is None or same_password is None:
        return None
    row = await conn.fetchrow(
        f"SELECT {_USER_COLS}, scram_salt, scram_iterations, scram_stored_key,"
        " (SELECT id FROM accounts WHERE user_id = users.id AND is_basic) AS basic_account_id"
        " FROM users WHERE external_id = $1 AND deleted_at IS NULL", external_id)
    if row is None or row["login"] != login or any(row[key] != value for key, value in fields.items()):
        return None
    if not same_password(bytes(row["scram_salt"]), row["scram_iterations"], bytes(row["scram_stored_key"])):
        return None
    user = {key: row[key] for key in _USER_COLS.split(", ")}
    return {**user, "basic_account_id": row["basic_account_id"], "created": False}


async def get_user(conn: DbConnection, user_id: int, *, include_deleted: bool = False) -> dict[str, Any]:
    if type(user_id) is not int:
        raise InvalidValue("user id must be an int")
    row = await conn.fetchrow(f"SELECT {_USER_COLS} FROM users WHERE id = $1", user_id)
    if row is None or (row["deleted_at"] is not None and not include_deleted):
        raise UnknownUser(f"user {user_id} does not exist")
    return dict(row)


async def edit_user(conn: DbConnection, user_id: int, **fields: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Change contact fields; returns (before, after)."""
    _check_fields(fields)
    if not fields:
        raise InvalidValue("nothing to change")
    try:
        async with conn.transaction():
            before = await conn.fetchrow(
                f"SELECT {_USER_COLS} FROM users WHERE id = $1 AND deleted_at IS NULL FOR UPDATE", user_id)
            if before is None:
                raise UnknownUser(f"user {user_id} does not exist")
            sets = ", ".join(f"{column} = ${i + 2}" for i, column in enumerate(fields))
            after = await conn.fetchrow(
                f"UPDATE users SET {sets} WHERE id = $1 RETURNING {_USER_COLS}", user_id, *fields.values())
    except asyncpg.UniqueViolationError:
        raise LoginTaken("external id already taken") from None
    return dict(before), dict(expect_row(after, f"user {user_id}"))


async def set_verifier(conn: DbConnection, user_id: int, verifier: Verifier) -> None:
    """Store a new SCRAM verifier (password change)."""
    done = await conn.fetchval(
        "UPDATE users SET scram_salt = $2, scram_iterations = $3, scram_stored_key = $4,"
        " scram_server_key = $5 WHERE id = $1 AND deleted_at IS NULL RETURNING id",
        user_id, verifier.salt, verifier.iterations, verifier.stored_key, verifier.server_key)
    if done is None:
        raise UnknownUser(f"user {user_id} does not exist")


async def delete_user(conn: DbConnection, user_id: int, *, now: dt.datetime | None = None,
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Soft delete; returns (before, after).  Deleting twice is ``UnknownUser``."""
    async with conn.transaction():
        before = await get_user(conn, user_id)
        after = await conn.fetchrow(
            f"UPDATE users SET deleted_at = $2 WHERE id = $1 RETURNING {_USER_COLS}",
            user_id, now or utcnow())
    return before, dict(expect_row(after, f"user {user_id}"))


# users.search: the per-column ILIKE decides what matches; with 3 or more
# characters the trigram index of schema 0011 (``billcore_user_grams``)
# narrows the rows first, so a search over a million users reads a few
# index pages instead of every row.  Shorter texts scan (ordered by id, so
# a common match stops early).  An IP address also finds the users whose
# binding holds it, through the bindings' GiST index.
SEARCH_COLUMNS = ("login", "full_name", "email", "phone", "address", "coalesce({}external_id, '')")
# the total is counted up to here: counting every match of "a" among a
# million users costs a second and tells the operator nothing more
MAX_COUNTED = 10_000


def text_match(text: str, arg: Callable[[Any], str], table: str = "", grams: bool | list[str] = True) -> str:
    """The condition "a users row (``table``: its alias and a dot) contains ``text``";
    ``arg(value)`` adds an argument and returns its placeholder.  ``grams``: through the trigram
    index (3 characters or more), asking it for every trigram of the text or for the ones listed (a
    subset of ``billcore_grams(text)``: the rows are re-checked, so it only narrows less); without,
    the row's own columns are checked, the cheap way for a row that is read anyway (computing the
    row's trigrams costs a millisecond's fraction each)."""
    pattern = arg("%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
    columns = [column.format(table) if "{}" in column else table + column for column in SEARCH_COLUMNS]
    match = "(" + " OR ".join(f"{column} ILIKE {pattern}" for column in columns) + ")"
    if len(text) < 3 or not grams:
        return match
    index = (f"billcore_user_grams({table}login, {table}full_name, {table}email, {table}phone, {table}address,"
             f" {table}external_id) @> "
             + (f"{arg(grams)}::text[]" if isinstance(grams, list) else f"billcore_grams({arg(text)})"))
    return f"({index} AND {match})"


def search_query(text: str, include_deleted: bool, at_ip: list[int] | None) -> tuple[str, list[Any]]:
    """The WHERE clause of ``search_users`` over ``users`` and its arguments ($1, $2, …)."""
    args: list[Any] = []

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    match = text_match(text, arg) if text else "true"
    if at_ip is not None:
        match = f"({match} OR id = ANY({arg(at_ip)}::bigint[]))"
    return f"{match} AND ({arg(include_deleted)}::bool OR deleted_at IS NULL)", args


async def users_at_ip(conn: DbConnection, text: str) -> list[int] | None:
    """Users with a binding holding the address ``text`` (at any time); None if it is no address."""
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    return [row["user_id"] for row in await conn.fetch(
        "SELECT DISTINCT a.user_id FROM ip_bindings b JOIN accounts a ON a.id = b.account_id"
        " WHERE b.prefix >>= $1::inet LIMIT $2", str(address), MAX_COUNTED)]


async def search_users(conn: DbConnection, text: str = "", *, limit: int = 50, offset: int = 0,
                       include_deleted: bool = False) -> dict[str, Any]:
    """Users whose login, name, e-mail, phone, address or external id contains
    ``text`` (case-insensitive), or whose IP binding holds it;
    ``{"total", "total_capped", "users"}``, ordered by id.  ``total`` counts
    up to ``MAX_COUNTED``; ``total_capped`` says there are more."""
    if type(text) is not str or len(text) > 200:
        raise InvalidValue("search text must be a string of at most 200 characters")
    check_page(limit, offset)
    at_ip = await users_at_ip(conn, text) if text else None
    where, args = search_query(text, bool(include_deleted), at_ip)
    total = await conn.fetchval(
        f"SELECT count(*) FROM (SELECT 1 FROM users WHERE {where} LIMIT {MAX_COUNTED + 1}) s", *args)
    rows = await conn.fetch(
        f"SELECT {_USER_COLS} FROM users WHERE {where} ORDER BY id"
        f" LIMIT ${len(args) + 1} OFFSET ${len(args) + 2}", *args, limit, offset)
    return {"total": min(total, MAX_COUNTED), "total_capped": total > MAX_COUNTED,
            "users": [dict(row) for row in rows]}


async def create_account(conn: DbConnection, user_id: int, *, credit: int = 0, vat_bp: int = 0,
                         unlimited: bool = False) -> dict[str, Any]:
    """Open a further (non-basic) account for a live user."""
    _check_credit(credit)
    _check_vat(vat_bp)
    if type(unlimited) is not bool:
        raise InvalidValue("unlimited must be a bool")
    async with conn.transaction():
        await get_user(conn, user_id)
        row = await conn.fetchrow(
            f"INSERT INTO accounts(user_id, credit, vat_bp, unlimited) VALUES ($1, $2, $3, $4)"
            f" RETURNING {_ACCOUNT_COLS}", user_id, credit, vat_bp, unlimited)
    return dict(expect_row(row, "new account"))


async def get_account(conn: DbConnection, account_id: int) -> dict[str, Any]:
    if type(account_id) is not int:
        raise InvalidValue("account id must be an int")
    row = await conn.fetchrow(f"SELECT {_ACCOUNT_COLS} FROM accounts WHERE id = $1", account_id)
    if row is None:
        raise UnknownAccount(f"account {account_id} does not exist")
    return dict(row)


async def user_accounts(conn: DbConnection, user_id: int, *, limit: int = MAX_PAGE,
                        offset: int = 0) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        f"SELECT {_ACCOUNT_COLS} FROM accounts WHERE user_id = $1 ORDER BY id LIMIT $2 OFFSET $3",
        user_id, limit, offset)
    return [dict(row) for row in rows]


async def edit_account(conn: DbConnection, account_id: int, *, actor: str,
                       now: dt.datetime | None = None, credit: int | None = None,
                       vat_bp: int | None = None, unlimited: bool | None = None) -> AccountChange:
    """Change credit, VAT rate or the unlimited flag; re-syncs the system block."""
    changes: dict[str, Any] = {}
    if credit is not None:
        changes["credit"] = _check_credit(credit)
    if vat_bp is not None:
        changes["vat_bp"] = _check_vat(vat_bp)
    if unlimited is not None:
        if type(unlimited) is not bool:
            raise InvalidValue("unlimited must be a bool")
        changes["unlimited"] = unlimited
    if not changes:
        raise InvalidValue("nothing to change")
    if type(account_id) is not int:
        raise InvalidValue("account id must be an int")
    async with conn.transaction():
        await lock_accounts(conn, [account_id])
        before = await get_account(conn, account_id)
        sets = ", ".join(f"{column} = ${i + 2}" for i, column in enumerate(changes))
        after = expect_row(await conn.fetchrow(
            f"UPDATE accounts SET {sets} WHERE id = $1 RETURNING {_ACCOUNT_COLS}",
            account_id, *changes.values()), f"account {account_id}")
        if after["balance"] != before["balance"] or not -MAX_AMOUNT <= after["balance"] <= MAX_AMOUNT:
            raise InvariantViolation("editing settings changed the balance")
        change = await sync_system_block(conn, account_id, actor=actor, now=now or utcnow())
    return AccountChange(before, dict(after), (change,) if change else ())
