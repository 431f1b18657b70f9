"""Bulk changes over a filtered subscriber list: preview, then apply.

Theory of operation
-------------------
An operator previews an action over a ``SubscriberFilter`` and gets the
number of subscribers it matches, a sample, and a *token*; applying the token
does the action to every match in one transaction.  The token binds what was
shown: the filter, the action with its arguments, the count, who previewed
and until when (``TOKEN_TTL``).  It is signed (HMAC-SHA-256) with a key the
core draws at start-up, so it is never stored, cannot be edited, and dies with
the process (preview again).  Apply refuses:

* a token that is malformed, edited, from another core or operator, or
  expired (``bulk.token``);
* a token already applied (``bulk.used``): the bulk's audit row names it
  (object ``bulk:<token id>``), read under an advisory lock on that id, so
  two applies of one token run one after the other and the second sees the
  first;
* a filter that now matches a different number of subscribers, or a client
  that expects another count (``bulk.changed``): what changes is what was
  shown;
* more than ``MAX_BULK`` subscribers, already at preview (``bulk.too_many``).

Each account is changed by the same domain function its single call uses
(``set_block``/``lift_block`` as blocks.set/lift, ``link_tariff`` as
tariffs.link) and gets its own audit row with the single call's action
name, plus ``"bulk"`` (the token id) in ``after``; the bulk gets one row.
Block changes are returned for the caller to announce after the commit, as
blocks.set does, so RADIUS disconnects the newly blocked sessions.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from typing import Any, ClassVar

from billcore.billing import audit
from billcore.billing.blocks import BlockChange, lift_block, set_block
from billcore.billing.ledger_errors import InvalidValue
from billcore.billing.subscribers import SubscriberFilter, count_subscribers, page_ids
from billcore.billing.tariffs import TariffNotFound, link_tariff
from billcore.common.errors import BillingError
from billcore.db.rows import DbConnection

__all__ = ["ACTIONS", "MAX_BULK", "TOKEN_TTL", "BulkAction", "BulkChanged", "BulkError", "BulkToken",
           "BulkTooMany", "BulkUsed", "Outcome", "Preview", "apply_bulk", "check_action", "count_for_bulk",
           "open_token", "seal_token"]

MAX_BULK = 10_000
TOKEN_TTL = dt.timedelta(minutes=10)
MAX_REASON = 1000
MAX_TOKEN = 4096
# the action and the right of its own call, which the operator must hold too
ACTIONS = {"set_tariff": "tariffs.write", "block": "blocks.write", "unblock": "blocks.write"}
# the audit action of each account's change: the name of the single call that makes it
_AUDIT_ACTION = {"set_tariff": "tariffs.link", "block": "blocks.set", "unblock": "blocks.lift"}


class BulkError(BillingError):
    """Root of the bulk refusals."""

    code: ClassVar[str] = "bulk"


class BulkToken(BulkError):
    """The token is malformed, altered, expired, from another core or of another operator."""

    code: ClassVar[str] = "bulk.token"


class BulkUsed(BulkError):
    """The token was applied already."""

    code: ClassVar[str] = "bulk.used"


class BulkChanged(BulkError):
    """The filter matches another number of subscribers than the preview showed."""

    code: ClassVar[str] = "bulk.changed"


class BulkTooMany(BulkError):
    """The filter matches more subscribers than one bulk change may touch."""

    code: ClassVar[str] = "bulk.too_many"


@dataclass(frozen=True, slots=True)
class BulkAction:
    """What to do to each matching subscriber's basic account."""

    action: str
    tariff_id: int | None = None
    start: str = "now"
    reason: str = ""

    @classmethod
    def of(cls, action: object, tariff_id: object = None, start: object = None, reason: object = None) -> BulkAction:
        if type(action) is not str or action not in ACTIONS:
            raise InvalidValue(f"action must be one of {', '.join(ACTIONS)}")
        if reason is not None and (type(reason) is not str or len(reason) > MAX_REASON):
            raise InvalidValue(f"reason must be a string of at most {MAX_REASON} characters")
        if action != "set_tariff":
            if tariff_id is not None or start is not None:
                raise InvalidValue(f"{action} takes no tariff_id or start")
            return cls(action, reason=reason or "")
        if type(tariff_id) is not int or not 1 <= tariff_id < 2**63:
            raise InvalidValue("set_tariff needs tariff_id, a positive int")
        if start is not None and start not in ("now", "next_period"):
            raise InvalidValue("start is 'now' or 'next_period'")
        return cls(action, tariff_id, start or "now", reason or "")

    @property
    def right(self) -> str:
        return ACTIONS[self.action]

    def as_dict(self) -> dict[str, Any]:
        """The action as bulk.preview's arguments (what ``of`` takes back)."""
        if self.action != "set_tariff":
            return {"action": self.action, "reason": self.reason}
        return {"action": self.action, "tariff_id": self.tariff_id, "start": self.start, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class Preview:
    """What a token binds."""

    token_id: str
    wanted: SubscriberFilter
    action: BulkAction
    count: int
    principal: str          # "kind:id" of the operator who previewed
    expires_at: dt.datetime


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def seal_token(key: bytes, wanted: SubscriberFilter, action: BulkAction, count: int, principal: str,
               now: dt.datetime) -> tuple[str, Preview]:
    """A signed token for this preview, and the preview it binds."""
    preview = Preview(secrets.token_hex(8), wanted, action, count, principal, now + TOKEN_TTL)
    body = json.dumps({"id": preview.token_id, "filter": wanted.as_dict(), "action": action.as_dict(),
                       "count": count, "principal": principal, "expires": preview.expires_at.isoformat()},
                      sort_keys=True, separators=(",", ":")).encode()
    return f"{_b64(body)}.{_b64(hmac.new(key, body, hashlib.sha256).digest())}", preview


def open_token(key: bytes, token: object, principal: str, now: dt.datetime) -> Preview:
    """The preview ``token`` binds, if it is ours, intact, this operator's and not expired."""
    if type(token) is not str or len(token) > MAX_TOKEN or token.count(".") != 1:
        raise BulkToken("not a bulk token: preview again")
    body_text, signature = token.split(".")
    try:
        body, mac = _unb64(body_text), _unb64(signature)
    except ValueError:
        raise BulkToken("not a bulk token: preview again") from None
    if not hmac.compare_digest(mac, hmac.new(key, body, hashlib.sha256).digest()):
        raise BulkToken("this token was not issued by this core (or it restarted since): preview again")
    fields = json.loads(body)
    preview = Preview(fields["id"], SubscriberFilter.of(fields["filter"]), BulkAction.of(**fields["action"]),
                      fields["count"], fields["principal"], dt.datetime.fromisoformat(fields["expires"]))
    if preview.principal != principal:
        raise BulkToken("this token was issued to another operator")
    if now >= preview.expires_at:
        raise BulkToken(f"the preview expired at {preview.expires_at.isoformat()}: preview again")
    return preview


async def check_action(conn: DbConnection, action: BulkAction) -> None:
    """Refuse an action on a tariff that does not exist (at preview, and at apply: it may be gone since)."""
    if action.tariff_id is not None and not await conn.fetchval(
            "SELECT 1 FROM tariffs WHERE id = $1", action.tariff_id):
        raise TariffNotFound(f"tariff {action.tariff_id} does not exist")


async def count_for_bulk(conn: DbConnection, wanted: SubscriberFilter, now: dt.datetime) -> int:
    """Matches of ``wanted``; over ``MAX_BULK`` is refused (inside a transaction)."""
    count = await count_subscribers(conn, wanted, now, cap=MAX_BULK)
    if count > MAX_BULK:
        raise BulkTooMany(f"the filter matches more than {MAX_BULK} subscribers; one bulk change may touch at"
                          f" most {MAX_BULK}: narrow the filter")
    return count


@dataclass(frozen=True, slots=True)
class Outcome:
    bulk_id: int                           # the bulk's audit row
    changed: int                           # accounts whose state changed
    block_changes: tuple[BlockChange, ...]


async def apply_bulk(conn: DbConnection, preview: Preview, expect_count: int, who: audit.Who, *,
                     now: dt.datetime, tz: dt.tzinfo) -> Outcome:
    """Apply a preview in one transaction (see the module's doc); the caller announces the block changes
    after the commit."""
    if expect_count != preview.count:
        raise BulkChanged(f"the preview counted {preview.count} subscribers, not {expect_count}")
    action, obj = preview.action, f"bulk:{preview.token_id}"
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", obj)
        if await conn.fetchval("SELECT 1 FROM audit_log WHERE object = $1", obj):
            raise BulkUsed("this preview was applied already")
        await check_action(conn, action)
        ids = await page_ids(conn, preview.wanted, now, limit=MAX_BULK + 1)
        if len(ids) != preview.count:
            raise BulkChanged(f"the filter now matches {len(ids)} subscribers, the preview {preview.count}:"
                              " preview again")
        changes: list[BlockChange] = []
        changed = 0
        for account_id in sorted(account for _, account in ids):   # one lock order for every writer
            after = await _change(conn, account_id, action, who, now, tz)
            if after is None:
                continue
            changed += 1
            if isinstance(after, BlockChange):
                changes.append(after)
                after = after.event()
            await audit.record(conn, who, _AUDIT_ACTION[action.action], f"account:{account_id}",
                               after={**after, "bulk": preview.token_id}, now=now)
        bulk_id = await audit.record(conn, who, "bulk.apply", obj, after={
            "filter": preview.wanted.as_dict(), **action.as_dict(), "count": preview.count,
            "changed": changed}, now=now)
    return Outcome(bulk_id, changed, tuple(changes))


async def _change(conn: DbConnection, account_id: int, action: BulkAction, who: audit.Who, now: dt.datetime,
                  tz: dt.tzinfo) -> dict[str, Any] | BlockChange | None:
    """One account's change (None: it was so already)."""
    if action.action == "block":
        return await set_block(conn, account_id, "admin", actor=who.actor, reason=action.reason, now=now)
    if action.action == "unblock":
        return await lift_block(conn, account_id, "admin", actor=who.actor, now=now)
    # on it already from now on (or from a start already scheduled): a new link would only cut the
    # period in two, and book the tariff's once-off services again
    latest = await conn.fetchrow("SELECT tariff_id, valid_from FROM account_tariffs WHERE account_id = $1"
                                 " AND valid_to IS NULL ORDER BY valid_from DESC LIMIT 1", account_id)
    if latest is not None and latest["tariff_id"] == action.tariff_id and (
            action.start == "next_period" or latest["valid_from"] <= now):
        return None
    return await link_tariff(conn, account_id, action.tariff_id, now=now, tz=tz, start=action.start,
                             actor=who.actor)
