"""The core's side of the outbox: the dispatcher, the hook worker, metrics.

Theory of operation
-------------------
Events are enqueued inside the transactions that cause them
(``billcore.billing.outbox``); the schema's trigger NOTIFYs
``billcore_outbox`` at their commit.  Here:

* the **dispatcher** wakes on that notification (``relay_notifications``,
  which also calls once on every (re)connect, so nothing is missed while it
  was deaf) or every ``[outbox] poll_interval`` seconds, and runs
  ``outbox_delivery.dispatch`` with the routers until no undispatched event
  is left.  Each batch that made deliveries is published on topic
  ``outbox`` ``{channels}`` so the deliverers of those channels (the radius
  process, the notify edge) claim at once instead of at their next poll; the
  in-core hook worker is woken directly.  The same loop refreshes the
  gauges and prunes (``[outbox] keep_days``) once an hour.
* the **hook worker** claims channel ``hook`` and runs, per delivery, only
  the target plugin's handlers (``HookBus.fire_owner``) with the event's
  payload plus ``event_id``; a handler that failed or timed out is
  ``failed`` (retried with backoff, dead after ``max_attempts``).  Other
  channels delivered inside the core (notify's ``plugin`` channel) register
  a deliverer in ``OutboxService.in_core`` and are worked the same way.

Routers (``Router``: events in, deliveries out, at dispatch time):

* ``hook_router(bus)`` — one delivery per plugin owner subscribed to the
  event now (channel ``hook``, target the owner's name);
* ``radius_router`` — ``account.blocked`` → ``{"action": "disconnect"}`` and
  every event in ``billcore.billing.fup.RATE_EVENTS`` (when that module
  exists) → ``{"action": "rate"}``, channel ``radius``, one delivery per
  event.

Nothing here is needed for correctness but the database rows: a core killed
at any moment restarts, finds undispatched events and unacknowledged
deliveries (their leases run out), and carries on.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from prometheus_client import Counter, Gauge

from billcore.billing import outbox_delivery as od
from billcore.billing.outbox_delivery import DeliveryPolicy, NewDelivery, Router, StoredEvent
from billcore.common.config import OutboxSection
from billcore.db.pool import DB_GONE
from billcore.db.rows import DbConnection
from billcore.plugins.hooks import HookBus

__all__ = [
    "OUTBOX_TOPIC", "HOOK_CHANNEL", "RADIUS_CHANNEL", "OutboxService", "hook_router", "radius_router",
    "rate_events", "policy_of", "DELIVERED", "FAILED", "DEAD", "InCoreDeliverer", "plugin_channel_deliverer",
]

log = logging.getLogger("billcore.server.outbox")

OUTBOX_TOPIC = "outbox"
HOOK_CHANNEL = "hook"
RADIUS_CHANNEL = "radius"
PRUNE_EVERY = 3600.0     # seconds between prunes
HOOK_BATCH = 20          # hook deliveries per claim: each may take the bus's timeout
DISPATCH_BATCH = 500
MAX_DISPATCH_ROUNDS = 1000   # batches per wake-up; the next wake-up or poll does the rest

PENDING = Gauge("billcore_outbox_pending", "Outbox deliveries waiting to be delivered, by channel", ["channel"],
                multiprocess_mode="livemax")
DEAD_NOW = Gauge("billcore_outbox_dead", "Outbox deliveries that gave up (dead letters), by channel", ["channel"],
                 multiprocess_mode="livemax")
OLDEST_PENDING = Gauge("billcore_outbox_oldest_pending_seconds",
                       "Age of the event of the oldest pending delivery, by channel", ["channel"],
                       multiprocess_mode="livemax")
DISPATCH_LAG = Gauge("billcore_outbox_dispatch_lag_seconds",
                     "Age of the oldest event not yet fanned out into deliveries", multiprocess_mode="livemax")
DELIVERED = Counter("billcore_outbox_delivered", "Outbox deliveries acknowledged, by channel", ["channel"])
FAILED = Counter("billcore_outbox_failed", "Outbox delivery tries that failed (retried later), by channel",
                 ["channel"])
DEAD = Counter("billcore_outbox_dead_letters", "Outbox deliveries that became dead, by channel", ["channel"])


def policy_of(section: OutboxSection) -> DeliveryPolicy:
    return DeliveryPolicy(section.max_attempts, section.backoff_base, section.backoff_cap)


def hook_router(bus: HookBus) -> Router:
    """One ``hook`` delivery per plugin subscribed to the event at dispatch time."""
    async def route(conn: DbConnection, events: Sequence[StoredEvent], now: dt.datetime) -> list[NewDelivery]:
        out = []
        for e in events:
            for owner in sorted(set(bus.owners(e.event))):
                out.append(NewDelivery(e.id, HOOK_CHANNEL, owner))
        return out

    return route


def rate_events() -> tuple[str, ...]:
    """fup's ``RATE_EVENTS`` (events after which RADIUS re-applies an account's
    rate), or none while that module is not installed."""
    try:
        fup = importlib.import_module("billcore.billing.fup")
    except ImportError:
        return ()
    return tuple(getattr(fup, "RATE_EVENTS", ()))


async def radius_router(conn: DbConnection, events: Sequence[StoredEvent], now: dt.datetime) -> list[NewDelivery]:
    """``account.blocked`` → Disconnect; fup's rate events → re-apply the rate."""
    rate = rate_events()
    out = []
    for e in events:
        if e.account_id is None:
            continue
        if e.event == "account.blocked":
            out.append(NewDelivery(e.id, RADIUS_CHANNEL, "", {"action": "disconnect", "account_id": e.account_id}))
        elif e.event in rate:
            out.append(NewDelivery(e.id, RADIUS_CHANNEL, "", {"action": "rate", "account_id": e.account_id}))
    return out


InCoreDeliverer = Callable[[od.Claimed], Awaitable[str | None]]


def plugin_channel_deliverer(bus: HookBus) -> InCoreDeliverer:
    """Channel ``plugin``: the short message goes to the plugin serving the delivery's target channel
    (``api.notification_channel``), under the bus's timeout; its exception is the failure's text."""
    async def deliver(claimed: od.Claimed) -> str | None:
        send = bus.channel(claimed.target)
        if send is None:
            return f"no loaded plugin serves notification channel {claimed.target!r}"
        message = claimed.message
        try:
            async with asyncio.timeout(bus.timeout):
                await send(str(message.get("to", "")), str(message.get("text", "")),
                           lang=str(message.get("lang", "en")), event_id=claimed.event_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a plugin's failure is the delivery's, retried
            return f"{type(exc).__name__}: {exc}"[:500]
        return None

    return deliver


@dataclass(slots=True)
class OutboxService:
    """The dispatcher and the hook worker of one core."""

    pool: asyncpg.Pool
    section: OutboxSection
    routers: list[Router]
    bus: HookBus | None
    publish: Callable[[str, dict[str, Any]], object]
    now: Callable[[], dt.datetime]
    wake_dispatch: asyncio.Event = field(default_factory=asyncio.Event)
    wake_hooks: asyncio.Event = field(default_factory=asyncio.Event)
    # other channels delivered inside the core (notify's ``plugin`` channel): channel → deliverer,
    # which answers None when delivered, else the error (retried with backoff)
    in_core: dict[str, InCoreDeliverer] = field(default_factory=dict)
    _last_prune: float = 0.0

    @property
    def policy(self) -> DeliveryPolicy:
        return policy_of(self.section)

    def notified(self, payload: str | None) -> None:
        """A NOTIFY on billcore_outbox (None: the relay (re)connected)."""
        if payload != "outbox_deliveries":   # new deliveries come from us, or from outbox.retry
            self.wake_dispatch.set()
        if payload != "outbox_events":
            self.wake_hooks.set()

    async def dispatch_once(self) -> od.DispatchResult:
        """Fan out everything undispatched (bounded); publish and wake per batch."""
        total_events = total = 0
        channels: set[str] = set()
        oldest: dt.datetime | None = None
        for _ in range(MAX_DISPATCH_ROUNDS):
            async with self.pool.acquire() as conn:
                result = await od.dispatch(conn, self.routers, self.now(), DISPATCH_BATCH)
            if result.events == 0:
                break
            total_events += result.events
            total += result.deliveries
            if oldest is None and result.oldest is not None:
                oldest = result.oldest
            if result.channels:
                channels.update(result.channels)
                self.publish(OUTBOX_TOPIC, {"channels": list(result.channels)})
                if HOOK_CHANNEL in result.channels:
                    self.wake_hooks.set()
        return od.DispatchResult(total_events, total, tuple(sorted(channels)), oldest)

    async def refresh_metrics(self) -> None:
        async with self.pool.acquire() as conn:
            s = await od.stats(conn, self.now())
        DISPATCH_LAG.set(s.oldest_undispatched_age or 0.0)
        seen: set[str] = set()
        for c in s.channels:
            seen.add(c.channel)
            if c.state == "pending":
                PENDING.labels(c.channel).set(c.count)
                OLDEST_PENDING.labels(c.channel).set(c.oldest_age or 0.0)
            elif c.state == "dead":
                DEAD_NOW.labels(c.channel).set(c.count)
        for channel in seen:
            if not any(c.channel == channel and c.state == "pending" for c in s.channels):
                PENDING.labels(channel).set(0)
                OLDEST_PENDING.labels(channel).set(0)
            if not any(c.channel == channel and c.state == "dead" for c in s.channels):
                DEAD_NOW.labels(channel).set(0)

    async def maybe_prune(self) -> None:
        if time.monotonic() - self._last_prune < PRUNE_EVERY and self._last_prune:
            return
        self._last_prune = time.monotonic()
        async with self.pool.acquire() as conn:
            result = await od.prune(conn, self.now(), self.section.keep_days)
        if result.deliveries or result.events:
            log.info("outbox pruned", extra={"deliveries": result.deliveries, "events": result.events})

    async def run_dispatcher(self) -> None:
        """Until cancelled: dispatch on every wake-up and every poll interval."""
        while True:
            try:
                await asyncio.wait_for(self.wake_dispatch.wait(), self.section.poll_interval)
            except asyncio.TimeoutError:
                pass
            self.wake_dispatch.clear()
            try:
                await self.dispatch_once()
                await self.refresh_metrics()
                await self.maybe_prune()
            except DB_GONE as exc:
                log.warning("outbox dispatch failed; will retry",
                            extra={"reason": f"{type(exc).__name__}: {exc}"})
            except Exception:  # noqa: BLE001 - a broken router must not stop the core; logged, retried
                log.exception("outbox dispatch failed; will retry")

    async def deliver_hooks_once(self) -> int:
        """Claim and deliver one batch of ``hook`` deliveries; how many were claimed."""
        bus = self.bus
        if bus is None:
            return 0
        async with self.pool.acquire() as conn:
            claimed = await od.claim(conn, HOOK_CHANNEL, HOOK_BATCH, self.section.lease, self.now())
        for c in claimed:
            payload = {**c.payload, "event_id": c.event_id}
            result = await bus.fire_owner(c.event, c.target, payload)
            async with self.pool.acquire() as conn:
                if result.delivered and not result.failed:
                    if await od.done(conn, [c.id], self.now(), [HOOK_CHANNEL]):
                        DELIVERED.labels(HOOK_CHANNEL).inc()
                    continue
                error = (f"plugin {c.target} does not subscribe to {c.event}" if not result.delivered
                         else f"a handler of plugin {c.target} failed or timed out")
                failed = await od.failed(conn, c.id, error, self.now(), self.policy, channels=[HOOK_CHANNEL])
            self.count_failure(HOOK_CHANNEL, failed)
        return len(claimed)

    async def deliver_in_core_once(self, channel: str) -> int:
        """Claim and deliver one batch of a registered in-core channel; how many were claimed."""
        deliverer = self.in_core[channel]
        async with self.pool.acquire() as conn:
            claimed = await od.claim(conn, channel, HOOK_BATCH, self.section.lease, self.now())
        for c in claimed:
            try:
                error = await deliverer(c)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - one delivery's failure is recorded and retried
                log.exception("in-core delivery failed", extra={"channel": channel, "delivery": c.id})
                error = f"{type(exc).__name__}: {exc}"
            async with self.pool.acquire() as conn:
                if error is None:
                    if await od.done(conn, [c.id], self.now(), [channel]):
                        DELIVERED.labels(channel).inc()
                    continue
                failed = await od.failed(conn, c.id, error, self.now(), self.policy, channels=[channel])
            self.count_failure(channel, failed)
        return len(claimed)

    @staticmethod
    def count_failure(channel: str, failed: od.FailResult | None) -> None:
        if failed is None:
            return
        FAILED.labels(channel).inc()
        if failed.state == "dead":
            DEAD.labels(channel).inc()
            log.warning("outbox delivery dead", extra={"delivery": failed.id, "channel": channel,
                                                      "attempts": failed.attempts})

    async def run_hooks(self) -> None:
        """Until cancelled: deliver hook deliveries when woken, polling as a fallback."""
        while True:
            try:
                await asyncio.wait_for(self.wake_hooks.wait(), self.section.poll_interval)
            except asyncio.TimeoutError:
                pass
            self.wake_hooks.clear()
            try:
                for _ in range(1000):   # bounded; the next round continues
                    if await self.deliver_hooks_once() < HOOK_BATCH:
                        break
                for channel in list(self.in_core):
                    for _ in range(1000):
                        if await self.deliver_in_core_once(channel) < HOOK_BATCH:
                            break
            except DB_GONE as exc:
                log.warning("hook delivery failed; will retry", extra={"reason": f"{type(exc).__name__}: {exc}"})
            except Exception:  # noqa: BLE001 - the worker outlives one bad batch; logged, the leases retry it
                log.exception("hook delivery failed; will retry")


async def run(service: OutboxService, dsn: str) -> None:
    """The dispatcher, the hook worker and the NOTIFY relay, until cancelled."""
    from billcore.db.notify import relay_notifications

    async with asyncio.TaskGroup() as group:
        group.create_task(service.run_dispatcher())
        group.create_task(service.run_hooks())
        group.create_task(relay_notifications(dsn, "billcore_outbox", service.notified))
