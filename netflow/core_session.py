"""The NetFlow worker's session with the core: `urfa.link.Link`, calls retried until the worker stops.

Theory of operation
-------------------
The link (``urfa.link``) connects, logs in or resumes, re-subscribes the
``classifier`` topic and backs off; it decides from one table
(``urfa.reconnect.RETRY``) which failures a retry can fix. This module adds
what is the worker's own:

* every call the worker makes is safe to repeat (``netflow.submit`` is
  idempotent by its watermark), and the journal keeps everything while the
  core is away, so `CoreSession.call` retries what the table calls worth a
  retry for as long as it takes, and gives up (`CoreUnavailable`) only once
  the worker is stopping;
* `ClassifierEvents` keeps what the ``classifier`` events say about the
  loaded snapshot. Any failure makes it stale, so the worker reloads: a
  reconnect or dropped events (events may be lost), and an event the apply
  step fails on (the link logs "event handler failed" and goes on pumping).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from netflow.metrics import CORE_CONNECTED
from netflow.snapshot import SnapshotLoader
from urfa.client import Client
from urfa.errors import URFAError
from urfa.link import Address, Link, error_code
from urfa.messages import Event
from urfa.reconnect import Verdict, verdict

__all__ = ["CoreAccess", "CoreSession", "ClassifierEvents", "CoreUnavailable"]

_R = TypeVar("_R")

log = logging.getLogger("netflow.worker")  # the worker's log lines keep their logger

CALL_TIMEOUT = 300.0  # seconds for one call (a large netflow.submit commits many accounts)
CHUNK_TIMEOUT = 60.0  # seconds for each chunk of the classifier snapshot
WAIT_FOR_CORE = 5.0  # seconds a call waits for the link to come up before it counts as a failed attempt


class CoreUnavailable(Exception):
    """The worker is stopping and the core did not answer; the journal keeps the rest."""


@dataclass(frozen=True, slots=True)
class CoreAccess:
    """Where the core listens (tried in order) and the worker's system login with the netflow rights."""

    addresses: tuple[Address, ...]
    login: str
    password: Callable[[], str]  # read at each login: it may be rotated


class ClassifierEvents:
    """What the core's ``classifier`` events say about the loaded snapshot (see `Worker.stale`)."""

    def __init__(self) -> None:
        self.snapshot_stale = True
        self.seen_version = 0  # the newest classifier version an event announced

    def apply(self, event: Event) -> None:
        if event.topic != "classifier":
            return
        version = event.payload.get("version") if isinstance(event.payload, dict) else None
        if isinstance(version, int):  # compared with the loaded version: see Worker.stale
            self.seen_version = max(self.seen_version, version)
        else:
            self.snapshot_stale = True

    def missed(self, reason: str) -> None:
        """Events may have been lost (a reconnect, a full queue, an event `apply` failed on)."""
        self.snapshot_stale = True

    def connected(self) -> None:
        self.snapshot_stale = True  # events may have been missed while away
        self.seen_version = 0  # versions are the database's: a restored one may count from lower


class CoreSession:
    """The worker's link to the core, from `start` to `close`."""

    def __init__(self, access: CoreAccess, worker: str) -> None:
        self.access = access
        self.events = ClassifierEvents()
        self.link: Link | None = None
        self._connected = CORE_CONNECTED.labels(worker)

    def start(self) -> Link:
        async def on_connected(client: Client, how: str) -> None:
            self.events.connected()
            self._connected.set(1)

        def on_lost(reason: str) -> None:
            self._connected.set(0)

        if self.link is None:
            self.link = Link(self.access.addresses, "system", self.access.login, self.access.password,
                             topics=("classifier",), on_connected=on_connected, on_event=self.events.apply,
                             on_missed=self.events.missed, on_lost=on_lost, wait_for_core=WAIT_FOR_CORE,
                             logger=log).start()
        return self.link

    async def close(self) -> None:
        if self.link is not None:
            await self.link.close()
        self._connected.set(0)

    async def call(self, fn: str, args: dict[str, Any], stop: asyncio.Event) -> Any:
        link = self.start()
        return await self._until_stopped(fn, stop, lambda: link.call(fn, args, timeout=CALL_TIMEOUT))

    async def load_snapshot(self, stop: asyncio.Event) -> tuple[SnapshotLoader, Any]:
        """``netflow.snapshot``'s chunks fed to a fresh `SnapshotLoader`, with the call's answer.

        Retried from the start like `call` (a half-loaded stream is thrown away)."""
        link = self.start()

        async def attempt() -> tuple[SnapshotLoader, Any]:
            loader = SnapshotLoader()
            stream = await link.stream("netflow.snapshot", {}, chunk_timeout=CHUNK_TIMEOUT)
            async for chunk in stream:
                loader.feed(chunk)
            return loader, stream.result

        return await self._until_stopped("netflow.snapshot", stop, attempt)

    async def _until_stopped(self, fn: str, stop: asyncio.Event, attempt: Callable[[], Awaitable[_R]]) -> _R:
        """The link's retry (`Link.retrying`) for as long as the worker runs; a failure
        a retry could fix becomes `CoreUnavailable` once the worker is stopping."""
        assert self.link is not None
        try:
            return await self.link.retrying(fn, attempt, retry_for=math.inf, stop=stop)
        except (URFAError, OSError, asyncio.TimeoutError) as exc:
            if verdict(error_code(exc)) is Verdict.NEVER:
                raise  # a retry cannot help (an epoch conflict: restart and decide again)
            raise CoreUnavailable(f"stopping before {fn} succeeded") from exc
