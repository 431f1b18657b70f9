"""The plugin API: the only surface a plugin's code is given.

A plugin package defines ``setup(api)`` (plain or ``async``) and may define
``teardown()`` (plain or ``async``).  During ``setup`` it declares what it
adds through the ``PluginAPI`` it receives; nothing takes effect until
``setup`` returns, and then everything takes effect at once (calls in the
registry, hooks on the bus, scheduled tasks started).  After that the API is
sealed: registering more raises.  A plugin imports nothing from the core but
this module (for ``Refused``, the event names and the types below).

``PLUGIN_API_VERSION`` is the version of this surface; a manifest's ``api``
must equal the version the core serves.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

from billcore.server.calls import ALL_KINDS, CallSpec, Handler, allows
from billcore.plugins.bundle import PluginBundle
from billcore.plugins.db import PluginDB
from billcore.plugins.errors import PluginError, Refused, wire_errors
from billcore.plugins.hooks import (
    ACCOUNT_BLOCKED,
    ACCOUNT_CHARGED,
    ACCOUNT_UNBLOCKED,
    BATCH_RATED,
    EVENTS,
    PAYMENT_ADDED,
    PAYMENT_CANCELLED,
    PERIOD_CLOSED,
    SESSION_STARTED,
    SESSION_STOPPED,
    ChannelSender,
    HookHandler,
)
from billcore.plugins.manifest import Manifest

__all__ = [
    "PLUGIN_API_VERSION",
    "PluginAPI",
    "BillingFacade",
    "Refused",
    "ScheduledTask",
    "PAYMENT_ADDED", "ACCOUNT_CHARGED", "BATCH_RATED", "ACCOUNT_BLOCKED",
    "ACCOUNT_UNBLOCKED", "PERIOD_CLOSED", "SESSION_STARTED", "SESSION_STOPPED", "EVENTS",
    "PAYMENT_CANCELLED",
]

PLUGIN_API_VERSION = 1
MIN_INTERVAL = 0.01


class BillingFacade(Protocol):
    """What the core offers plugins for money (``api.billing``; may be None).

    ``add_payment`` credits ``amount`` micro-units and is idempotent per
    ``external_id``: calling it again with the same id books nothing new and
    returns the first payment's id.  ``accounts_of`` is the one read a
    plugin gets outside its own schema: which accounts a subscriber owns,
    so a call open to subscribers can bind them to their own accounts.
    """

    async def add_payment(self, account_id: int, amount: int, external_id: str,
                          method: str, comment: str) -> int: ...

    async def accounts_of(self, user_id: int) -> list[int]:
        """Ids of the accounts subscriber ``user_id`` owns (read-only)."""
        ...


@dataclass(frozen=True, slots=True)
class ScheduledTask:
    interval: float
    fn: Callable[[], Awaitable[None]]
    name: str


class PluginAPI:
    """Handed to ``setup(api)``; see docs/plugins.md for the author's view."""

    __slots__ = ("name", "version", "config", "db", "billing", "log", "now",
                 "_manifest", "_bundle", "_calls", "_hooks", "_tasks", "_channels", "_sealed")

    def __init__(self, manifest: Manifest, bundle: PluginBundle, config: Mapping[str, Any],
                 db: PluginDB | None, billing: BillingFacade | None, log: logging.Logger,
                 clock: Callable[[], float] = time.time) -> None:
        self.name = manifest.name
        # The core's clock (unix seconds): rate limits and expiry read it, so
        # tests drive time instead of sleeping.
        self.now: Callable[[], float] = clock
        self.version = manifest.version
        self.config: Mapping[str, Any] = MappingProxyType(dict(config))
        self.db = db
        self.billing = billing
        self.log = log
        self._manifest = manifest
        self._bundle = bundle
        self._calls: list[CallSpec] = []
        self._hooks: list[tuple[str, HookHandler]] = []
        self._tasks: list[ScheduledTask] = []
        self._channels: list[tuple[str, ChannelSender]] = []
        self._sealed = False

    def _check_open(self) -> None:
        if self._sealed:
            raise PluginError(f"{self.name}: register calls, hooks and tasks during setup() only")

    def register_call(self, name: str, handler: Handler, *, args: Mapping[str, str] | None = None,
                      right: str | None = None, kinds: frozenset[str] = ALL_KINDS,
                      doc: str | None = None, result: str = "any", streaming: bool = False,
                      fields: Mapping[str, str] | None = None, bound: str = "") -> None:
        """Add a URFA function ``name`` (declared in the manifest's ``calls``).

        ``handler`` is ``async def handler(ctx, **args)``; ``args`` maps each
        argument to a schema type word (``int``, ``money``, ``str``, …, a
        trailing ``?`` for optional); ``right`` is what a session must hold.
        ``fields`` types the result's fields the same way (``sys.calls``
        ``fields``): declare every money field ``money`` so that clients show
        it as money.
        ``bound`` declares how the result stays within one frame (``"fixed"``,
        ``"page:N"`` with ``limit``/``offset`` arguments, or ``"stream"``;
        docs/protocol.md, "Results that grow"); ``""`` leaves it undeclared.
        """
        self._check_open()
        if name not in self._manifest.calls:
            raise PluginError(f"{self.name}: call {name!r} is not declared in plugin.toml")
        if any(call.name == name for call in self._calls):
            raise PluginError(f"{self.name}: call {name!r} registered twice")
        if not inspect.iscoroutinefunction(handler):
            raise PluginError(f"{self.name}: handler of {name} must be an async function")
        if not kinds or not kinds <= ALL_KINDS:
            raise PluginError(f"{self.name}: kinds of {name} must be a subset of {sorted(ALL_KINDS)}")
        spec = CallSpec(
            name=name, handler=wire_errors(handler), right=right, kinds=frozenset(kinds), module=self.name,
            args=MappingProxyType(dict(args or {})), result=result,
            doc=doc if doc is not None else inspect.getdoc(handler) or "", streaming=streaming, bound=bound,
            fields=MappingProxyType(dict(fields or {})))
        paged = spec.page_max is not None and {"limit", "offset"} <= set(spec.args)
        if bound not in ("", "fixed") and not paged and not (bound == "stream" and streaming):
            raise PluginError(f"{self.name}: bound of {name} is \"fixed\", \"page:N\" (with limit and offset "
                              f"arguments) or \"stream\" (a streaming call)")
        self._calls.append(spec)

    def on(self, event: str, handler: HookHandler) -> None:
        """Call ``await handler(payload)`` after the core commits ``event``."""
        self._check_open()
        if event not in EVENTS:
            raise PluginError(f"{self.name}: unknown event {event!r}")
        if event not in self._manifest.hooks:
            raise PluginError(f"{self.name}: hook {event!r} is not declared in plugin.toml")
        if not inspect.iscoroutinefunction(handler):
            raise PluginError(f"{self.name}: hook for {event} must be an async function")
        self._hooks.append((event, handler))

    def notification_channel(self, name: str, send: ChannelSender) -> None:
        """Serve the notification channel ``name`` (declared in the manifest's ``channels``).

        For each notification event of a subscriber with a phone number who has
        not opted out of short messages, the core calls ``await send(to, text,
        lang=…, event_id=…)`` after the commit, at least once (de-duplicate on
        ``event_id``); raising says the message was not sent, and the outbox
        tries again with its backoff (docs/automation/notify.md)."""
        self._check_open()
        if name not in self._manifest.channels:
            raise PluginError(f"{self.name}: channel {name!r} is not declared in plugin.toml")
        if any(held == name for held, _ in self._channels):
            raise PluginError(f"{self.name}: channel {name!r} registered twice")
        if not inspect.iscoroutinefunction(send):
            raise PluginError(f"{self.name}: the sender of channel {name} must be an async function")
        self._channels.append((name, send))

    def schedule(self, interval_seconds: float, coro_fn: Callable[[], Awaitable[None]], *,
                 name: str | None = None) -> None:
        """Run ``await coro_fn()`` every ``interval_seconds`` until the plugin is unloaded.

        A run that raises is logged; the next run still happens.
        """
        self._check_open()
        if not interval_seconds >= MIN_INTERVAL:
            raise PluginError(f"{self.name}: interval must be at least {MIN_INTERVAL}s")
        if not callable(coro_fn):
            raise PluginError(f"{self.name}: scheduled task is not callable")
        self._tasks.append(ScheduledTask(float(interval_seconds), coro_fn,
                                         name or str(getattr(coro_fn, "__name__", "task"))))

    # -- who is calling ----------------------------------------------------------
    @staticmethod
    def has_right(principal: Any, right: str) -> bool:
        """True when ``principal`` (``ctx.principal``) holds ``right`` (wildcards as in the core)."""
        return allows(frozenset(getattr(principal, "rights", ())), right)

    async def accounts_of(self, principal: Any) -> list[int]:
        """The ids of the accounts a subscriber (``ctx.principal`` of kind ``user``) owns.

        Empty for any other kind of principal: an administrator owns no
        accounts, and a check built on this fails closed for them.
        """
        if getattr(principal, "kind", None) != "user":
            return []
        if self.billing is None:
            raise PluginError(f"{self.name}: this core gives plugins no account access")
        return [int(account_id) for account_id in await self.billing.accounts_of(int(principal.id))]

    async def owns(self, principal: Any, account_id: int) -> bool:
        """True when subscriber ``principal`` owns account ``account_id``."""
        return account_id in await self.accounts_of(principal)

    def resource(self, path: str) -> bytes:
        """A data file shipped in the plugin (verified bytes, e.g. ``"templates/mail.txt"``)."""
        try:
            return self._bundle.files[path]
        except KeyError:
            raise PluginError(f"{self.name}: no file {path!r} in the plugin") from None


async def run_every(task: ScheduledTask, log: logging.Logger) -> None:
    """The body of a scheduled task: sleep, run, log failures, repeat."""
    while True:
        await asyncio.sleep(task.interval)
        try:
            await task.fn()
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a failing run must not end the schedule
            log.exception("scheduled task failed", extra={"task": task.name})
