"""Operator calls: ``operators.*`` (who may work in the core, in which roles) and ``self.otp_*``
(every operator's own second factor).

Rights: ``operators.read`` for roles/list/get, ``operators.write`` for the
rest; ``self.otp`` is in every operator's session whatever their groups
(``billcore.server.principals``).  Every change is audited.  A call table is
fixed at login, so a change of groups ends the operator's sessions, as do
disabling them and a new password: they log in again with what they now are.

Wrong codes given to ``self.otp_confirm``/``otp_disable`` are limited per
operator (``CODE_FAILURES`` in ``CODE_WINDOW`` seconds), so a session left
open is not a way to guess the second factor that guards the next login.
"""

from __future__ import annotations

import time
from typing import Any

from billcore.api import ADMIN, handler, need_int, page, who
from billcore.api.users import check_password
from billcore.billing import audit, operators
from billcore.billing.accounts import check_login
from billcore.billing.ledger_errors import InvalidValue
from billcore.common.totp import b32_secret, otpauth_uri
from billcore.server.call_context import CallContext
from billcore.server.calls import CallSpec
from billcore.server.context import CoreContext
from billcore.server.login_limiter import LoginLimiter
from urfa.errors import RATE_LIMITED, CallFailed
from urfa.scram import make_verifier

__all__ = ["calls", "CODE_FAILURES", "CODE_WINDOW"]

CODE_FAILURES = 5
CODE_WINDOW = 300.0
PAGE = 1000
OPERATOR_FIELDS = {"id": "int", "login": "str", "full_name": "str", "disabled": "bool", "groups": "list",
                   "otp_enrolled": "bool", "created_at": "time"}


def calls(core: CoreContext) -> list[CallSpec]:
    code_limiter = LoginLimiter(CODE_FAILURES, CODE_WINDOW)

    def target(operator_id: object) -> str:
        return f"admin:{need_int('operator_id', operator_id)}"

    def end_sessions(ctx: CallContext, operator_id: int, why: str) -> None:
        ctx.end_sessions_of("admin", operator_id, why)

    @handler
    async def operators_roles(ctx: CallContext) -> list[dict[str, Any]]:
        """The role templates (admin groups) with their rights: superusers, cashiers, support,
        tariff_managers, and any made by hand."""
        async with core.pool.acquire() as conn:
            return await operators.roles(conn)

    @handler
    async def operators_list(ctx: CallContext, limit: int | None = None, offset: int | None = None
                             ) -> list[dict[str, Any]]:
        """Operators by login, paged, with their groups and whether a second factor is enrolled."""
        limit, offset = page(limit, offset, PAGE)
        async with core.pool.acquire() as conn:
            return await operators.list_operators(conn, limit, offset)

    @handler
    async def operators_get(ctx: CallContext, operator_id: int) -> dict[str, Any]:
        """One operator."""
        async with core.pool.acquire() as conn:
            return await operators.get_operator(conn, need_int("operator_id", operator_id))

    @handler
    async def operators_create(ctx: CallContext, login: str, password: str, groups: list[str],
                               full_name: str | None = None) -> dict[str, Any]:
        """Create an operator in the given groups (password: 8 to 1024 characters); returns the operator."""
        check_login(login)
        if full_name is not None and len(full_name) > 256:
            raise InvalidValue("full_name must be at most 256 characters")
        verifier = make_verifier(check_password(password))
        async with core.pool.acquire() as conn, conn.transaction():
            operator_id = await operators.create_operator(conn, login, verifier, groups, full_name or "")
            created = await operators.get_operator(conn, operator_id)
            await audit.record(conn, who(ctx), "operators.create", f"admin:{operator_id}", after=created,
                               now=core.now())
        return created

    @handler
    async def operators_edit(ctx: CallContext, operator_id: int, full_name: str | None = None,
                             groups: list[str] | None = None) -> dict[str, Any]:
        """Change an operator's full name and/or groups (the groups given replace theirs). A change of
        groups ends the operator's sessions: a call table is fixed at login."""
        obj = target(operator_id)
        async with core.pool.acquire() as conn, conn.transaction():
            before, after = await operators.edit_operator(conn, operator_id, full_name=full_name, groups=groups)
            await audit.record(conn, who(ctx), "operators.edit", obj, before=before, after=after, now=core.now())
        if before["groups"] != after["groups"]:
            end_sessions(ctx, operator_id, "your groups changed; log in again")
        return after

    async def set_disabled(ctx: CallContext, operator_id: int, disabled: bool) -> dict[str, Any]:
        action = "operators.disable" if disabled else "operators.enable"
        obj = target(operator_id)
        by = ctx.principal.id if ctx.kind == "admin" else None
        async with core.pool.acquire() as conn, conn.transaction():
            before, after = await operators.set_disabled(conn, operator_id, disabled, by=by)
            await audit.record(conn, who(ctx), action, obj, before=before, after=after, now=core.now())
        if disabled:
            end_sessions(ctx, operator_id, "this operator was disabled")
        return after

    @handler
    async def operators_disable(ctx: CallContext, operator_id: int) -> dict[str, Any]:
        """Disable an operator: they can no longer log in, and their sessions end. Nobody may disable
        themselves (operators.self) or the last enabled operator with every right (operators.last_superuser)."""
        return await set_disabled(ctx, operator_id, True)

    @handler
    async def operators_enable(ctx: CallContext, operator_id: int) -> dict[str, Any]:
        """Enable a disabled operator again."""
        return await set_disabled(ctx, operator_id, False)

    @handler
    async def operators_set_password(ctx: CallContext, operator_id: int, password: str) -> bool:
        """Replace an operator's password (stored as a SCRAM verifier); their sessions end."""
        obj = target(operator_id)
        verifier = make_verifier(check_password(password))
        async with core.pool.acquire() as conn, conn.transaction():
            await operators.set_verifier(conn, operator_id, verifier)
            await audit.record(conn, who(ctx), "operators.set_password", obj, after={"password": "changed"},
                               now=core.now())
        end_sessions(ctx, operator_id, "your password was changed; log in again")
        return True

    @handler
    async def operators_reset_otp(ctx: CallContext, operator_id: int) -> bool:
        """Remove an operator's second factor and recovery codes (they lost their device); they may enrol
        again after their next login."""
        obj = target(operator_id)
        async with core.pool.acquire() as conn, conn.transaction():
            await operators.reset_otp(conn, operator_id)
            await audit.record(conn, who(ctx), "operators.reset_otp", obj, after={"otp": "removed"},
                               now=core.now())
        return True

    def checked_code(ctx: CallContext, code: str) -> tuple[Any, float]:
        """Admit one code try of this operator (``rate_limited`` over the limit); (attempt, Unix time)."""
        attempt = code_limiter.begin([("admin", str(ctx.principal.id))], time.monotonic())
        if attempt is None:
            raise CallFailed(RATE_LIMITED, "too many wrong codes; wait and retry")
        if len(code) > 64:
            code_limiter.failed(attempt)
            raise operators.OtpRefused("wrong code")
        return attempt, core.now().timestamp()

    async def with_code(ctx: CallContext, code: str, action: str, change: Any) -> Any:
        attempt, t = checked_code(ctx, code)
        try:
            async with core.pool.acquire() as conn, conn.transaction():
                result = await change(conn, t)
                await audit.record(conn, who(ctx), action, f"admin:{ctx.principal.id}",
                                   after={"otp": action.rpartition("_")[2]}, now=core.now())
        except operators.OtpRefused:
            code_limiter.failed(attempt)
            raise
        except BaseException:
            code_limiter.abandon(attempt)
            raise
        code_limiter.succeeded(attempt)
        return result

    @handler
    async def self_otp_begin(ctx: CallContext) -> dict[str, Any]:
        """Start enrolling a TOTP second factor: returns the new secret (base32) and its otpauth URI for
        an authenticator app. Nothing changes until self.otp_confirm proves the app has it."""
        async with core.pool.acquire() as conn:
            secret = await operators.begin_otp(conn, ctx.principal.id)
        return {"secret": b32_secret(secret), "uri": otpauth_uri(secret, ctx.principal.login)}

    @handler
    async def self_otp_confirm(ctx: CallContext, code: str) -> dict[str, Any]:
        """Finish enrolling with the app's current code: from now on every login of this operator takes a
        code. Returns ten single-use recovery codes, shown this once."""
        async def enrol(conn: Any, t: float) -> list[str]:
            return await operators.confirm_otp(conn, ctx.principal.id, code, t, core.now())

        return {"recovery_codes": await with_code(ctx, code, "self.otp_confirm", enrol)}

    @handler
    async def self_otp_disable(ctx: CallContext, code: str) -> bool:
        """Remove one's own second factor, proven with a current code or a recovery code."""
        async def remove(conn: Any, t: float) -> bool:
            await operators.disable_otp(conn, ctx.principal.id, code, t, core.now())
            return True

        return bool(await with_code(ctx, code, "self.otp_disable", remove))

    def spec(name: str, fn: Any, right: str, args: dict[str, str], result: str = "map", bound: str = "fixed",
             fields: dict[str, str] | None = None) -> CallSpec:
        return CallSpec(name, fn, right=right, kinds=ADMIN, args=args, result=result, doc=fn.__doc__ or "",
                        bound=bound, fields=fields or {})

    read, write, own = "operators.read", "operators.write", "self.otp"
    one = {"operator_id": "int"}
    return [
        spec("operators.roles", operators_roles, read, {}, result="list",
             fields={"name": "str", "description": "str", "rights": "list"}),
        spec("operators.list", operators_list, read, {"limit": "int?", "offset": "int?"}, result="list",
             bound=f"page:{PAGE}", fields=OPERATOR_FIELDS),
        spec("operators.get", operators_get, read, one, fields=OPERATOR_FIELDS),
        spec("operators.create", operators_create, write,
             {"login": "str", "password": "str", "groups": "list", "full_name": "str?"}, fields=OPERATOR_FIELDS),
        spec("operators.edit", operators_edit, write, {**one, "full_name": "str?", "groups": "list?"},
             fields=OPERATOR_FIELDS),
        spec("operators.disable", operators_disable, write, one, fields=OPERATOR_FIELDS),
        spec("operators.enable", operators_enable, write, one, fields=OPERATOR_FIELDS),
        spec("operators.set_password", operators_set_password, write, {**one, "password": "str"}, result="bool"),
        spec("operators.reset_otp", operators_reset_otp, write, one, result="bool"),
        spec("self.otp_begin", self_otp_begin, own, {}, fields={"secret": "str", "uri": "str"}),
        spec("self.otp_confirm", self_otp_confirm, own, {"code": "str"}, fields={"recovery_codes": "list"}),
        spec("self.otp_disable", self_otp_disable, own, {"code": "str"}, result="bool"),
    ]
