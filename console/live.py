"""Live updates: the console's own link hears core events; browsers hear only "changed".

Theory of operation
-------------------
The console's system link subscribes to the event topics of ``TOPICS``
(each on its own: a topic its login may not read is logged and skipped,
not a failed connection).  An event wakes every browser listening to its
topic with ``event: changed`` / ``data: <topic>`` on a Server-Sent Events
stream; the event's payload never leaves the console, so the page re-fetches
what it shows with the operator's own session and the core's rights decide
what that is.  When the link reconnects or drops events, every listener is
told every topic changed (it may have missed one).

Bounded: each listener holds the set of its topics changed since it last
sent (a topic changed twice is "changed" once), at most
``max_listeners`` streams are open, and a quiet stream sends a comment every
``keepalive`` seconds so a dead browser is noticed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from urfa.client import Client
from urfa.errors import CallFailed

__all__ = ["TOPICS", "LiveHub", "Listener"]

log = logging.getLogger("console.live")

# the core topics console pages refresh on (billcore/server/topics.py); the console's
# system login hears each with events.notice (topics.NOTICE_RIGHT), which opens no call
TOPICS = ("blocks", "radius.nas", "radius.disconnect", "radius.sessions")


class Listener:
    """One browser's stream: the topics changed since it last heard (a set, so bounded by its topics)."""

    def __init__(self, topics: frozenset[str]) -> None:
        self.topics = topics
        self.pending: set[str] = set()
        self.woken = asyncio.Event()

    def tell(self, topic: str) -> None:
        if topic in self.topics:
            self.pending.add(topic)
            self.woken.set()

    async def changed(self, timeout: float) -> list[str]:
        """The topics changed since the last call, waiting at most ``timeout`` (then [])."""
        try:
            await asyncio.wait_for(self.woken.wait(), timeout)
        except asyncio.TimeoutError:
            return []
        self.woken.clear()
        topics, self.pending = sorted(self.pending), set()
        return topics


class LiveHub:
    def __init__(self, topics: Iterable[str] = TOPICS, max_listeners: int = 256, keepalive: float = 15.0) -> None:
        self.topics = tuple(topics)
        self.max_listeners = max_listeners
        self.keepalive = keepalive
        self.listeners: set[Listener] = set()
        self.subscribed: set[str] = set()

    async def on_connected(self, client: Client, how: str) -> None:
        """The link's hook: subscribe topic by topic (a refused one is skipped)."""
        self.subscribed.clear()
        for topic in self.topics:
            try:
                await client.call("events.subscribe", {"topics": [topic]}, timeout=10.0)
            except CallFailed as exc:
                log.warning("console may not read a topic", extra={"topic": topic, "reason": exc.code})
                continue
            self.subscribed.add(topic)
        if how != "login" or self.listeners:
            self.missed("reconnected")

    def on_event(self, event: Any) -> None:
        for listener in list(self.listeners):
            listener.tell(event.topic)

    def missed(self, reason: str) -> None:
        for listener in list(self.listeners):
            for topic in listener.topics:
                listener.tell(topic)

    def listen(self, topics: Iterable[str]) -> Listener | None:
        """A new listener, or None when ``max_listeners`` are open."""
        wanted = frozenset(topics)
        unknown = wanted - set(self.topics)
        if unknown:
            raise ValueError(f"not a console topic: {sorted(unknown)} (known: {self.topics})")
        if len(self.listeners) >= self.max_listeners:
            return None
        listener = Listener(wanted)
        self.listeners.add(listener)
        return listener

    def leave(self, listener: Listener) -> None:
        self.listeners.discard(listener)
