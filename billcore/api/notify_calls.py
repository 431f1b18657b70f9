"""URFA calls of notifications: templates, webhook endpoints, a subscriber's own preferences.

Theory of operation
-------------------
* ``notify.templates_list/get/set/reset/preview`` (rights ``notify.read`` /
  ``notify.write``): the operator's view of every (event, channel, language)
  template — the override if there is one, else the shipped default.  ``set``
  compiles the template in the sandbox first (``notify.bad_template``);
  ``preview`` renders a template (the stored one, or the text given) with a
  sample event, so the console shows what a subscriber would read.
* ``webhooks.list/add/edit/delete/test`` (``webhooks.read`` /
  ``webhooks.write``): the secret is write-only — shown once by ``add`` (and
  by ``edit`` with ``rotate_secret``), never listed.  ``test`` enqueues a
  ``webhook.test`` event that is routed to that endpoint alone.
* ``notify.webhook_secrets`` (``notify.deliver``, the notify edge's system
  login): the endpoints' secrets, to sign with.
* ``me.notify_get`` / ``me.notify_set``: a subscriber's own language and
  opt-outs (essential events cannot be opted out: ``billing.invalid``).

Every write and its audit row are one transaction.  At start, ``calls`` also
hands the installation's ``[notify]`` settings to the router and the
ledger's low-balance check (``configure``): both run inside the core, with
signatures that have no room for configuration.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from billcore.api import ADMIN_SYSTEM, USER, handler, need_int, page, who
from billcore.billing import audit, notify_lowbalance, notify_prefs, notify_route, notify_webhooks
from billcore.billing.ledger_errors import InvalidValue
from billcore.billing.notify_templates import (
    CHANNELS, DEFAULTS, EVENTS, LANGS, MoneyStyle, Template, check_template, render,
)
from billcore.billing.outbox import enqueue_one
from billcore.billing.outbox_delivery import StoredEvent
from billcore.common.config import Config
from billcore.common.errors import UnknownObject
from billcore.common.money import parse_money
from billcore.radius.secrets import SecretStore
from billcore.server.call_context import CallContext
from billcore.server.calls import CallSpec
from billcore.server.context import CoreContext

__all__ = ["calls", "configure", "SAMPLES"]

PAGE = 1000
TEMPLATE_FIELDS = {"event": "str", "channel": "str", "lang": "str", "subject": "str", "body": "str",
                   "overridden": "bool", "essential": "bool"}
WEBHOOK_FIELDS = {"id": "int", "name": "str", "url": "str", "events": "list", "enabled": "bool",
                  "created_at": "time", "updated_at": "time"}

# a sample payload per event, for previews (money in micro-units, as events carry it)
SAMPLES: dict[str, dict[str, Any]] = {
    "balance.low": {"balance": 4_500_000, "threshold": 10_000_000},
    "balance.runout_soon": {"balance": 12_000_000, "days_left": 3, "runs_out_on": "2026-01-15"},
    "payment.added": {"payment_id": 1, "amount": 500_000_000, "balance": 512_340_000, "method": "cash"},
    "account.blocked": {"kind": "system", "action": "set"},
    "account.unblocked": {"kind": "system", "action": "lift"},
    "fup.quota_reached": {"service_id": 1, "class_id": 1, "quota": 100_000_000_000, "used": 100_000_000_000},
    "fup.restored": {"service_id": 1, "class_id": 1},
    "dunning.grace": {"balance": -150_000_000, "until": "2026-01-15"},
    "dunning.throttled": {"balance": -150_000_000, "step": "throttle", "cycle": 1},
    "dunning.blocked": {"balance": -150_000_000, "step": "block", "cycle": 1},
    "dunning.closed": {"balance": -150_000_000, "step": "close", "cycle": 1},
    "invoice.issued": {"invoice_id": 1, "number": "INV-2026-000123", "total": 1_200_000_000},
    "credit_note.issued": {"invoice_id": 2, "number": "CN-2026-000007", "total": -300_000_000, "credits": 1},
}


def configure(config: Config) -> None:
    """The ``[notify]`` settings of the router and of the ledger's low-balance check."""
    section = config.notify
    notify_lowbalance.set_default(parse_money(section.low_balance) if section.low_balance else None)
    notify_route.configure(notify_route.RouteSettings(
        style=MoneyStyle(config.billing.minor_units, config.billing.currency), language=section.language,
        mail_domain=section.mail_from.rpartition("@")[2] or "localhost"))


def _key(event: object, lang: object, channel: object) -> tuple[str, str, str]:
    if event not in EVENTS:
        raise InvalidValue("event must be a notification event (notify.templates_list names them)")
    if lang not in LANGS:
        raise InvalidValue(f"lang must be one of {', '.join(LANGS)}")
    if channel not in CHANNELS:
        raise InvalidValue(f"channel must be one of {', '.join(CHANNELS)}")
    return str(event), str(lang), str(channel)


def _default(event: str, lang: str, channel: str) -> Template:
    # text (short messages) defaults to the email's subject: one line
    email = DEFAULTS[(event, lang)]
    return email if channel == "email" else Template("", email.subject)


def calls(core: CoreContext) -> list[CallSpec]:
    configure(core.config)
    store_box: list[SecretStore] = []

    def store() -> SecretStore:
        if not store_box:
            found = core.extras.get("secret_store")
            store_box.append(found if isinstance(found, SecretStore) else SecretStore.from_config(core.config))
        return store_box[0]

    def view(event: str, lang: str, channel: str, row: Any) -> dict[str, Any]:
        t = Template(row["subject"], row["body"]) if row is not None else _default(event, lang, channel)
        return {"event": event, "channel": channel, "lang": lang, "subject": t.subject, "body": t.body,
                "overridden": row is not None, "essential": event in notify_prefs.ESSENTIAL}

    @handler
    async def templates_list(ctx: CallContext) -> list[dict[str, Any]]:
        """Every notification template (event, channel, language): the operator's override, else the shipped
        default, with whether it is overridden and whether the event is essential (always sent)."""
        async with core.pool.acquire() as conn:
            rows = {(r["event"], r["lang"], r["channel"]): r for r in await conn.fetch(
                "SELECT event, lang, channel, subject, body FROM notify_templates")}
        return [view(e, lang, ch, rows.get((e, lang, ch))) for e in EVENTS for ch in CHANNELS for lang in LANGS]

    @handler
    async def templates_get(ctx: CallContext, event: str, lang: str, channel: str = "email") -> dict[str, Any]:
        """One template, with the shipped default beside it (default_subject, default_body) and the sample
        event data a preview uses."""
        event, lang, channel = _key(event, lang, channel)
        async with core.pool.acquire() as conn:
            row = await conn.fetchrow("SELECT subject, body FROM notify_templates WHERE event = $1 AND lang = $2"
                                      " AND channel = $3", event, lang, channel)
        default = _default(event, lang, channel)
        return {**view(event, lang, channel, row), "default_subject": default.subject,
                "default_body": default.body, "sample": SAMPLES.get(event, {})}

    @handler
    async def templates_set(ctx: CallContext, event: str, lang: str, subject: str, body: str,
                            channel: str = "email") -> dict[str, Any]:
        """Override a template; it must compile in the sandbox (notify.bad_template) and render the sample
        event."""
        event, lang, channel = _key(event, lang, channel)
        template = check_template(subject, body)
        render(template, _sample_vars(event), MoneyStyle())
        by = who(ctx)
        async with core.pool.acquire() as conn, conn.transaction():
            before = await conn.fetchrow("SELECT subject, body FROM notify_templates WHERE event = $1 AND lang = $2"
                                         " AND channel = $3 FOR UPDATE", event, lang, channel)
            row = await conn.fetchrow(
                "INSERT INTO notify_templates (event, channel, lang, subject, body, updated_by, updated_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (event, channel, lang) DO UPDATE SET"
                " subject = EXCLUDED.subject, body = EXCLUDED.body, updated_by = EXCLUDED.updated_by,"
                " updated_at = EXCLUDED.updated_at RETURNING subject, body",
                event, channel, lang, template.subject, template.body, by.actor, core.now())
            await audit.record(conn, by, "notify.templates_set", f"template:{event}/{channel}/{lang}",
                               before=dict(before) if before else None, after=dict(row) if row else None,
                               now=core.now())
        return view(event, lang, channel, row)

    @handler
    async def templates_reset(ctx: CallContext, event: str, lang: str, channel: str = "email") -> bool:
        """Drop the override: the shipped default applies again. False when there was none."""
        event, lang, channel = _key(event, lang, channel)
        async with core.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow("DELETE FROM notify_templates WHERE event = $1 AND lang = $2 AND channel = $3"
                                      " RETURNING subject, body", event, lang, channel)
            if row is not None:
                await audit.record(conn, who(ctx), "notify.templates_reset", f"template:{event}/{channel}/{lang}",
                                   before=dict(row), now=core.now())
        return row is not None

    @handler
    async def templates_preview(ctx: CallContext, event: str, lang: str, channel: str = "email",
                                subject: str | None = None, body: str | None = None,
                                data: dict[str, Any] | None = None) -> dict[str, Any]:
        """Render a template with a sample event: the text given (subject and body), else the stored one;
        data replaces the sample payload. Nothing is saved or sent."""
        event, lang, channel = _key(event, lang, channel)
        if subject is not None or body is not None:
            template = check_template(subject or "", body)
        else:
            async with core.pool.acquire() as conn:
                row = await conn.fetchrow("SELECT subject, body FROM notify_templates WHERE event = $1 AND lang = $2"
                                          " AND channel = $3", event, lang, channel)
            template = Template(row["subject"], row["body"]) if row else _default(event, lang, channel)
        if data is not None and not isinstance(data, dict):
            raise InvalidValue("data must be a map")
        section = core.config.notify
        done = render(template, _sample_vars(event, data), MoneyStyle(core.config.billing.minor_units, core.config.billing.currency))
        return {"subject": done.subject, "body": done.body}

    @handler
    async def webhooks_list(ctx: CallContext, limit: int | None = None, offset: int | None = None
                            ) -> list[dict[str, Any]]:
        """Webhook endpoints by id, paged: name, url, events, enabled. Never the secret."""
        limit, offset = page(limit, offset, PAGE)
        async with core.pool.acquire() as conn:
            return await notify_webhooks.list_webhooks(conn, limit, offset)

    @handler
    async def webhooks_add(ctx: CallContext, name: str, url: str, events: list[str],
                           enabled: bool = True) -> dict[str, Any]:
        """Add an endpoint that hears events ('*': every event). The answer holds its signing secret, shown
        this once."""
        if type(enabled) is not bool:
            raise InvalidValue("enabled must be a bool")
        by = who(ctx)
        async with core.pool.acquire() as conn, conn.transaction():
            made = await notify_webhooks.add(conn, store(), name, url, events, enabled, core.now())
            shown = {k: v for k, v in made.items() if k != "secret"}
            await audit.record(conn, by, "webhooks.add", f"webhook:{made['id']}", after=shown, now=core.now())
        return made

    @handler
    async def webhooks_edit(ctx: CallContext, webhook_id: int, name: str | None = None, url: str | None = None,
                            events: list[str] | None = None, enabled: bool | None = None,
                            rotate_secret: bool = False) -> dict[str, Any]:
        """Change an endpoint; with rotate_secret a new secret is made and shown this once."""
        webhook_id = need_int("webhook_id", webhook_id)
        if type(rotate_secret) is not bool:
            raise InvalidValue("rotate_secret must be a bool")
        async with core.pool.acquire() as conn, conn.transaction():
            before, after = await notify_webhooks.edit(conn, store(), webhook_id, core.now(), name=name, url=url,
                                                       events=events, enabled=enabled, rotate_secret=rotate_secret)
            logged = {k: v for k, v in after.items() if k != "secret"}
            await audit.record(conn, who(ctx), "webhooks.edit", f"webhook:{webhook_id}", before=before,
                               after={**logged, "secret": "rotated"} if rotate_secret else logged, now=core.now())
        return after

    @handler
    async def webhooks_delete(ctx: CallContext, webhook_id: int) -> bool:
        """Delete an endpoint; deliveries already queued for it still go out."""
        webhook_id = need_int("webhook_id", webhook_id)
        async with core.pool.acquire() as conn, conn.transaction():
            before = await notify_webhooks.delete(conn, webhook_id)
            await audit.record(conn, who(ctx), "webhooks.delete", f"webhook:{webhook_id}", before=before,
                               now=core.now())
        return True

    @handler
    async def webhooks_test(ctx: CallContext, webhook_id: int) -> dict[str, Any]:
        """Send a webhook.test event to this endpoint alone, through the outbox like any other; the answer
        names the event id the receiver sees in X-Billcore-Event."""
        webhook_id = need_int("webhook_id", webhook_id)
        async with core.pool.acquire() as conn, conn.transaction():
            exists = await conn.fetchval("SELECT id FROM webhooks WHERE id = $1", webhook_id)
            if exists is None:
                raise UnknownObject(f"webhook {webhook_id} does not exist")
            event_id = await enqueue_one(conn, notify_webhooks.TEST_EVENT, {"webhook_id": webhook_id}, core.now())
        return {"event_id": event_id}

    @handler
    async def webhook_secrets(ctx: CallContext, ids: list[int]) -> list[dict[str, Any]]:
        """The signing secrets of the endpoints among ids (at most 1000), for the notify edge."""
        if not isinstance(ids, list) or len(ids) > PAGE:
            raise InvalidValue(f"ids must be a list of at most {PAGE} ids")
        checked = [need_int("ids[]", i) for i in ids]
        async with core.pool.acquire() as conn:
            return await notify_webhooks.secrets_of(conn, store(), checked)

    def uid(ctx: CallContext) -> int:
        if ctx.principal.kind != "user":
            raise InvalidValue("me.* calls are for subscriber sessions")
        return int(ctx.principal.id)

    @handler
    async def me_notify_get(ctx: CallContext) -> dict[str, Any]:
        """My notification settings: language ('' is the provider's), the events with whether each is
        essential (always sent), and my opt-outs."""
        async with core.pool.acquire() as conn:
            return (await notify_prefs.get_prefs(conn, uid(ctx))).wire()

    @handler
    async def me_notify_set(ctx: CallContext, language: str | None = None,
                            optouts: list[dict[str, str]] | None = None) -> dict[str, Any]:
        """Set my notification language and replace my opt-outs ({event, channel}; event '*' is every event
        that is not essential)."""
        pairs = None if optouts is None else notify_prefs.check_optouts(optouts)
        if language is not None and type(language) is not str:
            raise InvalidValue("language must be a string")
        async with core.pool.acquire() as conn, conn.transaction():
            prefs = await notify_prefs.set_prefs(conn, uid(ctx), language, pairs)
            await audit.record(conn, who(ctx), "me.notify_set", f"user:{uid(ctx)}",
                               after={"language": prefs.language, "optouts": [list(p) for p in prefs.optouts]},
                               now=core.now())
        return prefs.wire()

    def spec(name: str, fn: Any, right: str | None, args: dict[str, str], result: str = "map",
             bound: str = "fixed", fields: dict[str, str] | None = None, kinds: frozenset[str] = ADMIN_SYSTEM
             ) -> CallSpec:
        return CallSpec(name, fn, right=right, kinds=kinds, args=args, result=result, doc=fn.__doc__ or "",
                        bound=bound, fields=fields or {})

    key = {"event": "str", "lang": "str", "channel": "str?"}
    return [
        spec("notify.templates_list", templates_list, "notify.read", {}, "list", fields=TEMPLATE_FIELDS),
        spec("notify.templates_get", templates_get, "notify.read", key,
             fields={**TEMPLATE_FIELDS, "default_subject": "str", "default_body": "str", "sample": "map"}),
        spec("notify.templates_set", templates_set, "notify.write", {**key, "subject": "str", "body": "str"},
             fields=TEMPLATE_FIELDS),
        spec("notify.templates_reset", templates_reset, "notify.write", key, "bool"),
        spec("notify.templates_preview", templates_preview, "notify.read",
             {**key, "subject": "str?", "body": "str?", "data": "map?"}, fields={"subject": "str", "body": "str"}),
        # system logins only: an operator, even with "*", never reads a secret back (shown once, at add)
        spec("notify.webhook_secrets", webhook_secrets, "notify.deliver", {"ids": "list"}, "list",
             fields={"id": "int", "secret": "str"}, kinds=frozenset({"system"})),
        spec("webhooks.list", webhooks_list, "webhooks.read", {"limit": "int?", "offset": "int?"}, "list",
             f"page:{PAGE}", WEBHOOK_FIELDS),
        spec("webhooks.add", webhooks_add, "webhooks.write",
             {"name": "str", "url": "str", "events": "list", "enabled": "bool?"},
             fields={**WEBHOOK_FIELDS, "secret": "str"}),
        spec("webhooks.edit", webhooks_edit, "webhooks.write",
             {"webhook_id": "int", "name": "str?", "url": "str?", "events": "list?", "enabled": "bool?",
              "rotate_secret": "bool?"}, fields={**WEBHOOK_FIELDS, "secret": "str"}),
        spec("webhooks.delete", webhooks_delete, "webhooks.write", {"webhook_id": "int"}, "bool"),
        spec("webhooks.test", webhooks_test, "webhooks.write", {"webhook_id": "int"}, fields={"event_id": "int"}),
        spec("me.notify_get", me_notify_get, None, {}, kinds=USER),
        spec("me.notify_set", me_notify_set, None, {"language": "str?", "optouts": "list?"}, kinds=USER),
    ]


def _sample_vars(event: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    sample = StoredEvent(0, event, 1, {"account_id": 1, **SAMPLES.get(event, {}), **(data or {})},
                         dt.datetime(2026, 1, 12, 9, 30, tzinfo=dt.timezone.utc))
    return notify_route.variables(sample, "subscriber", "A. Subscriber", "")

