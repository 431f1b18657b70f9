"""The call dispatcher: from a ``call`` frame to its reply.

Theory of operation
-------------------
A call is admitted (``admit``, pure: ``now`` passed in) when its session
is live, the function is in that session's own call table (the snapshot
taken at login) and its arguments fit the symbol's schema at every depth
(``billcore.server.argcheck``).  A system session with right
``session.proxy`` may call *as* a proxied subscriber session, declaring the
subscriber's address, one with ``session.proxy_admin`` as a proxied
operator session, and one with ``session.proxy_token`` as an API token's
session (``proxy_right_for``); the call is then checked against that
session's table and address.

An admitted call's handler runs holding the symbol's module
(``registry.in_flight``), as a task; replies go out as they finish, in any
order.  A handler that never waits for anything (the in-memory builtins,
``sys.ping`` first) can instead be a plain function wrapped by
``runs_inline``: it is called right in the socket callback, and its reply
joins the same write as the other replies to that read, with no task,
coroutine or loop round trip.  (Starting *any* coroutine eagerly and making
a task only if it suspends would need Python 3.12's eager tasks: on 3.11 a
handler started outside a task has no ``asyncio.current_task()``, which
``asyncio.timeout`` and asyncpg need.)

The error boundary: ``CallFailed``, a ``BillingError`` or a PostgreSQL
refusal of the data becomes an error reply with its documented code
(``billcore.server.wire_errors``, never PostgreSQL's text); any other
exception is a bug, logged with its traceback and answered ``internal``
with no detail.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import Callable
from typing import Any

from billcore.server import argcheck
from billcore.server.call_context import CallContext
from billcore.server.calls import CallRegistry, CallSpec, Handler, NotInTable, Symbol, SymbolDeleted, allows
from billcore.server.peer import Peer
from billcore.server.sessions import NoSession, Principal, Session, SessionTable
from billcore.server.wire_errors import to_call_failed
from urfa.errors import (
    BAD_ARGS, CANCELLED, DELETED, FORBIDDEN, INTERNAL, NO_SESSION, NOT_IN_TABLE, CallFailed, LocalProtocolError,
)
from urfa.messages import Call, Chunk
from urfa.server import ServerChannel

__all__ = ["Admitted", "Dispatcher", "PROXY_ADMIN_RIGHT", "PROXY_RIGHT", "PROXY_TOKEN_RIGHT", "admit",
           "proxy_right_for", "runs_inline"]

log = logging.getLogger("billcore.urfa")
PROXY_RIGHT = "session.proxy"               # act for subscribers (the web office)
PROXY_ADMIN_RIGHT = "session.proxy_admin"   # act for operators (the operator's console)
PROXY_TOKEN_RIGHT = "session.proxy_token"   # act as API tokens (the HTTP API)
_PROXY_RIGHTS = (PROXY_RIGHT, PROXY_ADMIN_RIGHT, PROXY_TOKEN_RIGHT)
_INLINE = "__urfa_runs_inline__"

# CallContext(...) without the NamedTuple's Python-level __new__, which costs
# as much again on the hot path; it takes every field, in order:
_new_context = tuple.__new__
assert CallContext._fields == ("session", "call_id", "proxy", "chunks", "sessions"), "update on_call"

# observe(function name, reply code, seconds): after each call run as a task
Observe = Callable[[str, str, float], None]


def runs_inline(fn: Callable[..., Any]) -> Handler:
    """Make a call handler of a plain function that answers without waiting.

    The dispatcher calls ``fn(ctx, **args)`` straight from the socket
    callback (see the module notes); anyone else gets an ordinary async
    handler.  ``fn`` runs to its end before anything else can, so it holds
    no module reference: it must not unload its own module.
    """
    if inspect.iscoroutinefunction(fn):
        raise TypeError(f"runs_inline takes a plain function, not the coroutine function {fn!r}")

    @functools.wraps(fn)
    async def handler(ctx: CallContext, **args: Any) -> Any:
        return fn(ctx, **args)

    setattr(handler, _INLINE, fn)
    return handler


# (the session the call runs as, the system principal acting for it if
# proxied, the symbol called): a plain tuple, one per call on the hot path
Admitted = tuple[Session, Principal | None, Symbol]


def proxy_right_for(kind: str) -> str:
    """The right a system session needs to act for a proxied session of ``kind``."""
    return PROXY_ADMIN_RIGHT if kind == "admin" else PROXY_TOKEN_RIGHT if kind == "token" else PROXY_RIGHT


def admit(sessions: SessionTable, session: Session, call: Call, now: float) -> Admitted:
    """What ``session``'s ``call`` runs as, or ``CallFailed`` saying why it
    may not run.  Touches the sessions it finds (``SessionTable.touch``)."""
    proxy: Principal | None = None
    if call.as_sid is not None:
        rights = session.principal.rights
        if session.kind != "system" or not any(allows(rights, right) for right in _PROXY_RIGHTS):
            raise CallFailed(FORBIDDEN, "this session may not act for others")
        sessions.touch(session, now)
        peek = sessions.get(call.as_sid)
        if peek is not None and peek.proxied and not allows(rights, proxy_right_for(peek.kind)):
            raise CallFailed(FORBIDDEN, f"this session may not act for {peek.kind} sessions")
        try:
            target = sessions.lookup(call.as_sid, call.as_ip or "", now)
        except NoSession as exc:
            raise CallFailed(NO_SESSION, str(exc)) from None
        if not target.proxied:
            raise CallFailed(NO_SESSION, "not a proxied session")
        proxy, session = session.principal, target
    else:
        sessions.touch(session, now)
    try:
        symbol = session.table.lookup(call.fn)
    except NotInTable:
        raise CallFailed(NOT_IN_TABLE, f"{call.fn} is not in this session; log in again") from None
    except SymbolDeleted:
        raise CallFailed(DELETED, f"{call.fn} was unloaded") from None
    args_schema = symbol.spec.args
    if call.args or args_schema:
        problem = argcheck.check_args(args_schema, call.args)
        if problem is not None:
            raise CallFailed(BAD_ARGS, problem)
    return session, proxy, symbol


async def _send_chunk(channel: ServerChannel, call_id: int, chunk: Any) -> None:
    if not channel.send(Chunk(call_id, chunk)):
        raise asyncio.CancelledError()   # the connection is gone: end the handler
    await channel.drain()


class Dispatcher:
    def __init__(self, registry: CallRegistry, sessions: SessionTable, clock: Callable[[], float]) -> None:
        self.registry = registry
        self.sessions = sessions
        self.clock = clock
        self.observe: Observe | None = None   # metrics, set by the core

    def on_call(self, channel: ServerChannel, call: Call) -> None:
        peer: Peer = channel.state  # type: ignore[assignment]  # the service's, set in on_open
        call_id = call.id
        session = peer.session
        if session is None:   # logged out or expired, connection closing
            channel.send_error(call_id, NO_SESSION, "session ended")
            return
        try:
            session, proxy, symbol = admit(self.sessions, session, call, self.clock())
        except CallFailed as refusal:
            channel.send_error(call_id, refusal.code, refusal.message)
            return
        spec = symbol.spec
        args = call.args
        chunks = functools.partial(_send_chunk, channel, call_id) if spec.streaming else None
        ctx = _new_context(CallContext, (session, call_id, proxy, chunks, self.sessions))
        inline = getattr(spec.handler, _INLINE, None)
        if inline is not None:
            try:
                value = inline(ctx, **args)
            except (Exception, asyncio.CancelledError) as exc:
                self._send_failure(channel, call_id, spec, exc)
                return
            try:
                channel.send_result(call_id, value)
            except LocalProtocolError as exc:
                self._unencodable(channel, call_id, spec, exc)
            return
        # The call holds its module from now (not from its task's first step)
        # until it ends, so an unload in between waits for it.  The bookkeeping
        # is a done callback: it also runs for a task cancelled before it
        # started (a cancel in the same read as its call), whose coroutine
        # never runs at all.
        guard = self.registry.in_flight(symbol)
        guard.__enter__()
        task = asyncio.get_running_loop().create_task(self._finish(channel, ctx, spec, args))
        peer.tasks[call_id] = task
        task.add_done_callback(functools.partial(self._call_done, peer, guard, call_id))

    @staticmethod
    def cancel(peer: Peer, call_id: int) -> None:
        task = peer.tasks.get(call_id)
        if task is not None:
            task.cancel()

    async def _finish(self, channel: ServerChannel, ctx: CallContext, spec: CallSpec, args: dict[str, Any]) -> None:
        started = time.monotonic()
        code = "ok"
        try:
            value = await spec.handler(ctx, **args)
        except (Exception, asyncio.CancelledError) as exc:
            code = self._send_failure(channel, ctx.call_id, spec, exc)
            return
        finally:
            # only names found in a call table reach here: labels stay bounded
            if self.observe is not None:
                self.observe(spec.name, code, time.monotonic() - started)
        try:
            channel.send_result(ctx.call_id, value)
        except LocalProtocolError as exc:
            self._unencodable(channel, ctx.call_id, spec, exc)

    @staticmethod
    def _call_done(peer: Peer, guard: Any, call_id: int, task: asyncio.Task[None]) -> None:
        guard.__exit__(None, None, None)
        if peer.tasks.get(call_id) is task:
            del peer.tasks[call_id]
        if task.cancelled():   # cancelled before its first step: nothing answered yet
            peer.channel.send_error(call_id, CANCELLED, "cancelled")

    @staticmethod
    def _unencodable(channel: ServerChannel, call_id: int, spec: CallSpec, exc: LocalProtocolError) -> None:
        log.error("result of %s cannot be sent: %s", spec.name, exc)
        channel.send_error(call_id, INTERNAL, "result could not be encoded")

    @staticmethod
    def _send_failure(channel: ServerChannel, call_id: int, spec: CallSpec, exc: BaseException) -> str:
        """Answer a failed call; return the code sent.  Domain and database
        refusals get their documented code (``billcore.server.wire_errors``)."""
        if isinstance(exc, asyncio.CancelledError):
            channel.send_error(call_id, CANCELLED, "cancelled")
            return CANCELLED
        failed = to_call_failed(exc)
        if failed is None:   # the boundary: anything unexpected becomes `internal`, logged here
            log.error("call %s failed", spec.name, exc_info=exc)
            channel.send_error(call_id, INTERNAL, "internal error")
            return INTERNAL
        channel.send_error(call_id, failed.code, failed.message)
        return failed.code
