"""What a call handler gets as its first argument: ``CallContext``.

Every handler is ``handler(ctx: CallContext, **args)``.  The context says
who is calling (the session and its principal, kind, rights and address)
and, for a call declared streaming, lets the handler send chunks before its
result; a call that deletes or disables a principal ends its sessions
through it.  It is immutable: a handler reads it and cannot swap the session
it runs as.  It is a ``NamedTuple`` rather than a frozen dataclass because
one is built for every call on the hot path: a frozen dataclass's
``__init__`` costs about seven times as much (2 µs), a third of an inline
call's whole budget.

The core's shared parts (database pool, publish, plugin hooks, clock) are
not here: call modules get them once, as ``calls(core: CoreContext)``
(``billcore.server.context``), and their handlers close over them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from billcore.server.sessions import Principal, Session, SessionTable
from urfa.errors import LocalProtocolError

__all__ = ["CallContext", "ChunkSink"]

# send one chunk of a streaming call's result, waiting for the socket to drain;
# raises asyncio.CancelledError when the connection is gone
ChunkSink = Callable[[Any], Awaitable[None]]


class CallContext(NamedTuple):
    # The session the call runs as.  For a call a system session makes *for*
    # a proxied subscriber session, this is the subscriber's session.
    session: Session
    # The call's id on its connection (replies and chunks carry it).
    call_id: int
    # The system principal acting for a proxied session, else None.
    proxy: Principal | None = None
    # Set for a call declared streaming that came over a connection.
    chunks: ChunkSink | None = None
    # The live sessions, for a call that takes a principal's rights away
    # (``end_sessions_of``); None outside the URFA service (tests in-process).
    sessions: SessionTable | None = None

    @property
    def principal(self) -> Principal:
        return self.session.principal

    @property
    def kind(self) -> str:
        """``system``, ``admin`` or ``user``."""
        return self.session.principal.kind

    @property
    def rights(self) -> frozenset[str]:
        return self.session.principal.rights

    @property
    def ip(self) -> str:
        """The address the session is bound to (a proxied subscriber's: the
        address the office declared for them; the Unix socket's: ``unix``)."""
        return self.session.ip

    @property
    def sid(self) -> bytes:
        return self.session.sid

    async def stream(self, chunk: Any) -> None:
        """Send one chunk of a streaming call's result; waits for the socket."""
        if self.chunks is None:
            raise LocalProtocolError("stream() in a call not declared streaming")
        await self.chunks(chunk)

    def end_sessions_of(self, kind: str, principal_id: int, why: str) -> int:
        """End every session of a principal that was deleted or disabled (their
        connections get bye ``logged_out``); how many ended."""
        if self.sessions is None:
            return 0
        return len(self.sessions.end_principal(kind, principal_id, why))
