"""Event hooks: the core fires events, plugins' handlers react.

Theory of operation
-------------------
The change an event describes (a payment, a block, a rated batch, …)
enqueues the event in the outbox inside its own transaction
(``billcore.billing.outbox``).  After the commit the core's dispatcher makes
one ``hook`` delivery per plugin that subscribes to the event at that
moment, and the core's hook worker (``billcore.server.outbox_service``)
calls ``await bus.fire_owner(EVENT, owner, payload)`` for each: only that
plugin's handlers run, with the event's payload plus ``event_id``.  So a
hook never sees a change that is later rolled back, never undoes or delays
the core's commit, and hears of every committed change **at least once**
(a handler that raised or timed out is tried again with backoff; a core
killed mid-delivery delivers again after its restart): handlers
de-duplicate on ``event_id``.

Handlers run one after another in subscription order, each under a timeout.
A handler that raises or times out is logged with its owner and counted; the
remaining handlers still run and ``fire`` never raises because of a handler.
Each handler gets a read-only view of the payload, so one plugin cannot
change what the next one sees.  A handler unsubscribed while an event is
being delivered (its plugin was torn down) is skipped.

Payload shapes (all money in integer micro-units) are the contract with
plugin authors and are documented in docs/plugins.md.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from billcore.plugins.errors import PluginError

__all__ = [
    "PAYMENT_ADDED",
    "PAYMENT_CANCELLED",
    "ACCOUNT_CHARGED",
    "BATCH_RATED",
    "ACCOUNT_BLOCKED",
    "ACCOUNT_UNBLOCKED",
    "PERIOD_CLOSED",
    "SESSION_STARTED",
    "SESSION_STOPPED",
    "EVENTS",
    "HookBus",
    "HookHandler",
    "FireResult",
    "ChannelSender",
    "CHANNEL_NAME",
]

PAYMENT_ADDED = "payment.added"
"""{account_id, amount, balance, external_id, method, payment_id} — payments.add, api.billing."""
PAYMENT_CANCELLED = "payment.cancelled"
"""{account_id, payment_id, amount, balance} — payments.cancel (amount: the payment's, as booked)."""
ACCOUNT_CHARGED = "account.charged"
"""{account_id, amount, balance, reason} — periodic runs: periodic and one-off fees."""
BATCH_RATED = "batch.rated"
"""{batch_id, charges: [{account_id, amount, balance}, …]} — traffic rated."""
ACCOUNT_BLOCKED = "account.blocked"
"""{account_id, balance, reason, kind, action="set", block_id, at, by} — ``at`` an ISO 8601 string."""
ACCOUNT_UNBLOCKED = "account.unblocked"
"""{account_id, balance, reason, kind, action="lifted", block_id, at, by}"""
PERIOD_CLOSED = "period.closed"
"""{period_start, period_end} — unix seconds; once per period, when the periodic run that closed it finishes."""
SESSION_STARTED = "session.started"
"""{account_id, session_id, ip} — a subscriber's network session began."""
SESSION_STOPPED = "session.stopped"
"""{account_id, session_id, ip, bytes_in, bytes_out}"""

EVENTS: frozenset[str] = frozenset({
    PAYMENT_ADDED, PAYMENT_CANCELLED, ACCOUNT_CHARGED, BATCH_RATED, ACCOUNT_BLOCKED,
    ACCOUNT_UNBLOCKED, PERIOD_CLOSED, SESSION_STARTED, SESSION_STOPPED,
})

HookHandler = Callable[[Mapping[str, Any]], Awaitable[None]]
ChannelSender = Callable[..., Awaitable[None]]
"""``await send(to, text, lang=…, event_id=…)``: a plugin's notification channel (an SMS gateway, a
messenger) sends one short message; raising says it was not sent (the outbox tries again later)."""
CHANNEL_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


@dataclass(frozen=True, slots=True)
class FireResult:
    """What happened to one event: how many handlers ran, which owners failed."""

    event: str
    delivered: int
    failed: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, eq=False)
class _Subscription:
    event: str
    handler: HookHandler
    owner: str


@dataclass(slots=True)
class HookBus:
    """Event name → handlers, fired by the core."""

    timeout: float = 5.0
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("billcore.plugins.hooks"))
    _subs: dict[str, list[_Subscription]] = field(default_factory=dict)
    _channels: dict[str, tuple[str, ChannelSender]] = field(default_factory=dict)   # name -> (owner, send)

    def add_channel(self, name: str, send: ChannelSender, owner: str) -> None:
        """A notification channel served by ``owner`` (one plugin per channel name)."""
        if not CHANNEL_NAME.match(name):
            raise PluginError(f"channel name {name!r}: [a-z][a-z0-9_]{{0,31}}")
        held = self._channels.get(name)
        if held is not None and held[0] != owner:
            raise PluginError(f"notification channel {name!r} is served by plugin {held[0]!r} already")
        self._channels[name] = (owner, send)

    def channel(self, name: str) -> ChannelSender | None:
        held = self._channels.get(name)
        return None if held is None else held[1]

    def channel_owner(self, name: str) -> str | None:
        held = self._channels.get(name)
        return None if held is None else held[0]

    def channel_names(self) -> list[str]:
        return sorted(self._channels)

    def subscribe(self, event: str, handler: HookHandler, owner: str) -> None:
        if event not in EVENTS:
            raise PluginError(f"unknown event {event!r}; known: {', '.join(sorted(EVENTS))}")
        if not callable(handler):
            raise PluginError(f"hook for {event} is not callable")
        self._subs.setdefault(event, []).append(_Subscription(event, handler, owner))

    def unsubscribe_owner(self, owner: str) -> int:
        """Remove every handler of ``owner``; return how many were removed."""
        removed = 0
        for name in [n for n, (held_by, _) in self._channels.items() if held_by == owner]:
            del self._channels[name]
            removed += 1
        for event, subs in list(self._subs.items()):
            kept = [sub for sub in subs if sub.owner != owner]
            removed += len(subs) - len(kept)
            self._subs[event] = kept
        return removed

    def owners(self, event: str) -> list[str]:
        return [sub.owner for sub in self._subs.get(event, ())]

    async def fire_owner(self, event: str, owner: str, payload: Mapping[str, Any]) -> FireResult:
        """Run only ``owner``'s handlers of ``event`` (one outbox delivery).
        ``delivered`` 0: the owner does not subscribe (any more)."""
        return await self._run(event, payload, owner)

    async def fire(self, event: str, payload: Mapping[str, Any]) -> FireResult:
        """Run every handler of ``event`` at once, in subscription order."""
        return await self._run(event, payload, None)

    async def _run(self, event: str, payload: Mapping[str, Any], owner: str | None) -> FireResult:
        if event not in EVENTS:
            raise PluginError(f"unknown event {event!r}")
        view = MappingProxyType(dict(payload))
        delivered = 0
        failed: list[str] = []
        for sub in tuple(self._subs.get(event, ())):
            if owner is not None and sub.owner != owner:
                continue
            if sub not in self._subs.get(event, ()):
                continue  # unsubscribed while this event was being delivered
            delivered += 1
            try:
                async with asyncio.timeout(self.timeout):
                    await sub.handler(view)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - containing plugin failures is this bus's job
                failed.append(sub.owner)
                self.log.exception("hook failed", extra={"event": event, "plugin": sub.owner})
        return FireResult(event, delivered, tuple(failed))
