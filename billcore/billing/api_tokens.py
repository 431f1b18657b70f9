"""API tokens (the ``api_tokens`` table): bearer credentials for the HTTP API.

Theory of operation
-------------------
A token (``billcore.common.api_token``: ``bct_`` + 43 characters of 32
random bytes) is stored as its SHA-256 only, so it is shown once (by
``tokens.create``) and a stolen database holds nothing that logs in.

A token acts as a narrow operator: its rights are the union of its admin
groups' rights, read at each token login (``find_by_hash``), like an
operator's at each login.  ``find_by_hash`` answers revoked and expired
tokens too, with their dates, so the login desk decides, with its own
clock, and says nothing more to the caller than ``auth_failed``.

The functions take a connection and values and raise domain errors with
stable codes (``tokens.name``, ``tokens.group``, ``tokens.not_found``,
``tokens.expires``); the call module (``billcore.api.api_tokens``) audits
and ends a revoked token's sessions.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from billcore.billing.ledger_errors import InvalidValue
from billcore.common.api_token import new_token
from billcore.common.errors import BillingError
from billcore.db.rows import DbConnection

__all__ = [
    "MAX_GROUPS", "TokenError", "TokenName", "TokenGroup", "TokenNotFound", "TokenExpires",
    "FoundToken", "check_name", "create_token", "find_by_hash", "list_tokens",
    "revoke_token", "touch_used",
]

MAX_GROUPS = 64
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


class TokenError(BillingError):
    code: ClassVar[str] = "tokens"


class TokenName(InvalidValue):
    """A name that is malformed or already taken."""

    code: ClassVar[str] = "tokens.name"


class TokenGroup(InvalidValue):
    """Groups that are not a list of known admin group names."""

    code: ClassVar[str] = "tokens.group"


class TokenNotFound(TokenError, LookupError):
    code: ClassVar[str] = "tokens.not_found"


class TokenExpires(InvalidValue):
    """An expiry that is not a time in the future."""

    code: ClassVar[str] = "tokens.expires"


@dataclass(frozen=True, slots=True)
class FoundToken:
    """A token as a login sees it (revoked or expired ones too: the desk decides)."""

    id: int
    name: str
    rights: frozenset[str]
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    last_used_at: dt.datetime | None

    def usable(self, now: dt.datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


def check_name(name: object) -> str:
    if type(name) is not str or _NAME.fullmatch(name) is None:
        shown = repr(name[:40]) + ("..." if len(name) > 40 else "") if isinstance(name, str) else type(name).__name__
        raise TokenName(f"a token name is 1 to 64 characters of A-Z a-z 0-9 . _ - (got {shown})")
    return name


def _check_expiry(expires_at: object, now: dt.datetime) -> dt.datetime | None:
    if expires_at is None:
        return None
    if not isinstance(expires_at, dt.datetime) or expires_at.tzinfo is None:
        raise TokenExpires("expires_at must be a time with a zone")
    if expires_at <= now:
        raise TokenExpires(f"expires_at {expires_at.isoformat()} is not in the future")
    return expires_at


async def _check_groups(conn: DbConnection, groups: object) -> list[str]:
    if type(groups) is not list or not groups or len(groups) > MAX_GROUPS \
            or any(type(group) is not str for group in groups):
        raise TokenGroup(f"groups must be a list of 1 to {MAX_GROUPS} admin group names")
    known = {row["name"] for row in await conn.fetch("SELECT name FROM admin_groups")}
    unknown = sorted(set(groups) - known)
    if unknown:
        shown = ", ".join(repr(group[:64]) for group in unknown[:5])
        raise TokenGroup(f"unknown admin group(s): {shown} (known: {', '.join(sorted(known))})")
    return sorted(set(groups))


_COLUMNS = "id, name, groups, created_by, created_at, expires_at, revoked_at, last_used_at"


def _listed(row: Any) -> dict[str, Any]:
    return {"id": row["id"], "name": row["name"], "groups": list(row["groups"]), "created_by": row["created_by"],
            "created_at": row["created_at"], "expires_at": row["expires_at"], "revoked_at": row["revoked_at"],
            "last_used_at": row["last_used_at"]}


async def create_token(conn: DbConnection, name: object, groups: object, expires_at: object, *,
                       created_by: str, now: dt.datetime) -> dict[str, Any]:
    """Store a new token; its row with the token itself (``token``), which is never stored."""
    name = check_name(name)
    expiry = _check_expiry(expires_at, now)
    group_names = await _check_groups(conn, groups)
    token, secret_hash = new_token()
    row = await conn.fetchrow(
        f"""INSERT INTO api_tokens(name, groups, secret_hash, created_by, created_at, expires_at)
            VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO NOTHING RETURNING {_COLUMNS}""",
        name, group_names, secret_hash, created_by, now, expiry)
    if row is None:
        raise TokenName(f"a token named {name!r} exists (revoked tokens keep their names)")
    return {"id": row["id"], "name": row["name"], "groups": list(row["groups"]), "token": token,
            "created_at": row["created_at"], "expires_at": row["expires_at"]}


async def list_tokens(conn: DbConnection, limit: int, offset: int) -> list[dict[str, Any]]:
    rows = await conn.fetch(f"SELECT {_COLUMNS} FROM api_tokens ORDER BY id LIMIT $1 OFFSET $2", limit, offset)
    return [_listed(row) for row in rows]


async def get_token(conn: DbConnection, token_id: int) -> dict[str, Any]:
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM api_tokens WHERE id = $1", token_id)
    if row is None:
        raise TokenNotFound(f"no token {token_id}")
    return _listed(row)


async def revoke_token(conn: DbConnection, token_id: int, now: dt.datetime) -> tuple[dict[str, Any], dict[str, Any]]:
    """Revoke (in the caller's transaction; revoking twice keeps the first date); (before, after)."""
    before = await get_token(conn, token_id)
    after = await conn.fetchrow(f"UPDATE api_tokens SET revoked_at = coalesce(revoked_at, $2) WHERE id = $1"
                                f" RETURNING {_COLUMNS}", token_id, now)
    return before, _listed(after)


async def find_by_hash(conn: DbConnection, secret_hash: bytes) -> FoundToken | None:
    """The token with this hash, with the rights of its groups now; ``None`` if there is none."""
    row = await conn.fetchrow(
        """SELECT t.id, t.name, t.expires_at, t.revoked_at, t.last_used_at,
                  coalesce(array_agg(DISTINCT r) FILTER (WHERE r IS NOT NULL), '{}') AS rights
             FROM api_tokens t
             LEFT JOIN admin_groups g ON g.name = ANY(t.groups)
             LEFT JOIN LATERAL unnest(g.rights) r ON true
            WHERE t.secret_hash = $1
            GROUP BY t.id""", secret_hash)
    if row is None:
        return None
    return FoundToken(row["id"], row["name"], frozenset(row["rights"]), row["expires_at"], row["revoked_at"],
                      row["last_used_at"])


async def touch_used(conn: DbConnection, token_id: int, now: dt.datetime) -> None:
    await conn.execute("UPDATE api_tokens SET last_used_at = $2 WHERE id = $1", token_id, now)
