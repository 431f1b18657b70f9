"""The notification router: outbox events → email, webhook and plugin-channel deliveries.

Theory of operation
-------------------
The core's dispatcher hands every router a batch of undispatched events
(``StoredEvent``, up to a thousand) inside its transaction and inserts what
they answer (``NewDelivery``).  ``route_notifications`` answers, per event:

* ``email`` to the account's subscriber when the event has a template (an
  operator's override of (event, ``email``, language), else the shipped
  default), the subscriber has an address, and has not opted out of it (or
  of every event: ``'*'``) — unless the event is essential
  (``notify_prefs.ESSENTIAL``).  The message is rendered here, once, in the
  subscriber's language (theirs, else ``[notify] language``):
  ``{to, subject, body, lang, message_id}``.  An override that fails to
  render falls back to the default; a payload the default cannot fill (a
  field missing) is rendered once more with the missing parts empty, so an
  essential notice is never lost to a producer's payload.
* ``webhook`` to every enabled endpoint that subscribed to the event (or to
  ``'*'``), target = the endpoint's id, message ``{url, body}``; ``body`` is
  the exact JSON text the edge signs and POSTs: ``{id, event, created_at,
  account_id, data}``.

* ``plugin`` — when plugins serve notification channels (an SMS gateway):
  target = the channel's name, message ``{to, text, lang}`` to the
  subscriber's phone, unless they opted out of channel ``text``.

Set-based: a batch of any size costs at most four reads (subscribers, their
opt-outs, template overrides — each read once for every channel — and
endpoints), each one statement over arrays.

The installation's settings (money style, default language, the Message-ID
domain) are process state set once at start (``configure``), as the ledger's
low-balance default is: the router's signature is the dispatcher's.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from billcore.billing.notify_prefs import ESSENTIAL
from billcore.billing.notify_templates import DEFAULTS, EVENTS, MoneyStyle, NotifyTemplateError, Template, render
from billcore.billing.notify_webhooks import TEST_EVENT
from billcore.billing.outbox_delivery import NewDelivery, StoredEvent
from billcore.db.rows import DbConnection

__all__ = ["RouteSettings", "configure", "route_notifications", "variables", "webhook_body"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RouteSettings:
    style: MoneyStyle = MoneyStyle()
    language: str = "en"
    mail_domain: str = "localhost"


_settings: list[RouteSettings] = [RouteSettings()]


def configure(settings: RouteSettings) -> None:
    _settings[0] = settings


def webhook_body(event: StoredEvent) -> str:
    """The signed JSON text of one event (compact, keys sorted: stable bytes for a signature)."""
    return json.dumps({"id": event.id, "event": event.event, "created_at": event.created_at.isoformat(),
                       "account_id": event.account_id, "data": event.payload},
                      separators=(",", ":"), sort_keys=True, ensure_ascii=False, default=str)


def variables(event: StoredEvent, login: str, full_name: str, currency: str) -> dict[str, Any]:
    """What a template sees (documented in notify_templates)."""
    return {"event": event.event, "event_id": event.id, "account_id": event.account_id, "login": login,
            "full_name": full_name, "created_at": event.created_at.isoformat(), "data": dict(event.payload),
            "currency": currency}


async def route_notifications(conn: DbConnection, events: Sequence[StoredEvent], now: dt.datetime,
                              settings: RouteSettings | None = None,
                              channels: Sequence[str] = ()) -> list[NewDelivery]:
    """The dispatcher's router: email and webhook deliveries of ``events`` (``settings``: the configured
    ones), and a ``plugin`` delivery per plugin notification channel in ``channels`` (those loaded now)."""
    settings = settings or _settings[0]
    out: list[NewDelivery] = []
    if not events:
        return out
    names = sorted({e.event for e in events})
    mailed = [e for e in events if e.account_id is not None and e.event in EVENTS]
    if mailed:
        audience = await _audience(conn, mailed, ("email", "text") if channels else ("email",))
        out.extend(_emails(mailed, settings, audience))
        if channels:
            out.extend(_texts(mailed, settings, audience, channels))
    # webhooks.test's event goes to its one endpoint (enabled or not), never to subscribers of '*'
    tests = {e.id: int(e.payload["webhook_id"]) for e in events
             if e.event == TEST_EVENT and type(e.payload.get("webhook_id")) is int}
    hooks = await conn.fetch(
        "SELECT id, url, events, enabled FROM webhooks WHERE (enabled AND (events && $1::text[] OR '*' = ANY(events)))"
        " OR id = ANY($2::bigint[]) ORDER BY id", names, sorted(set(tests.values())))
    for event in events:
        body: str | None = None
        for hook in hooks:
            if event.event == TEST_EVENT:
                wanted = tests.get(event.id) == hook["id"]
            else:
                wanted = hook["enabled"] and (event.event in hook["events"] or "*" in hook["events"])
            if wanted:
                body = body or webhook_body(event)
                out.append(NewDelivery(event.id, "webhook", str(hook["id"]), {"url": hook["url"], "body": body}))
    return out


@dataclass(frozen=True, slots=True)
class _Audience:
    """Who the events' accounts belong to, what they opted out of, and the operator's templates, read
    once for every channel of a dispatch batch (three queries, whatever the batch's size)."""

    people: Mapping[int | None, Any]                 # account id -> user row (email, phone, language, …)
    optouts: frozenset[tuple[int, str, str]]         # (user id, event or '*', channel)
    overrides: Mapping[tuple[str, str, str], Template]   # (channel, event, lang) -> template

    def wants(self, person: Any, event: str, channel: str) -> bool:
        user = person["user_id"]
        return event in ESSENTIAL or not ((user, event, channel) in self.optouts
                                          or (user, "*", channel) in self.optouts)


async def _audience(conn: DbConnection, events: Sequence[StoredEvent], channels: Sequence[str]) -> _Audience:
    account_ids = sorted({int(e.account_id) for e in events if e.account_id is not None})
    people = {row["account_id"]: row for row in await conn.fetch(
        "SELECT a.id AS account_id, u.id AS user_id, u.login, u.full_name, u.email, u.phone, u.language"
        " FROM accounts a JOIN users u ON u.id = a.user_id"
        " WHERE a.id = ANY($1::bigint[]) AND u.deleted_at IS NULL AND (u.email <> '' OR u.phone <> '')",
        account_ids)}
    if not people:
        return _Audience({}, frozenset(), {})
    optouts = frozenset((row["user_id"], row["event"], row["channel"]) for row in await conn.fetch(
        "SELECT user_id, event, channel FROM notify_optouts WHERE user_id = ANY($1::bigint[])"
        " AND channel = ANY($2::text[])", sorted({row["user_id"] for row in people.values()}), list(channels)))
    overrides = {(row["channel"], row["event"], row["lang"]): Template(row["subject"], row["body"])
                 for row in await conn.fetch(
                     "SELECT channel, event, lang, subject, body FROM notify_templates"
                     " WHERE channel = ANY($1::text[]) AND event = ANY($2::text[])",
                     list(channels), sorted({e.event for e in events}))}
    return _Audience(people, optouts, overrides)


def _emails(events: Sequence[StoredEvent], settings: RouteSettings, audience: _Audience) -> list[NewDelivery]:
    overrides = {(event, lang): t for (channel, event, lang), t in audience.overrides.items() if channel == "email"}
    out: list[NewDelivery] = []
    for event in events:
        person = audience.people.get(event.account_id)
        if person is None or not person["email"] or not audience.wants(person, event.event, "email"):
            continue
        lang = person["language"] or settings.language
        rendered = _render(event, lang, overrides, person, settings)
        if rendered is None:
            continue
        out.append(NewDelivery(event.id, "email", person["email"], {
            "to": person["email"], "subject": rendered[0], "body": rendered[1], "lang": lang,
            "message_id": f"<billcore.{event.id}@{settings.mail_domain}>"}))
    return out


def _texts(events: Sequence[StoredEvent], settings: RouteSettings, audience: _Audience,
           channels: Sequence[str]) -> list[NewDelivery]:
    """Short messages for the plugins' channels: to the subscriber's phone, unless they opted out of
    channel ``text`` (essential events excepted).  The text is the operator's ``text`` template's body
    for the event and language, else the email's subject (written to be read alone)."""
    out: list[NewDelivery] = []
    for event in events:
        person = audience.people.get(event.account_id)
        if person is None or not person["phone"] or not audience.wants(person, event.event, "text"):
            continue
        lang = person["language"] or settings.language
        override = audience.overrides.get(("text", event.event, lang))
        if override is not None:
            rendered = _render(event, lang, {(event.event, lang): override}, person, settings)
            text = rendered[1] if rendered is not None else None
        else:
            rendered = _render(event, lang, {}, person, settings)
            text = rendered[0] if rendered is not None else None
        if not text:
            continue
        for name in channels:
            out.append(NewDelivery(event.id, "plugin", name, {"to": person["phone"], "text": text, "lang": lang}))
    return out


def _render(event: StoredEvent, lang: str, overrides: Mapping[tuple[str, str], Template], person: Any,
            settings: RouteSettings) -> tuple[str, str] | None:
    values = variables(event, person["login"], person["full_name"], settings.style.currency)
    default = DEFAULTS.get((event.event, lang))
    tries = [(overrides.get((event.event, lang)), False), (default, False), (default, True)]
    for template, lenient in tries:
        if template is None:
            continue
        try:
            done = render(template, values, settings.style, lenient=lenient)
            return done.subject, done.body
        except NotifyTemplateError as exc:
            log.warning("notification template failed", extra={"event": event.event, "event_id": event.id,
                                                                 "lang": lang, "lenient": lenient,
                                                                 "reason": str(exc)})
    return None
