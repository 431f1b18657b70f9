"""What the core's call modules get: the shared parts, passed explicitly.

Every built-in call module exposes ``calls(core: CoreContext) ->
list[CallSpec]``; the core builds one ``CoreContext`` at start and registers
each module's calls.  Handlers reach the database and publish events only
through it, so a test can build one around a real test database without
starting the whole core.  (Plugin hooks are not fired from here: the billing
functions write their events into the outbox in the causing transaction,
``billcore.billing.outbox``.)
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from billcore.common.config import Config

__all__ = ["CoreContext", "utcnow"]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass(slots=True)
class CoreContext:
    pool: asyncpg.Pool
    config: Config
    # publish(topic, payload): push an event to subscribed URFA sessions.  The
    # service's publish answers how many sessions it queued the event for;
    # handlers do not use that, so any return type will do (a test's list.append)
    publish: Callable[[str, dict[str, Any]], object] = lambda topic, payload: 0
    # the clock; tests move it
    now: Callable[[], dt.datetime] = utcnow
    # anything a later subsystem hangs on the core (radius NAS cache, …)
    extras: dict[str, Any] = field(default_factory=dict)
