"""The notify role: claims email and webhook deliveries from the core's outbox and sends them.

Theory of operation
-------------------
The role reaches the core only over URFA (``urfa.link.Link``, logged in as
the ``notify`` system principal, as the radius process is).  It subscribes to
topic ``outbox``: the core publishes it after a dispatch made deliveries, and
a message naming ``email`` or ``webhook`` (or none) wakes the channel's loop;
without one, each loop polls every ``poll_interval`` seconds.

One loop per channel: ``outbox.claim {channel, limit, lease}`` → send every
claimed delivery, at most ``concurrency`` at once across both channels →
``outbox.done {ids}`` for the delivered ones, ``outbox.failed {id, error,
permanent}`` for the others (the verdicts of ``notify.deliver``).  A claim
that came back full is followed at once by the next; the lease covers a whole
batch even if every send takes its full timeout, so a live deliverer never
sees its rows claimed by another; a killed one loses nothing (the lease runs
out and the rows are claimed again: at-least-once, receivers de-duplicate on
the event id).

Webhook secrets come from the core (``notify.webhook_secrets``) and are kept
for ``SECRET_TTL`` seconds, so a rotated secret is in use within a minute.
``Deliverer.deliver`` — claimed rows in, (done ids, failures) out — is the
part tests and the benchmark drive directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from urfa.errors import URFAError
from urfa.link import Address, Link
from urfa.messages import Event

from .deliver import Mailer, MailSettings, Outcome, WebhookSender

__all__ = ["CHANNELS", "Deliverer", "NotifySettings", "SecretCache", "run", "serve"]

log = logging.getLogger(__name__)

CHANNELS = ("email", "webhook")
SECRET_TTL = 60.0


@dataclass(frozen=True, slots=True)
class NotifySettings:
    mail: MailSettings = MailSettings()
    webhook_timeout: float = 10.0
    webhook_max_response: int = 65536
    concurrency: int = 16
    batch: int = 100
    poll_interval: float = 5.0

    @property
    def lease(self) -> int:
        # a whole batch, every send at its full timeout, concurrency at a time
        worst = max(self.mail.timeout, self.webhook_timeout) * -(-self.batch // self.concurrency)
        return int(min(3600, max(60, worst + 30)))

    @classmethod
    def from_config(cls, config: Any) -> NotifySettings:
        n = config.notify
        password = Path(n.smtp_password_file).read_text().strip() if n.smtp_password_file else ""
        mail = MailSettings(n.smtp_host, n.smtp_port, n.smtp_starttls, n.smtp_tls, n.smtp_user, password,
                            n.mail_from, n.smtp_timeout, max(1, n.concurrency // 2), n.smtp_ca_file)
        return cls(mail, n.webhook_timeout, n.webhook_max_response, n.concurrency, n.batch, n.poll_interval)


Fetch = Callable[[list[int]], Awaitable[list[dict[str, Any]]]]


class SecretCache:
    """Webhook endpoints' secrets by id, fetched in one call for a batch, kept ``ttl`` seconds."""

    def __init__(self, fetch: Fetch, ttl: float = SECRET_TTL, clock: Callable[[], float] = time.monotonic) -> None:
        self._fetch = fetch
        self._ttl = ttl
        self._clock = clock
        self._known: dict[int, tuple[bytes, float]] = {}

    async def get(self, ids: Sequence[int]) -> dict[int, bytes]:
        now = self._clock()
        missing = sorted({i for i in ids if i not in self._known or self._known[i][1] < now})
        if missing:
            for row in await self._fetch(missing):
                self._known[int(row["id"])] = (str(row["secret"]).encode(), now + self._ttl)
            for i in missing:        # deleted endpoints: forget them
                if i in self._known and self._known[i][1] < now:
                    del self._known[i]
        return {i: self._known[i][0] for i in ids if i in self._known}


class Deliverer:
    """Sends claimed deliveries with bounded concurrency; knows nothing of URFA."""

    def __init__(self, settings: NotifySettings, secrets: SecretCache) -> None:
        self.settings = settings
        self.mailer = Mailer(settings.mail)
        self.webhooks = WebhookSender(settings.webhook_timeout, settings.webhook_max_response, settings.concurrency)
        self.secrets = secrets
        self._slots = asyncio.Semaphore(settings.concurrency)

    async def deliver(self, rows: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[tuple[int, Outcome]]]:
        """(delivered ids, [(id, failure)]) of claimed rows of any channel."""
        hook_ids = [int(r["target"]) for r in rows if r["channel"] == "webhook" and str(r["target"]).isdigit()]
        keys = await self.secrets.get(hook_ids) if hook_ids else {}

        async def one(row: Mapping[str, Any]) -> Outcome:
            async with self._slots:
                if row["channel"] == "email":
                    return await self.mailer.send(row)
                if row["channel"] == "webhook":
                    target = str(row["target"])
                    key = keys.get(int(target)) if target.isdigit() else None
                    if key is None:
                        return Outcome(False, "the webhook endpoint no longer exists", permanent=True)
                    return await self.webhooks.send(row, key)
                return Outcome(False, f"channel {row['channel']!r} is not the notify edge's", permanent=True)

        outcomes = await asyncio.gather(*(one(r) for r in rows))
        done = [int(r["id"]) for r, o in zip(rows, outcomes) if o.ok]
        failed = [(int(r["id"]), o) for r, o in zip(rows, outcomes) if not o.ok]
        return done, failed

    async def close(self) -> None:
        await self.mailer.close()
        await self.webhooks.close()


async def serve(link: Link, deliverer: Deliverer, wake: Mapping[str, asyncio.Event], stop: asyncio.Event) -> None:
    """Claim, send, acknowledge, per channel, until ``stop``."""
    settings = deliverer.settings

    async def channel_loop(channel: str) -> None:
        while not stop.is_set():
            wake[channel].clear()
            try:
                rows = await link.call("outbox.claim", {"channel": channel, "limit": settings.batch,
                                                         "lease": settings.lease}, timeout=30.0)
                if rows:
                    done, failed = await deliverer.deliver(rows)
                    if done:
                        # idempotent: retried across a reconnect, so a blip does not send them all again
                        await link.call("outbox.done", {"ids": done}, timeout=30.0, retry_for=30.0)
                    for delivery_id, outcome in failed:
                        await link.call("outbox.failed", {"id": delivery_id, "error": outcome.error,
                                                          "permanent": outcome.permanent}, timeout=30.0)
                    if failed:
                        log.info("deliveries failed", extra={"channel": channel, "failed": len(failed),
                                                             "first": failed[0][1].error})
                    if len(rows) >= settings.batch:
                        continue           # there is more: claim again at once
            except (URFAError, OSError, asyncio.TimeoutError) as exc:
                log.warning("outbox round failed, will retry", extra={"channel": channel, "reason": repr(exc)})
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(_first(wake[channel], stop), settings.poll_interval)

    await asyncio.gather(*(channel_loop(c) for c in CHANNELS))


async def _first(a: asyncio.Event, b: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(a.wait()), asyncio.ensure_future(b.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


def _address(config: Any) -> Address:
    if config.notify.core_address:
        return Address.parse(config.notify.core_address)
    if config.urfa_socket is not None:
        return Address(host=None, unix=str(config.urfa_socket))
    return Address(host=config.urfa.host, port=config.urfa.port)


def _password(config: Any) -> str:
    from billcore.common.sysfiles import service_password_file

    path = Path(config.notify.password_file) if config.notify.password_file else \
        service_password_file(config.data_dir, "notify")
    return path.read_text().strip()


async def run(config: Any, dsn: str, index: int, stop: asyncio.Event) -> None:
    """The supervisor's ``notify`` role."""
    settings = NotifySettings.from_config(config)
    wake = {channel: asyncio.Event() for channel in CHANNELS}

    def on_event(event: Event) -> None:
        if event.topic == "outbox":
            named = event.payload.get("channels") if isinstance(event.payload, dict) else None
            for channel in CHANNELS:
                if not named or channel in named:
                    wake[channel].set()

    link = Link([_address(config)], "system", config.notify.login, lambda: _password(config), topics=("outbox",),
                on_event=on_event, timeout=10.0, logger=log)

    async def fetch(ids: list[int]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = await link.call("notify.webhook_secrets", {"ids": ids}, timeout=10.0)
        return rows

    deliverer = Deliverer(settings, SecretCache(fetch))
    link.start()
    log.info("notify serving", extra={"smtp": f"{settings.mail.host}:{settings.mail.port}",
                                       "concurrency": settings.concurrency})
    try:
        await serve(link, deliverer, wake, stop)
    finally:
        await deliverer.close()
        await link.close()
