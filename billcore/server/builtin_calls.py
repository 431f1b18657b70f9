"""The built-in URFA calls every session may have: ``sys.*``, ``session.*``, ``events.*``.

They live in the core's own module ``builtin`` (never unloaded).  The ones
that only read or change in-memory state are plain functions wrapped by
``runs_inline``: the service calls them straight from the socket callback
and answers in the same write, without a task per call (see
``billcore.server.service``).
"""

from __future__ import annotations

import dataclasses
import secrets
from datetime import datetime, timezone
from typing import Any

from billcore.server.calls import CallSpec
from billcore.server.service import PROXY_RIGHT, CallContext, runs_inline
from urfa import errors as E
from urfa import scram
from urfa.errors import CallFailed

__all__ = ["builtin_specs"]


@runs_inline
def _sys_ping(ctx: CallContext) -> str:
    return "pong"


@runs_inline
def _sys_time(ctx: CallContext) -> datetime:
    return datetime.now(timezone.utc)


@runs_inline
def _sys_whoami(ctx: CallContext) -> dict[str, Any]:
    p = ctx.principal
    return {
        "kind": p.kind, "login": p.login, "id": p.id, "rights": sorted(p.rights),
        "ip": ctx.ip, "sid": ctx.sid, "proxied": ctx.session.proxied,
    }


SYS_CALLS_PAGE = 500  # entries of sys.calls per page: it grows with the plugins' calls


@runs_inline
def _sys_calls(ctx: CallContext, limit: int | None = None, offset: int | None = None) -> list[dict[str, Any]]:
    # nil for an optional argument means "not given", as in every other call
    limit = SYS_CALLS_PAGE if limit is None else limit
    offset = 0 if offset is None else offset
    if not 1 <= limit <= SYS_CALLS_PAGE or not 0 <= offset:
        raise CallFailed(E.BAD_ARGS, f"limit must be 1..{SYS_CALLS_PAGE}, offset >= 0")
    return ctx.session.table.describe()[offset:offset + limit]


@runs_inline
def _session_logout(ctx: CallContext) -> bool:
    ctx.service.logout(ctx.session)
    return True


# A task: a subscriber's subscription reads their account ids.
async def _events_subscribe(ctx: CallContext, topics: list[str]) -> list[str]:
    return await ctx.service.subscribe(ctx.session, topics)


@runs_inline
def _events_unsubscribe(ctx: CallContext, topics: list[str]) -> list[str]:
    return ctx.service.unsubscribe(ctx.session, topics)


# The proxy calls ask the auth backend (the database): they run as tasks.
async def _proxy_login(ctx: CallContext, login: str, cnonce: bytes, ip: str) -> dict[str, Any]:
    if len(cnonce) != scram.NONCE_BYTES:
        raise CallFailed(E.BAD_ARGS, f"cnonce must be {scram.NONCE_BYTES} bytes")
    snonce = secrets.token_bytes(scram.NONCE_BYTES)
    pending = await ctx.service.begin_login("user", login, cnonce, snonce, ip)
    handle = ctx.service.add_proxy_login(pending)
    return {"handle": handle, "nonce": snonce, "salt": pending.verifier.salt, "iter": pending.verifier.iterations}


async def _proxy_proof(ctx: CallContext, handle: bytes, proof: bytes) -> dict[str, Any]:
    pending = ctx.service.take_proxy_login(handle)
    if pending is None:
        raise CallFailed(E.AUTH_FAILED, "login failed")
    session, signature = ctx.service.finish_login(pending, proof, proxied=True)
    return {"sid": session.sid, "sig": signature, "timeout": int(ctx.service.config.session_timeout)}


def builtin_specs() -> list[CallSpec]:
    """The calls every session may have (``module="builtin"``)."""
    system = frozenset({"system"})
    specs = [
        CallSpec("sys.ping", _sys_ping, result="str", doc="Answers \"pong\"."),
        CallSpec("sys.time", _sys_time, result="time", doc="The server's current time (UTC)."),
        CallSpec("sys.whoami", _sys_whoami, result="map",
                 doc="The calling session: kind, login, id, rights, ip, sid and proxied flag."),
        CallSpec("sys.calls", _sys_calls, result="list", args={"limit": "int?", "offset": "int?"},
                 doc="This session's call table by name (paged): name, args, result, right, kinds, module, doc, "
                     "streaming, fields, bound, deleted.", bound=f"page:{SYS_CALLS_PAGE}"),
        CallSpec("session.logout", _session_logout, result="bool",
                 doc="End the session; its own connection then closes with bye logged_out."),
        CallSpec("events.subscribe", _events_subscribe, args={"topics": "list"}, result="list",
                 doc="Add topics; returns all topics now subscribed. Events arrive as event frames."
                     " Who may read which topic: docs/protocol.md section 9 (unknown topic: bad_args;"
                     " not allowed for this session: forbidden)."),
        CallSpec("events.unsubscribe", _events_unsubscribe, args={"topics": "list"}, result="list",
                 doc="Remove topics; returns the topics still subscribed."),
        CallSpec("session.proxy_login", _proxy_login, right=PROXY_RIGHT, kinds=system,
                 args={"login": "str", "cnonce": "bytes", "ip": "ip"}, result="map",
                 doc="Start a subscriber's login on their behalf: returns handle, nonce, salt, iter."),
        CallSpec("session.proxy_proof", _proxy_proof, right=PROXY_RIGHT, kinds=system,
                 args={"handle": "bytes", "proof": "bytes"}, result="map",
                 doc="Finish a proxied login with the subscriber's ClientProof: returns sid, sig, timeout."),
    ]
    # the rest answer one record (events.*: the topics of one session, at most MAX_TOPICS)
    return [s if s.bound else dataclasses.replace(s, bound="fixed") for s in specs]
