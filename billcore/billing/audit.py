"""The audit log: who changed what through URFA, from where, before and after.

Every write call records one row in the same transaction as its change
(the row is append-only, a trigger refuses UPDATE and DELETE).  ``before``
and ``after`` are JSON snapshots; ``jsonable`` turns datetimes and bytes
into strings so any row dict can be stored.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

from billcore.billing.ledger_errors import InvalidValue
from billcore.db.rows import DbConnection

__all__ = ["Who", "account_audit", "jsonable", "record", "query"]

MAX_PAGE = 1000


@dataclass(frozen=True, slots=True)
class Who:
    kind: str
    id: int
    login: str
    ip: str

    @property
    def actor(self) -> str:
        """The short form written into ledger/blocks/payments rows."""
        return f"{self.kind}:{self.login}#{self.id}"


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return value


async def record(conn: DbConnection, who: Who, action: str, obj: str, *,
                 before: Any = None, after: Any = None, now: dt.datetime) -> int:
    return int(await conn.fetchval(
        "INSERT INTO audit_log(at, principal_kind, principal_id, principal_login, ip, action,"
        " object, before, after) VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9::jsonb) RETURNING id",
        now, who.kind, who.id, who.login, who.ip, action, obj,
        None if before is None else json.dumps(jsonable(before)),
        None if after is None else json.dumps(jsonable(after))))


async def query(conn: DbConnection, *, obj: str | None = None, action: str | None = None,
                login: str | None = None, since: dt.datetime | None = None,
                until: dt.datetime | None = None, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
    """Audit rows, newest first, filtered by object, action, principal login and time."""
    if type(limit) is not int or not 1 <= limit <= MAX_PAGE or type(offset) is not int or offset < 0:
        raise InvalidValue(f"limit must be in 1..{MAX_PAGE} and offset non-negative")
    rows = await conn.fetch(
        "SELECT id, at, principal_kind, principal_id, principal_login, ip, action, object,"
        " before::text AS before, after::text AS after FROM audit_log"
        " WHERE ($1::text IS NULL OR object = $1) AND ($2::text IS NULL OR action = $2)"
        " AND ($3::text IS NULL OR principal_login = $3)"
        " AND ($4::timestamptz IS NULL OR at >= $4) AND ($5::timestamptz IS NULL OR at < $5)"
        " ORDER BY id DESC LIMIT $6 OFFSET $7",
        obj, action, login, since, until, limit, offset)
    return _entries(rows)


def _entries(rows: list[Any]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        entry = dict(row)
        entry["before"] = None if entry["before"] is None else json.loads(entry["before"])
        entry["after"] = None if entry["after"] is None else json.loads(entry["after"])
        out.append(entry)
    return out


async def account_audit(conn: DbConnection, account_id: int, user_id: int, *, limit: int,
                        offset: int) -> list[dict[str, Any]]:
    """Audit rows of the account and of its user, newest first.  Each object's rows are read newest
    first from ``audit_object`` (object, id) and merged, so an operator's page costs ``limit + offset``
    index entries per object, not every row of a busy account."""
    if type(limit) is not int or not 1 <= limit <= MAX_PAGE or type(offset) is not int or offset < 0:
        raise InvalidValue(f"limit must be in 1..{MAX_PAGE} and offset non-negative")
    columns = ("id, at, principal_kind, principal_login, ip, action, object, before::text AS before,"
               " after::text AS after")
    newest = "ORDER BY id DESC LIMIT $3::bigint + $4::bigint"
    rows = await conn.fetch(
        f"(SELECT {columns} FROM audit_log WHERE object = $1 {newest})"
        f" UNION ALL (SELECT {columns} FROM audit_log WHERE object = $2 {newest})"
        " ORDER BY id DESC LIMIT $3 OFFSET $4", f"account:{account_id}", f"user:{user_id}", limit, offset)
    return _entries(rows)
