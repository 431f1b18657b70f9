"""The reconnecting URFA link: one session with the core, kept up.

Theory of operation
-------------------
Layered like asyncpg: ``urfa.connection`` (sans-IO) → ``urfa.client``
(one asyncio connection) → this ``Link``, which every edge and tool uses.
The link owns a keeper task that follows ``urfa.reconnect.LinkPlan``: it
connects to one of the configured core addresses, logs in (or *resumes* the
system session after a drop, so the core keeps its state for us),
re-subscribes the link's topics, awaits the ``on_connected`` hook, and then
pumps events to ``on_event`` until the connection drops; then it plans the
next attempt.  Every connect, login and call is bounded by ``timeout``, the
hook by ``hook_timeout``.

Callers see:

- ``call`` / ``stream`` / ``proxy_login`` on the live session.  While the
  link is down a call waits at most ``wait_for_core`` seconds (and asks the
  keeper to try at once) before it fails with ``LinkDown``.  A call that was
  in flight when the connection dropped fails with ``ConnectionLost`` and is
  not retried (it may have run) unless the caller says it is idempotent
  (``retry_for``: retry what ``urfa.reconnect.RETRY`` calls worth a retry).
- ``ready()``: the live client, waiting through one round of attempts; the
  error of the attempt that ended the round when none worked (a tool turns
  ``LoginFailed`` or ``OSError`` into its exit code).
- ``on_connected(client, how)``, awaited after every (re)connect with
  ``how`` = ``"login"`` or ``"resume"``: the place to reload what the edge
  caches.  ``on_missed(reason)``: events may have been missed (after any
  reconnect, when a queue dropped events, when ``on_event`` raised), so a
  cache built from events is stale.  ``on_lost(reason)`` after a drop.
- The log lines ``core connected``, ``core not reachable; retrying`` (or
  ``core refused the login``, an error) and ``core connection lost;
  reconnecting`` (tests and dashboards grep them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl as ssl_module
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from .client import DEFAULT_PORT, Client, LoginInfo, OtpSource, Stream, connect
from .errors import CallFailed, ConnectionLost, LoginFailed, URFAError
from .messages import Event
from .reconnect import CONNECTION_FAILED, Attempt, Backoff, GiveUp, LinkPlan, Verdict, verdict

__all__ = ["Address", "Link", "LinkDown", "LinkStream", "error_code"]

log = logging.getLogger("urfa.link")


@dataclass(frozen=True, slots=True)
class Address:
    """Where a core listens: TCP (optionally TLS) or a Unix socket."""

    host: str | None = "127.0.0.1"
    port: int = DEFAULT_PORT
    unix: str | None = None
    ssl: ssl_module.SSLContext | None = None
    server_hostname: str | None = None

    @classmethod
    def parse(cls, text: str, *, ssl: ssl_module.SSLContext | None = None,
              server_hostname: str | None = None) -> Address:
        """``host:port``, ``[v6]:port``, ``host`` (the default port), or a Unix socket path (``/…`` or ``unix:…``)."""
        if text.startswith("unix:"):
            return cls(host=None, unix=text[5:])
        if text.startswith("/"):
            return cls(host=None, unix=text)
        host, sep, port = text.rpartition(":")
        if not sep or (host.count(":") and not host.endswith("]")):   # a bare host, or a bare IPv6 address
            host, port = text, str(DEFAULT_PORT)
        host = host.strip("[]")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"core address {text!r}: the port must be 1 to 65535")
        return cls(host=host, port=int(port), ssl=ssl,
                   server_hostname=(server_hostname or host) if ssl is not None else None)

    def __str__(self) -> str:
        if self.unix is not None:
            return f"unix:{self.unix}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{'tls://' if self.ssl else ''}{host}:{self.port}"

    async def open(self, timeout: float) -> Client:
        if self.unix is not None:
            return await connect(unix=self.unix, timeout=timeout)
        return await connect(self.host, self.port, ssl=self.ssl, server_hostname=self.server_hostname,
                             timeout=timeout)


class LinkDown(ConnectionLost):
    """No session with the core now (down, or closed); nothing was sent."""


def error_code(exc: BaseException) -> str:
    """The wire code of a failure, ``""`` when the connection failed without one."""
    if isinstance(exc, (CallFailed, LoginFailed, ConnectionLost)):
        return exc.code
    return CONNECTION_FAILED


class LinkStream:
    """A streamed call's chunks, each within ``chunk_timeout``; ``result`` after the end."""

    def __init__(self, client: Client, stream: Stream, chunk_timeout: float) -> None:
        self._client = client
        self._stream = stream
        self._chunk_timeout = chunk_timeout
        self.result: Any = None

    def __aiter__(self) -> LinkStream:
        return self

    async def __anext__(self) -> Any:
        try:
            return await asyncio.wait_for(self._stream.__anext__(), self._chunk_timeout)
        except StopAsyncIteration:
            self.result = self._stream.result
            raise
        except BaseException:
            # a timeout, or the consumer gave up: the server stops sending
            with contextlib.suppress(URFAError):
                self._client.cancel(self._stream)
            raise


ConnectedHook = Callable[[Client, str], Awaitable[None]]
_Result = TypeVar("_Result")


class Link:
    """One session with the core, kept up from ``start`` until ``close``."""

    def __init__(self, addresses: Sequence[Address], kind: str, login: str, password: str | Callable[[], str], *,
                 topics: Sequence[str] = (), on_connected: ConnectedHook | None = None,
                 on_event: Callable[[Event], None] | None = None, on_missed: Callable[[str], None] | None = None,
                 on_lost: Callable[[str], None] | None = None, timeout: float = 10.0, wait_for_core: float = 0.0,
                 hook_timeout: float = 60.0, persistent: bool = True, rounds: int | None = None,
                 backoff: tuple[float, float] = (0.1, 2.0), logger: logging.Logger | None = None,
                 otp: OtpSource | None = None, otp_wait: float = 120.0) -> None:
        if not addresses:
            raise ValueError("a link needs at least one core address")
        self.addresses = tuple(addresses)
        self.kind = kind
        self.login = login
        self._password = password
        self._otp = otp                  # an operator's second factor (billctl: --otp, or a prompt)
        self._otp_wait = otp_wait if otp is not None and not isinstance(otp, str) else 0.0   # a person types it
        self.topics: list[str] = list(topics)
        self._on_connected = on_connected
        self._on_event = on_event
        self._on_missed = on_missed
        self._on_lost = on_lost
        self.timeout = timeout
        self.wait_for_core = wait_for_core
        self.hook_timeout = hook_timeout
        self.plan = LinkPlan(len(self.addresses), can_resume=kind == "system", persistent=persistent,
                             rounds=rounds, first_delay=backoff[0], max_delay=backoff[1])
        self._log = logger or log
        self._loop = asyncio.get_running_loop()
        self.client: Client | None = None
        self.address: Address | None = None     # the core of the session, or of the attempt in progress
        self.up = asyncio.Event()
        self.connects = {"login": 0, "resume": 0}
        self.reconnects = 0
        self._kick = asyncio.Event()
        # a round of attempts ends: (None, n) connected, or (error, n) a pause or the end; n counts attempts begun
        self._round_over: asyncio.Future[tuple[BaseException | None, int]] = self._loop.create_future()
        self._begun = 0
        self._given_up: BaseException | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._closed = False

    # -- life --------------------------------------------------------------
    def start(self) -> Link:
        """Start keeping the session (the first attempt begins now)."""
        if self._keeper is None:
            self._keeper = self._loop.create_task(self._keep())
        return self

    async def __aenter__(self) -> Link:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
        client, self.client = self.client, None
        self.up.clear()
        if client is not None:
            await client.close()
        self._end_round(LinkDown("", "the link is closed"))

    @property
    def info(self) -> LoginInfo | None:
        return self.client.info if self.client is not None else None

    async def ready(self, timeout: float | None = None) -> Client:
        """The live client; else wait (at most ``timeout``, default ``timeout`` × addresses + 1 s)
        through one round of attempts and raise the error that ended it."""
        client = self.client
        if self.up.is_set() and client is not None and not client.closed:
            return client
        if self._given_up is not None:
            raise self._given_up
        if self._closed:
            raise LinkDown("", "the link is closed")
        self.start()
        self._kick.set()
        # an attempt already under way may have begun before the core came back: its failure is not our answer
        fresh = self._begun + 1
        budget = timeout if timeout is not None else self.timeout * len(self.addresses) + 1.0
        deadline = self._loop.time() + budget
        up: asyncio.Future[Any] = asyncio.ensure_future(self.up.wait())
        try:
            while True:
                round_over = self._round_over
                waiters: set[asyncio.Future[Any]] = {up, round_over}
                await asyncio.wait(waiters, timeout=max(0.0, deadline - self._loop.time()),
                                   return_when=asyncio.FIRST_COMPLETED)
                client = self.client
                if self.up.is_set() and client is not None:
                    return client
                if not round_over.done():
                    raise LinkDown("", f"no session with the core within {budget:g} s")
                failure, last = round_over.result()
                if failure is not None and (last >= fresh or self._given_up is not None or self._closed):
                    raise failure
        finally:
            up.cancel()

    async def _live(self) -> Client:
        client = self.client
        if self.up.is_set() and client is not None and not client.closed:
            return client
        if self.wait_for_core <= 0:
            self._kick.set()   # no waiting here, but the next caller should find it up
            raise LinkDown("", "not connected to the core")
        try:
            return await self.ready(self.wait_for_core)
        except LinkDown:
            raise
        except (URFAError, OSError, asyncio.TimeoutError) as exc:
            raise LinkDown(error_code(exc), f"{type(exc).__name__}: {exc}") from exc

    # -- calls -------------------------------------------------------------
    async def call(self, fn: str, args: dict[str, Any] | None = None, *, as_sid: bytes | None = None,
                   as_ip: str | None = None, timeout: float | None = None, retry_for: float = 0.0) -> Any:
        """``fn``'s result, or ``CallFailed``/``ConnectionLost``/``TimeoutError``.

        ``retry_for`` > 0 (idempotent calls only): for that many seconds
        (``math.inf``: until cancelled) retry a failure that ``RETRY`` says a
        retry can fix, after a pause or a new connection."""
        async def attempt() -> Any:
            client = await self._live()
            return await client.call(fn, args, as_sid=as_sid, as_ip=as_ip, timeout=timeout or self.timeout)

        return await self.retrying(fn, attempt, retry_for=retry_for)

    async def retrying(self, what: str, attempt: Callable[[], Awaitable[_Result]], *, retry_for: float = 0.0,
                       stop: asyncio.Event | None = None) -> _Result:
        """``attempt()``'s result, retrying what ``RETRY`` says a retry can fix
        for ``retry_for`` seconds (``math.inf``: until cancelled) and while
        ``stop`` is not set; otherwise the failure is raised.  Only for work
        that is safe to repeat (an idempotent call, a stream read again from
        its start).  A failure that needs a new connection waits for the
        link to come back; one the core will get over (busy, its database
        away) waits a doubling pause."""
        deadline = self._loop.time() + retry_for
        backoff = Backoff(self.plan.backoff.first, self.plan.backoff.cap)
        while True:
            try:
                return await attempt()
            except (URFAError, OSError, asyncio.TimeoutError) as exc:
                kind = verdict(error_code(exc))
                delay = backoff.next_delay()
                if kind is Verdict.NEVER or self._loop.time() + delay > deadline or (stop is not None and stop.is_set()):
                    raise
                if not isinstance(exc, LinkDown):   # down: the keeper says so, once per outage
                    self._log.warning("core call failed; retrying",
                                      extra={"fn": what, "reason": f"{type(exc).__name__}: {exc}"})
            await self._pause(delay, stop)
            if kind is Verdict.RECONNECT:
                await self._pause(self.plan.backoff.cap, stop, until_up=True)

    async def _pause(self, seconds: float, stop: asyncio.Event | None, *, until_up: bool = False) -> None:
        """Wait ``seconds`` (or until the link is up), ending early when ``stop`` is set."""
        waits = [asyncio.ensure_future(self.up.wait() if until_up else asyncio.sleep(seconds))]
        if stop is not None:
            waits.append(asyncio.ensure_future(stop.wait()))
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()

    async def stream(self, fn: str, args: dict[str, Any] | None = None, *, as_sid: bytes | None = None,
                     as_ip: str | None = None, chunk_timeout: float | None = None) -> LinkStream:
        """A streamed call (never retried: its rows may be half read)."""
        client = await self._live()
        return LinkStream(client, client.stream(fn, args, as_sid=as_sid, as_ip=as_ip),
                          chunk_timeout or self.timeout)

    async def proxy_login(self, login: str, password: str, ip: str, *, kind: str = "user",
                          otp: str | None = None) -> LoginInfo:
        """Log a subscriber (or an operator, ``kind="admin"``, with their code ``otp``) in on their
        behalf (the SCRAM step counts twice against ``timeout``)."""
        client = await self._live()
        return await asyncio.wait_for(client.proxy_login(login, password, ip, kind=kind, otp=otp), self.timeout * 2)

    async def subscribe(self, *topics: str) -> None:
        """Add topics; they are subscribed now when up, and after every reconnect."""
        self.topics.extend(t for t in topics if t not in self.topics)
        client = self.client
        if self.up.is_set() and client is not None:
            await client.call("events.subscribe", {"topics": list(topics)}, timeout=self.timeout)

    # -- the keeper ----------------------------------------------------------
    async def _keep(self) -> None:
        step: Attempt | GiveUp = self.plan.start(self._loop.time())
        down_since = self._loop.time()
        reported = False
        while not isinstance(step, GiveUp):
            step = await self._wait_until(step)
            try:
                client, how = await self._attempt(step)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a hook's failure is a failed attempt too
                step = self.plan.failed(self._loop.time(), error_code(exc))
                if isinstance(step, GiveUp):
                    self._given_up = exc
                if isinstance(step, GiveUp) or step.at > self._loop.time():
                    self._end_round(exc)   # a pause (or the end): callers waiting for this round learn why
                if not reported:
                    reported = True
                    extra = {"reason": f"{type(exc).__name__}: {exc}", "address": str(self.address)}
                    if isinstance(exc, LoginFailed) and verdict(exc.code) is Verdict.NEVER:
                        # not an outage: the operator must fix the login or its password file
                        self._log.error("core refused the login", extra={**extra, "login": self.login})
                    else:
                        self._log.warning("core not reachable; retrying", extra=extra)
                continue
            self.plan.connected(self._loop.time())
            self.connects[how] += 1
            self.up.set()
            self._end_round(None)
            self._log.info("core connected", extra={"after_s": round(self._loop.time() - down_since, 3),
                                                    "how": how, "address": str(self.address)})
            reason = await self._pump(client)
            self.up.clear()
            down_since = self._loop.time()
            reported = False
            self._log.warning("core connection lost; reconnecting", extra={"reason": reason})
            if self._on_lost is not None:
                try:
                    self._on_lost(reason)
                except Exception:  # noqa: BLE001 - the hook's fault is logged; the link keeps reconnecting
                    self._log.exception("on_lost hook failed")
            step = self.plan.lost(self._loop.time())

    async def _wait_until(self, step: Attempt) -> Attempt:
        """Sleep until the attempt is due, or a caller kicks (a kick during the last attempt counts)."""
        delay = step.at - self._loop.time()
        if delay > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._kick.wait(), delay)
            step = self.plan.kicked(self._loop.time(), step)
        self._kick.clear()
        self._begun += 1
        return step

    async def _attempt(self, step: Attempt) -> tuple[Client, str]:
        address = self.addresses[step.index]
        self.address = address
        old = self.client
        if step.resume and old is not None and old.info is not None:
            try:
                await asyncio.wait_for(old.resume(), self.timeout)
            except BaseException:
                await old.close()
                raise
            client, how = old, "resume"
        else:
            if old is not None:
                await old.close()
            self.client = None
            password = self._password() if callable(self._password) else self._password
            client = await asyncio.wait_for(address.open(self.timeout), self.timeout)
            try:
                await asyncio.wait_for(client.login(self.kind, self.login, password, otp=self._otp),
                                       self.timeout + self._otp_wait)
            except BaseException:
                await client.close()
                raise
            how = "login"
        self.client = client
        try:
            if self.topics:
                await client.call("events.subscribe", {"topics": self.topics}, timeout=self.timeout)
            if self._on_connected is not None:
                await asyncio.wait_for(self._on_connected(client, how), self.hook_timeout)
        except BaseException:
            await client.close()
            raise
        if self.connects["login"] + self.connects["resume"] > 0:
            self.reconnects += 1
            self._missed("reconnected")
        return client, how

    async def _pump(self, client: Client) -> str:
        dropped = client.events_dropped
        while True:
            try:
                event = await client.next_event()
            except ConnectionLost as exc:
                return str(exc)
            except Exception as exc:  # noqa: BLE001 - a fault in the pump must not end the keeper silently
                # The connection may still be open, but nothing says what was lost in between: drop it,
                # tell the user its cache is stale, and reconnect like after any loss.
                self._log.exception("event pump failed")
                await client.close()
                self._missed("event pump failed")
                return f"event pump failed: {type(exc).__name__}"
            if event.dropped or client.events_dropped != dropped:
                dropped = client.events_dropped
                self._missed("events dropped")
            if self._on_event is None:
                continue
            try:
                self._on_event(event)
            except Exception:  # noqa: BLE001 - one bad event must not end the link; the cache is stale
                self._log.exception("event handler failed", extra={"topic": event.topic})
                self._missed("event handler failed")

    def _missed(self, reason: str) -> None:
        if self._on_missed is not None:
            self._on_missed(reason)

    def _end_round(self, outcome: BaseException | None) -> None:
        if not self._round_over.done():
            self._round_over.set_result((outcome, self._begun))
        self._round_over = self._loop.create_future()
