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
from billcore.server.dispatcher import PROXY_RIGHT, runs_inline
from billcore.server.event_hub import EventHub
from billcore.server.login_desk import LoginDesk
from urfa import scram
from urfa.errors import AUTH_FAILED, BAD_ARGS, CallFailed

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
    async def proxy_login(ctx: CallContext, login: str, cnonce: bytes, ip: str) -> dict[str, Any]:
        if len(cnonce) != scram.NONCE_BYTES:
            raise CallFailed(BAD_ARGS, f"cnonce must be {scram.NONCE_BYTES} bytes")
        snonce = secrets.token_bytes(scram.NONCE_BYTES)
        pending = await desk.begin_login("user", login, cnonce, snonce, ip, desk.clock())
        handle = desk.add_proxy_login(pending)
        return {"handle": handle, "nonce": snonce, "salt": pending.verifier.salt, "iter": pending.verifier.iterations}

    async def proxy_proof(ctx: CallContext, handle: bytes, proof: bytes) -> dict[str, Any]:
        now = desk.clock()
        pending = desk.take_proxy_login(handle, now)
        if pending is None:
            raise CallFailed(AUTH_FAILED, "login failed")
        session, signature = desk.finish_login(pending, proof, now, proxied=True)
        return {"sid": session.sid, "sig": signature, "timeout": int(desk.sessions.timeout)}

    system = frozenset({"system"})
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
        CallSpec("session.proxy_login", proxy_login, right=PROXY_RIGHT, kinds=system,
                 args={"login": "str", "cnonce": "bytes", "ip": "ip"}, result="map",
                 doc="Start a subscriber's login on their behalf: returns handle, nonce, salt, iter."),
        CallSpec("session.proxy_proof", proxy_proof, right=PROXY_RIGHT, kinds=system,
                 args={"handle": "bytes", "proof": "bytes"}, result="map",
                 doc="Finish a proxied login with the subscriber's ClientProof: returns sid, sig, timeout."),
    ]
    # the rest answer one record (events.*: the topics of one session, at most MAX_TOPICS)
    return [spec if spec.bound else dataclasses.replace(spec, bound="fixed") for spec in specs]
