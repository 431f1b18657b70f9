"""The radius process's outbox deliverer: Disconnects and rate changes, at least once.

Theory of operation
-------------------
The core's dispatcher turns ``account.blocked`` (and fup's rate events)
into deliveries of channel ``radius`` (``{"action": "disconnect" | "rate",
"account_id"}``).  This loop claims them over the link (``outbox.claim``,
with a lease), acts, and answers ``outbox.done`` or ``outbox.failed``:

* ``disconnect`` → the account's open sessions (``radius.sessions``) get a
  Disconnect-Request, or a CoA to their NAS's blocked profile
  (``process.dynauth_sessions``); done when every session's NAS acknowledged
  (or there was none), else failed — a NAS that timed out is tried again
  after the core's backoff;
* ``rate`` → ``radius.rate_apply.apply_rate`` (re-apply the account's current
  rate to its sessions) when that module is installed, else failed as not
  yet supported (not permanent: it is tried again once it is);
* anything else → failed permanently (a newer core's action).

It wakes on topic ``outbox`` naming its channel, on every (re)connect, and
every ``poll`` seconds as a fallback.  A radius process that was down when
the block committed finds the delivery waiting when it starts; one killed
mid-delivery leaves a lease that runs out, and the delivery is claimed again.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from urfa.errors import CallFailed, URFAError
from urfa.link import Link
from urfa.messages import Event

__all__ = ["Outcome", "OutboxConsumer", "CHANNEL"]

log = logging.getLogger(__name__)

CHANNEL = "radius"
MAX_ROUNDS = 100       # claims per wake-up before waiting again (the next wake-up continues)


@dataclass(frozen=True, slots=True)
class Outcome:
    ok: bool
    error: str = ""
    permanent: bool = False


Handler = Callable[[dict[str, Any]], Awaitable[Outcome]]


@dataclass(slots=True)
class OutboxConsumer:
    link: Link
    handle: Handler
    channel: str = CHANNEL
    limit: int = 50
    lease: int = 60
    poll: float = 5.0
    call_timeout: float = 10.0
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def on_event(self, event: Event) -> None:
        if event.topic == "outbox" and self.channel in (event.payload.get("channels") or ()):
            self.wake.set()

    async def once(self) -> int:
        """Claim one batch, act on each delivery (at once), acknowledge; how many were claimed."""
        claimed = await self.link.call("outbox.claim", {"channel": self.channel, "limit": self.limit,
                                                        "lease": self.lease}, timeout=self.call_timeout)
        if not claimed:
            return 0

        async def one(delivery: dict[str, Any]) -> Outcome:
            try:
                return await self.handle(delivery)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - one delivery's failure is recorded, not fatal
                return Outcome(False, f"{type(exc).__name__}: {exc}"[:500])

        outcomes = await asyncio.gather(*(one(d) for d in claimed))
        done = [d["id"] for d, o in zip(claimed, outcomes) if o.ok]
        if done:
            await self.link.call("outbox.done", {"ids": done}, timeout=self.call_timeout)
        for d, o in zip(claimed, outcomes):
            if not o.ok:
                log.warning("outbox delivery failed", extra={"delivery": d["id"], "event_id": d["event_id"],
                                                             "attempt": d["attempt"], "error": o.error})
                await self.link.call("outbox.failed", {"id": d["id"], "error": o.error or "failed",
                                                       "permanent": o.permanent}, timeout=self.call_timeout)
        return len(claimed)

    async def run(self) -> None:
        """Until cancelled."""
        while True:
            await self.link.up.wait()
            try:
                for _ in range(MAX_ROUNDS):
                    if await self.once() < self.limit:
                        break
            except (CallFailed, URFAError, OSError, asyncio.TimeoutError) as exc:
                # the link went down or the core refused for now: the leases keep what was claimed
                log.info("outbox claim interrupted: %r", exc)
            try:
                await asyncio.wait_for(self.wake.wait(), self.poll)
            except asyncio.TimeoutError:
                pass
            self.wake.clear()


def rate_applier() -> Callable[..., Awaitable[bool]] | None:
    """fup's ``radius.rate_apply.apply_rate``, or ``None`` while it is not installed."""
    try:
        module = importlib.import_module(".rate_apply", __package__)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.rate_apply":
            raise
        return None
    apply_rate: Callable[..., Awaitable[bool]] | None = getattr(module, "apply_rate", None)
    return apply_rate
