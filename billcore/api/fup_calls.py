"""URFA calls of fair usage and dunning: ``fup.*``, ``dunning.*``, ``radius.rate_state``, ``me.dunning``.

Theory of operation
-------------------
Operators (rights ``fup.read``/``fup.write``, ``dunning.read``/``dunning.write``)
keep the rate profiles, the quotas, the NAS kinds and the dunning policies,
and read an account's throttles and dunning state.  Every write is audited in
its own transaction.  The radius process (right ``radius.serve``, which its
system login holds as ``radius.*``) asks ``radius.rate_state`` what to send
to an account's open sessions after a rate event (``fup.RATE_EVENTS``).  A
subscriber reads their own dunning status with ``me.dunning`` (no operator
text in it: steps, dates and money only).  The rules are in
``billcore.billing.fup`` and ``billcore.billing.dunning``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, Final

from billcore.api import ADMIN, ADMIN_SYSTEM, USER, handler, need_int, who
from billcore.api.me import _own
from billcore.billing import audit, dunning, fup
from billcore.billing.ledger_errors import InvalidValue
from billcore.db.rows import DbConnection
from billcore.server.call_context import CallContext
from billcore.server.calls import CallSpec
from billcore.server.context import CoreContext

__all__ = ["calls"]

SYSTEM: Final = frozenset({"system"})
_PROFILE_ARGS: Final = {"name": "str", "down_kbps": "int", "up_kbps": "int", "cisco_in": "str?",
                        "cisco_out": "str?", "attributes": "list?"}
_POLICY_ARGS: Final = {"tariff_id": "int", "reminder_days": "int?", "grace_days": "int?", "throttle_profile": "int?",
                       "block_after_days": "int?", "close_after_days": "int?"}
_STATE_FIELDS: Final = {"steps.balance": "money"}


def calls(core: CoreContext) -> list[CallSpec]:
    pool = core.pool

    @contextlib.asynccontextmanager
    async def write(ctx: CallContext, action: str, obj: str, after: Any) -> AsyncIterator[DbConnection]:
        async with pool.acquire() as conn, conn.transaction():
            yield conn
            await audit.record(conn, who(ctx), action, obj, after=after, now=core.now())

    @handler
    async def profiles_list(ctx: CallContext) -> list[dict[str, Any]]:
        """Rate profiles: id, name, down_kbps, up_kbps, cisco_in, cisco_out, attributes."""
        async with pool.acquire() as conn:
            return [profile.wire() for profile in await fup.profile_list(conn)]

    @handler
    async def profiles_set(ctx: CallContext, name: str, down_kbps: int, up_kbps: int, cisco_in: str | None = None,
                           cisco_out: str | None = None, attributes: list[Any] | None = None) -> int:
        """Create or replace the rate profile called `name` (speeds in kbit/s from the subscriber's side; Cisco policy-map names; a generic NAS's [[attribute, value]…] list, names from the RADIUS dictionaries); its id."""
        args = {"name": name, "down_kbps": down_kbps, "up_kbps": up_kbps, "cisco_in": cisco_in or "",
                "cisco_out": cisco_out or "", "attributes": attributes or []}
        async with write(ctx, "fup.profiles_set", f"rate_profile:{name}", args) as conn:
            return await fup.profile_set(conn, **args)

    @handler
    async def profiles_delete(ctx: CallContext, id: int) -> bool:
        """Delete a rate profile that no quota, policy or throttle uses."""
        async with write(ctx, "fup.profiles_delete", f"rate_profile:{id}", None) as conn:
            return await fup.profile_delete(conn, need_int("id", id))

    @handler
    async def quotas_list(ctx: CallContext) -> list[dict[str, Any]]:
        """Quotas: id, service, class (null: every class of the service), quota_bytes, profile."""
        async with pool.acquire() as conn:
            return await fup.quota_list(conn)

    @handler
    async def quotas_set(ctx: CallContext, service_id: int, quota_bytes: int, profile_id: int,
                         class_id: int | None = None) -> int:
        """Create or replace the quota of a traffic service and class per accounting period (no class: all classes summed); crossing it throttles the account to the profile until the period ends; its id."""
        args = {"service_id": need_int("service_id", service_id), "class_id": class_id,
                "quota_bytes": quota_bytes, "profile_id": need_int("profile_id", profile_id)}
        if class_id is not None:
            need_int("class_id", class_id)
        async with write(ctx, "fup.quotas_set", f"service:{service_id}", args) as conn:
            return await fup.quota_set(conn, service_id, class_id, quota_bytes, profile_id)

    @handler
    async def quotas_delete(ctx: CallContext, id: int) -> bool:
        """Delete a quota (throttles it set stay until their period ends)."""
        async with write(ctx, "fup.quotas_delete", f"fup_quota:{id}", None) as conn:
            return await fup.quota_delete(conn, need_int("id", id))

    @handler
    async def nas_set(ctx: CallContext, id: int, kind: str | None = None, coa_nak_action: str | None = None) -> bool:
        """Set how a NAS is told a rate (kind generic, mikrotik or cisco) and what follows a refused CoA (coa_nak_action disconnect or none)."""
        async with write(ctx, "fup.nas_set", f"nas:{id}", {"kind": kind, "coa_nak_action": coa_nak_action}) as conn:
            done = await fup.nas_set(conn, need_int("id", id), kind, coa_nak_action)
        core.publish("radius.nas", {"changed": id})
        return done

    @handler
    async def fup_state(ctx: CallContext, account_id: int) -> dict[str, Any]:
        """The account's rate now (the throttle profile in force, or none) and its last throttles."""
        need_int("account_id", account_id)
        async with pool.acquire() as conn:
            current = (await fup.throttle_profiles(conn, [account_id], core.now())).get(account_id)
            return {"account_id": account_id, "throttled": current is not None,
                    "profile": None if current is None else current.wire(),
                    "throttles": await fup.throttles_of(conn, account_id)}

    @handler
    async def rate_state(ctx: CallContext, account_id: int) -> list[dict[str, Any]]:
        """Per open session of the account: its NAS, the session's identification and the rate attributes to send it now (for a CoA after a rate event)."""
        need_int("account_id", account_id)
        async with pool.acquire() as conn:
            return await fup.rate_state(conn, account_id, core.now())

    @handler
    async def policies_get(ctx: CallContext, tariff_id: int) -> dict[str, Any] | None:
        """The tariff's dunning policy, or null."""
        async with pool.acquire() as conn:
            policy = await dunning.policy_get(conn, need_int("tariff_id", tariff_id))
        return None if policy is None else policy.wire()

    @handler
    async def policies_set(ctx: CallContext, tariff_id: int, **args: Any) -> dict[str, Any]:
        """Create or replace the tariff's dunning policy: reminder_days before the balance runs out; after it goes past the credit, grace_days, then the throttle_profile's speed, then a block at block_after_days, then closing at close_after_days (null: never)."""
        given = {name: value for name, value in args.items() if value is not None}
        for name in ("reminder_days", "grace_days", "block_after_days", "close_after_days", "throttle_profile"):
            if name in given and type(given[name]) is not int:
                raise InvalidValue(f"{name} must be an int")
        policy = dunning.Policy(need_int("tariff_id", tariff_id), **given)
        async with write(ctx, "dunning.policies_set", f"tariff:{tariff_id}", policy.wire()) as conn:
            return (await dunning.policy_set(conn, policy, core.now())).wire()

    @handler
    async def policies_delete(ctx: CallContext, tariff_id: int) -> bool:
        """Remove the tariff's dunning policy (open cycles are no longer advanced)."""
        async with write(ctx, "dunning.policies_delete", f"tariff:{tariff_id}", None) as conn:
            return await dunning.policy_delete(conn, need_int("tariff_id", tariff_id))

    @handler
    async def dunning_state(ctx: CallContext, account_id: int) -> dict[str, Any]:
        """The account's dunning cycle, step, debt start, policy and step log."""
        async with pool.acquire() as conn:
            return await dunning.dunning_state(conn, need_int("account_id", account_id))

    @handler
    async def me_dunning(ctx: CallContext, account_id: int | None = None) -> dict[str, Any]:
        """Your account's payment reminders and restrictions: step (none, grace, throttled, blocked, closed or cleared), since when, the block date if nothing is paid, and whether your speed is limited now."""
        async with pool.acquire() as conn:
            own = (await _own(conn, int(ctx.principal.id), account_id))[0]
            state = await dunning.dunning_state(conn, own)
            throttled = own in await fup.throttle_profiles(conn, [own], core.now())
        return {"account_id": own, "step": state["step"], "debt_since": state["debt_since"],
                "block_on": state.get("block_on"), "throttled": throttled}

    read_fup = {"right": "fup.read", "kinds": ADMIN_SYSTEM}
    write_fup = {"right": "fup.write", "kinds": ADMIN}
    read_dun = {"right": "dunning.read", "kinds": ADMIN_SYSTEM}
    write_dun = {"right": "dunning.write", "kinds": ADMIN}

    def spec(name: str, fn: Any, access: dict[str, Any], args: dict[str, str], result: str,
             fields: dict[str, str] | None = None) -> CallSpec:
        return CallSpec(name, fn, args=args, result=result, doc=fn.__doc__ or "", bound="fixed",
                        fields=fields or {}, **access)

    return [
        spec("fup.profiles_list", profiles_list, read_fup, {}, "list"),
        spec("fup.profiles_set", profiles_set, write_fup, _PROFILE_ARGS, "int"),
        spec("fup.profiles_delete", profiles_delete, write_fup, {"id": "int"}, "bool"),
        spec("fup.quotas_list", quotas_list, read_fup, {}, "list"),
        spec("fup.quotas_set", quotas_set, write_fup,
             {"service_id": "int", "class_id": "int?", "quota_bytes": "int", "profile_id": "int"}, "int"),
        spec("fup.quotas_delete", quotas_delete, write_fup, {"id": "int"}, "bool"),
        spec("fup.nas_set", nas_set, write_fup, {"id": "int", "kind": "str?", "coa_nak_action": "str?"}, "bool"),
        spec("fup.state", fup_state, read_fup, {"account_id": "int"}, "map"),
        spec("radius.rate_state", rate_state, {"right": "radius.serve", "kinds": SYSTEM}, {"account_id": "int"},
             "list"),
        spec("dunning.policies_get", policies_get, read_dun, {"tariff_id": "int"}, "map"),
        spec("dunning.policies_set", policies_set, write_dun, _POLICY_ARGS, "map"),
        spec("dunning.policies_delete", policies_delete, write_dun, {"tariff_id": "int"}, "bool"),
        spec("dunning.state", dunning_state, read_dun, {"account_id": "int"}, "map", _STATE_FIELDS),
        CallSpec("me.dunning", me_dunning, right=None, kinds=USER, module="builtin", args={"account_id": "int?"},
                 result="map", doc=me_dunning.__doc__ or "", bound="fixed"),
    ]
