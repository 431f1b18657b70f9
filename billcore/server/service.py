"""The URFA service: the call registry, the session table and logins, on the wire.

Theory of operation
-------------------
``URFAService`` is the application behind ``urfa.server``'s channels.  Per
connection it keeps a ``_Link``: the login in progress, the session once
logged in, the call tasks in flight and the event queue.

Login is SCRAM-SHA-256 (``urfa.scram``).  The auth backend is asked for the
principal; an unknown login, or one of another kind, gets a fake verifier
derived from ``config.secret`` so its challenge looks like a real one and
the failure is the same ``auth_failed``.  Attempts count against the source
address and the login (``LoginLimiter``) from the moment they are admitted,
so logins in flight count too; over the limit a login is refused with
``rate_limited`` before any lookup.  A backend that cannot answer (its
database is down) gets the login a prompt bye ``core.db_unavailable``.

Sessions end only through ``SessionTable.end``, whose hook
(``_session_ended``) closes the session's connection with a bye (``expired``
or ``logged_out``), whatever ended it.

A call is looked up in the session's own call table (snapshot at login),
its arguments checked against the symbol's schema at every depth
(``billcore.server.argcheck``), and its handler run holding the symbol's module
(``registry.in_flight``).  Replies go out as they finish, in any order.
``CallFailed``, a ``BillingError`` or a PostgreSQL refusal of the data
becomes an error reply with its documented code (``billcore.server.wire_errors``,
never PostgreSQL's text); any other exception is a bug: logged with its
traceback and answered ``internal`` with no detail.

Handlers are coroutines and each call runs as a task, holding its module
from the moment it is admitted.  A handler that never waits for anything
(the in-memory builtins, ``sys.ping`` first) can instead be a plain
function wrapped by ``runs_inline``: the service calls it right in the
socket callback, and its reply joins the same write as the other replies to
that read, with no task, coroutine or loop round trip.  (Starting *any*
coroutine eagerly and making a task only if it suspends would need Python
3.12's eager tasks: on 3.11 a handler started outside a task has no
``asyncio.current_task()``, which ``asyncio.timeout`` and asyncpg need.)

A system session with right ``session.proxy`` may open subscriber sessions
(``session.proxy_login``/``session.proxy_proof``, relaying the subscriber's
SCRAM exchange) and call *as* them, declaring the subscriber's address; such
calls are checked against that subscriber session's table and address.

Events: ``publish(topic, payload)`` appends to each subscribed connection's
bounded queue (oldest dropped and counted); a pump per connection writes
them, waiting for the socket to drain, so a slow reader only loses events.
Who may subscribe to a topic, and what a subscriber's session gets of its
events (its own accounts', through a view), is ``billcore.server.topics``' table:
checked at subscribe and again at delivery.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import secrets
import ssl as ssl_module
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from billcore.server import argcheck
from billcore.server.wire_errors import to_call_failed
from billcore.server.calls import CallRegistry, CallSpec, Handler, NotInTable, SymbolDeleted, allows
from billcore.db.pool import DB_UNAVAILABLE
from billcore.server.sessions import (
    ENDED_LOGGED_OUT, Attempt, AuthUnavailable, LoginLimiter, NoSession, Principal, ResumeRefused,
    Session, SessionTable, TooManySessions, address_key,
)
from billcore.server.topics import TOPICS, Topic, may_subscribe
from urfa import errors as E
from urfa import scram
from urfa.errors import CallFailed, LocalProtocolError
from urfa.messages import (
    Call, Cancel, Challenge, Chunk, Event, Login, Message, Ping, Pong, Proof, Resume, Welcome,
)
from urfa.server import DEFAULT_PORT, ServerChannel, ServerLimits, serve

__all__ = [
    "AuthBackend", "CallContext", "Principal", "URFAConfig", "URFAService", "DEFAULT_PORT",
    "check_args", "runs_inline",
]

log = logging.getLogger("billcore.urfa")
KINDS = ("system", "admin", "user")
PROXY_RIGHT = "session.proxy"
MAX_TOPICS = 64


_INLINE = "__urfa_runs_inline__"


def runs_inline(fn: Callable[..., Any]) -> Handler:
    """Make a call handler of a plain function that answers without waiting.

    The service calls ``fn(ctx, **args)`` straight from the socket callback
    (see the module notes); anyone else gets an ordinary async handler.
    ``fn`` runs to its end before anything else can, so it holds no module
    reference: it must not unload its own module.
    """
    if inspect.iscoroutinefunction(fn):
        raise TypeError(f"runs_inline takes a plain function, not the coroutine function {fn!r}")

    @functools.wraps(fn)
    async def handler(ctx: Any, **args: Any) -> Any:
        return fn(ctx, **args)

    setattr(handler, _INLINE, fn)
    return handler


class AuthBackend(Protocol):
    # None: no such (enabled) principal; raises AuthUnavailable when it cannot tell now
    async def find_principal(self, kind: str, login: str) -> Principal | None: ...
    # a subscriber's account ids (a backend without it: subscribers see no account's events)
    async def accounts_of(self, user_id: int) -> frozenset[int]: ...


@dataclass(frozen=True, slots=True)
class URFAConfig:
    session_timeout: float = 1800.0
    handshake_timeout: float = 10.0
    max_frame: int = 1 << 20
    max_inflight: int = 64
    max_sessions: int = 100_000
    event_queue: int = 1024
    login_failures: int = 5          # per address and per login ...
    login_window: float = 300.0      # ... in this many seconds
    secret: bytes | None = None      # keeps fake salts stable; set it from a file in production
    mock_iterations: int = scram.DEFAULT_ITERATIONS
    sweep_interval: float = 5.0
    lookup_timeout: float = 5.0
    server_name: str = "billcore"
    max_connections_per_ip: int = 64  # open connections per address (IPv6: per /64); 0: no cap
    max_sessions_per_login: int = 16     # live sessions per admin or subscriber; a new login ends the oldest
    max_sessions_per_system: int = 256   # the same for a system principal (every edge process logs in)


class CallContext:
    """What a handler gets as its first argument."""

    __slots__ = ("service", "session", "principal", "ip", "call_id", "proxy", "_link", "_streaming")

    def __init__(self, service: URFAService, session: Session, call_id: int,
                 link: _Link | None, proxy: Principal | None, streaming: bool) -> None:
        self.service = service
        self.session = session
        self.principal: Principal = session.principal
        self.ip: str = session.ip
        self.call_id = call_id
        self.proxy = proxy            # the system principal acting for a proxied session
        self._link = link
        self._streaming = streaming

    @property
    def sid(self) -> bytes:
        return self.session.sid

    async def stream(self, chunk: Any) -> None:
        """Send one chunk of a streaming call's result; waits for the socket."""
        if not self._streaming:
            raise LocalProtocolError("stream() in a call not declared streaming")
        link = self._link
        if link is None or not link.channel.send(Chunk(self.call_id, chunk)):
            raise asyncio.CancelledError()
        await link.channel.drain()

    def publish(self, topic: str, payload: Any) -> int:
        return self.service.publish(topic, payload)


class _Link:
    """Per-connection state of the service."""

    __slots__ = ("channel", "ip", "login", "session", "tasks", "events", "dropped", "wake", "pump")

    def __init__(self, channel: ServerChannel) -> None:
        self.channel = channel
        self.ip = channel.peer_ip
        self.login: _PendingLogin | None = None
        self.session: Session | None = None
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.events: deque[tuple[str, Any]] = deque()
        self.dropped = 0
        self.wake: asyncio.Event | None = None
        self.pump: asyncio.Task[None] | None = None


@dataclass(slots=True)
class _PendingLogin:
    kind: str
    login: str
    cnonce: bytes
    snonce: bytes
    ip: str
    principal: Principal | None
    verifier: scram.Verifier
    expires: float = 0.0
    attempt: Attempt | None = None   # what the limiter counts until the proof is checked

    def auth_message(self) -> bytes:
        v = self.verifier
        return scram.auth_message(self.kind, self.login, self.cnonce, self.snonce, v.salt, v.iterations)


def check_args(spec: CallSpec, args: dict[str, Any]) -> str | None:
    """Why ``args`` do not fit ``spec.args``, or ``None`` if they do (``billcore.server.argcheck``)."""
    return argcheck.check_args(spec.args, args)


class URFAService:
    """URFA server application: logins, sessions, calls, events."""

    def __init__(
        self, registry: CallRegistry, auth: AuthBackend, config: URFAConfig = URFAConfig(),
        clock: Callable[[], float] = time.monotonic, topics: Mapping[str, Topic] = TOPICS,
    ) -> None:
        self.registry = registry
        self.topics = topics
        self.auth = auth
        self.config = config
        self.clock = clock
        self.secret = config.secret if config.secret is not None else secrets.token_bytes(32)
        self.sessions = SessionTable(config.session_timeout, config.max_sessions,
                                     max_per_login=config.max_sessions_per_login,
                                     max_per_system=config.max_sessions_per_system,
                                     on_end=self._session_ended)
        self.limiter = LoginLimiter(config.login_failures, config.login_window)
        self.limits = ServerLimits(
            max_frame=config.max_frame, handshake_timeout=config.handshake_timeout,
            max_inflight=config.max_inflight, server_name=config.server_name,
            max_connections_per_ip=config.max_connections_per_ip,
        )
        self._links: set[_Link] = set()
        self._subscribers: dict[str, set[_Link]] = {}
        self._unknown_topics: set[str] = set()   # published without a rule: said once each
        self._proxy_logins: OrderedDict[bytes, _PendingLogin] = OrderedDict()
        self._servers: list[asyncio.Server] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        # observe(fn, code, seconds) after each call run as a task (metrics)
        self.observe: Callable[[str, str, float], None] | None = None
        from billcore.server.builtin_calls import builtin_specs   # they use this module's API
        registry.register_all(builtin_specs())

    # -- lifecycle -------------------------------------------------------
    async def start(self, tcp: tuple[str, int] | None = None, unix: str | None = None,
                    ssl: ssl_module.SSLContext | None = None) -> None:
        self._servers = await serve(self, self.limits, tcp=tcp, unix=unix, ssl=ssl)
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop())

    @property
    def sockets(self) -> list[Any]:
        return [s for srv in self._servers for s in (srv.sockets or ())]

    async def stop(self) -> None:
        for srv in self._servers:
            srv.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for link in list(self._links):
            link.channel.close(E.SHUTDOWN, "server stopping")
            self._drop_link(link)
        for srv in self._servers:
            await srv.wait_closed()
        for session in list(self.sessions):
            self.sessions.end(session.sid)
        self._servers = []

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval)
            self.sweep()

    def sweep(self, now: float | None = None) -> list[Session]:
        """Expire idle sessions (their connections get bye ``expired``) and stale proxy logins."""
        now = self.clock() if now is None else now
        gone = self.sessions.expire(now)
        while self._proxy_logins:
            handle, pending = next(iter(self._proxy_logins.items()))
            if pending.expires > now:
                break
            del self._proxy_logins[handle]
            self._abandon(pending)
        return gone

    # -- ServerApp -------------------------------------------------------
    def on_open(self, channel: ServerChannel) -> None:
        link = _Link(channel)
        channel.state = link
        self._links.add(link)

    def on_close(self, channel: ServerChannel) -> None:
        link = channel.state
        if isinstance(link, _Link):
            self._drop_link(link)

    def _drop_link(self, link: _Link) -> None:
        self._links.discard(link)
        if link.login is not None:   # closed between challenge and proof: no guess was checked
            self._abandon(link.login)
            link.login = None
        for task in list(link.tasks.values()):
            task.cancel()
        if link.pump is not None:
            link.pump.cancel()
        session, link.session = link.session, None
        if session is None:
            return
        self._unsubscribe_all(link, session)
        if session.owner is link:
            session.owner = None
            if session.kind != "system":
                self.sessions.end(session.sid)   # admin/user sessions die with their connection

    def on_message(self, channel: ServerChannel, msg: Message) -> None:
        link: _Link = channel.state  # type: ignore[assignment]
        t = type(msg)
        if t is Cancel:
            task = link.tasks.get(msg.id)  # type: ignore[union-attr]
            if task is not None:
                task.cancel()
        elif t is Ping:
            channel.send(Pong(msg.id))  # type: ignore[union-attr]
        elif t is Login:
            self._spawn(self._on_login(link, msg))  # type: ignore[arg-type]
        elif t is Proof:
            self._on_proof(link, msg)  # type: ignore[arg-type]
        elif t is Resume:
            self._on_resume(link, msg)  # type: ignore[arg-type]

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- login -----------------------------------------------------------
    @staticmethod
    def _address_keys(ip: str) -> tuple[tuple[str, str], ...]:
        # The Unix socket is every local edge's one "address", gated by its
        # file permissions (urfa.server does not count its connections either):
        # attempts over it count per login only.
        return () if ip == "unix" else (("ip", address_key(ip)),)

    def _limit_keys(self, ip: str, kind: str, login: str) -> tuple[tuple[str, str], ...]:
        return (*self._address_keys(ip), ("login", f"{kind}:{login}"))

    async def begin_login(self, kind: str, login: str, cnonce: bytes, snonce: bytes, ip: str) -> _PendingLogin:
        """Admit the attempt (it counts from now) and look the principal up;
        unknown ones get a deterministic fake verifier."""
        now = self.clock()
        attempt = self.limiter.begin(self._limit_keys(ip, kind, login), now)
        if attempt is None:
            raise CallFailed(E.RATE_LIMITED, "too many login attempts; wait and retry")
        principal = None
        # a NUL cannot be in any login (PostgreSQL text): unknown, without asking
        if kind in KINDS and "\0" not in login:
            try:
                principal = await asyncio.wait_for(self.auth.find_principal(kind, login), self.config.lookup_timeout)
            except (AuthUnavailable, asyncio.TimeoutError) as exc:
                self.limiter.abandon(attempt)   # no proof will be checked
                log.warning("login of %s:%s refused: the auth backend cannot answer (%s)",
                            kind, login, "timed out" if isinstance(exc, asyncio.TimeoutError) else exc)
                raise CallFailed(DB_UNAVAILABLE, "the database is unavailable; retry later") from None
            except BaseException:
                self.limiter.abandon(attempt)
                raise
        if principal is not None and (principal.kind != kind or principal.login != login):
            principal = None
        verifier = principal.verifier if principal is not None else scram.fake_verifier(
            self.secret, scram.scram_username(kind, login), self.config.mock_iterations)
        return _PendingLogin(kind, login, cnonce, snonce, ip, principal, verifier,
                             now + self.config.handshake_timeout, attempt)

    def _abandon(self, pending: _PendingLogin) -> None:
        if pending.attempt is not None:
            self.limiter.abandon(pending.attempt)

    def finish_login(self, pending: _PendingLogin, proof: bytes, *, proxied: bool = False) -> tuple[Session, bytes]:
        """Check the proof; the new session and the ServerSignature, or ``CallFailed``."""
        now = self.clock()
        am = pending.auth_message()
        client_key = scram.recover_client_key(pending.verifier, am, proof)
        attempt = pending.attempt
        assert attempt is not None, "a pending login comes from begin_login"
        if client_key is None or pending.principal is None:
            self.limiter.failed(attempt)
            raise CallFailed(E.AUTH_FAILED, "login failed")
        # a success clears the login's count of failures (not the address's)
        self.limiter.succeeded(attempt, clear=[k for k in attempt.keys if k[0] == "login"])
        principal = pending.principal
        table = self.registry.snapshot(principal.kind, principal.rights)
        rkey = scram.resume_key(client_key, am) if principal.kind == "system" and not proxied else None
        for _old in self.sessions.make_room(principal):   # at its cap: the oldest ends (bye logged_out)
            log.info("session of %s:%s ended: over %d sessions", principal.kind, principal.login,
                     self.sessions.cap(principal))
        try:
            session = self.sessions.create(principal, pending.ip, table, now, resume_key=rkey, proxied=proxied)
        except TooManySessions:
            raise CallFailed(E.BUSY, "session table full") from None
        return session, scram.server_signature(pending.verifier.server_key, am)

    async def _on_login(self, link: _Link, msg: Login) -> None:
        # A task nobody awaits: every outcome is answered here, none escapes
        # as "Task exception was never retrieved".
        try:
            pending = await self.begin_login(msg.kind, msg.login, msg.cnonce, link.channel.nonce, link.ip)
        except CallFailed as exc:
            link.channel.close(exc.code, exc.message)
            return
        except Exception:   # the boundary: an auth backend's bug is logged, answered `internal`
            log.exception("login of %s:%s failed unexpectedly", msg.kind, msg.login)
            link.channel.close(E.INTERNAL, "internal error")
            return
        if link.channel.closed:   # gone (or timed out) while we looked: no proof will come
            self._abandon(pending)
            return
        link.login = pending
        link.channel.send(Challenge(pending.verifier.salt, pending.verifier.iterations))

    def _on_proof(self, link: _Link, msg: Proof) -> None:
        pending, link.login = link.login, None
        if pending is None:   # the state machine only lets a proof follow our challenge
            link.channel.close(E.PROTOCOL, "proof without login")
            return
        try:
            session, signature = self.finish_login(pending, msg.proof)
        except CallFailed as exc:
            link.channel.close(exc.code, exc.message)
            return
        self._attach(link, session)
        link.channel.send(Welcome(session.sid, signature, session.kind, session.principal.login,
                                  int(self.config.session_timeout)))

    def _on_resume(self, link: _Link, msg: Resume) -> None:
        now = self.clock()
        attempt = self.limiter.begin(self._address_keys(link.ip), now)
        if attempt is None:
            link.channel.close(E.RATE_LIMITED, "too many failed attempts; wait and retry")
            return
        try:
            session = self.sessions.resume(msg.sid, link.ip, link.channel.nonce, msg.cnonce, msg.proof, now)
        except ResumeRefused as exc:
            self.limiter.failed(attempt)
            log.info("resume refused from %s: %s", link.ip, exc)
            link.channel.close(E.RESUME_FAILED, "resume refused; log in again")
            return
        self.limiter.succeeded(attempt)
        old = session.owner
        if isinstance(old, _Link) and old is not link:
            old.session = None
            self._unsubscribe_all(old, session)
            old.channel.close(E.LOGGED_OUT, "session resumed on another connection")
        self._attach(link, session)
        assert session.resume_key is not None
        sig = scram.resume_signature(session.resume_key, link.channel.nonce, msg.cnonce, msg.sid)
        link.channel.send(Welcome(session.sid, sig, session.kind, session.principal.login,
                                  int(self.config.session_timeout)))

    def _attach(self, link: _Link, session: Session) -> None:
        link.session = session
        session.owner = link
        for topic in session.topics:   # a resumed system session keeps its subscriptions
            self._subscribers.setdefault(topic, set()).add(link)
        if session.topics:
            self._ensure_pump(link)

    def _ensure_pump(self, link: _Link) -> None:
        if link.pump is None:
            link.wake = asyncio.Event()
            link.pump = asyncio.get_running_loop().create_task(self._pump(link))

    # -- proxy logins (called by the builtin handlers) -------------------
    def add_proxy_login(self, pending: _PendingLogin) -> bytes:
        handle = secrets.token_bytes(16)
        self._proxy_logins[handle] = pending
        while len(self._proxy_logins) > self.config.max_sessions // 10 + 16:
            self._abandon(self._proxy_logins.popitem(last=False)[1])
        return handle

    def take_proxy_login(self, handle: bytes) -> _PendingLogin | None:
        pending = self._proxy_logins.pop(handle, None)
        if pending is not None and pending.expires <= self.clock():
            self._abandon(pending)
            return None
        return pending

    # -- calls -----------------------------------------------------------
    def on_call(self, channel: ServerChannel, call: Call) -> None:
        link: _Link = channel.state  # type: ignore[assignment]
        session = link.session
        call_id = call.id
        if session is None:   # logged out or expired, connection closing
            channel.send_error(call_id, E.NO_SESSION, "session ended")
            return
        now = self.clock()
        proxy: Principal | None = None
        if call.as_sid is not None:
            if session.kind != "system" or not allows(session.principal.rights, PROXY_RIGHT):
                channel.send_error(call_id, E.FORBIDDEN, "this session may not act for others")
                return
            self.sessions.touch(session, now)
            try:
                target = self.sessions.lookup(call.as_sid, call.as_ip or "", now)
            except NoSession as exc:
                channel.send_error(call_id, E.NO_SESSION, str(exc))
                return
            if not target.proxied:
                channel.send_error(call_id, E.NO_SESSION, "not a proxied session")
                return
            proxy = session.principal
            session = target
        else:
            self.sessions.touch(session, now)
        try:
            symbol = session.table.lookup(call.fn)
        except NotInTable:
            channel.send_error(call_id, E.NOT_IN_TABLE, f"{call.fn} is not in this session; log in again")
            return
        except SymbolDeleted:
            channel.send_error(call_id, E.DELETED, f"{call.fn} was unloaded")
            return
        spec = symbol.spec
        args = call.args
        if args or spec.args:
            problem = check_args(spec, args)
            if problem is not None:
                channel.send_error(call_id, E.BAD_ARGS, problem)
                return
        ctx = CallContext(self, session, call_id, link, proxy, spec.streaming)
        inline = getattr(spec.handler, _INLINE, None)
        if inline is not None:
            try:
                value = inline(ctx, **args)
            except (Exception, asyncio.CancelledError) as exc:
                self._send_failure(channel, call_id, spec, exc)
                return
            try:
                channel.send_result(call_id, value)
            except LocalProtocolError as exc:
                self._unencodable(channel, call_id, spec, exc)
            return
        # The call holds its module from now (not from its task's first step)
        # until it ends, so an unload in between waits for it.  The bookkeeping
        # is a done callback: it also runs for a task cancelled before it
        # started (a cancel in the same read as its call), whose coroutine
        # never runs at all.
        guard = self.registry.in_flight(symbol)
        guard.__enter__()
        task = asyncio.get_running_loop().create_task(self._finish(channel, ctx, spec, args))
        link.tasks[call_id] = task
        task.add_done_callback(functools.partial(self._call_done, link, guard, call_id))

    async def _finish(self, channel: ServerChannel, ctx: CallContext, spec: CallSpec, args: dict[str, Any]) -> None:
        started = time.monotonic()
        code = "ok"
        try:
            value = await spec.handler(ctx, **args)
        except (Exception, asyncio.CancelledError) as exc:
            code = self._send_failure(channel, ctx.call_id, spec, exc)
            return
        finally:
            # only names found in a call table reach here: labels stay bounded
            if self.observe is not None:
                self.observe(spec.name, code, time.monotonic() - started)
        try:
            channel.send_result(ctx.call_id, value)
        except LocalProtocolError as exc:
            self._unencodable(channel, ctx.call_id, spec, exc)

    @staticmethod
    def _call_done(link: _Link, guard: Any, call_id: int, task: asyncio.Task[None]) -> None:
        guard.__exit__(None, None, None)
        if link.tasks.get(call_id) is task:
            del link.tasks[call_id]
        if task.cancelled():   # cancelled before its first step: nothing answered yet
            link.channel.send_error(call_id, E.CANCELLED, "cancelled")

    @staticmethod
    def _unencodable(channel: ServerChannel, call_id: int, spec: CallSpec, exc: LocalProtocolError) -> None:
        log.error("result of %s cannot be sent: %s", spec.name, exc)
        channel.send_error(call_id, E.INTERNAL, "result could not be encoded")

    @staticmethod
    def _send_failure(channel: ServerChannel, call_id: int, spec: CallSpec, exc: BaseException) -> str:
        """Answer a failed call; return the code sent.  Domain and database
        refusals get their documented code (``billcore.server.wire_errors``)."""
        if isinstance(exc, asyncio.CancelledError):
            channel.send_error(call_id, E.CANCELLED, "cancelled")
            return E.CANCELLED
        failed = to_call_failed(exc)
        if failed is None:   # the boundary: anything unexpected becomes `internal`, logged here
            log.error("call %s failed", spec.name, exc_info=exc)
            channel.send_error(call_id, E.INTERNAL, "internal error")
            return E.INTERNAL
        channel.send_error(call_id, failed.code, failed.message)
        return failed.code

    # -- sessions ending -------------------------------------------------
    def logout(self, session: Session) -> None:
        """End a session; its own connection (if any) closes after the reply."""
        self.sessions.end(session.sid, ENDED_LOGGED_OUT, "logged out")

    def end_sessions_of(self, kind: str, principal_id: int, why: str) -> int:
        """End every session of a principal that was deleted or disabled;
        their connections get bye ``logged_out``.  How many ended."""
        return len(self.sessions.end_principal(kind, principal_id, why))

    def _session_ended(self, session: Session, code: str, why: str) -> None:
        """``SessionTable.on_end``: whatever ended a session, the connection
        holding it gets a bye saying why (after any reply being sent now,
        such as ``session.logout``'s own answer)."""
        link = session.owner
        session.owner = None
        if isinstance(link, _Link) and link.session is session:
            link.session = None
            self._unsubscribe_all(link, session)
            try:
                asyncio.get_running_loop().call_soon(link.channel.close, code, why)
            except RuntimeError:   # no loop running (a test driving the table by hand)
                link.channel.close(code, why)

    # -- events ----------------------------------------------------------
    @staticmethod
    def _check_topics(topics: list[str]) -> None:
        for topic in topics:
            if type(topic) is not str or not topic or len(topic) > 256:
                raise CallFailed(E.BAD_ARGS, "topics are non-empty strings")

    async def subscribe(self, session: Session, topics: list[str]) -> list[str]:
        link = session.owner
        if not isinstance(link, _Link) or session.proxied:
            raise CallFailed(E.FORBIDDEN, "only a session with its own connection may subscribe")
        self._check_topics(topics)
        for topic in topics:
            rule = self.topics.get(topic)
            if rule is None:
                raise CallFailed(E.BAD_ARGS, f"unknown topic {topic!r}")
            if not may_subscribe(rule, session.kind, session.principal.rights, session.proxied):
                raise CallFailed(E.FORBIDDEN, f"this session may not read topic {topic!r}")
        if len(session.topics | set(topics)) > MAX_TOPICS:
            raise CallFailed(E.BAD_ARGS, f"at most {MAX_TOPICS} topics per session")
        if session.kind == "user" and topics:
            session.accounts = await self._accounts_of(session.principal.id)
            if link.session is not session:   # ended while we read
                raise CallFailed(E.NO_SESSION, "session ended")
        session.topics.update(topics)
        for topic in topics:
            self._subscribers.setdefault(topic, set()).add(link)
        self._ensure_pump(link)
        return sorted(session.topics)

    async def _accounts_of(self, user_id: int) -> frozenset[int]:
        find = getattr(self.auth, "accounts_of", None)
        if find is None:
            return frozenset()
        try:
            accounts: frozenset[int] = await asyncio.wait_for(find(user_id), self.config.lookup_timeout)
        except (AuthUnavailable, asyncio.TimeoutError):
            raise CallFailed(DB_UNAVAILABLE, "the database is unavailable; retry later") from None
        return accounts

    def unsubscribe(self, session: Session, topics: list[str]) -> list[str]:
        self._check_topics(topics)   # a list is not hashable: it would fail in discard()
        link = session.owner
        for topic in topics:
            session.topics.discard(topic)
            subs = self._subscribers.get(topic)
            if subs is not None and isinstance(link, _Link):
                subs.discard(link)
                if not subs:
                    del self._subscribers[topic]
        return sorted(session.topics)

    def _unsubscribe_all(self, link: _Link, session: Session) -> None:
        for topic in session.topics:
            subs = self._subscribers.get(topic)
            if subs is not None:
                subs.discard(link)
                if not subs:
                    del self._subscribers[topic]

    def publish(self, topic: str, payload: Any) -> int:
        """Queue an event for every connection whose session subscribed and
        may see it (``billcore.server.topics``); returns how many."""
        rule = self.topics.get(topic)
        if rule is None:   # nobody can have subscribed; a developer must write its rule
            if topic not in self._unknown_topics and len(self._unknown_topics) < 1000:
                self._unknown_topics.add(topic)
                log.error("event topic %r has no rule in billcore.server.topics: delivered to nobody", topic)
            return 0
        subs = self._subscribers.get(topic)
        if not subs:
            return 0
        cap = self.config.event_queue
        sent = 0
        for link in subs:
            session = link.session
            if session is None:
                continue
            event = payload
            if session.kind == "user":   # only its own accounts', through the subscriber's view
                view = rule.for_subscriber
                if view is None or not isinstance(payload, Mapping) or payload.get("account_id") not in session.accounts:
                    continue
                event = view(payload)
            if len(link.events) >= cap:
                link.events.popleft()
                link.dropped += 1
            link.events.append((topic, event))
            if link.wake is not None:
                link.wake.set()
            sent += 1
        return sent

    async def _pump(self, link: _Link) -> None:
        assert link.wake is not None
        channel = link.channel
        while not channel.closed:
            await link.wake.wait()
            link.wake.clear()
            while link.events and not channel.closed:
                topic, payload = link.events.popleft()
                dropped, link.dropped = link.dropped, 0
                try:
                    channel.send(Event(topic, payload, dropped))
                except LocalProtocolError as exc:
                    log.error("event on %s cannot be sent: %s", topic, exc)
                await channel.drain()
