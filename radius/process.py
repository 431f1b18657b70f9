"""The radius role wired to the core over URFA.

Theory of operation
-------------------
Start: bind the ports first (``PortInUse`` stops the role with a clear
message), then start the link to the core (``urfa.link.Link``, which
reconnects and resumes by itself; see docs/architecture.md).  It logs in as
the ``radius`` system principal (password file
``<data_dir>/system/radius.password``, provisioned by the core, read at
every attempt), subscribes to ``outbox``, ``radius.nas`` and
``radius.disconnect`` and loads ``radius.nas_list`` on every (re)connect.

While the link is down, nothing is answered: a request that reaches the
decider fails fast with ``DecisionUnavailable`` and is counted
(``billcore_radius_dropped{reason="core_unavailable"}``); the NAS
retransmits and the retry is decided afresh.  Before the first NAS table is
loaded every datagram is dropped the same way.

Decisions: ``UrfaDecider`` gathers the Access-Requests of one loop turn
into one ``radius.authorize_many`` call (at most ``max_batch`` each, at most
``max_batches`` calls in flight — the core caps calls per connection; while
all are in flight the next batch grows).  Accounting-Requests are batched
the same way into ``radius.accounting_many`` (at most ``max_batch`` records a
call, at most ``max_accounting`` calls in flight — a storm of Starts after a
NAS reboot waits its turn, within the decision timeout, instead of meeting
"busy"); the core applies a batch in one transaction, in arrival order, and
answers each record alone: a record's error (``{"error": code}``) fails only
its own request — dropped unanswered when a retry can help (the NAS
retransmits), counted as refused otherwise.  The Accounting-Response is sent
only after the core answered, i.e. after the batch's commit.

A block's Disconnect (and a rate change) is an outbox delivery of channel
``radius`` (``radius.outbox_consumer``): claimed, sent — ``radius.sessions``
for the account → Disconnect-Request, or a CoA to the NAS's blocked profile
— and acknowledged, so a block committed while this process was down or
restarting still disconnects the account when it is back.  Topics:
``outbox`` wakes the deliverer; ``radius.nas`` → reload the NAS table;
``radius.disconnect`` (an operator's request) → send it at once.  Every
``stale_check`` seconds, ``radius.close_stale``.

Several processes (``[radius] processes``): the supervisor binds the ports
as SO_REUSEPORT groups and hands each process its sockets (``ENV_FDS``);
every process answers NAS requests, but only radius[0] delivers the outbox,
sends operators' disconnects and sweeps stale sessions (the others subscribe
to ``radius.nas`` only), so no NAS gets a Disconnect twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Gauge

from billcore.common.gctune import tune as tune_gc
from billcore.common.udpgroup import ENV_FDS
from urfa.client import Client
from urfa.errors import CallFailed, URFAError
from urfa.link import Address, Link
from urfa.messages import Event
from urfa.reconnect import Verdict, verdict

from .coa import CoaTimeout, send_dynauth, session_attributes
from .dedup import DedupCache
from .outbox_consumer import OutboxConsumer, Outcome, rate_applier
from .server import Decision, DecisionUnavailable, Nas, NasTable, PortInUse, RadiusError, RadiusServer, load_dictionary

__all__ = ["RadiusSettings", "UrfaDecider", "core_call", "core_link", "dynauth_sessions", "outbox_action",
           "run_process"]

log = logging.getLogger(__name__)

TOPICS = ("outbox", "radius.nas", "radius.disconnect")
NAS_PAGE = 1000  # radius.nas_list's page size at most

CONNECTED = Gauge("billcore_radius_core_connected", "1 while the radius process holds a session with the core",
                  multiprocess_mode="livesum")
CONNECTS = Counter("billcore_radius_core_connects", "Sessions with the core established, by how", ["how"])


@dataclass(frozen=True, slots=True)
class RadiusSettings:
    """The [radius] config keys (defaults here when the section is absent)."""

    host: str = "0.0.0.0"
    auth_port: int = 1812
    acct_port: int = 1813
    max_inflight: int = 1024
    decision_timeout: float = 3.0
    dedup_ttl: float = 30.0
    dedup_max: int = 65536
    stale_timeout: int = 0  # 0: 3 hours
    stale_check: float = 60.0
    coa_timeout: float = 2.0
    coa_retries: int = 2
    processes: int = 1   # above 1: the supervisor binds the ports as a group and hands each its sockets
    radsec_port: int = 0  # 0: off
    radsec_host: str = "0.0.0.0"
    radsec_cert: str = ""
    radsec_key: str = ""
    radsec_ca: str = ""
    radsec_handshake_timeout: float = 10.0
    radsec_idle_timeout: float = 300.0
    radsec_packet_timeout: float = 10.0

    @classmethod
    def from_config(cls, config: Any) -> RadiusSettings:
        section = getattr(config, "radius", None)
        if section is None:
            return cls()
        names = cls.__dataclass_fields__
        return cls(**{k: getattr(section, k) for k in names if hasattr(section, k)})


async def core_call(link: Link, fn: str, args: dict[str, Any], timeout: float | None = None) -> Any:
    """A call on the link; ``DecisionUnavailable`` when a retry could help
    (down, busy, stopping, database away: the NAS retransmits), else ``RadiusError``."""
    try:
        return await link.call(fn, args, timeout=timeout)
    except CallFailed as exc:
        if verdict(exc.code) is not Verdict.NEVER:
            raise DecisionUnavailable(str(exc)) from exc
        raise RadiusError(f"{fn} refused by the core: {exc}") from exc
    except (URFAError, OSError, asyncio.TimeoutError) as exc:
        raise DecisionUnavailable(f"{fn}: {exc!r}") from exc


class UrfaDecider:
    """Access-Requests in batches (``radius.authorize_many``), Accounting-Requests
    in batches too (``radius.accounting_many``).

    ``bounded``: every call carries the decision timeout, so the server sets
    no timer of its own per request."""

    bounded = True

    def __init__(self, link: Link, timeout: float = 3.0, max_batch: int = 256, max_batches: int = 16,
                 max_accounting: int = 4) -> None:
        self.link = link
        # the core answers "busy" past its per-connection cap (urfa.max_inflight, 64 by default):
        # batches, accounting batches and the event handlers' calls stay under it together
        self.max_accounting = max_accounting
        self._acct_queue: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._acct_flushing = False
        self._acct_inflight = 0
        self.timeout = timeout
        self.max_batch = max_batch
        self.max_batches = max_batches
        # (request, done, queued at): ``done`` gets the decision or the error, once
        self._queue: list[tuple[dict[str, Any], Callable[[Decision | BaseException], None], float]] = []
        self._flushing = False
        self._inflight = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def authorize(self, nas: Nas, request: dict[str, Any]) -> asyncio.Future[Decision]:
        loop = self._loop or asyncio.get_running_loop()
        fut: asyncio.Future[Decision] = loop.create_future()

        def done(result: Decision | BaseException) -> None:
            if fut.done():
                return
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)

        self.authorize_then(nas, request, done)
        return fut

    def authorize_then(self, nas: Nas, request: dict[str, Any], done: Callable[[Decision | BaseException], None]) -> None:
        """``authorize`` without a future: ``done`` is called once, later, with the
        decision or the error (the server's hot path: a future and its callback
        cost ~3 µs a request).  Raises ``DecisionUnavailable`` at once when the
        link is down (``done`` is then never called)."""
        if not self.link.up.is_set():
            raise DecisionUnavailable("not connected to the core")
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        self._queue.append((request, done, loop.time()))
        if not self._flushing:
            self._flushing = True
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        loop = self._loop
        assert loop is not None
        if self._queue and self._queue[0][2] < loop.time() - self.timeout:
            # waited a whole timeout for a free batch slot: the NAS has retried by now
            stale = DecisionUnavailable("no answer from the core in time")
            fresh = []
            for entry in self._queue:
                if entry[2] < loop.time() - self.timeout:
                    _call(entry[1], stale)
                else:
                    fresh.append(entry)
            self._queue = fresh
        while self._queue and self._inflight < self.max_batches:
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            self._inflight += 1
            loop.create_task(self._send(batch))

    async def _send(self, batch: list[tuple[dict[str, Any], Callable[[Decision | BaseException], None], float]]) -> None:
        answers: Any = None
        failure: BaseException | None = None
        try:
            answers = await core_call(self.link, "radius.authorize_many", {"requests": [e[0] for e in batch]},
                                      timeout=self.timeout)
            if not isinstance(answers, list) or len(answers) != len(batch):
                raise RadiusError(f"radius.authorize_many answered {answers!r:.40} for {len(batch)}")
        except Exception as exc:
            failure = exc
        except BaseException:
            failure = DecisionUnavailable("cancelled")
            raise
        finally:
            self._inflight -= 1
            if failure is not None:
                for entry in batch:
                    _call(entry[1], failure)
            else:
                from_wire = Decision.from_wire
                for entry, answer in zip(batch, answers):
                    _call(entry[1], from_wire(answer))
            if self._queue and not self._flushing:
                self._flush()

    async def account(self, nas: Nas, record: dict[str, Any]) -> None:
        """Queue the record for this loop turn's ``radius.accounting_many``;
        return once the core has applied it (committed), else raise."""
        if not self.link.up.is_set():
            raise DecisionUnavailable("not connected to the core")
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._acct_queue.append((record, fut))
        if not self._acct_flushing:
            self._acct_flushing = True
            loop.call_soon(self._flush_accounting)
        async with asyncio.timeout(self.timeout):
            await fut

    def _flush_accounting(self) -> None:
        self._acct_flushing = False
        loop = self._loop
        assert loop is not None
        self._acct_queue = [entry for entry in self._acct_queue if not entry[1].done()]   # timed out waiting
        while self._acct_queue and self._acct_inflight < self.max_accounting:
            batch, self._acct_queue = self._acct_queue[: self.max_batch], self._acct_queue[self.max_batch :]
            self._acct_inflight += 1
            loop.create_task(self._send_accounting(batch))

    async def _send_accounting(self, batch: list[tuple[dict[str, Any], asyncio.Future[None]]]) -> None:
        try:
            answers = await core_call(self.link, "radius.accounting_many", {"records": [e[0] for e in batch]},
                                      timeout=self.timeout)
            if not isinstance(answers, list) or len(answers) != len(batch):
                raise RadiusError(f"radius.accounting_many answered {answers!r:.40} for {len(batch)}")
        except BaseException as exc:
            failure = exc if isinstance(exc, Exception) else DecisionUnavailable("cancelled")
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(failure)
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            self._acct_inflight -= 1
            if self._acct_queue and not self._acct_flushing:
                self._acct_flushing = True
                asyncio.get_running_loop().call_soon(self._flush_accounting)
        for (_, fut), answer in zip(batch, answers):
            if fut.done():
                continue
            code = answer.get("error") if isinstance(answer, dict) else "malformed"
            if code is None:
                fut.set_result(None)
            elif isinstance(code, str) and verdict(code) is not Verdict.NEVER:
                fut.set_exception(DecisionUnavailable(f"accounting record: {code}: {answer.get('message')}"))
            else:
                fut.set_exception(RadiusError(f"accounting record refused by the core: {code}: "
                                              f"{answer.get('message') if isinstance(answer, dict) else answer!r}"))


def _call(done: Callable[[Decision | BaseException], None], result: Decision | BaseException) -> None:
    """Hand one request its outcome; a failing callback costs only its own request."""
    try:
        done(result)
    except Exception:
        log.exception("radius decision callback failed")


def core_link(config: Any, on_connected: Callable[[Client, str], Awaitable[None]],
              on_event: Callable[[Event], None], backoff: tuple[float, float] = (0.1, 2.0),
              topics: tuple[str, ...] = TOPICS) -> Link:
    """The link to the core as the ``radius`` system principal (Unix socket, else TCP)."""
    from billcore.common.sysfiles import service_password_file

    sock = config.urfa_socket
    address = Address(host=None, unix=str(sock)) if sock is not None else Address(config.urfa.host, config.urfa.port)

    async def connected(client: Client, how: str) -> None:
        await on_connected(client, how)
        CONNECTS.labels(how).inc()
        CONNECTED.set(1)

    return Link([address], "system", "radius",
                lambda: service_password_file(config.data_dir, "radius").read_text().strip(),
                topics=topics, on_connected=connected, on_event=on_event, on_lost=lambda reason: CONNECTED.set(0),
                timeout=5.0, backoff=backoff, logger=log)


async def _load_nas(client: Client, table: NasTable) -> None:
    rows: list[dict[str, Any]] = []
    while True:  # paged (at most 1 000 a call): a NAS table of any size fits the frame cap
        page = await client.call("radius.nas_list", {"limit": NAS_PAGE, "offset": len(rows)}, timeout=10.0)
        rows.extend(page)
        if len(page) < NAS_PAGE:
            break
    table.replace(Nas.from_wire(r) for r in rows)
    log.info("NAS table loaded", extra={"nas": len(table)})


async def dynauth_sessions(sessions: list[dict[str, Any]], table: NasTable, settings: RadiusSettings,
                           dictionary: Any) -> list[bool]:
    """Disconnect (or CoA to the blocked profile) each session; ACKed flags."""
    async def one(s: dict[str, Any]) -> bool:
        nas = table.get(s["nas_ip"])
        if nas is None:
            log.warning("session %s: NAS %s is not in the table; cannot disconnect", s["session_id"], s["nas_ip"])
            return False
        attrs = session_attributes(s)
        kind = "disconnect"
        if nas.disconnect_mode == "coa" and nas.blocked_profile:
            kind = "coa"
            attrs += list(nas.blocked_profile)
        try:
            result = await send_dynauth(nas.address, nas.coa_port, nas.secret, kind, attrs, dictionary,
                                        timeout=settings.coa_timeout, retries=settings.coa_retries)
        except (CoaTimeout, OSError) as exc:
            log.warning("%s of session %s: %s", kind, s["session_id"], exc)
            return False
        if not result.acked:
            log.warning("%s of session %s refused by %s (Error-Cause %s)", kind, s["session_id"],
                        nas.address, result.error_cause)
        else:
            log.info("session disconnected", extra={"kind": kind, "session": s["session_id"], "nas": nas.address})
        return result.acked

    return list(await asyncio.gather(*(one(s) for s in sessions)))


async def outbox_action(link: Link, delivery: dict[str, Any], table: NasTable, settings: RadiusSettings,
                        dictionary: Any) -> Outcome:
    """Carry out one ``radius`` outbox delivery (``radius.outbox_consumer``)."""
    message = delivery.get("message") or {}
    action = message.get("action")
    account_id = message.get("account_id", delivery.get("account_id"))
    if type(account_id) is not int:
        return Outcome(False, "no account_id in the delivery", permanent=True)
    if action == "disconnect":
        sessions = await core_call(link, "radius.sessions", {"account_id": account_id}, timeout=10.0)
        if not sessions:
            return Outcome(True)
        acked = await dynauth_sessions(sessions, table, settings, dictionary)
        if all(acked):
            return Outcome(True)
        return Outcome(False, f"{acked.count(False)} of {len(acked)} sessions not disconnected"
                              " (NAS timeout, refusal or unknown NAS)")
    if action == "rate":
        apply_rate = rate_applier()
        if apply_rate is None:
            return Outcome(False, "action rate is not supported by this radius process yet")
        if await apply_rate(link, account_id, table, settings, dictionary):
            return Outcome(True)
        return Outcome(False, "the rate was not applied to every session")
    return Outcome(False, f"unknown action {action!r}", permanent=True)


async def run_process(config: Any, stop: asyncio.Event, index: int = 0) -> None:
    settings = RadiusSettings.from_config(config)
    lead = index == 0   # radius[0] alone delivers the outbox, disconnects and sweeps
    dictionary = load_dictionary()
    table = NasTable()
    background: set[asyncio.Task[Any]] = set()

    def spawn(coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        background.add(task)
        task.add_done_callback(background.discard)
        task.add_done_callback(_log_failure)

    async def on_connected(client: Client, how: str) -> None:
        await _load_nas(client, table)
        if lead:
            consumer.wake.set()   # whatever became due while we were away

    async def reload_nas() -> None:
        await _load_nas(await link.ready(), table)

    async def deliver(delivery: dict[str, Any]) -> Outcome:
        return await outbox_action(link, delivery, table, settings, dictionary)

    def on_event(event: Event) -> None:
        if event.topic == "radius.nas":
            spawn(reload_nas())
        elif event.topic == "radius.disconnect":
            spawn(dynauth_sessions(event.payload["sessions"], table, settings, dictionary))
        elif event.topic == "outbox":
            consumer.on_event(event)

    link = core_link(config, on_connected, on_event, topics=TOPICS if lead else ("radius.nas",))
    outbox = getattr(config, "outbox", None)
    consumer = OutboxConsumer(link, deliver, lease=int(getattr(outbox, "lease", 60)),
                              poll=float(getattr(outbox, "poll_interval", 5.0)))
    server = RadiusServer(decider=UrfaDecider(link, timeout=settings.decision_timeout), nas_table=table,
                          dictionary=dictionary, max_inflight=settings.max_inflight,
                          decision_timeout=settings.decision_timeout,
                          dedup=DedupCache(settings.dedup_ttl, settings.dedup_max))
    given = os.environ.get(ENV_FDS)
    if given:   # one of a group the supervisor bound: SO_REUSEPORT, strangers checked there
        auth_fd, acct_fd = (int(fd) for fd in given.split(","))
        ports = await server.listen_sockets(socket.socket(fileno=auth_fd), socket.socket(fileno=acct_fd))
    else:
        try:
            ports = await server.listen(settings.host, settings.auth_port, settings.acct_port)
        except PortInUse as exc:
            log.error("%s", exc)
            raise
    radsec = None
    if settings.radsec_port and lead:   # one TCP listener: radius[0]'s (RadSec takes no reuseport group)
        from .radsec import start_radsec

        try:
            radsec, _ = await start_radsec(server, settings)
        except (RadiusError, OSError) as exc:
            log.error("radsec: %s", exc)
            await server.close()
            raise
    log.info("radius serving", extra={"auth": ports[0], "acct": ports[1], "shared": bool(given)})
    tune_gc()   # after start-up: what exists now lives as long as the process

    async def sweep() -> None:
        while True:
            await asyncio.sleep(settings.stale_check)
            with contextlib.suppress(RadiusError, DecisionUnavailable):
                await core_call(link, "radius.close_stale", {"timeout": settings.stale_timeout or 3 * 3600}, timeout=60.0)

    link.start()
    tasks = [asyncio.create_task(sweep()), asyncio.create_task(consumer.run())] if lead else []
    try:
        await stop.wait()
    finally:
        for t in [*tasks, *background]:
            t.cancel()
        await asyncio.gather(*tasks, *background, return_exceptions=True)
        if radsec is not None:
            await radsec.close()
        await server.close()
        await link.close()


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        log.warning("radius event handling failed: %r", exc)
