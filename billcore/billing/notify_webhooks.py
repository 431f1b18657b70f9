"""Webhook endpoints: where events are POSTed, signed, and with which secret.

Theory of operation
-------------------
An endpoint is a name, an http(s) URL, the events it hears (``'*'``: all)
and a secret.  The secret is made here (256 random bits, ``whsec_`` + url-safe
base64), shown once by ``add`` (and by ``edit`` with ``rotate_secret``), and
stored sealed with the core's ``SecretStore`` — like NAS secrets, a
database dump alone cannot sign.  The notify edge, which signs every POST,
reads the cleartext over URFA (``notify.webhook_secrets``, right
``notify.deliver``, its system login only), as the radius process reads NAS
secrets.

Signature (docs/automation/notify.md): ``X-Billcore-Signature: v1=<hex
HMAC-SHA256(secret, "<timestamp>.<body>")>``; ``billcore.common.webhook_sig``
is the one implementation, the edge's and the tests' (re-exported here).
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
import urllib.parse
from collections.abc import Sequence
from typing import Any

from billcore.billing.ledger_errors import InvalidValue
from billcore.common.errors import AlreadyExists, UnknownObject
from billcore.common.webhook_sig import sign, verify
from billcore.db.rows import DbConnection
from billcore.radius.secrets import SecretStore

__all__ = ["EVENT_RE", "TEST_EVENT", "add", "check_events", "delete", "edit", "list_webhooks", "secrets_of",
           "sign", "verify"]

NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
EVENT_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
TEST_EVENT = "webhook.test"       # webhooks.test: routed to the one endpoint named in its payload
MAX_URL = 2000
MAX_EVENTS = 100
_COLS = "id, name, url, events, enabled, created_at, updated_at"


def check_name(name: object) -> str:
    if type(name) is not str or not NAME_RE.match(name):
        raise InvalidValue("name must be 1..64 letters, digits, '.', '_' or '-'")
    return name


def check_url(url: object) -> str:
    if type(url) is not str or len(url) > MAX_URL:
        raise InvalidValue(f"url must be a string of at most {MAX_URL} characters")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in url):
        raise InvalidValue("url must be an http:// or https:// URL with a host")
    return url


def check_events(events: object) -> list[str]:
    if not isinstance(events, list) or not 1 <= len(events) <= MAX_EVENTS:
        raise InvalidValue(f"events must be a list of 1..{MAX_EVENTS} event names ('*': every event)")
    for event in events:
        if type(event) is not str or not (event == "*" or (EVENT_RE.match(event) and len(event) <= 64)):
            raise InvalidValue("each event is '*' or a dotted event name like 'payment.added'")
    return sorted(set(events))


def _view(row: Any) -> dict[str, Any]:
    return {"id": row["id"], "name": row["name"], "url": row["url"], "events": list(row["events"]),
            "enabled": row["enabled"], "created_at": row["created_at"], "updated_at": row["updated_at"]}


def _new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


async def list_webhooks(conn: DbConnection, limit: int, offset: int) -> list[dict[str, Any]]:
    return [_view(r) for r in await conn.fetch(f"SELECT {_COLS} FROM webhooks ORDER BY id LIMIT $1 OFFSET $2",
                                               limit, offset)]


async def add(conn: DbConnection, store: SecretStore, name: object, url: object, events: object,
              enabled: bool, now: dt.datetime) -> dict[str, Any]:
    """The new endpoint with its ``secret`` (shown this once)."""
    name, url, events = check_name(name), check_url(url), check_events(events)
    secret = _new_secret()
    row = await conn.fetchrow(
        f"INSERT INTO webhooks (name, url, secret_enc, events, enabled, created_at, updated_at)"
        f" VALUES ($1, $2, $3, $4, $5, $6, $6) ON CONFLICT (name) DO NOTHING RETURNING {_COLS}",
        name, url, store.seal(secret.encode()), events, enabled, now)
    if row is None:
        raise AlreadyExists(f"a webhook named {name!r} exists")
    return {**_view(row), "secret": secret}


async def edit(conn: DbConnection, store: SecretStore, webhook_id: int, now: dt.datetime, *,
               name: object = None, url: object = None, events: object = None, enabled: object = None,
               rotate_secret: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """(before, after); ``after`` holds the new ``secret`` when it was rotated."""
    before = await conn.fetchrow(f"SELECT {_COLS} FROM webhooks WHERE id = $1 FOR UPDATE", webhook_id)
    if before is None:
        raise UnknownObject(f"webhook {webhook_id} does not exist")
    if enabled is not None and type(enabled) is not bool:
        raise InvalidValue("enabled must be a bool")
    secret = _new_secret() if rotate_secret else None
    if name is not None:
        name = check_name(name)
        taken = await conn.fetchval("SELECT id FROM webhooks WHERE name = $1 AND id <> $2", name, webhook_id)
        if taken is not None:
            raise AlreadyExists(f"a webhook named {name!r} exists")
    row = await conn.fetchrow(
        f"UPDATE webhooks SET name = coalesce($2, name), url = coalesce($3, url), events = coalesce($4, events),"
        f" enabled = coalesce($5, enabled), secret_enc = coalesce($6, secret_enc), updated_at = $7"
        f" WHERE id = $1 RETURNING {_COLS}",
        webhook_id, name, None if url is None else check_url(url), None if events is None else check_events(events),
        enabled, None if secret is None else store.seal(secret.encode()), now)
    after = _view(row)
    return _view(before), ({**after, "secret": secret} if secret else after)


async def delete(conn: DbConnection, webhook_id: int) -> dict[str, Any]:
    row = await conn.fetchrow(f"DELETE FROM webhooks WHERE id = $1 RETURNING {_COLS}", webhook_id)
    if row is None:
        raise UnknownObject(f"webhook {webhook_id} does not exist")
    return _view(row)


async def secrets_of(conn: DbConnection, store: SecretStore, ids: Sequence[int]) -> list[dict[str, Any]]:
    """``[{id, secret}]`` of the endpoints that exist among ``ids`` (for the notify edge)."""
    rows = await conn.fetch("SELECT id, secret_enc FROM webhooks WHERE id = ANY($1::bigint[]) ORDER BY id", list(ids))
    return [{"id": r["id"], "secret": store.open(bytes(r["secret_enc"])).decode()} for r in rows]
