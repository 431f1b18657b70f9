"""The radius role wired to the core over URFA.

Theory of operation
-------------------
Start: bind the ports first (``PortInUse`` stops the role with a clear
message), then ``CoreLink.run`` connects to the core and keeps connected.
The core starts at the same time as we do and may restart under us, so the
link never gives up: it logs in as the ``radius`` system principal
(password file ``<data_dir>/system/radius.password``, provisioned by the
core), subscribes to ``blocks``, ``radius.nas`` and ``radius.disconnect``,
loads ``radius.nas_list``, and then pumps events until the connection
drops.  After a drop it first *resumes* the system session
(``Client.resume``: same session, same subscriptions, no password), and logs
in afresh when the core refuses (a restarted core knows no old session);
attempts back off from 0.1 s to 2 s.

While the link is down, nothing is answered: a request that reaches the
decider fails fast with ``DecisionUnavailable`` and is counted
(``billcore_radius_dropped{reason="core_unavailable"}``); the NAS
retransmits and the retry is decided afresh.  Before the first NAS table is
loaded every datagram is dropped the same way.

Decisions: ``UrfaDecider`` gathers the Access-Requests of one loop turn
into one ``radius.authorize_many`` call (at most ``max_batch`` each, at most
``max_batches`` calls in flight — the core caps calls per connection; while
all are in flight the next batch grows).  Accounting stays one call per
request — it is rarer and each one is its own transaction in the core — with
at most ``max_accounting`` in flight (a storm of Starts after a NAS reboot
waits its turn, within the decision timeout, instead of meeting "busy").

Events: a ``blocks`` event with action ``set`` → ``radius.sessions`` for the
account → Disconnect-Request, or a CoA to the NAS's blocked profile;
``radius.nas`` → reload the NAS table; ``radius.disconnect`` → send it.
Every ``stale_check`` seconds, ``radius.close_stale``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Gauge

from urfa.client import Client, connect
from urfa.errors import BUSY, SHUTDOWN, CallFailed, ConnectionLost, LoginFailed, URFAError
from urfa.messages import Event

from .coa import CoaTimeout, send_dynauth, session_attributes
from .dedup import DedupCache
from .server import Decision, DecisionUnavailable, Nas, NasTable, PortInUse, RadiusError, RadiusServer, load_dictionary

__all__ = ["RadiusSettings", "CoreLink", "UrfaDecider", "dynauth_sessions", "run_process"]

log = logging.getLogger(__name__)

# The core's code for "the database went away; nothing was changed, retry
# later" (billcore.db.pool.DB_UNAVAILABLE, spelled here: radius does not
# import the core).  Like "busy", it is not the NAS's fault: drop and let the
# NAS retransmit, instead of an error with a traceback per request.
DB_UNAVAILABLE = "core.db_unavailable"
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

    @classmethod
    def from_config(cls, config: Any) -> RadiusSettings:
        section = getattr(config, "radius", None)
        if section is None:
            return cls()
        names = cls.__dataclass_fields__
        return cls(**{k: getattr(section, k) for k in names if hasattr(section, k)})


class CoreLink:
    """One URFA session with the core, kept up for as long as ``run`` runs."""

    def __init__(self, open_session: Callable[[], Awaitable[Client]], on_connected: Callable[[Client], Awaitable[None]],
                 on_event: Callable[[Client, Event], None], backoff: tuple[float, float] = (0.1, 2.0)) -> None:
        self._open_session = open_session
        self._on_connected = on_connected
        self._on_event = on_event
        self._backoff = backoff
        self.client: Client | None = None
        self.up = asyncio.Event()

    async def call(self, fn: str, args: dict[str, Any], timeout: float | None = None) -> Any:
        """A call on the live session; ``DecisionUnavailable`` at once when
        there is none, or when the core is busy, stopping or goes away."""
        client = self.client
        if client is None or client.closed or not self.up.is_set():
            raise DecisionUnavailable("not connected to the core")
        try:
            return await client.call(fn, args, timeout=timeout)
        except CallFailed as exc:
            if exc.code in (BUSY, SHUTDOWN, DB_UNAVAILABLE):
                raise DecisionUnavailable(str(exc)) from exc
            raise RadiusError(f"{fn} refused by the core: {exc}") from exc
        except (URFAError, OSError, asyncio.TimeoutError) as exc:
            raise DecisionUnavailable(f"{fn}: {exc!r}") from exc

    async def _connect(self) -> Client:
        client = self.client
        if client is not None and client.info is not None:
            try:
                await client.resume()
                CONNECTS.labels("resume").inc()
                return client
            except LoginFailed as exc:
                log.info("core refused to resume the session; logging in again", extra={"reason": str(exc)})
                await client.close()
        client = await self._open_session()
        CONNECTS.labels("login").inc()
        return client

    async def run(self) -> None:
        delay = self._backoff[0]
        down_since: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            try:
                client = await self._connect()
                self.client = client
                await self._on_connected(client)
            except (URFAError, OSError, asyncio.TimeoutError, RadiusError) as exc:
                if down_since is None:
                    down_since = loop.time()
                    log.warning("core not reachable; retrying", extra={"reason": f"{type(exc).__name__}: {exc}"})
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._backoff[1])
                continue
            delay = self._backoff[0]
            self.up.set()
            CONNECTED.set(1)
            log.info("core connected", extra={"after_s": round(loop.time() - down_since, 3) if down_since else 0})
            down_since = None
            try:
                while True:
                    self._on_event(client, await client.next_event())
            except ConnectionLost as exc:
                reason = f"{exc}"
            finally:
                self.up.clear()
                CONNECTED.set(0)
            down_since = loop.time()
            log.warning("core connection lost; reconnecting", extra={"reason": reason})


class UrfaDecider:
    """Access-Requests in batches (``radius.authorize_many``), accounting one by one.

    ``bounded``: every call carries the decision timeout, so the server sets
    no timer of its own per request."""

    bounded = True

    def __init__(self, link: CoreLink, timeout: float = 3.0, max_batch: int = 256, max_batches: int = 16,
                 max_accounting: int = 32) -> None:
        self.link = link
        # the core answers "busy" past its per-connection cap (urfa.max_inflight, 64 by default):
        # batches, accounting calls and the event handlers' calls stay under it together
        self._accounting = asyncio.Semaphore(max_accounting)
        self.timeout = timeout
        self.max_batch = max_batch
        self.max_batches = max_batches
        self._queue: list[tuple[dict[str, Any], asyncio.Future[Decision], float]] = []
        self._flushing = False
        self._inflight = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def authorize(self, nas: Nas, request: dict[str, Any]) -> asyncio.Future[Decision]:
        if not self.link.up.is_set():
            raise DecisionUnavailable("not connected to the core")
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop
        fut: asyncio.Future[Decision] = loop.create_future()
        self._queue.append((request, fut, loop.time()))
        if not self._flushing:
            self._flushing = True
            loop.call_soon(self._flush)
        return fut

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
                    if not entry[1].done():
                        entry[1].set_exception(stale)
                else:
                    fresh.append(entry)
            self._queue = fresh
        while self._queue and self._inflight < self.max_batches:
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            self._inflight += 1
            loop.create_task(self._send(batch))

    async def _send(self, batch: list[tuple[dict[str, Any], asyncio.Future[Decision], float]]) -> None:
        try:
            answers = await self.link.call("radius.authorize_many", {"requests": [e[0] for e in batch]},
                                           timeout=self.timeout)
            if not isinstance(answers, list) or len(answers) != len(batch):
                raise RadiusError(f"radius.authorize_many answered {len(answers)} for {len(batch)}")
            for (_, fut, _t), answer in zip(batch, answers):
                if not fut.done():
                    fut.set_result(Decision.from_wire(answer))
        except BaseException as exc:
            for _, fut, _t in batch:
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else DecisionUnavailable("cancelled"))
            if not isinstance(exc, Exception):
                raise
        finally:
            self._inflight -= 1
            if self._queue and not self._flushing:
                self._flush()

    async def account(self, nas: Nas, record: dict[str, Any]) -> None:
        if not self.link.up.is_set():
            raise DecisionUnavailable("not connected to the core")
        async with asyncio.timeout(self.timeout):
            async with self._accounting:
                await self.link.call("radius.accounting", {"record": record})


async def open_session(config: Any) -> Client:
    """A fresh URFA session as the ``radius`` system principal."""
    from billcore.common.sysfiles import service_password_file

    password = service_password_file(config.data_dir, "radius").read_text().strip()
    sock = config.urfa_socket
    client = await (connect(unix=str(sock), timeout=5.0) if sock is not None
                    else connect(config.urfa.host, config.urfa.port, timeout=5.0))
    try:
        await client.login("system", "radius", password)
    except BaseException:
        await client.close()
        raise
    return client


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


async def run_process(config: Any, stop: asyncio.Event) -> None:
    settings = RadiusSettings.from_config(config)
    dictionary = load_dictionary()
    table = NasTable()
    background: set[asyncio.Task[Any]] = set()

    def spawn(coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        background.add(task)
        task.add_done_callback(background.discard)
        task.add_done_callback(_log_failure)

    async def on_connected(client: Client) -> None:
        await client.subscribe("blocks", "radius.nas", "radius.disconnect")
        await _load_nas(client, table)

    async def blocked(client: Client, account_id: int) -> None:
        sessions = await link.call("radius.sessions", {"account_id": account_id}, timeout=10.0)
        if sessions:
            await dynauth_sessions(sessions, table, settings, dictionary)

    def on_event(client: Client, event: Event) -> None:
        if event.topic == "radius.nas":
            spawn(_load_nas(client, table))
        elif event.topic == "radius.disconnect":
            spawn(dynauth_sessions(event.payload["sessions"], table, settings, dictionary))
        elif event.topic == "blocks" and event.payload.get("action") == "set":
            spawn(blocked(client, int(event.payload["account_id"])))

    link = CoreLink(lambda: open_session(config), on_connected, on_event)
    server = RadiusServer(decider=UrfaDecider(link, timeout=settings.decision_timeout), nas_table=table,
                          dictionary=dictionary, max_inflight=settings.max_inflight,
                          decision_timeout=settings.decision_timeout,
                          dedup=DedupCache(settings.dedup_ttl, settings.dedup_max))
    try:
        await server.listen(settings.host, settings.auth_port, settings.acct_port)
    except PortInUse as exc:
        log.error("%s", exc)
        raise
    log.info("radius serving", extra={"auth": settings.auth_port, "acct": settings.acct_port})

    async def sweep() -> None:
        while True:
            await asyncio.sleep(settings.stale_check)
            with contextlib.suppress(RadiusError):
                await link.call("radius.close_stale", {"timeout": settings.stale_timeout or 3 * 3600}, timeout=60.0)

    tasks = [asyncio.create_task(link.run()), asyncio.create_task(sweep())]
    try:
        await stop.wait()
    finally:
        for t in [*tasks, *background]:
            t.cancel()
        await asyncio.gather(*tasks, *background, return_exceptions=True)
        await server.close()
        if link.client is not None:
            await link.client.close()


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        log.warning("radius event handling failed: %r", exc)
