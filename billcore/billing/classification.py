"""What the NetFlow classifier sees, as rows: traffic classes and their rules, IP bindings.

Each write validates its values first (a malformed prefix or port range is a
``TariffError`` before SQL) and maps constraint violations to
``TariffConflict`` (an overlapping binding, a taken name, a class in use).
Every write bumps ``classifier_version`` (a statement trigger, schema 0008),
which the ``netflow.snapshot`` call reads so workers know to reload; the same
triggers NOTIFY the core, which relays the change to the workers
(``billcore/db/notify.py``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

from billcore.common.errors import TariffError
from billcore.billing.tariffs import MAX_PAGE, Conflicts, TariffNotFound, aware_utc, checked_int, checked_name
from billcore.db.rows import DbConnection

__all__ = [
    "add_binding",
    "add_rule",
    "classifier_version",
    "create_class",
    "delete_class",
    "delete_rule",
    "end_binding",
    "list_bindings",
    "list_classes",
    "port_range",
]


async def create_class(conn: DbConnection, name: str, position: int = 0, comment: str = "") -> int:
    with Conflicts("traffic class"):
        return int(await conn.fetchval(
            "INSERT INTO traffic_classes(name, position, comment) VALUES ($1, $2, $3) RETURNING id",
            checked_name(name), checked_int(position, "position", -2**31, 2**31 - 1), comment))


async def delete_class(conn: DbConnection, class_id: int) -> None:
    with Conflicts("traffic class"):
        if await conn.execute("DELETE FROM traffic_classes WHERE id = $1", class_id) == "DELETE 0":
            raise TariffNotFound(f"traffic class {class_id} does not exist")


def _net(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return str(ipaddress.ip_network(value, strict=True))
    except ValueError as exc:
        raise TariffError(f"not a network prefix: {value!r}") from exc


def _ports(value: Sequence[int] | None) -> asyncpg.Range[int] | None:
    if value is None:
        return None
    if len(value) != 2 or not 0 <= value[0] <= value[1] <= 65535:
        raise TariffError("ports are [first, last] within 0..65535")
    return asyncpg.Range(value[0], value[1], upper_inc=True)


async def add_rule(conn: DbConnection, class_id: int, *, position: int = 0, skip: bool = False,
                   local_net: str | None = None, remote_net: str | None = None,
                   local_ports: Sequence[int] | None = None, remote_ports: Sequence[int] | None = None,
                   protocol: int | None = None, exporter: str | None = None,
                   iface: int | None = None) -> int:
    if exporter is not None:
        try:
            exporter = str(ipaddress.ip_address(exporter))
        except ValueError as exc:
            raise TariffError(f"exporter must be an IP address: {exporter!r}") from exc
    with Conflicts("traffic class rule"):
        return int(await conn.fetchval(
            "INSERT INTO traffic_class_rules(class_id, position, skip, local_net, remote_net,"
            " local_ports, remote_ports, protocol, exporter, iface)"
            " VALUES ($1, $2, $3, $4::cidr, $5::cidr, $6, $7, $8, $9::inet, $10) RETURNING id",
            class_id, position, skip, _net(local_net), _net(remote_net), _ports(local_ports),
            _ports(remote_ports), protocol, exporter, iface))


async def delete_rule(conn: DbConnection, rule_id: int) -> None:
    if await conn.execute("DELETE FROM traffic_class_rules WHERE id = $1", rule_id) == "DELETE 0":
        raise TariffNotFound(f"rule {rule_id} does not exist")


def port_range(ports: asyncpg.Range[int] | None) -> list[int] | None:
    """A port range column as an inclusive [lo, hi] pair (None: any port).
    The schema keeps ranges within 0..65535; an open end means that limit."""
    if ports is None or ports.isempty:
        return None
    if ports.lower is None:
        lo = 0
    else:
        lo = ports.lower if ports.lower_inc else ports.lower + 1
    if ports.upper is None:
        hi = 65535
    else:
        hi = ports.upper if ports.upper_inc else ports.upper - 1
    return [lo, hi]


async def list_classes(conn: DbConnection, *, limit: int = MAX_PAGE, offset: int = 0
                       ) -> list[dict[str, Any]]:
    """Classes in match order, each with its rules in match order (plain, msgpack-able)."""
    classes = await conn.fetch("SELECT id, name, position, comment FROM traffic_classes ORDER BY position, id"
                               " LIMIT $1 OFFSET $2", limit, offset)
    rules = await conn.fetch(
        "SELECT id, class_id, position, skip, local_net::text, remote_net::text, local_ports,"
        " remote_ports, protocol, host(exporter) AS exporter, iface FROM traffic_class_rules"
        " WHERE class_id = ANY($1::bigint[]) ORDER BY class_id, position, id",
        [traffic_class["id"] for traffic_class in classes])
    by_class: dict[int, list[dict[str, Any]]] = {}
    for row in rules:
        by_class.setdefault(row["class_id"], []).append({
            "id": row["id"], "position": row["position"], "skip": row["skip"],
            "local_net": row["local_net"], "remote_net": row["remote_net"],
            "local_ports": port_range(row["local_ports"]), "remote_ports": port_range(row["remote_ports"]),
            "protocol": row["protocol"], "exporter": row["exporter"], "iface": row["iface"],
        })
    return [{**dict(traffic_class), "rules": by_class.get(traffic_class["id"], [])} for traffic_class in classes]


async def add_binding(conn: DbConnection, account_id: int, prefix: str, *, kind: str = "static",
                      source: str = "admin", session_ref: str | None = None,
                      valid_from: datetime, valid_to: datetime | None = None) -> int:
    """Bind a prefix to an account; ``TariffConflict`` if it overlaps another binding in time."""
    if kind not in ("static", "dynamic"):
        raise TariffError("binding kind is 'static' or 'dynamic'")
    with Conflicts("ip binding"):
        return int(await conn.fetchval(
            "INSERT INTO ip_bindings(account_id, prefix, kind, source, session_ref, valid_from, valid_to)"
            " VALUES ($1, $2::cidr, $3, $4, $5, $6, $7) RETURNING id",
            account_id, _net(prefix), kind, source, session_ref, aware_utc(valid_from, "valid_from"),
            None if valid_to is None else aware_utc(valid_to, "valid_to")))


async def end_binding(conn: DbConnection, binding_id: int, at: datetime) -> None:
    """Close an open binding at ``at`` (a binding that had not started yet is deleted)."""
    at = aware_utc(at, "at")
    async with conn.transaction():
        if await conn.execute("DELETE FROM ip_bindings WHERE id = $1 AND valid_from >= $2",
                              binding_id, at) != "DELETE 0":
            return
        status = await conn.execute(
            "UPDATE ip_bindings SET valid_to = $2 WHERE id = $1 AND (valid_to IS NULL OR valid_to > $2)",
            binding_id, at)
        if status == "UPDATE 0" and await conn.fetchval(
                "SELECT 1 FROM ip_bindings WHERE id = $1", binding_id) is None:
            raise TariffNotFound(f"ip binding {binding_id} does not exist")


async def list_bindings(conn: DbConnection, account_id: int | None = None, *,
                        at: datetime | None = None, limit: int = MAX_PAGE, offset: int = 0) -> list[dict[str, Any]]:
    """Bindings (of one account, or all), valid at ``at`` if given; plain values."""
    rows = await conn.fetch(
        "SELECT id, account_id, prefix::text AS prefix, kind, source, session_ref, valid_from, valid_to"
        " FROM ip_bindings WHERE ($1::bigint IS NULL OR account_id = $1)"
        " AND ($2::timestamptz IS NULL OR (valid_from <= $2 AND (valid_to IS NULL OR valid_to > $2)))"
        " ORDER BY id LIMIT $3 OFFSET $4", account_id, at, limit, offset)
    return [dict(row) for row in rows]


async def classifier_version(conn: DbConnection) -> int:
    return int(await conn.fetchval("SELECT version FROM classifier_version"))
