"""Operators (the ``admins`` table): groups, passwords, and their TOTP second factor.

Theory of operation
-------------------
An operator's rights are the union of the rights of their groups
(``admin_groups``, the role templates of schema/0012_operators.sql).  The
functions here take a connection and values and raise domain errors; the
call module (``billcore.api.operators``) audits and ends sessions.

Two rules keep a core administrable: nobody may disable themselves, and the
last enabled operator holding every right (``*``) cannot be disabled or
lose that group.  Every change that could break the second rule runs under
one transaction-scoped advisory lock, so two operators demoting each other
at once cannot both succeed.

The second factor: ``begin_otp`` parks a new secret; ``confirm_otp`` takes
a code from the operator's app, moves the secret into place and hands out
ten single-use recovery codes (only their SHA-256 is kept).
``check_code`` is what a login's second step and ``disable_otp`` ask: a
6-digit TOTP code of a step later than the last one accepted (stored, so a
code counts once), or an unused recovery code (then marked used).  The
admin's row is locked while a code is checked, so one code cannot open two
sessions racing each other.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from typing import Any, ClassVar

from billcore.billing.ledger_errors import InvalidValue
from billcore.common.errors import BillingError
from billcore.common.totp import match_step, new_secret
from billcore.db.rows import DbConnection
from urfa.scram import Verifier

__all__ = [
    "LastSuperuser", "OperatorError", "OtpRefused", "OtpState", "SelfDisable", "UnknownGroup", "UnknownOperator",
    "RECOVERY_CODES", "begin_otp", "check_code", "confirm_otp", "create_operator", "disable_otp", "edit_operator",
    "get_operator", "list_operators", "new_recovery_codes", "reset_otp", "roles", "set_disabled", "set_verifier",
]

RECOVERY_CODES = 10
MAX_ROLES = 1000   # groups listed by roles(): made by hand, never near this
_RECOVERY_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"   # base32's, in lower case: no 0/1/8 to misread
_LOCK = 0x6F706572   # "oper": changes that could remove the last superuser


class OperatorError(BillingError):
    code: ClassVar[str] = "operators"


class UnknownOperator(OperatorError, LookupError):
    code: ClassVar[str] = "operators.unknown"


class UnknownGroup(InvalidValue):
    code: ClassVar[str] = "operators.unknown_group"


class SelfDisable(OperatorError):
    """An operator tried to disable themselves."""

    code: ClassVar[str] = "operators.self"


class LastSuperuser(OperatorError):
    """The change would leave no enabled operator holding every right."""

    code: ClassVar[str] = "operators.last_superuser"


class OtpState(OperatorError):
    """The second factor is not in the state the call needs (enrolled, or being enrolled)."""

    code: ClassVar[str] = "operators.otp_state"


class OtpRefused(OperatorError):
    """A wrong one-time code."""

    code: ClassVar[str] = "operators.otp_code"


_SELECT = """
SELECT a.id, a.login, a.full_name, a.disabled, a.otp_enrolled, a.created_at,
       coalesce(array_agg(g.name ORDER BY g.name) FILTER (WHERE g.name IS NOT NULL), '{}') AS groups
  FROM admins a
  LEFT JOIN admin_group_members m ON m.admin_id = a.id
  LEFT JOIN admin_groups g ON g.id = m.group_id
"""


def _operator(row: Any) -> dict[str, Any]:
    return {"id": row["id"], "login": row["login"], "full_name": row["full_name"], "disabled": row["disabled"],
            "groups": list(row["groups"]), "otp_enrolled": row["otp_enrolled"], "created_at": row["created_at"]}


async def roles(conn: DbConnection) -> list[dict[str, Any]]:
    rows = await conn.fetch("SELECT name, description, rights FROM admin_groups ORDER BY name LIMIT $1", MAX_ROLES)
    return [{"name": row["name"], "description": row["description"], "rights": sorted(row["rights"])}
            for row in rows]


async def list_operators(conn: DbConnection, limit: int, offset: int) -> list[dict[str, Any]]:
    rows = await conn.fetch(_SELECT + " GROUP BY a.id ORDER BY a.login LIMIT $1 OFFSET $2", limit, offset)
    return [_operator(row) for row in rows]


async def get_operator(conn: DbConnection, admin_id: int) -> dict[str, Any]:
    row = await conn.fetchrow(_SELECT + " WHERE a.id = $1 GROUP BY a.id", admin_id)
    if row is None:
        raise UnknownOperator(f"no operator {admin_id}")
    return _operator(row)


async def _group_ids(conn: DbConnection, groups: list[str]) -> list[int]:
    if type(groups) is not list or any(type(group) is not str for group in groups):
        raise InvalidValue("groups must be a list of group names")
    known = {row["name"]: row["id"] for row in await conn.fetch("SELECT id, name FROM admin_groups")}
    unknown = sorted(set(groups) - set(known))
    if unknown:
        raise UnknownGroup(f"unknown admin group(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return sorted({known[group] for group in groups})


async def _set_groups(conn: DbConnection, admin_id: int, groups: list[str]) -> None:
    group_ids = await _group_ids(conn, groups)
    await conn.execute("DELETE FROM admin_group_members WHERE admin_id = $1", admin_id)
    await conn.executemany("INSERT INTO admin_group_members(admin_id, group_id) VALUES ($1, $2)",
                           [(admin_id, group_id) for group_id in group_ids])


async def _superusers_left(conn: DbConnection) -> int:
    """Enabled operators in a group holding every right."""
    return int(await conn.fetchval(
        """SELECT count(DISTINCT a.id) FROM admins a
             JOIN admin_group_members m ON m.admin_id = a.id
             JOIN admin_groups g ON g.id = m.group_id
            WHERE NOT a.disabled AND '*' = ANY(g.rights)"""))


async def create_operator(conn: DbConnection, login: str, verifier: Verifier, groups: list[str],
                          full_name: str = "") -> int:
    async with conn.transaction():
        group_ids = await _group_ids(conn, groups)
        admin_id: int = await conn.fetchval(
            """INSERT INTO admins(login, full_name, scram_salt, scram_iterations, scram_stored_key, scram_server_key)
               VALUES ($1, $2, $3, $4, $5, $6) RETURNING id""",
            login, full_name, verifier.salt, verifier.iterations, verifier.stored_key, verifier.server_key,
        )
        await conn.executemany("INSERT INTO admin_group_members(admin_id, group_id) VALUES ($1, $2)",
                               [(admin_id, group_id) for group_id in group_ids])
    return admin_id


async def edit_operator(conn: DbConnection, admin_id: int, *, full_name: str | None = None,
                        groups: list[str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Change the name and/or replace the groups (in the caller's transaction); (before, after)."""
    await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK)
    before = await get_operator(conn, admin_id)
    if full_name is not None:
        if type(full_name) is not str or len(full_name) > 256:
            raise InvalidValue("full_name must be a string of at most 256 characters")
        await conn.execute("UPDATE admins SET full_name = $2 WHERE id = $1", admin_id, full_name)
    if groups is not None:
        await _set_groups(conn, admin_id, groups)
        if await _superusers_left(conn) == 0:
            raise LastSuperuser("this would leave no enabled operator with every right")
    return before, await get_operator(conn, admin_id)


async def set_disabled(conn: DbConnection, admin_id: int, disabled: bool, *,
                       by: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Disable or enable (in the caller's transaction); ``by``: the operator asking."""
    if disabled and by == admin_id:
        raise SelfDisable("an operator may not disable themselves")
    await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK)
    before = await get_operator(conn, admin_id)
    await conn.execute("UPDATE admins SET disabled = $2 WHERE id = $1", admin_id, disabled)
    if disabled and await _superusers_left(conn) == 0:
        raise LastSuperuser("this would leave no enabled operator with every right")
    return before, await get_operator(conn, admin_id)


async def set_verifier(conn: DbConnection, admin_id: int, verifier: Verifier) -> None:
    status = await conn.execute(
        """UPDATE admins SET scram_salt=$2, scram_iterations=$3, scram_stored_key=$4, scram_server_key=$5
            WHERE id = $1""",
        admin_id, verifier.salt, verifier.iterations, verifier.stored_key, verifier.server_key,
    )
    if status.endswith(" 0"):
        raise UnknownOperator(f"no operator {admin_id}")


# -- the second factor ----------------------------------------------------

def _normalised(code: str) -> str:
    return "".join(code.split()).replace("-", "").lower()


def _code_hash(code: str) -> bytes:
    return hashlib.sha256(_normalised(code).encode()).digest()


def new_recovery_codes(n: int = RECOVERY_CODES) -> list[str]:
    """``n`` codes of 80 random bits each, as ``abcd-efgh-ijkm-npqr``."""
    codes = []
    for _ in range(n):
        text = "".join(secrets.choice(_RECOVERY_ALPHABET) for _ in range(16))
        codes.append("-".join(text[i:i + 4] for i in range(0, 16, 4)))
    return codes


async def reset_otp(conn: DbConnection, admin_id: int) -> None:
    """Remove the second factor (and its recovery codes, and any enrolment under way)."""
    status = await conn.execute(
        """UPDATE admins SET otp_secret = NULL, otp_enrolled = false, otp_last_step = 0, otp_pending_secret = NULL
            WHERE id = $1""", admin_id)
    if status.endswith(" 0"):
        raise UnknownOperator(f"no operator {admin_id}")
    await conn.execute("DELETE FROM admin_recovery_codes WHERE admin_id = $1", admin_id)


async def begin_otp(conn: DbConnection, admin_id: int) -> bytes:
    """A new secret waiting for its first code; refused while a second factor is enrolled."""
    secret = new_secret()
    status = await conn.execute(
        "UPDATE admins SET otp_pending_secret = $2 WHERE id = $1 AND NOT otp_enrolled", admin_id, secret)
    if status.endswith(" 0"):
        raise OtpState("a second factor is enrolled: disable it first")
    return secret


async def confirm_otp(conn: DbConnection, admin_id: int, code: str, t: float, now: dt.datetime) -> list[str]:
    """Enrol the pending secret if ``code`` is its current code (in the caller's transaction); the recovery codes."""
    row = await conn.fetchrow(
        "SELECT otp_pending_secret, otp_enrolled FROM admins WHERE id = $1 FOR UPDATE", admin_id)
    if row is None or row["otp_enrolled"] or row["otp_pending_secret"] is None:
        raise OtpState("no enrolment under way: call self.otp_begin first")
    secret = bytes(row["otp_pending_secret"])
    step = match_step(secret, code, t, last_step=0)
    if step is None:
        raise OtpRefused("wrong code: check the clock of the device")
    await conn.execute(
        """UPDATE admins SET otp_secret = $2, otp_enrolled = true, otp_last_step = $3, otp_pending_secret = NULL
            WHERE id = $1""", admin_id, secret, step)
    codes = new_recovery_codes()
    await conn.execute("DELETE FROM admin_recovery_codes WHERE admin_id = $1", admin_id)
    await conn.executemany(
        "INSERT INTO admin_recovery_codes(admin_id, code_hash, created_at) VALUES ($1, $2, $3)",
        [(admin_id, _code_hash(code), now) for code in codes])
    return codes


async def check_code(conn: DbConnection, admin_id: int, code: str, t: float, now: dt.datetime) -> bool:
    """True when ``code`` is the enrolled operator's next TOTP code or an unused recovery code
    (which it uses up).  Runs in its own transaction: the admin's row stays locked until the step is stored."""
    if type(code) is not str or not 1 <= len(code) <= 64:
        return False
    async with conn.transaction():
        row = await conn.fetchrow(
            "SELECT otp_secret, otp_enrolled, otp_last_step FROM admins WHERE id = $1 FOR UPDATE", admin_id)
        if row is None or not row["otp_enrolled"]:
            return False
        step = match_step(bytes(row["otp_secret"]), code, t, last_step=row["otp_last_step"])
        if step is not None:
            await conn.execute("UPDATE admins SET otp_last_step = $2 WHERE id = $1", admin_id, step)
            return True
        used = await conn.fetchval(
            """UPDATE admin_recovery_codes SET used_at = $3
                WHERE admin_id = $1 AND code_hash = $2 AND used_at IS NULL RETURNING 1""",
            admin_id, _code_hash(code), now)
        return used is not None


async def disable_otp(conn: DbConnection, admin_id: int, code: str, t: float, now: dt.datetime) -> None:
    """Remove one's own second factor, proving it with a code."""
    if not await conn.fetchval("SELECT otp_enrolled FROM admins WHERE id = $1", admin_id):
        raise OtpState("no second factor is enrolled")
    if not await check_code(conn, admin_id, code, t, now):
        raise OtpRefused("wrong code")
    await reset_otp(conn, admin_id)
