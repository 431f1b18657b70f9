"""The built-in URFA calls every session may have: ``sys.*``, ``session.*``, ``events.*``.

They live in the core's own module ``builtin`` (never unloaded).  The ones
that only read or change in-memory state are plain functions wrapped by
``runs_inline``: the dispatcher calls them straight from the socket
callback and answers in the same write, without a task per call (see
``billcore.server.dispatcher``).  The session and proxy calls close over
the login desk, the event calls over the event hub.
"""

from __future__ import annotations

import dataclasses
import secrets
from datetime import datetime, timezone
from typing import Any

from billcore.server.call_context import CallContext
from billcore.server.calls import CallSpec
from billcore.server.calls import allows
from billcore.server.dispatcher import PROXY_ADMIN_RIGHT, PROXY_RIGHT, PROXY_TOKEN_RIGHT, runs_inline
from billcore.server.event_hub import EventHub
from billcore.server.login_desk import LoginDesk
from urfa import scram
from urfa.errors import AUTH_FAILED, BAD_ARGS, FORBIDDEN, CallFailed

__all__ = ["builtin_specs", "SYS_CALLS_PAGE"]

SYS_CALLS_PAGE = 500  # entries of sys.calls per page: it grows with the plugins' calls


@runs_inline
def _sys_ping(ctx: CallContext) -> str:
    return "pong"


@runs_inline
def _sys_time(ctx: CallContext) -> datetime:
    return datetime.now(timezone.utc)


@runs_inline
def _sys_whoami(ctx: CallContext) -> dict[str, Any]:
    principal = ctx.principal
    return {
        "kind": principal.kind, "login": principal.login, "id": principal.id, "rights": sorted(principal.rights),
        "ip": ctx.ip, "sid": ctx.sid, "proxied": ctx.session.proxied,
    }


@runs_inline
def _sys_calls(ctx: CallContext, limit: int | None = None, offset: int | None = None) -> list[dict[str, Any]]:
    # nil for an optional argument means "not given", as in every other call
    limit = SYS_CALLS_PAGE if limit is None else limit
    offset = 0 if offset is None else offset
    if not 1 <= limit <= SYS_CALLS_PAGE or not 0 <= offset:
        raise CallFailed(BAD_ARGS, f"limit must be 1..{SYS_CALLS_PAGE}, offset >= 0")
    return ctx.session.table.describe()[offset:offset + limit]


def builtin_specs(desk: LoginDesk, hub: EventHub) -> list[CallSpec]:
    """The calls every session may have (``module="builtin"``)."""

    @runs_inline
    def session_logout(ctx: CallContext) -> bool:
        desk.logout(ctx.session)
        return True

    # A task: a subscriber's subscription reads their account ids.
    async def events_subscribe(ctx: CallContext, topics: list[str]) -> list[str]:
        return await hub.subscribe(ctx.session, topics)

    @runs_inline
    def events_unsubscribe(ctx: CallContext, topics: list[str]) -> list[str]:
        return hub.unsubscribe(ctx.session, topics)

    # The proxy calls ask the auth backend (the database): they run as tasks.
    def may_proxy(ctx: CallContext, kind: str) -> None:
        if not allows(ctx.rights, PROXY_ADMIN_RIGHT if kind == "admin" else PROXY_RIGHT):
            raise CallFailed(FORBIDDEN, f"this session may not log {kind}s in")

    async def proxy_login(ctx: CallContext, login: str, cnonce: bytes, ip: str,
                          kind: str | None = None) -> dict[str, Any]:
        kind = kind or "user"
        if kind not in ("user", "admin"):
            raise CallFailed(BAD_ARGS, 'kind must be "user" or "admin"')
        may_proxy(ctx, kind)
        if len(cnonce) != scram.NONCE_BYTES:
            raise CallFailed(BAD_ARGS, f"cnonce must be {scram.NONCE_BYTES} bytes")
        snonce = secrets.token_bytes(scram.NONCE_BYTES)
        pending = await desk.begin_login(kind, login, cnonce, snonce, ip, desk.clock())
        handle = desk.add_proxy_login(pending)
        return {"handle": handle, "nonce": snonce, "salt": pending.verifier.salt, "iter": pending.verifier.iterations}

    async def proxy_proof(ctx: CallContext, handle: bytes, proof: bytes) -> dict[str, Any]:
        now = desk.clock()
        pending = desk.take_proxy_login(handle, now)
        if pending is None or pending.proven:   # unknown, expired, or waiting for its code
            raise CallFailed(AUTH_FAILED, "login failed")
        try:
            may_proxy(ctx, pending.kind)
        except CallFailed:
            desk.abandon(pending)
            raise
        session, signature = desk.finish_login(pending, proof, now, proxied=True)
        if session is None:   # an operator with a second factor: the same handle takes the code
            desk.add_proxy_login(pending, handle)
            return {"sig": signature, "otp_required": True}
        return {"sid": session.sid, "sig": signature, "timeout": int(desk.sessions.timeout)}

    async def proxy_otp(ctx: CallContext, handle: bytes, code: str) -> dict[str, Any]:
        now = desk.clock()
        pending = desk.take_proxy_login(handle, now)
        if pending is None or not pending.proven:
            if pending is not None:
                desk.abandon(pending)
            raise CallFailed(AUTH_FAILED, "login failed")
        try:
            session = await desk.finish_second_factor(pending, code, now, proxied=True)
        except CallFailed as refused:
            if refused.code != AUTH_FAILED or pending.codes_left > 0:
                desk.add_proxy_login(pending, handle)   # the next try uses the same handle
            raise
        return {"sid": session.sid, "timeout": int(desk.sessions.timeout)}

    # Any system session has it in its table; only one with session.proxy_token may use it, so a
    # radius or console login that tries is told `forbidden`, not that the call does not exist.
    async def token_login(ctx: CallContext, token: str, ip: str) -> dict[str, Any]:
        if not allows(ctx.rights, PROXY_TOKEN_RIGHT):
            raise CallFailed(FORBIDDEN, "this session may not log API tokens in")
        session, grant = await desk.token_login(token, ip, desk.clock())
        return {"sid": session.sid, "timeout": int(desk.sessions.timeout), "name": grant.principal.login,
                "expires_at": grant.expires_at}

    system = frozenset({"system"})
    PROXY_ANY = f"{PROXY_RIGHT}|{PROXY_ADMIN_RIGHT}"
    specs = [
        CallSpec("sys.ping", _sys_ping, result="str", doc="Answers \"pong\"."),
        CallSpec("sys.time", _sys_time, result="time", doc="The server's current time (UTC)."),
        CallSpec("sys.whoami", _sys_whoami, result="map",
                 doc="The calling session: kind, login, id, rights, ip, sid and proxied flag."),
        CallSpec("sys.calls", _sys_calls, result="list", args={"limit": "int?", "offset": "int?"},
                 doc="This session's call table by name (paged): name, args, result, right, kinds, module, doc, "
                     "streaming, fields, bound, deleted.", bound=f"page:{SYS_CALLS_PAGE}"),
        CallSpec("session.logout", session_logout, result="bool",
                 doc="End the session; its own connection then closes with bye logged_out."),
        CallSpec("events.subscribe", events_subscribe, args={"topics": "list"}, result="list",
                 doc="Add topics; returns all topics now subscribed. Events arrive as event frames."
                     " Who may read which topic: docs/protocol.md section 9 (unknown topic: bad_args;"
                     " not allowed for this session: forbidden)."),
        CallSpec("events.unsubscribe", events_unsubscribe, args={"topics": "list"}, result="list",
                 doc="Remove topics; returns the topics still subscribed."),
        CallSpec("session.proxy_login", proxy_login, right=PROXY_ANY, kinds=system,
                 args={"login": "str", "cnonce": "bytes", "ip": "ip", "kind": "str?"}, result="map",
                 doc="Start a subscriber's (kind \"user\", the default; right session.proxy) or an operator's"
                     " (kind \"admin\"; right session.proxy_admin) login on their behalf: returns handle, nonce,"
                     " salt, iter."),
        CallSpec("session.proxy_proof", proxy_proof, right=PROXY_ANY, kinds=system,
                 args={"handle": "bytes", "proof": "bytes"}, result="map",
                 doc="Finish a proxied login with the ClientProof: returns sid, sig, timeout; or, for an operator"
                     " with a second factor, sig and otp_required (then session.proxy_otp with the same handle)."),
        CallSpec("session.proxy_otp", proxy_otp, right=PROXY_ADMIN_RIGHT, kinds=system,
                 args={"handle": "bytes", "code": "str"}, result="map",
                 doc="Finish a proxied operator's login with their TOTP or recovery code: returns sid, timeout."
                     " A wrong code is auth_failed and counts as a failed login; three codes per handle."),
        CallSpec("session.token_login", token_login, kinds=system, args={"token": "str", "ip": "ip"}, result="map",
                 doc="Open a proxied session for an API token (bct_...) used from the HTTP client address ip;"
                     " needs right session.proxy_token (else forbidden). Returns sid, timeout, name and"
                     " expires_at. A wrong, revoked or expired token is auth_failed, counted against ip like a"
                     " failed login (rate_limited past the limit). The session calls what an operator with the"
                     " token's rights would (no events.* or proxy calls) and ends at expires_at and on"
                     " tokens.revoke; call as it with as and ip, like a proxied operator's."),
    ]
    # the rest answer one record (events.*: the topics of one session, at most MAX_TOPICS)
    return [spec if spec.bound else dataclasses.replace(spec, bound="fixed") for spec in specs]
