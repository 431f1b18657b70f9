"""Who may log in, as stored in PostgreSQL (schema/0001_principals.sql).

``DatabaseAuth.find_principal(kind, login)`` is the URFA server's auth
backend: an administrator's rights are the union of their groups' rights
plus ``self.otp`` (every operator manages their own second factor), a
system login's rights are its own, and a subscriber gets the fixed ``me.*``
right (what a subscriber may do is decided by the call table, which only
holds ``kinds={"user"}`` calls for them).  Disabled or deleted principals
are not found, exactly like unknown ones.  An operator with a TOTP second
factor is found with ``second_factor`` set; ``check_second_factor`` checks
the code their login's second step brings (``billcore.billing.operators``).

An API token (``billcore.billing.api_tokens``) is principal kind
``token``: ``find_token`` answers a usable token's principal (login = the
token's name, id = its id, rights = its groups' rights, without
``self.otp``) and its expiry, and notes its use in ``last_used_at`` at most
once a minute.  It has no verifier: it never logs in by SCRAM, only through
an HTTP API edge's ``session.token_login``.

The edges (radius, netflow, portal, console, httpapi) log in as system
principals.  On a single machine the core provisions them itself: ``ensure_service_login``
keeps a random password per role in ``<data_dir>/system/<role>.password``
(mode 0600) and its verifier in ``system_logins``; the edge reads the same
file.  A remote collector gets a login made with ``billcore system create``.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg

from urfa.scram import Verifier, make_verifier

from billcore.billing import api_tokens, operators
from billcore.common.api_token import hash_token, well_formed
from billcore.common.sysfiles import read_or_make_password, service_password_file
from billcore.db.pool import DATABASE_GONE
from billcore.db.rows import DbConnection
from billcore.server.sessions import AuthUnavailable, Principal, TokenGrant

__all__ = [
    "DatabaseAuth", "NO_VERIFIER", "OWN_RIGHTS", "SERVICE_RIGHTS", "TOKEN_USE_INTERVAL",
    "USER_RIGHTS", "create_admin", "create_system_login",
    "ensure_service_login", "set_user_password",
]

log = logging.getLogger("billcore.urfa")
USER_RIGHTS = frozenset({"me.*"})
OWN_RIGHTS = frozenset({"self.otp"})   # every operator's, whatever their groups

# What each edge's system login may do.
SERVICE_RIGHTS: dict[str, frozenset[str]] = {
    # outbox.claim: the radius channel's deliveries (Disconnect, rate changes; billcore.api.outbox_calls)
    "radius": frozenset({"radius.*", "events.subscribe", "outbox.claim"}),
    "netflow": frozenset({"netflow.*", "events.subscribe"}),
    "portal": frozenset({"session.proxy"}),
    # the operators' console: relays operators' logins and calls as them; its own link
    # hears the topics its pages refresh on (events.notice: topics.NOTICE_RIGHT) and may
    # read nothing itself
    "console": frozenset({"session.proxy_admin", "events.subscribe", "events.notice"}),
    # the HTTP API: turns API tokens into token sessions and calls as them; reads nothing itself
    "httpapi": frozenset({"session.proxy_token"}),
    # the payment gateways' callback edge: books payments (idempotent by the gateway's transaction id)
    # and finds the account a callback names; reads nothing else
    "paygate": frozenset({"payments.add", "payments.lookup"}),
    # the notify edge: claims and acknowledges email and webhook deliveries (outbox.claim answers it
    # only those channels), hears topic "outbox", and reads webhook secrets to sign with
    "notify": frozenset({"outbox.claim", "events.subscribe", "notify.deliver"}),
}

# A principal that never logs in by SCRAM (a token) has this verifier: no proof matches it.
NO_VERIFIER = Verifier(b"", 0, b"", b"")
TOKEN_USE_INTERVAL = dt.timedelta(minutes=1)   # last_used_at is written at most this often per token


def _verifier(row: asyncpg.Record) -> Verifier:
    return Verifier(
        bytes(row["scram_salt"]), row["scram_iterations"],
        bytes(row["scram_stored_key"]), bytes(row["scram_server_key"]),
    )


class DatabaseAuth:
    """The URFA auth backend over the principal tables."""

    def __init__(self, pool: asyncpg.Pool, wall_clock: Callable[[], float] = time.time) -> None:
        self.pool = pool
        self.wall_clock = wall_clock   # Unix time: TOTP codes are counted from the epoch

    async def check_second_factor(self, principal: Principal, code: str) -> bool:
        """Is ``code`` the operator's next TOTP code or an unused recovery code (used up now)?"""
        t = self.wall_clock()
        try:
            async with self.pool.acquire() as conn:
                return await operators.check_code(conn, principal.id, code, t,
                                                  dt.datetime.fromtimestamp(t, dt.timezone.utc))
        except (*DATABASE_GONE, OSError) as exc:
            raise AuthUnavailable(f"{type(exc).__name__}: {exc}") from None

    async def find_principal(self, kind: str, login: str) -> Principal | None:
        """The enabled principal, ``None``, or ``AuthUnavailable`` while the
        database is down (the login is then answered at once, not timed out)."""
        try:
            return await self._find(kind, login)
        except (*DATABASE_GONE, OSError) as exc:   # only asyncpg does I/O here
            raise AuthUnavailable(f"{type(exc).__name__}: {exc}") from None

    async def find_token(self, token: str) -> TokenGrant | None:
        """The usable (known, not revoked, not expired) token's grant; ``None`` for any other,
        ``AuthUnavailable`` while the database is down."""
        if not well_formed(token):
            return None
        now = dt.datetime.fromtimestamp(self.wall_clock(), dt.timezone.utc)
        try:
            async with self.pool.acquire() as conn:
                found = await api_tokens.find_by_hash(conn, hash_token(token))
                if found is None or not found.usable(now):
                    return None
                if found.last_used_at is None or now - found.last_used_at >= TOKEN_USE_INTERVAL:
                    await api_tokens.touch_used(conn, found.id, now)
        except (*DATABASE_GONE, OSError) as exc:
            raise AuthUnavailable(f"{type(exc).__name__}: {exc}") from None
        left = None if found.expires_at is None else (found.expires_at - now).total_seconds()
        return TokenGrant(Principal("token", found.name, found.id, found.rights, NO_VERIFIER), found.expires_at, left)

    async def note_tokens_used(self, token_ids: list[int]) -> None:
        """``last_used_at`` of tokens whose sessions were called (the service's sweep, at most once a
        minute per token); a database that is away costs the note, logged, never a call."""
        now = dt.datetime.fromtimestamp(self.wall_clock(), dt.timezone.utc)
        try:
            await self.pool.execute("UPDATE api_tokens SET last_used_at = $2 WHERE id = ANY($1::bigint[])",
                                    token_ids, now)
        except (*DATABASE_GONE, OSError) as exc:
            log.warning("last use of API tokens not noted: %s", f"{type(exc).__name__}: {exc}")

    async def accounts_of(self, user_id: int) -> frozenset[int]:
        """A subscriber's account ids (what their event subscriptions may see)."""
        try:
            rows = await self.pool.fetch(
                "SELECT a.id FROM accounts a JOIN users u ON u.id = a.user_id"
                " WHERE a.user_id = $1 AND u.deleted_at IS NULL", user_id)
        except (*DATABASE_GONE, OSError) as exc:
            raise AuthUnavailable(f"{type(exc).__name__}: {exc}") from None
        return frozenset(int(row["id"]) for row in rows)

    async def _find(self, kind: str, login: str) -> Principal | None:
        if kind == "admin":
            row = await self.pool.fetchrow(
                """SELECT a.*, coalesce(array_agg(DISTINCT r) FILTER (WHERE r IS NOT NULL), '{}') AS rights
                     FROM admins a
                     LEFT JOIN admin_group_members m ON m.admin_id = a.id
                     LEFT JOIN admin_groups g ON g.id = m.group_id
                     LEFT JOIN LATERAL unnest(g.rights) r ON true
                    WHERE a.login = $1 AND NOT a.disabled
                    GROUP BY a.id""",
                login,
            )
            if row is None:
                return None
            return Principal("admin", login, row["id"], frozenset(row["rights"]) | OWN_RIGHTS, _verifier(row),
                             second_factor=row["otp_enrolled"])
        if kind == "system":
            row = await self.pool.fetchrow(
                "SELECT * FROM system_logins WHERE login = $1 AND NOT disabled", login
            )
            if row is None:
                return None
            return Principal("system", login, row["id"], frozenset(row["rights"]), _verifier(row))
        if kind == "user":
            row = await self.pool.fetchrow(
                "SELECT * FROM users WHERE login = $1 AND deleted_at IS NULL", login
            )
            if row is None:
                return None
            return Principal("user", login, row["id"], USER_RIGHTS, _verifier(row))
        return None


async def create_admin(
    conn: DbConnection, login: str, password: str, groups: list[str], full_name: str = ""
) -> int:
    """An operator in ``groups`` (``ValueError`` naming an unknown group)."""
    return await operators.create_operator(conn, login, make_verifier(password), groups, full_name)


async def create_system_login(
    conn: DbConnection, login: str, password: str, rights: frozenset[str] | list[str]
) -> int:
    """Create or replace a system login (its password and rights)."""
    verifier = make_verifier(password)
    login_id: int = await conn.fetchval(
        """INSERT INTO system_logins(login, rights, scram_salt, scram_iterations, scram_stored_key, scram_server_key)
           VALUES ($1, $2, $3, $4, $5, $6)
           ON CONFLICT (login) DO UPDATE SET rights = EXCLUDED.rights, scram_salt = EXCLUDED.scram_salt,
               scram_iterations = EXCLUDED.scram_iterations, scram_stored_key = EXCLUDED.scram_stored_key,
               scram_server_key = EXCLUDED.scram_server_key, disabled = false
           RETURNING id""",
        login, sorted(rights), verifier.salt, verifier.iterations, verifier.stored_key, verifier.server_key,
    )
    return login_id


async def set_user_password(conn: DbConnection, user_id: int, password: str) -> None:
    verifier = make_verifier(password)
    await conn.execute(
        """UPDATE users SET scram_salt=$2, scram_iterations=$3, scram_stored_key=$4, scram_server_key=$5
            WHERE id = $1""",
        user_id, verifier.salt, verifier.iterations, verifier.stored_key, verifier.server_key,
    )


async def ensure_service_login(conn: DbConnection, data_dir: Path, role: str) -> None:
    """Make the system login ``role`` match the password file the edge reads."""
    password = read_or_make_password(service_password_file(data_dir, role))
    await create_system_login(conn, role, password, SERVICE_RIGHTS[role])
