"""URFA calls of RADIUS: the radius process's (authorize, accounting, the NAS
table, the stale sweep) and the operators' (NAS devices, pools, links,
sessions, disconnect).

System calls (kinds ``{"system"}``, right ``radius.serve``):

* ``radius.authorize(request)`` / ``radius.authorize_many(requests)`` — an
  Access-Request as ``radius.requests.auth_request`` builds it; answer
  ``{"accept", "account_id", "reply"}`` or ``{"accept": false, "reason",
  "reply"}`` with ``reply`` a list of ``[attribute, value]``.
* ``radius.accounting(record)`` — an Accounting-Request; answer
  ``{"session"}`` (``"ended": true`` for a session that had ended),
  ``{"closed"}`` for Accounting-On/Off or ``{"ignored"}``.  The ``session.*``
  plugin hooks are enqueued in the outbox inside the accounting transaction;
  block changes are published on topic ``blocks`` after the commit.
* ``radius.accounting_many(records)`` — up to ``MAX_BATCH`` records (the
  radius process's Accounting-Requests of one loop turn); one answer per
  record in the same order: the map ``radius.accounting`` answers, or
  ``{"error": code, "message"}`` for that record alone.  Theory: batches
  that share a login, a session or a NAS being reset take turns in arrival
  order (``Turns``: at once they would wait on each other's rows and IP
  bindings); a batch is applied in order in ONE transaction (``prefetch`` reads the NAS ids,
  locks the sessions in key order and reads links and time-charged accounts
  in four statements; each record then costs only its writes), its hooks
  enqueued in one statement, its block changes and topics published after
  the one commit.  A malformed record (``InvalidValue``) or one of an
  unknown NAS gets its error and is not applied.  Any other failure inside
  the batch (a deadlock with a concurrent batch, a record the database
  refuses, a bug) rolls the whole batch back and applies each record
  again in its own transaction, exactly as ``radius.accounting`` does, so one
  bad record costs only itself and every record is applied once or not at
  all (a retry after the rollback is the first application).  A database
  that goes away fails the whole call (``db_unavailable``): the NAS
  retransmits, and a record that was committed is idempotent.

Maps become records (``billcore.radius.records``) here and records maps;
every rule is in ``billcore.radius``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import zoneinfo
from collections.abc import AsyncIterator
from typing import Any, Final

import asyncpg

from billcore.api import announce, handler, listened, need_int, page, who
from billcore.billing import audit
from billcore.billing.ledger_errors import InvalidValue
from billcore.billing.outbox import OutboxEvent, enqueue
from billcore.common.errors import UnknownObject
from billcore.db.pool import DATABASE_GONE
from billcore.db.rows import DbConnection
from billcore.radius.accounting import Prefetch, apply_accounting, flush_pending, nas_id_of, prefetch, sweep
from billcore.radius.authorize import Authorizer, authorize
from billcore.radius.nas import (
    add_link,
    add_nas,
    add_pool,
    delete_link,
    delete_nas,
    delete_pool,
    edit_link,
    edit_nas,
    edit_pool,
    link_list,
    nas_list,
    pool_list,
)
from billcore.radius.records import (
    AccountingRecord,
    AccountingResult,
    AcctStatus,
    read_access_request,
    read_accounting_record,
)
from billcore.radius.secrets import SecretStore
from billcore.radius.sessions import PAGE, active_sessions
from billcore.server.call_context import CallContext
from billcore.server.calls import CallSpec
from billcore.server.context import CoreContext
from billcore.server.wire_errors import to_call_failed
from urfa.errors import BUSY, INTERNAL

__all__ = ["calls", "MAX_BATCH"]

log = logging.getLogger(__name__)

SYSTEM: Final = frozenset({"system"})
ADMIN: Final = frozenset({"admin", "system"})
MAX_BATCH: Final = 1024
MA_NOTICE: Final = (
    "require_message_authenticator is on (the default, BlastRADIUS protection): Access-Requests"
    " from this NAS without a Message-Authenticator attribute are dropped unanswered, and the radius"
    " log says so once a minute. Configure the NAS to send it; only for a NAS that cannot, use"
    " radius.nas_edit require_message_authenticator=false.")
_NAS_FIELDS: Final = {"name": "str?", "address": "ip?", "secret": "str?", "require_message_authenticator": "bool?",
                      "coa_port": "int?", "disconnect_mode": "str?", "blocked_profile": "list?"}
_LINK_FIELDS: Final = {"static_ip": "ip?", "pool": "str?", "max_sessions": "int?", "session_limit": "int?",
                       "interim_interval": "int?", "rate_limit": "str?", "cisco_avpairs": "list?"}
# the lists grow with NAS devices, pools, logins and sessions: paged; the rest is one record
# (radius.authorize_many answers as many decisions as it was given, at most MAX_BATCH)
_PAGED: Final = frozenset({"radius.nas_list", "radius.nas_show", "radius.pool_list", "radius.link_list",
                           "radius.sessions"})


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class _Claim:
    """What a batch of accounting records touches: its logins and sessions
    (``names``), the NAS of its records, and the NAS it resets (On/Off)."""

    names: frozenset[str]
    nas: frozenset[str]
    resets: frozenset[str]

    @classmethod
    def of(cls, records: list[AccountingRecord]) -> _Claim:
        names = {f"s:{r.nas}:{r.session_id}" for r in records if r.session_id is not None}
        names |= {f"l:{r.login}" for r in records if r.login is not None}
        resets = {r.nas for r in records if r.status in (AcctStatus.ON, AcctStatus.OFF)}
        return cls(frozenset(names), frozenset(r.nas for r in records), frozenset(resets))

    def meets(self, other: _Claim) -> bool:
        return (not self.names.isdisjoint(other.names) or not self.resets.isdisjoint(other.nas)
                or not other.resets.isdisjoint(self.nas))


class Turns:
    """Accounting batches run side by side (at most ``width``) unless they
    meet (``_Claim.meets``): then the later one waits for the earlier, so the
    records of one session or NAS are applied in arrival order."""

    def __init__(self, width: int = 3) -> None:
        self.width = width
        self._queue: list[_Claim] = []       # running and waiting, in arrival order
        self._running: set[_Claim] = set()
        self._changed = asyncio.Condition()

    def _may_run(self, claim: _Claim) -> bool:
        if len(self._running) >= self.width:
            return False
        for earlier in self._queue:
            if earlier is claim:
                return True
            if earlier.meets(claim):
                return False
        return True

    @contextlib.asynccontextmanager
    async def turn(self, records: list[AccountingRecord]) -> AsyncIterator[None]:
        claim = _Claim.of(records)
        async with self._changed:
            self._queue.append(claim)
            try:
                await self._changed.wait_for(lambda: self._may_run(claim))
            except BaseException:
                self._queue.remove(claim)
                self._changed.notify_all()
                raise
            self._running.add(claim)
        try:
            yield
        finally:
            async with self._changed:
                self._running.discard(claim)
                self._queue.remove(claim)
                self._changed.notify_all()


def _redacted(args: dict[str, Any]) -> dict[str, Any]:
    """Arguments for the audit row: secrets only as changed."""
    return {name: ("<changed>" if name in ("secret", "password") else value)
            for name, value in args.items() if value is not None}


def _given(args: dict[str, Any]) -> dict[str, Any]:
    """An optional argument sent as nil means its default."""
    return {name: value for name, value in args.items() if value is not None}


def calls(core: CoreContext) -> list[CallSpec]:
    tz = zoneinfo.ZoneInfo(core.config.core.timezone)
    store: SecretStore = core.extras.get("secret_store") or SecretStore.from_config(core.config)
    core.extras["secret_store"] = store
    pool = core.pool
    authorizer = Authorizer(pool, store, tz)

    @contextlib.asynccontextmanager
    async def admin_tx(ctx: CallContext, action: str, obj: str, after: Any) -> AsyncIterator[DbConnection]:
        """One transaction for an admin write and its audit row.  A database
        refusal (duplicate name, bad range) rolls both back and answers its
        documented code (``billcore.server.wire_errors``), never PostgreSQL's text."""
        async with pool.acquire() as conn, conn.transaction():
            yield conn
            await audit.record(conn, who(ctx), action, obj, after=after, now=core.now())

    async def authorize_one(ctx: CallContext, request: dict[str, Any]) -> dict[str, Any]:
        async with pool.acquire() as conn:
            decision = await authorize(conn, store, read_access_request(request), core.now(), tz=tz)
        return decision.wire()

    async def authorize_batch(ctx: CallContext, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not 1 <= len(requests) <= MAX_BATCH or not all(isinstance(request, dict) for request in requests):
            raise InvalidValue(f"requests: a list of 1..{MAX_BATCH} maps")
        decisions = await authorizer.decide([read_access_request(request) for request in requests], core.now())
        return [decision.wire() for decision in decisions]

    async def enqueue_hooks(conn: DbConnection, results: list[AccountingResult], now: dt.datetime) -> None:
        # the session hooks go out through the outbox, with the sessions' own commit
        # (enqueued only while a plugin listens: every Start and Stop would be one)
        events = [OutboxEvent(hook.event, hook.payload, hook.payload.get("account_id"))
                  for result in results for hook in result.hooks if listened(core, hook.event)]
        if events:
            await enqueue(conn, events, now)

    async def published(result: AccountingResult) -> dict[str, Any]:
        """After the commit: block changes on ``blocks``, the session's events."""
        await announce(core, result.block_changes)
        for hook in result.hooks:
            core.publish("radius.sessions", {"event": hook.event.removeprefix("session."), "session": result.session,
                                             "account_id": hook.payload["account_id"]})
        if result.closed:
            core.publish("radius.sessions", {"event": "closed", "closed": result.closed})
        return result.wire()

    async def apply_one(record: AccountingRecord, now: dt.datetime) -> AccountingResult:
        async with pool.acquire() as conn, conn.transaction():
            result = await apply_accounting(conn, record, now, tz=tz)
            await enqueue_hooks(conn, [result], now)
        return result

    async def accounting(ctx: CallContext, record: dict[str, Any]) -> dict[str, Any]:
        return await published(await apply_one(read_accounting_record(record), core.now()))

    def record_error(exc: Exception) -> dict[str, Any]:
        """One record's failure as its answer (the codes the single call answers)."""
        if isinstance(exc, asyncpg.TransactionRollbackError):   # deadlock, serialization: the NAS retries
            return {"error": BUSY, "message": "the record met a concurrent one; retry"}
        failed = to_call_failed(exc)
        if failed is None:
            log.error("an accounting record failed", exc_info=exc)
            return {"error": INTERNAL, "message": "internal error"}
        return {"error": failed.code, "message": failed.message}

    # batches that share a login, a session or a NAS being reset take turns in arrival order: at
    # once they would wait on each other's rows and IP bindings (a deadlock, an exclusion conflict
    # on a shared static IP) and fall back record by record; the others run side by side
    accounting_turns = Turns()

    async def accounting_batch(ctx: CallContext, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not 1 <= len(records) <= MAX_BATCH or not all(isinstance(record, dict) for record in records):
            raise InvalidValue(f"records: a list of 1..{MAX_BATCH} maps")
        answers: list[dict[str, Any] | None] = [None] * len(records)
        todo: list[tuple[int, AccountingRecord]] = []
        for i, raw in enumerate(records):
            try:
                todo.append((i, read_accounting_record(raw)))
            except InvalidValue as exc:
                answers[i] = record_error(exc)
        now = core.now()
        results: list[tuple[int, AccountingResult]] = []
        if todo:
            async with accounting_turns.turn([record for _, record in todo]):
                results = await apply_batch(todo, answers, now)
        for i, result in results:
            answers[i] = await published(result)
        return [answer if answer is not None else {"error": INTERNAL, "message": "internal error"}
                for answer in answers]

    async def apply_batch(todo: list[tuple[int, AccountingRecord]], answers: list[dict[str, Any] | None],
                          now: dt.datetime) -> list[tuple[int, AccountingResult]]:
        """The batch in one transaction, else record by record (see the module docstring)."""
        results: list[tuple[int, AccountingResult]] = []
        if todo:
            try:
                async with pool.acquire() as conn, conn.transaction():
                    pre: Prefetch = await prefetch(conn, [record for _, record in todo])
                    for i, record in todo:
                        try:
                            await nas_id_of(conn, record.nas, pre)   # nothing written yet for it
                        except UnknownObject as exc:
                            answers[i] = record_error(exc)
                            continue
                        results.append((i, await apply_accounting(conn, record, now, tz=tz, pre=pre)))
                    await flush_pending(conn, pre)
                    await enqueue_hooks(conn, [result for _, result in results], now)
            except (*DATABASE_GONE, OSError):
                raise
            except Exception as exc:   # rolled back: each record again, alone
                log.warning("an accounting batch of %d records failed (%r); applying them one by one",
                            len(todo), exc)
                results = []
                for i, record in todo:
                    if answers[i] is not None:
                        continue
                    try:
                        results.append((i, await apply_one(record, now)))
                    except (*DATABASE_GONE, OSError):
                        raise
                    except Exception as exc:
                        answers[i] = record_error(exc)
        return results

    @handler  # a bad page answers billing.invalid, not internal
    async def nas_for_radius(ctx: CallContext, limit: int = PAGE, offset: int = 0) -> list[dict[str, Any]]:
        limit, offset = page(limit, offset, PAGE)
        async with pool.acquire() as conn:
            return [nas.wire() for nas in await nas_list(conn, store, with_secrets=True, limit=limit, offset=offset)]

    @handler  # a bad page answers billing.invalid, not internal
    async def nas_show(ctx: CallContext, limit: int = PAGE, offset: int = 0) -> list[dict[str, Any]]:
        limit, offset = page(limit, offset, PAGE)
        async with pool.acquire() as conn:
            return [nas.wire() for nas in await nas_list(conn, store, with_secrets=False, limit=limit, offset=offset)]

    async def nas_add(ctx: CallContext, **args: Any) -> dict[str, Any]:
        args = _given(args)
        async with admin_tx(ctx, "radius.nas_add", f"nas:{args.get('name')}", _redacted(args)) as conn:
            nas_id = await add_nas(conn, store, **args)
        core.publish("radius.nas", {"changed": nas_id})
        required = args.get("require_message_authenticator", True)
        return {"id": nas_id, "require_message_authenticator": required, "notice": MA_NOTICE if required else ""}

    async def nas_edit(ctx: CallContext, id: int, **args: Any) -> bool:
        async with admin_tx(ctx, "radius.nas_edit", f"nas:{id}", _redacted(args)) as conn:
            done = await edit_nas(conn, store, id, **args)
        core.publish("radius.nas", {"changed": id})
        return done

    async def nas_delete(ctx: CallContext, id: int, force: bool = False) -> bool:
        async with admin_tx(ctx, "radius.nas_delete", f"nas:{id}", {"force": bool(force)}) as conn:
            done = await delete_nas(conn, id, core.now(), bool(force))
        core.publish("radius.nas", {"deleted": id})
        return done

    async def pool_add(ctx: CallContext, **args: Any) -> int:
        args = _given(args)
        async with admin_tx(ctx, "radius.pool_add", f"pool:{args.get('name')}", args) as conn:
            return await add_pool(conn, **args)

    async def pool_edit(ctx: CallContext, id: int, **args: Any) -> bool:
        async with admin_tx(ctx, "radius.pool_edit", f"pool:{id}", _redacted(args)) as conn:
            return await edit_pool(conn, id, **args)

    async def pool_delete(ctx: CallContext, id: int) -> bool:
        async with admin_tx(ctx, "radius.pool_delete", f"pool:{id}", None) as conn:
            return await delete_pool(conn, id)

    @handler  # a bad page answers billing.invalid, not internal
    async def pools(ctx: CallContext, limit: int = PAGE, offset: int = 0) -> list[dict[str, Any]]:
        limit, offset = page(limit, offset, PAGE)
        async with pool.acquire() as conn:
            return [ip_pool.wire() for ip_pool in await pool_list(conn, limit, offset)]

    async def link_add(ctx: CallContext, **args: Any) -> int:
        args = _given(args)
        async with admin_tx(ctx, "radius.link_add", f"account:{args.get('account_id')}", _redacted(args)) as conn:
            return await add_link(conn, store, **args)

    async def link_edit(ctx: CallContext, id: int, **args: Any) -> bool:
        async with admin_tx(ctx, "radius.link_edit", f"radius_link:{id}", _redacted(args)) as conn:
            return await edit_link(conn, store, id, **args)

    async def link_delete(ctx: CallContext, id: int, force: bool = False) -> bool:
        async with admin_tx(ctx, "radius.link_delete", f"radius_link:{id}", {"force": bool(force)}) as conn:
            return await delete_link(conn, id, core.now(), bool(force))

    @handler  # a bad page answers billing.invalid, not internal
    async def links(ctx: CallContext, account_id: int | None = None, login: str | None = None, limit: int = PAGE,
                    offset: int = 0) -> list[dict[str, Any]]:
        limit, offset = page(limit, offset, PAGE)
        async with pool.acquire() as conn:
            return [link.wire() for link in await link_list(conn, account_id, login, limit, offset)]

    @handler  # a bad page answers billing.invalid, not internal
    async def sessions(ctx: CallContext, account_id: int | None = None, limit: int = PAGE, offset: int = 0
                       ) -> list[dict[str, Any]]:
        limit, offset = page(limit, offset, PAGE)
        async with pool.acquire() as conn:
            return [session.wire() for session in await active_sessions(conn, account_id, limit=limit, offset=offset)]

    async def sweep_stale(ctx: CallContext, timeout: int) -> int:
        need_int("timeout", timeout, 1, 10 * 366 * 86400)   # seconds; a timedelta of 2^63 s overflows
        async with pool.acquire() as conn, conn.transaction():
            swept = await sweep(conn, core.now(), dt.timedelta(seconds=timeout), tz=tz)
        await announce(core, swept.block_changes)   # a close charges the seconds Interims had not
        closed = swept.closed
        if closed:
            core.publish("radius.sessions", {"event": "closed", "closed": closed})
        return closed

    async def disconnect(ctx: CallContext, session: int) -> dict[str, Any]:
        async with pool.acquire() as conn:
            found = await active_sessions(conn, None, session)
        if not found:
            raise UnknownObject(f"no active session {session}")
        core.publish("radius.disconnect", {"sessions": [active.wire() for active in found]})
        return {"requested": True, "session": found[0].id}

    specs = [
        CallSpec("radius.authorize", authorize_one, right="radius.serve", kinds=SYSTEM, args={"request": "map"},
                 result="map", doc="Decide an Access-Request: {accept, reply: [[attribute, value]…]}."),
        CallSpec("radius.authorize_many", authorize_batch, right="radius.serve", kinds=SYSTEM,
                 args={"requests": "list"}, result="list",
                 doc=f"Decide up to {MAX_BATCH} Access-Requests at once; the decisions in the same order."),
        CallSpec("radius.accounting", accounting, right="radius.serve", kinds=SYSTEM, args={"record": "map"},
                 result="map", doc="Apply an Accounting-Request (idempotent)."),
        CallSpec("radius.accounting_many", accounting_batch, right="radius.serve", kinds=SYSTEM,
                 args={"records": "list"}, result="list",
                 doc=f"Apply up to {MAX_BATCH} Accounting-Requests in order (one transaction when all succeed);"
                 " one answer per record, as radius.accounting's, or {error, message} for that record."),
        CallSpec("radius.nas_list", nas_for_radius, right="radius.serve", kinds=SYSTEM, result="list",
                 doc="NAS devices with their shared secrets (for the radius process)."),
        CallSpec("radius.close_stale", sweep_stale, right="radius.serve", kinds=SYSTEM, args={"timeout": "int"},
                 result="int", doc="End sessions silent for `timeout` seconds; return how many."),
        CallSpec("radius.nas_show", nas_show, right="radius.read", kinds=ADMIN, result="list",
                 doc="NAS devices, without secrets."),
        CallSpec("radius.nas_add", nas_add, right="radius.nas", kinds=ADMIN,
                 args={**_NAS_FIELDS, "name": "str", "address": "ip", "secret": "str"},
                 result="map", doc="Add a NAS device; returns {id, require_message_authenticator, notice}:"
                 " notice is non-empty when Access-Requests without Message-Authenticator will be dropped."),
        CallSpec("radius.nas_edit", nas_edit, right="radius.nas", kinds=ADMIN, args={"id": "int", **_NAS_FIELDS},
                 result="bool", doc="Change fields of a NAS device (the radius process reloads its table)."),
        CallSpec("radius.nas_delete", nas_delete, right="radius.nas", kinds=ADMIN,
                 args={"id": "int", "force": "bool?"}, result="bool",
                 doc="Delete a NAS device and its session history (force: end its active sessions)."),
        CallSpec("radius.pool_add", pool_add, right="radius.pools", kinds=ADMIN,
                 args={"name": "str", "first": "ip", "last": "ip"}, result="int", doc="Add an IPv4 pool."),
        CallSpec("radius.pool_edit", pool_edit, right="radius.pools", kinds=ADMIN,
                 args={"id": "int", "name": "str?", "first": "ip?", "last": "ip?"}, result="bool",
                 doc="Rename or resize a pool (refused if a lease would fall outside)."),
        CallSpec("radius.pool_delete", pool_delete, right="radius.pools", kinds=ADMIN, args={"id": "int"},
                 result="bool", doc="Delete a pool no link uses."),
        CallSpec("radius.pool_list", pools, right="radius.read", kinds=ADMIN, result="list",
                 doc="Pools with their size and leased count."),
        CallSpec("radius.link_add", link_add, right="radius.links", kinds=ADMIN,
                 args={"account_id": "int", "login": "str", "password": "str", **_LINK_FIELDS},
                 result="int", doc="Give an account a RADIUS login (password stored encrypted)."),
        CallSpec("radius.link_edit", link_edit, right="radius.links", kinds=ADMIN,
                 args={"id": "int", "login": "str?", "password": "str?", "disabled": "bool?", **_LINK_FIELDS},
                 result="bool", doc="Change fields of a RADIUS login (pool \"\" or static_ip \"\" removes it)."),
        CallSpec("radius.link_delete", link_delete, right="radius.links", kinds=ADMIN,
                 args={"id": "int", "force": "bool?"}, result="bool",
                 doc="Delete a RADIUS login and its session history (force: end its active sessions)."),
        CallSpec("radius.link_list", links, right="radius.read", kinds=ADMIN,
                 args={"account_id": "int?", "login": "str?"}, result="list",
                 doc="RADIUS logins (without passwords), of one account, one login, or all."),
        CallSpec("radius.sessions", sessions, right="radius.read", kinds=ADMIN, args={"account_id": "int?"},
                 result="list", doc="Active sessions, of one account or all."),
        CallSpec("radius.disconnect", disconnect, right="radius.disconnect", kinds=ADMIN, args={"session": "int"},
                 result="map", doc="Ask the radius process to disconnect an active session."),
    ]
    return [dataclasses.replace(spec, args={**spec.args, "limit": "int?", "offset": "int?"}, bound=f"page:{PAGE}")
            if spec.name in _PAGED else dataclasses.replace(spec, bound="fixed") for spec in specs]
