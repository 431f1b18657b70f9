"""Events to subscribed connections: subscriptions, topic rules, bounded queues.

Theory of operation
-------------------
``events.subscribe`` adds topics to a session that has its own connection
(a ``Peer``); ``publish(topic, payload)`` then puts the event on the queue
of every peer whose session subscribed, and a pump per peer writes the
queue out, waiting for the socket to drain.  Who may subscribe to a topic,
and what a subscriber's session gets of its events (its own accounts',
through a view), is ``billcore.server.topics``' table: checked at subscribe
(``check_subscription``) and again for every event (``delivery``), so what
reaches a subscriber is decided per event, not once per subscription.

Each peer's queue (``Outbox``) is bounded: when a slow reader lets it fill,
the oldest event is dropped and counted, and the next event sent says how
many were lost.  A slow reader only loses events; it never holds memory
or the publisher.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from billcore.db.pool import DB_UNAVAILABLE
from billcore.server.peer import Peer
from billcore.server.sessions import AuthUnavailable, Session
from billcore.server.topics import Topic, may_subscribe
from urfa.errors import BAD_ARGS, FORBIDDEN, NO_SESSION, CallFailed, LocalProtocolError
from urfa.messages import Event
from urfa.server import ServerChannel

__all__ = ["EventHub", "Outbox", "MAX_TOPICS", "check_topics", "check_subscription", "delivery"]

log = logging.getLogger("billcore.urfa")
MAX_TOPICS = 64              # per session
MAX_TOPIC_LENGTH = 256
MAX_UNKNOWN_TOPICS = 1000    # unknown topics said once each in the log, at most this many

# accounts_of(user_id): the account ids a subscriber owns
AccountsOf = Callable[[int], Awaitable[frozenset[int]]]


def check_topics(topics: Iterable[object]) -> None:
    """``bad_args`` unless every topic is a short non-empty string (a list
    is not hashable: it would fail later, in a set)."""
    for topic in topics:
        if type(topic) is not str or not topic or len(topic) > MAX_TOPIC_LENGTH:
            raise CallFailed(BAD_ARGS, "topics are non-empty strings")


def check_subscription(rules: Mapping[str, Topic], session: Session, topics: list[str]) -> None:
    """Whether ``session`` may add ``topics``; ``CallFailed`` says why not."""
    check_topics(topics)
    for topic in topics:
        rule = rules.get(topic)
        if rule is None:
            raise CallFailed(BAD_ARGS, f"unknown topic {topic!r}")
        if not may_subscribe(rule, session.kind, session.principal.rights, session.proxied):
            raise CallFailed(FORBIDDEN, f"this session may not read topic {topic!r}")
    if len(session.topics | set(topics)) > MAX_TOPICS:
        raise CallFailed(BAD_ARGS, f"at most {MAX_TOPICS} topics per session")


def delivery(rule: Topic, session: Session, payload: Any) -> tuple[bool, Any]:
    """Whether ``session`` gets this event, and what it gets of it: an
    operator's session the payload as published, a subscriber's only the
    events of its own accounts, through the topic's subscriber view."""
    if session.kind != "user":
        return True, payload
    view = rule.for_subscriber
    if view is None or not isinstance(payload, Mapping) or payload.get("account_id") not in session.accounts:
        return False, None
    return True, view(payload)


class Outbox:
    """One peer's bounded event queue; over ``cap`` the oldest is dropped and counted."""

    __slots__ = ("cap", "events", "dropped", "wake", "pump")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.events: deque[tuple[str, Any]] = deque()
        self.dropped = 0
        self.wake = asyncio.Event()
        self.pump: asyncio.Task[None] | None = None

    def push(self, topic: str, event: Any) -> None:
        if len(self.events) >= self.cap:
            self.events.popleft()
            self.dropped += 1
        self.events.append((topic, event))
        self.wake.set()

    def take(self) -> Event | None:
        """The next event to send (carrying how many were dropped before it)."""
        if not self.events:
            return None
        topic, payload = self.events.popleft()
        dropped, self.dropped = self.dropped, 0
        return Event(topic, payload, dropped)


class EventHub:
    """Subscriptions by topic, and a queue and a pump per subscribed peer."""

    def __init__(self, rules: Mapping[str, Topic], accounts_of: AccountsOf | None,
                 queue_cap: int, lookup_timeout: float) -> None:
        self.rules = rules
        self.accounts_of = accounts_of   # None: subscribers see no account's events
        self.queue_cap = queue_cap
        self.lookup_timeout = lookup_timeout
        self._subscribers: dict[str, set[Peer]] = {}
        self._outboxes: dict[Peer, Outbox] = {}
        self._unknown_topics: set[str] = set()

    async def subscribe(self, session: Session, topics: list[str]) -> list[str]:
        """``events.subscribe``: add topics; all topics now subscribed."""
        peer = session.owner
        if not isinstance(peer, Peer) or session.proxied:
            raise CallFailed(FORBIDDEN, "only a session with its own connection may subscribe")
        check_subscription(self.rules, session, topics)
        if session.kind == "user" and topics:
            session.accounts = await self._accounts(session.principal.id)
            if peer.session is not session:   # ended while we read
                raise CallFailed(NO_SESSION, "session ended")
        session.topics.update(topics)
        for topic in topics:
            self._subscribers.setdefault(topic, set()).add(peer)
        self._ensure_pump(peer)
        return sorted(session.topics)

    async def _accounts(self, user_id: int) -> frozenset[int]:
        if self.accounts_of is None:
            return frozenset()
        try:
            return await asyncio.wait_for(self.accounts_of(user_id), self.lookup_timeout)
        except (AuthUnavailable, asyncio.TimeoutError):
            raise CallFailed(DB_UNAVAILABLE, "the database is unavailable; retry later") from None

    def unsubscribe(self, session: Session, topics: list[str]) -> list[str]:
        """``events.unsubscribe``: remove topics; the topics still subscribed."""
        check_topics(topics)
        peer = session.owner
        for topic in topics:
            session.topics.discard(topic)
            if isinstance(peer, Peer):
                self._remove(topic, peer)
        return sorted(session.topics)

    def attach(self, peer: Peer, session: Session) -> None:
        """``session`` is now served by ``peer`` (a resumed system session
        keeps its subscriptions)."""
        for topic in session.topics:
            self._subscribers.setdefault(topic, set()).add(peer)
        if session.topics:
            self._ensure_pump(peer)

    def detach(self, peer: Peer, session: Session) -> None:
        """``peer`` no longer serves ``session``: it gets none of its events."""
        for topic in session.topics:
            self._remove(topic, peer)

    def close(self, peer: Peer) -> None:
        """``peer``'s connection is gone: stop its pump, drop its queue."""
        outbox = self._outboxes.pop(peer, None)
        if outbox is not None and outbox.pump is not None:
            outbox.pump.cancel()

    def _remove(self, topic: str, peer: Peer) -> None:
        subs = self._subscribers.get(topic)
        if subs is not None:
            subs.discard(peer)
            if not subs:
                del self._subscribers[topic]

    def publish(self, topic: str, payload: Any) -> int:
        """Queue an event for every peer whose session subscribed and may
        see it (``billcore.server.topics``); returns how many."""
        rule = self.rules.get(topic)
        if rule is None:   # nobody can have subscribed; a developer must write its rule
            if topic not in self._unknown_topics and len(self._unknown_topics) < MAX_UNKNOWN_TOPICS:
                self._unknown_topics.add(topic)
                log.error("event topic %r has no rule in billcore.server.topics: delivered to nobody", topic)
            return 0
        sent = 0
        for peer in self._subscribers.get(topic, ()):
            session = peer.session
            outbox = self._outboxes.get(peer)
            if session is None or outbox is None:
                continue
            visible, event = delivery(rule, session, payload)
            if visible:
                outbox.push(topic, event)
                sent += 1
        return sent

    def _ensure_pump(self, peer: Peer) -> None:
        if peer not in self._outboxes:
            outbox = self._outboxes[peer] = Outbox(self.queue_cap)
            outbox.pump = asyncio.get_running_loop().create_task(self._pump(peer.channel, outbox))

    @staticmethod
    async def _pump(channel: ServerChannel, outbox: Outbox) -> None:
        while not channel.closed:
            await outbox.wake.wait()
            outbox.wake.clear()
            while not channel.closed:
                event = outbox.take()
                if event is None:
                    break
                try:
                    channel.send(event)
                except LocalProtocolError as exc:
                    log.error("event on %s cannot be sent: %s", event.topic, exc)
                await channel.drain()
