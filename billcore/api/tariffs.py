"""URFA calls for the tariff model.

Admin calls (kinds ``{"admin"}``), right ``tariffs.read`` for reads and
``tariffs.write`` for changes:

  services.list, services.add, services.delete, services.set_rate,
  tariffs.list, tariffs.add, tariffs.set_services, tariffs.delete,
  tariffs.link (account ↔ tariff, from now or the next period), tariffs.history,
  tariffs.quote (a sample month's cost, priced by the charging code: billcore.billing.quote),
  classes.list, classes.add, classes.delete, classes.add_rule, classes.delete_rule,
  timeranges.list, timeranges.add, timeranges.delete,
  bindings.list, bindings.add, bindings.end

The NetFlow workers' classifier snapshot (``netflow.snapshot``) lives in
``billcore.api.netflow_calls``: it is streamed, since it grows with bindings.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from datetime import date, datetime
from typing import Any

from billcore.api import ADMIN, handler, need_int, page, who
from billcore.billing import audit
from billcore.billing.classification import (
    add_binding, add_rule, create_class, delete_class, delete_rule, end_binding, list_bindings, list_classes,
)
from billcore.billing.tariffs import (
    MAX_PAGE, create_service, create_tariff, create_time_range, delete_service, delete_tariff, delete_time_range,
    link_tariff, list_services, list_tariffs, list_time_ranges, set_rate, set_tariff_services, tariff_history,
)
from billcore.billing.quote import quote_services
from billcore.common.errors import TariffError
from billcore.server.call_context import CallContext
from billcore.server.calls import CallSpec
from billcore.server.context import CoreContext

__all__ = ["calls", "plain"]

PAGE = MAX_PAGE
CLASS_PAGE = 100  # a class carries its rules: fewer per page


def plain(value: Any) -> Any:
    """Rows to msgpack-able values: dates become ISO strings, the rest passes."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, date) and not isinstance(value, datetime):
        return value.isoformat()
    return value


def plain_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``plain`` of each row, typed as the list of dicts it is."""
    return [{key: plain(value) for key, value in row.items()} for row in rows]


def _date(value: object, what: str) -> date:
    if type(value) is not str:
        raise TariffError(f"{what} must be an ISO date string")
    try:
        return date.fromisoformat(value)
    except ValueError as exc:
        raise TariffError(f"{what}: {exc}") from exc


def calls(core: CoreContext) -> list[CallSpec]:
    tz = core.config.zone

    @handler
    async def services_list(ctx: CallContext, limit: int = PAGE, offset: int = 0) -> list[dict[str, Any]]:
        """Services with their rates, by id (paged)."""
        limit, offset = page(limit, offset, PAGE)
        async with core.pool.acquire() as conn:
            return plain_rows(await list_services(conn, limit=limit, offset=offset))

    @handler
    async def services_add(ctx: CallContext, name: str, kind: str, fee: int | None = None,
                           period: dict[str, Any] | None = None, charge_mode: str | None = None,
                           session_limit: int | None = None, max_sessions: int | None = None,
                           comment: str | None = None) -> dict[str, Any]:
        """Add a service of kind once, periodic, traffic or time; fee is money (a periodic or once-off fee).
        A periodic service takes period {"kind": daily, weekly, monthly, yearly or custom, "anchor":
        "YYYY-MM-DD", "days": N for custom} and charge_mode start, end or daily (docs/tariffs.md)."""
        if period is not None:
            period = {**period, "anchor": _date(period.get("anchor"), "period.anchor")}
        async with core.pool.acquire() as conn:
            sid = await create_service(conn, name, kind, fee=fee or 0, period=period,
                                         charge_mode=charge_mode, session_limit=session_limit,
                                         max_sessions=max_sessions, comment=comment or "")
        return {"id": sid}

    @handler
    async def services_delete(ctx: CallContext, service_id: int) -> dict[str, Any]:
        """Delete a service no tariff or counter uses."""
        async with core.pool.acquire() as conn:
            await delete_service(conn, need_int("service_id", service_id))
        return {"id": service_id}

    @handler
    async def services_set_rate(ctx: CallContext, service_id: int, unit_size: int, tiers: list[list[int]],
                                class_id: int | None = None, range_id: int | None = None,
                                prepaid: int | None = None) -> dict[str, Any]:
        """Set the price of a traffic class (class_id) or of session time (no class_id), in a time range
        (range_id) or in any range (no range_id). Tiers are [[start, price], …]: price in micro-units per
        unit_size bytes or seconds, from start bytes or seconds beyond the prepaid volume (prepaid, in bytes
        or seconds, is free); the first tier starts at 0 (docs/tariffs.md)."""
        parsed = [(tier[0], tier[1]) for tier in tiers if isinstance(tier, list) and len(tier) == 2]
        if len(parsed) != len(tiers):
            raise TariffError("tiers are [start, price] pairs")
        async with core.pool.acquire() as conn:
            await set_rate(conn, service_id, class_id=class_id, range_id=range_id,
                             prepaid=prepaid or 0, unit_size=unit_size, tiers=parsed)
        return {"service_id": service_id}

    @handler
    async def tariffs_list(ctx: CallContext, limit: int = PAGE, offset: int = 0) -> list[dict[str, Any]]:
        """Tariffs with their service ids, by id (paged)."""
        limit, offset = page(limit, offset, PAGE)
        async with core.pool.acquire() as conn:
            return plain_rows(await list_tariffs(conn, limit=limit, offset=offset))

    @handler
    async def tariffs_add(ctx: CallContext, name: str, service_ids: list[int],
                          comment: str | None = None) -> dict[str, Any]:
        """Add a tariff: a name and the services it bundles (service_ids)."""
        async with core.pool.acquire() as conn:
            return {"id": await create_tariff(conn, name, service_ids, comment or "")}

    @handler
    async def tariffs_set_services(ctx: CallContext, tariff_id: int, service_ids: list[int]) -> dict[str, Any]:
        """Replace a tariff's services."""
        async with core.pool.acquire() as conn:
            await set_tariff_services(conn, tariff_id, service_ids)
        return {"id": tariff_id}

    @handler
    async def tariffs_delete(ctx: CallContext, tariff_id: int) -> dict[str, Any]:
        """Delete a tariff no account was ever linked to."""
        async with core.pool.acquire() as conn:
            await delete_tariff(conn, tariff_id)
        return {"id": tariff_id}

    @handler
    async def tariffs_link(ctx: CallContext, account_id: int, tariff_id: int | None = None,
                           start: str | None = None) -> dict[str, Any]:
        """Put an account on a tariff (no tariff_id: on none), from now (start "now", the default) or from
        its next accounting period (start "next_period"); periodic fees are prorated to the second."""
        async with core.pool.acquire() as conn:
            return await link_tariff(conn, need_int("account_id", account_id), tariff_id,
                                       now=core.now(), tz=tz, start=start or "now",
                                       actor=f"{ctx.principal.kind}:{ctx.principal.login}")

    @handler
    async def tariffs_history(ctx: CallContext, account_id: int, limit: int = PAGE,
                              offset: int = 0) -> list[dict[str, Any]]:
        """An account's tariff links, oldest first (paged)."""
        limit, offset = page(limit, offset, PAGE)
        async with core.pool.acquire() as conn:
            account_id = need_int("account_id", account_id)
            return plain_rows(await tariff_history(conn, account_id, limit=limit, offset=offset))

    @handler
    async def tariffs_quote(ctx: CallContext, service_ids: list[int], traffic: dict[str, int] | None = None,
                            days: int | None = None) -> dict[str, Any]:
        """What a sample month would cost with these services: {lines: [{service_id, name, kind, amount}],
        total, unrated, start, end}. traffic maps a traffic class id (as text) to the month's bytes, spread
        evenly over the hours; days (1..31) keeps the services for the month's first days only. Priced by
        the code that charges: periodic fees prorated as the scheduler does, traffic rated as NetFlow
        batches are; unrated lists the bytes charging would not rate, with its reason."""
        async with core.pool.acquire() as conn:
            quoted = await quote_services(conn, service_ids, traffic, days, core.now(), tz)
        return {"lines": [{"service_id": line.service_id, "name": line.name, "kind": line.kind,
                           "amount": line.amount} for line in quoted.lines],
                "total": quoted.total, "start": quoted.start, "end": quoted.end,
                "unrated": [{"class_id": klass, "bytes": quantity, "reason": reason}
                            for klass, quantity, reason in quoted.unrated]}

    @handler
    async def classes_list(ctx: CallContext, limit: int = CLASS_PAGE, offset: int = 0) -> list[dict[str, Any]]:
        """Traffic classes and their rules, in match order (paged)."""
        limit, offset = page(limit, offset, CLASS_PAGE)
        async with core.pool.acquire() as conn:
            return await list_classes(conn, limit=limit, offset=offset)

    @handler
    async def classes_add(ctx: CallContext, name: str, position: int | None = None,
                          comment: str | None = None) -> dict[str, Any]:
        """Add a traffic class; position orders classes for matching (lower first)."""
        async with core.pool.acquire() as conn:
            cid = await create_class(conn, name, position or 0, comment or "")
        return {"id": cid}

    @handler
    async def classes_delete(ctx: CallContext, class_id: int) -> dict[str, Any]:
        """Delete a traffic class (and its rules) that no rate uses."""
        async with core.pool.acquire() as conn:
            await delete_class(conn, class_id)
        return {"id": class_id}

    @handler
    async def classes_add_rule(ctx: CallContext, class_id: int, **rule: Any) -> dict[str, Any]:
        """Add a rule: a leg of a flow belongs to the class of the first rule it matches (classes in
        position order, then their rules in position order). local_net and remote_net (prefixes),
        local_ports and remote_ports ([first, last]), protocol (6 TCP, 17 UDP), exporter (address) and iface
        (interface index) must all match; an absent one matches anything. A skip rule's legs are not
        charged (docs/tariffs.md)."""
        async with core.pool.acquire() as conn:
            rid = await add_rule(conn, class_id, **{k: v for k, v in rule.items() if v is not None})
        return {"id": rid}

    @handler
    async def classes_delete_rule(ctx: CallContext, rule_id: int) -> dict[str, Any]:
        """Delete a rule."""
        async with core.pool.acquire() as conn:
            await delete_rule(conn, rule_id)
        return {"id": rule_id}

    @handler
    async def timeranges_list(ctx: CallContext, limit: int = PAGE, offset: int = 0) -> list[dict[str, Any]]:
        """Time ranges with their windows (weekday 0 = Monday) and dates, by id (paged)."""
        limit, offset = page(limit, offset, PAGE)
        async with core.pool.acquire() as conn:
            return plain_rows(await list_time_ranges(conn, limit=limit, offset=offset))

    @handler
    async def timeranges_add(ctx: CallContext, name: str, priority: int | None = None,
                             windows: list[dict[str, Any]] | None = None,
                             dates: list[str] | None = None) -> dict[str, Any]:
        """Add a time range: windows such as [{"days": "mon-fri", "time": "08:00-24:00"}] on the core's
        time zone (a time ending at or before its start crosses midnight), whole dates ["YYYY-MM-DD"]
        such as holidays, and a priority (the highest matching range wins) (docs/tariffs.md)."""
        async with core.pool.acquire() as conn:
            rid = await create_time_range(conn, name, priority=priority or 0, windows=windows or [],
                                            dates=[_date(text, "date") for text in dates or []])
        return {"id": rid}

    @handler
    async def timeranges_delete(ctx: CallContext, range_id: int) -> dict[str, Any]:
        """Delete a time range no rate uses."""
        async with core.pool.acquire() as conn:
            await delete_time_range(conn, range_id)
        return {"id": range_id}

    @handler
    async def bindings_list(ctx: CallContext, account_id: int | None = None, at: datetime | None = None,
                            limit: int = PAGE, offset: int = 0) -> list[dict[str, Any]]:
        """IP bindings, of one account if account_id is given, valid at the instant at if given; by id,
        paged."""
        limit, offset = page(limit, offset, PAGE)
        async with core.pool.acquire() as conn:
            return await list_bindings(conn, account_id, at=at, limit=limit, offset=offset)

    @handler
    async def bindings_add(ctx: CallContext, account_id: int, prefix: str, kind: str | None = None,
                           valid_from: datetime | None = None, valid_to: datetime | None = None,
                           source: str | None = None, session_ref: str | None = None) -> dict[str, Any]:
        """Bind a prefix to an account from valid_from (default now) to valid_to (default open); two
        bindings of overlapping prefixes never overlap in time."""
        async with core.pool.acquire() as conn:
            bid = await add_binding(conn, need_int("account_id", account_id), prefix,
                                      kind=kind or "static", source=source or "admin",
                                      session_ref=session_ref, valid_from=valid_from or core.now(),
                                      valid_to=valid_to)
        return {"id": bid}

    @handler
    async def bindings_end(ctx: CallContext, binding_id: int, at: datetime | None = None) -> dict[str, Any]:
        """End a binding at the instant at (default now)."""
        async with core.pool.acquire() as conn:
            await end_binding(conn, need_int("binding_id", binding_id), at or core.now())
        return {"id": binding_id}

    R, W = "tariffs.read", "tariffs.write"
    paged = {"limit": "int?", "offset": "int?"}
    rule_args = {"class_id": "int", "position": "int?", "skip": "bool?", "local_net": "str?",
                 "remote_net": "str?", "local_ports": "list?", "remote_ports": "list?",
                 "protocol": "int?", "exporter": "str?", "iface": "int?"}
    table: list[tuple[str, Any, str, dict[str, str]]] = [
        ("services.list", services_list, R, paged),
        ("services.add", services_add, W, {"name": "str", "kind": "str", "fee": "money?", "period": "map?",
                                           "charge_mode": "str?", "session_limit": "int?",
                                           "max_sessions": "int?", "comment": "str?"}),
        ("services.delete", services_delete, W, {"service_id": "int"}),
        ("services.set_rate", services_set_rate, W, {"service_id": "int", "unit_size": "int", "tiers": "list",
                                                     "class_id": "int?", "range_id": "int?", "prepaid": "int?"}),
        ("tariffs.list", tariffs_list, R, paged),
        ("tariffs.add", tariffs_add, W, {"name": "str", "service_ids": "list", "comment": "str?"}),
        ("tariffs.set_services", tariffs_set_services, W, {"tariff_id": "int", "service_ids": "list"}),
        ("tariffs.delete", tariffs_delete, W, {"tariff_id": "int"}),
        ("tariffs.link", tariffs_link, W, {"account_id": "int", "tariff_id": "int?", "start": "str?"}),
        ("tariffs.history", tariffs_history, R, {"account_id": "int", **paged}),
        ("tariffs.quote", tariffs_quote, R, {"service_ids": "list", "traffic": "map?", "days": "int?"}),
        ("classes.list", classes_list, R, paged),
        ("classes.add", classes_add, W, {"name": "str", "position": "int?", "comment": "str?"}),
        ("classes.delete", classes_delete, W, {"class_id": "int"}),
        ("classes.add_rule", classes_add_rule, W, rule_args),
        ("classes.delete_rule", classes_delete_rule, W, {"rule_id": "int"}),
        ("timeranges.list", timeranges_list, R, paged),
        ("timeranges.add", timeranges_add, W, {"name": "str", "priority": "int?", "windows": "list?",
                                               "dates": "list?"}),
        ("timeranges.delete", timeranges_delete, W, {"range_id": "int"}),
        ("bindings.list", bindings_list, R, {"account_id": "int?", "at": "time?", **paged}),
        ("bindings.add", bindings_add, W, {"account_id": "int", "prefix": "str", "kind": "str?",
                                           "valid_from": "time?", "valid_to": "time?", "source": "str?",
                                           "session_ref": "str?"}),
        ("bindings.end", bindings_end, W, {"binding_id": "int", "at": "time?"}),
    ]
    def audited(name: str, fn: Any) -> Any:
        """A catalogue change is recorded in the audit log (who, from where,
        the arguments and the result), just after its own commit."""
        @functools.wraps(fn)
        async def wrapped(ctx: CallContext, **args: Any) -> Any:
            result = await fn(ctx, **args)
            async with core.pool.acquire() as conn:
                # a link is about one account: its row shows on the account's audit (accounts.audit)
                about = f"account:{args['account_id']}" if name == "tariffs.link" else name.split(".")[0]
                await audit.record(conn, who(ctx), name, about, before=None,
                                   after={"args": args, "result": result}, now=core.now())
            return result
        return wrapped

    def bound(name: str, args: dict[str, str]) -> str:
        if "limit" not in args:
            return "fixed"
        return f"page:{CLASS_PAGE if name == 'classes.list' else PAGE}"

    money = {"services.list": {"fee": "money"},
             "tariffs.quote": {"lines": "list", "lines.amount": "money", "total": "money", "unrated": "list"}}
    specs = [CallSpec(name, audited(name, fn) if right == W else fn, right=right, kinds=ADMIN, args=args,
                      doc=fn.__doc__ or "", bound=bound(name, args), fields=money.get(name, {}))
             for name, fn, right, args in table]
    return specs
