"""One URFA connection as the service sees it: a ``Peer``.

The transport's ``ServerChannel`` carries one as its ``state``.  The login
desk's exchange in progress, the session once logged in and the dispatcher's
calls in flight hang on it; the event hub keeps its own per-link queue.
A session names the link serving it as its ``owner`` (none for a proxied
session, or a system session whose connection is gone until it resumes).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from billcore.server.sessions import Session
from urfa.server import ServerChannel

if TYPE_CHECKING:
    from billcore.server.login_desk import PendingLogin

__all__ = ["Peer"]


class Peer:
    __slots__ = ("channel", "ip", "login", "session", "tasks")

    def __init__(self, channel: ServerChannel) -> None:
        self.channel = channel
        self.ip = channel.peer_ip
        self.login: PendingLogin | None = None      # between our challenge and the client's proof
        self.session: Session | None = None
        self.tasks: dict[int, asyncio.Task[None]] = {}   # calls in flight, by call id
