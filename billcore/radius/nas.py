"""The NAS table and the address side: NAS devices, IP pools and the
subscribers' RADIUS links, as operators manage them.

Secrets and passwords are sealed (``SecretStore``) before they reach the
database.  A NAS or link with active sessions is deleted only with ``force``,
which ends them first (``end_sessions``: bindings, leases).  Column names in
an UPDATE come from the field tables here, never from the caller.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any, Final

from billcore.billing.ledger_errors import InvalidValue
from billcore.common.errors import InUse, UnknownObject
from billcore.db.rows import DbConnection
from billcore.radius.records import DisconnectMode, EndReason, Link, Nas, Pool
from billcore.radius.secrets import SecretStore
from billcore.radius.sessions import PAGE, WATERMARK_HORIZON, end_sessions, keep_watermarks, locked_active

__all__ = ["add_nas", "nas_list", "edit_nas", "delete_nas", "add_pool", "edit_pool", "delete_pool", "pool_list",
           "add_link", "edit_link", "delete_link", "link_list"]

_NAS_FIELDS: Final = frozenset({"name", "address", "require_message_authenticator", "coa_port", "disconnect_mode"})
_NAS_CASTS: Final = {"address": "::inet", "blocked_profile": "::jsonb"}
_LINK_FIELDS: Final = frozenset({"login", "static_ip", "max_sessions", "session_limit",
                                 "interim_interval", "rate_limit", "cisco_avpairs", "disabled"})
_LINK_CASTS: Final = {"static_ip": "::inet"}
_POOL_CASTS: Final = {"first": "::inet", "last": "::inet"}


async def _update(conn: DbConnection, table: str, row_id: int, sets: dict[str, Any],
                  casts: dict[str, str]) -> bool:
    """UPDATE one row by id with the given column values (names are ours, never the caller's)."""
    if not sets:
        return bool(await conn.fetchval(f"SELECT true FROM {table} WHERE id = $1", row_id))
    cols = ", ".join(f"{column} = ${i + 2}{casts.get(column, '')}" for i, column in enumerate(sets))
    return bool(await conn.execute(f"UPDATE {table} SET {cols} WHERE id = $1", row_id, *sets.values()) != "UPDATE 0")


async def _delete(conn: DbConnection, table: str, row_id: int) -> bool:
    return bool(await conn.execute(f"DELETE FROM {table} WHERE id = $1", row_id) != "DELETE 0")


# -- NAS devices --------------------------------------------------------------------


async def add_nas(conn: DbConnection, store: SecretStore, *, name: str, address: str, secret: str,
                  require_message_authenticator: bool = True, coa_port: int = 3799,
                  disconnect_mode: str = DisconnectMode.DISCONNECT,
                  blocked_profile: list[list[Any]] | None = None) -> int:
    if not secret:
        raise InvalidValue("a NAS needs a shared secret")
    return int(await conn.fetchval(
        "INSERT INTO radius_nas(name, address, secret_enc, require_message_authenticator, coa_port,"
        " disconnect_mode, blocked_profile) VALUES ($1, $2::inet, $3, $4, $5, $6, $7::jsonb) RETURNING id",
        name, address, store.seal(secret.encode()), require_message_authenticator, coa_port,
        disconnect_mode, json.dumps(blocked_profile or [])))


async def nas_list(conn: DbConnection, store: SecretStore, *, with_secrets: bool, limit: int = PAGE,
                   offset: int = 0) -> list[Nas]:
    rows = await conn.fetch("SELECT *, host(address) AS host FROM radius_nas ORDER BY id LIMIT $1 OFFSET $2",
                            limit, offset)
    return [Nas(id=row["id"], name=row["name"], address=row["host"],
                require_message_authenticator=row["require_message_authenticator"], coa_port=row["coa_port"],
                disconnect_mode=DisconnectMode(row["disconnect_mode"]),
                blocked_profile=json.loads(row["blocked_profile"]),
                secret=store.open(row["secret_enc"]) if with_secrets else None)
            for row in rows]


async def edit_nas(conn: DbConnection, store: SecretStore, nas_id: int, **changes: Any) -> bool:
    """Change the given fields of a NAS (the secret is sealed again)."""
    sets: dict[str, Any] = {}
    for name, value in changes.items():
        if value is None:
            continue
        if name == "secret":
            if not value:
                raise InvalidValue("a NAS needs a shared secret")
            sets["secret_enc"] = store.seal(str(value).encode())
        elif name == "blocked_profile":
            sets["blocked_profile"] = json.dumps(value)
        elif name in _NAS_FIELDS:
            sets[name] = value
        else:
            raise InvalidValue(f"a NAS has no field {name!r}")
    return await _update(conn, "radius_nas", nas_id, sets, _NAS_CASTS)


async def delete_nas(conn: DbConnection, nas_id: int, now: dt.datetime, force: bool = False) -> bool:
    """Delete a NAS and its session history.  Refused while it has active
    sessions, unless ``force``: then they are ended first (bindings, leases)."""
    active = await locked_active(conn, "nas_id = $1", nas_id)
    if active and not force:
        raise InUse(f"NAS {nas_id} has {len(active)} active session(s); pass force to end them")
    await end_sessions(conn, active, now, EndReason.NAS_DELETED)
    # NAS ids are never reused: the time watermarks of its sessions are dead
    await conn.execute("DELETE FROM ingest_watermarks WHERE starts_with(source, $1) OR source = $2",
                       f"radius:{nas_id}:", f"radius-close:{nas_id}")
    return await _delete(conn, "radius_nas", nas_id)


# -- IP pools -----------------------------------------------------------------------


async def add_pool(conn: DbConnection, *, name: str, first: str, last: str) -> int:
    return int(await conn.fetchval(
        "INSERT INTO radius_pools(name, first, last) VALUES ($1, $2::inet, $3::inet) RETURNING id", name, first, last))


async def edit_pool(conn: DbConnection, pool_id: int, *, name: str | None = None, first: str | None = None,
                    last: str | None = None) -> bool:
    """Rename or resize a pool; leases outside the new range are refused."""
    sets = {column: value for column, value in (("name", name), ("first", first), ("last", last)) if value is not None}
    done = await _update(conn, "radius_pools", pool_id, sets, _POOL_CASTS)
    outside = await conn.fetchval(
        "SELECT count(*) FROM radius_leases l JOIN radius_pools p ON p.id = l.pool_id"
        " WHERE p.id = $1 AND (l.address < p.first OR l.address > p.last)", pool_id)
    if outside:
        raise InUse(f"{outside} leased address(es) would fall outside the pool")
    return done


async def delete_pool(conn: DbConnection, pool_id: int) -> bool:
    users = await conn.fetchval("SELECT count(*) FROM radius_links WHERE pool_id = $1", pool_id)
    if users:
        raise InUse(f"pool {pool_id} is used by {users} link(s)")
    return await _delete(conn, "radius_pools", pool_id)


async def pool_list(conn: DbConnection, limit: int = PAGE, offset: int = 0) -> list[Pool]:
    rows = await conn.fetch(
        "SELECT p.id, p.name, host(p.first) AS first, host(p.last) AS last, p.last - p.first + 1 AS size,"
        " (SELECT count(*) FROM radius_leases l WHERE l.pool_id = p.id) AS leased FROM radius_pools p ORDER BY id"
        " LIMIT $1 OFFSET $2", limit, offset)
    return [Pool(**dict(row)) for row in rows]


# -- links: an account's RADIUS login ----------------------------------------------


async def _pool_id(conn: DbConnection, name: str) -> int:
    pool_id = await conn.fetchval("SELECT id FROM radius_pools WHERE name = $1", name)
    if pool_id is None:
        raise UnknownObject(f"no IP pool named {name!r}")
    return int(pool_id)


async def add_link(conn: DbConnection, store: SecretStore, *, account_id: int, login: str, password: str,
                   static_ip: str | None = None, pool: str | None = None, max_sessions: int = 1,
                   session_limit: int | None = None, interim_interval: int = 300,
                   rate_limit: str = "", cisco_avpairs: list[str] | None = None) -> int:
    """An account's RADIUS login.  Time is priced by the account's tariff
    (a time service), not by the link."""
    pool_id = await _pool_id(conn, pool) if pool is not None else None
    return int(await conn.fetchval(
        "INSERT INTO radius_links(account_id, login, password_enc, static_ip, pool_id, max_sessions,"
        " session_limit, interim_interval, rate_limit, cisco_avpairs)"
        " VALUES ($1, $2, $3, $4::inet, $5, $6, $7, $8, $9, $10) RETURNING id",
        account_id, login, store.seal(password.encode()), static_ip, pool_id, max_sessions,
        session_limit, interim_interval, rate_limit, cisco_avpairs or []))


async def edit_link(conn: DbConnection, store: SecretStore, link_id: int, **changes: Any) -> bool:
    """Change the given fields of a link.  ``password`` is sealed again;
    ``pool`` names a pool ("" for none) and clears a static IP, a
    ``static_ip`` ("" for none) clears the pool; ``session_limit`` 0 removes the limit."""
    sets: dict[str, Any] = {}
    for name, value in changes.items():
        if value is None:
            continue
        if name == "password":
            sets["password_enc"] = store.seal(str(value).encode())
        elif name == "pool":
            sets["pool_id"] = await _pool_id(conn, value) if value else None
            if value:
                sets["static_ip"] = None
        elif name == "static_ip":
            sets["static_ip"] = value or None
            if value:
                sets["pool_id"] = None
        elif name == "session_limit":
            sets["session_limit"] = value or None
        elif name in _LINK_FIELDS:
            sets[name] = value
        else:
            raise InvalidValue(f"a link has no field {name!r}")
    done = await _update(conn, "radius_links", link_id, sets, _LINK_CASTS)
    if "pool_id" in sets:  # leases of the old pool go; active sessions keep their address until they end
        await conn.execute("DELETE FROM radius_leases WHERE link_id = $1 AND expires_at IS NOT NULL"
                           " AND pool_id IS DISTINCT FROM $2", link_id, sets["pool_id"])
    return done


async def delete_link(conn: DbConnection, link_id: int, now: dt.datetime, force: bool = False) -> bool:
    """Delete a link, its leases and session history.  Refused while it has
    active sessions, unless ``force``: then they are ended first.  Time
    charges already booked stay in the ledger, and so do the sessions' time
    watermarks: a late Interim of a deleted session, should the login come
    back, is never charged twice."""
    active = await locked_active(conn, "link_id = $1", link_id)
    if active and not force:
        raise InUse(f"link {link_id} has {len(active)} active session(s); pass force to end them")
    await end_sessions(conn, active, now, EndReason.LINK_DELETED)
    await keep_watermarks(conn, "link_id = $1 AND coalesce(ended_at, updated_at) > $2", link_id,
                          now - WATERMARK_HORIZON)   # the session rows go with the link
    return await _delete(conn, "radius_links", link_id)


async def link_list(conn: DbConnection, account_id: int | None = None, login: str | None = None,
                    limit: int = PAGE, offset: int = 0) -> list[Link]:
    """Links (without passwords), of one account, one login, or all."""
    rows = await conn.fetch(
        "SELECT l.id, l.account_id, l.login, host(l.static_ip) AS static_ip, p.name AS pool, l.max_sessions,"
        " l.session_limit, l.interim_interval, l.rate_limit, l.cisco_avpairs, l.disabled"
        " FROM radius_links l LEFT JOIN radius_pools p ON p.id = l.pool_id"
        " WHERE ($1::bigint IS NULL OR l.account_id = $1) AND ($2::text IS NULL OR l.login = $2) ORDER BY l.id"
        " LIMIT $3 OFFSET $4", account_id, login, limit, offset)
    return [Link(**{**dict(row), "cisco_avpairs": list(row["cisco_avpairs"])}) for row in rows]
