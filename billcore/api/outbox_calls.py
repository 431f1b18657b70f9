"""URFA calls of the outbox: deliverers claim and acknowledge, operators look and retry.

Deliverers (system logins, right ``outbox.claim``) — each edge role only its
own channels (``CHANNELS_OF``: the radius process ``radius``; the notify
edge ``email`` and ``webhook``):

* ``outbox.claim {channel, limit=100, lease=60}`` — lease due deliveries;
  each comes with its event (``event``, ``event_id``, ``payload``,
  ``account_id``, ``created_at``), its ``message`` and ``attempt`` (1 on the
  first try).  Unacknowledged, a claimed delivery is due again when its
  lease runs out.
* ``outbox.done {ids}`` and ``outbox.failed {id, error, permanent=false}``.

Operators: ``outbox.stats`` and ``outbox.list`` (right ``outbox.read``),
``outbox.retry {ids}`` (``outbox.write``: dead deliveries are tried again).
See docs/automation/outbox.md.
"""

from __future__ import annotations

import re
from typing import Any, Final

from billcore.api import ADMIN, handler, need_int, page
from billcore.billing import outbox_delivery as od
from billcore.billing.ledger_errors import InvalidValue
from billcore.server.call_context import CallContext
from billcore.server.calls import CallSpec
from billcore.server.context import CoreContext
from urfa.errors import FORBIDDEN, CallFailed

__all__ = ["calls", "CHANNELS_OF", "MAX_IDS"]

SYSTEM: Final = frozenset({"system"})
# which channels each edge's system login delivers (billcore.server.principals.SERVICE_RIGHTS)
CHANNELS_OF: Final[dict[str, tuple[str, ...]]] = {
    "radius": ("radius",),
    "notify": ("email", "webhook"),
}
MAX_IDS: Final = 1000
MAX_ERROR_TEXT: Final = 1000
_CHANNEL = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_EVENT = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")


def _channel(value: object, what: str = "channel") -> str:
    if type(value) is not str or not _CHANNEL.fullmatch(value):
        raise InvalidValue(f"{what}: a channel name like 'radius' or 'email'")
    return value


def _ids(value: object) -> list[int]:
    if type(value) is not list or not 1 <= len(value) <= MAX_IDS:
        raise InvalidValue(f"ids: a list of 1..{MAX_IDS} delivery ids")
    return [need_int("ids[]", i) for i in value]


def _own_channels(ctx: CallContext) -> tuple[str, ...]:
    return CHANNELS_OF.get(ctx.principal.login, ())


def calls(core: CoreContext) -> list[CallSpec]:
    def policy() -> od.DeliveryPolicy:
        from billcore.server.outbox_service import policy_of

        return policy_of(core.config.outbox)

    def count(metric: str, channel: str, n: int = 1) -> None:
        from billcore.server import outbox_service

        if n:
            getattr(outbox_service, metric).labels(channel).inc(n)

    @handler
    async def outbox_claim(ctx: CallContext, channel: str, limit: int = 100, lease: int = 60) -> list[dict[str, Any]]:
        """Lease up to limit due deliveries of one of this login's channels for lease seconds, oldest first.

        Acknowledge each with outbox.done or outbox.failed; one left unacknowledged is due again when its lease
        runs out (at least once: de-duplicate on event_id).  A channel this login does not deliver answers
        forbidden."""
        channel = _channel(channel)
        limit = need_int("limit", 100 if limit is None else limit, 1, od.MAX_CLAIM)
        lease = need_int("lease", 60 if lease is None else lease, 1, od.MAX_LEASE)
        if channel not in _own_channels(ctx):
            raise CallFailed(FORBIDDEN, f"this login does not deliver channel {channel!r}")
        async with core.pool.acquire() as conn:
            claimed = await od.claim(conn, channel, limit, lease, core.now())
        return [c.as_dict() for c in claimed]

    @handler
    async def outbox_done(ctx: CallContext, ids: list[int]) -> dict[str, Any]:
        """Mark claimed deliveries of this login's channels delivered; done counts those that were still pending."""
        wanted = _ids(ids)
        own = _own_channels(ctx)
        async with core.pool.acquire() as conn:
            rows = await conn.fetch("SELECT channel, count(*) AS n FROM outbox_deliveries"
                                    " WHERE id = ANY($1::bigint[]) AND state = 'pending' AND channel = ANY($2::text[])"
                                    " GROUP BY channel", wanted, list(own))
            n = await od.done(conn, wanted, core.now(), own)
        if n == sum(int(r["n"]) for r in rows):
            for r in rows:
                count("DELIVERED", r["channel"], int(r["n"]))
        return {"done": n}

    @handler
    async def outbox_failed(ctx: CallContext, id: int, error: str, permanent: bool = False) -> dict[str, Any]:
        """Record a failed try of a claimed delivery: it is tried again after the backoff, or is dead after the last try or when permanent is true.

        The answer says which (state pending with next_at, or dead); a delivery that is not pending on one of
        this login's channels answers core.unknown."""
        delivery = need_int("id", id)
        if type(error) is not str or len(error) > 10 * MAX_ERROR_TEXT:
            raise InvalidValue(f"error: a text of at most {10 * MAX_ERROR_TEXT} characters")
        permanent_value: object = False if permanent is None else permanent
        if type(permanent_value) is not bool:
            raise InvalidValue("permanent: true or false")
        own = _own_channels(ctx)
        async with core.pool.acquire() as conn:
            channel = await conn.fetchval("SELECT channel FROM outbox_deliveries WHERE id = $1", delivery)
            result = await od.failed(conn, delivery, error, core.now(), policy(), permanent=permanent_value,
                                     channels=own)
        if result is None:
            from billcore.common.errors import UnknownObject

            raise UnknownObject(f"no pending delivery {delivery} on this login's channels")
        count("FAILED", channel)
        if result.state == "dead":
            count("DEAD", channel)
        return {"id": result.id, "state": result.state, "attempts": result.attempts, "next_at": result.next_at}

    @handler
    async def outbox_stats(ctx: CallContext) -> dict[str, Any]:
        """The outbox now: events not yet fanned out (and the oldest one's age in seconds), and per channel and state the deliveries and the oldest pending one's age."""
        async with core.pool.acquire() as conn:
            s = await od.stats(conn, core.now())
        return {"undispatched": s.undispatched, "oldest_undispatched_age": s.oldest_undispatched_age,
                "channels": [{"channel": c.channel, "state": c.state, "count": c.count, "oldest_age": c.oldest_age}
                             for c in s.channels]}

    @handler
    async def outbox_list(ctx: CallContext, state: str | None = None, channel: str | None = None,
                          event: str | None = None, account_id: int | None = None,
                          limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Deliveries, newest first, filtered by state (pending, delivered or dead), channel, event and account."""
        if state is not None and state not in od.STATES:
            raise InvalidValue(f"state: one of {', '.join(od.STATES)}")
        if channel is not None:
            _channel(channel)
        if event is not None and (type(event) is not str or len(event) > 64 or not _EVENT.fullmatch(event)):
            raise InvalidValue("event: an event name like 'payment.added'")
        if account_id is not None:
            need_int("account_id", account_id)
        limit, offset = page(limit, offset)
        async with core.pool.acquire() as conn:
            return await od.list_deliveries(conn, state=state, channel=channel, event=event,
                                            account_id=account_id, limit=limit, offset=offset)

    @handler
    async def outbox_retry(ctx: CallContext, ids: list[int]) -> dict[str, Any]:
        """Make dead deliveries pending again, due now with their tries counted afresh; retried lists those that were dead."""
        wanted = _ids(ids)
        from billcore.api import who
        from billcore.billing import audit

        async with core.pool.acquire() as conn, conn.transaction():
            retried = await od.retry(conn, wanted, core.now())
            if retried:
                await audit.record(conn, who(ctx), "outbox.retry", "outbox", after={"ids": retried}, now=core.now())
                channels = sorted({r["channel"] for r in await conn.fetch(
                    "SELECT DISTINCT channel FROM outbox_deliveries WHERE id = ANY($1::bigint[])", retried)})
        if retried:
            core.publish("outbox", {"channels": channels})
            service = core.extras.get("outbox")
            if service is not None and "hook" in channels:
                service.wake_hooks.set()
        return {"retried": retried}

    claimed_fields = {"id": "int", "event_id": "int", "event": "str", "channel": "str", "target": "str",
                      "attempt": "int", "account_id": "int", "created_at": "time", "message": "map",
                      "payload": "map"}
    return [
        CallSpec("outbox.claim", outbox_claim, right="outbox.claim", kinds=SYSTEM,
                 args={"channel": "str", "limit": "int?", "lease": "int?"}, result="list",
                 doc=outbox_claim.__doc__ or "", fields=claimed_fields, bound="fixed"),
        CallSpec("outbox.done", outbox_done, right="outbox.claim", kinds=SYSTEM, args={"ids": "list"},
                 result="map", doc=outbox_done.__doc__ or "", fields={"done": "int"}, bound="fixed"),
        CallSpec("outbox.failed", outbox_failed, right="outbox.claim", kinds=SYSTEM,
                 args={"id": "int", "error": "str", "permanent": "bool?"}, result="map",
                 doc=outbox_failed.__doc__ or "",
                 fields={"id": "int", "state": "str", "attempts": "int", "next_at": "time"}, bound="fixed"),
        CallSpec("outbox.stats", outbox_stats, right="outbox.read", kinds=ADMIN, args={}, result="map",
                 doc=outbox_stats.__doc__ or "", fields={"undispatched": "int", "channels": "list"},
                 bound="fixed"),
        CallSpec("outbox.list", outbox_list, right="outbox.read", kinds=ADMIN,
                 args={"state": "str?", "channel": "str?", "event": "str?", "account_id": "int?",
                       "limit": "int?", "offset": "int?"}, result="list", doc=outbox_list.__doc__ or "",
                 fields={"id": "int", "event_id": "int", "event": "str", "channel": "str", "target": "str",
                         "state": "str", "attempts": "int", "next_at": "time", "claimed_until": "time",
                         "last_error": "str", "delivered_at": "time", "account_id": "int", "created_at": "time"},
                 bound="page:1000"),
        CallSpec("outbox.retry", outbox_retry, right="outbox.write", kinds=ADMIN, args={"ids": "list"},
                 result="map", doc=outbox_retry.__doc__ or "", fields={"retried": "list"}, bound="fixed"),
    ]
