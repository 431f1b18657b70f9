"""The URFA service: the login desk, the dispatcher and the event hub on the wire.

Theory of operation
-------------------
``URFAService`` is the application behind ``urfa.server``'s channels
(``ServerApp``).  It composes three parts that share the session table and
do no socket I/O themselves:

* the login desk (``billcore.server.login_desk``): logins, proxied logins,
  resumes and the login rate limiter;
* the dispatcher (``billcore.server.dispatcher``): calls, from the session's
  call table to the reply, with the error boundary;
* the event hub (``billcore.server.event_hub``): subscriptions and bounded
  per-connection event queues.

What is left here is the transport: a ``Peer`` per connection (the channel's
``state``), the routing of each message to its part, and the connection's
end.  Sessions end only through ``SessionTable.end``, whose hook
(``_session_ended``) closes the session's connection with a bye
(``expired`` or ``logged_out``), whatever ended it.  An admin or subscriber
session dies with its connection; a system session outlives it until it
is resumed or expires.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import ssl as ssl_module
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, cast

from billcore.server.builtin_calls import builtin_specs
from billcore.server.calls import CallRegistry
from billcore.server.dispatcher import Dispatcher, Observe
from billcore.server.event_hub import EventHub
from billcore.server.peer import Peer
from billcore.server.login_desk import AuthBackend, LoginDesk
from billcore.server.login_limiter import LoginLimiter
from billcore.server.sessions import Session, SessionTable
from billcore.server.topics import TOPICS, Topic
from urfa import scram
from urfa.errors import INTERNAL, LOGGED_OUT, PROTOCOL, SHUTDOWN, CallFailed
from urfa.messages import Call, Cancel, Challenge, Login, Message, Otp, OtpCode, Ping, Pong, Proof, Resume, Welcome
from urfa.server import ServerChannel, ServerLimits, serve

__all__ = ["URFAConfig", "URFAService"]

log = logging.getLogger("billcore.urfa")


@dataclass(frozen=True, slots=True)
class URFAConfig:
    session_timeout: float = 1800.0
    handshake_timeout: float = 10.0
    otp_timeout: float = 120.0       # more handshake time when a login takes a second factor's code
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


class URFAService:
    """URFA server application: logins, sessions, calls, events."""

    def __init__(
        self, registry: CallRegistry, auth: AuthBackend, config: URFAConfig = URFAConfig(),
        clock: Callable[[], float] = time.monotonic, topics: Mapping[str, Topic] = TOPICS,
    ) -> None:
        self.registry = registry
        self.config = config
        self.clock = clock
        self.sessions = SessionTable(config.session_timeout, config.max_sessions,
                                     max_per_login=config.max_sessions_per_login,
                                     max_per_system=config.max_sessions_per_system,
                                     on_end=self._session_ended)
        self.desk = LoginDesk(
            registry, auth, self.sessions, LoginLimiter(config.login_failures, config.login_window),
            config.secret if config.secret is not None else secrets.token_bytes(32), clock,
            lookup_timeout=config.lookup_timeout, handshake_timeout=config.handshake_timeout,
            mock_iterations=config.mock_iterations, max_proxy_logins=config.max_sessions // 10 + 16,
            otp_timeout=config.otp_timeout,
        )
        self.dispatcher = Dispatcher(registry, self.sessions, clock)
        # ServerApp.on_call, the hot path: the transport calls the dispatcher
        # straight, one Python call fewer per call
        self.on_call: Callable[[ServerChannel, Call], None] = self.dispatcher.on_call
        # a backend without accounts_of: subscribers see no account's events
        self.hub = EventHub(topics, getattr(auth, "accounts_of", None), config.event_queue, config.lookup_timeout)
        self.limits = ServerLimits(
            max_frame=config.max_frame, handshake_timeout=config.handshake_timeout,
            max_inflight=config.max_inflight, server_name=config.server_name,
            max_connections_per_ip=config.max_connections_per_ip, otp_timeout=config.otp_timeout,
        )
        self._peers: set[Peer] = set()
        self._servers: list[asyncio.Server] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        registry.register_all(builtin_specs(self.desk, self.hub))

    @property
    def observe(self) -> Observe | None:
        """``observe(fn, code, seconds)`` after each call run as a task (metrics)."""
        return self.dispatcher.observe

    @observe.setter
    def observe(self, observe: Observe | None) -> None:
        self.dispatcher.observe = observe

    def publish(self, topic: str, payload: Any) -> int:
        """Queue an event for the sessions subscribed to ``topic`` that may see it."""
        return self.hub.publish(topic, payload)

    # -- lifecycle -------------------------------------------------------
    async def start(self, tcp: tuple[str, int] | None = None, unix: str | None = None,
                    ssl: ssl_module.SSLContext | None = None) -> None:
        self._servers = await serve(self, self.limits, tcp=tcp, unix=unix, ssl=ssl)
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop())

    @property
    def sockets(self) -> list[socket.socket]:
        return [sock for server in self._servers for sock in (server.sockets or ())]

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for peer in list(self._peers):
            peer.channel.close(SHUTDOWN, "server stopping")
            self._drop_peer(peer)
        for server in self._servers:
            await server.wait_closed()
        for session in list(self.sessions):
            self.sessions.end(session.sid)
        self._servers = []

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval)
            self.sweep()

    def sweep(self, now: float | None = None) -> list[Session]:
        """Expire idle sessions (their connections get bye ``expired``) and stale proxy logins; have the
        auth backend note the API tokens in use (``last_used_at``)."""
        now = self.clock() if now is None else now
        gone = self.sessions.expire(now)
        self.desk.sweep(now)
        used = self.desk.tokens_used(now)
        note = getattr(self.desk.auth, "note_tokens_used", None)
        if used and note is not None:
            try:
                asyncio.get_running_loop()
            except RuntimeError:   # no loop running (a test driving the sweep by hand)
                return gone
            self._spawn(note(used))
        return gone

    # -- ServerApp -------------------------------------------------------
    def on_open(self, channel: ServerChannel) -> None:
        peer = Peer(channel)
        channel.state = peer
        self._peers.add(peer)

    def on_close(self, channel: ServerChannel) -> None:
        peer = channel.state
        if isinstance(peer, Peer):
            self._drop_peer(peer)

    def on_message(self, channel: ServerChannel, msg: Message) -> None:
        peer = cast(Peer, channel.state)
        if isinstance(msg, Cancel):
            self.dispatcher.cancel(peer, msg.id)
        elif isinstance(msg, Ping):
            channel.send(Pong(msg.id))
        elif isinstance(msg, Login):
            self._spawn(self._on_login(peer, msg))
        elif isinstance(msg, Proof):
            self._on_proof(peer, msg)
        elif isinstance(msg, OtpCode):
            self._spawn(self._on_otp(peer, msg))
        elif isinstance(msg, Resume):
            self._on_resume(peer, msg)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _drop_peer(self, peer: Peer) -> None:
        self._peers.discard(peer)
        if peer.login is not None:   # closed between challenge and proof: no guess was checked
            self.desk.abandon(peer.login)
            peer.login = None
        for task in list(peer.tasks.values()):
            task.cancel()
        self.hub.close(peer)
        session, peer.session = peer.session, None
        if session is None:
            return
        self.hub.detach(peer, session)
        if session.owner is peer:
            session.owner = None
            if session.kind != "system":
                self.sessions.end(session.sid)   # admin/user sessions die with their connection

    # -- login, proof, resume --------------------------------------------
    async def _on_login(self, peer: Peer, msg: Login) -> None:
        # A task nobody awaits: every outcome is answered here, none escapes
        # as "Task exception was never retrieved".
        channel = peer.channel
        try:
            pending = await self.desk.begin_login(msg.kind, msg.login, msg.cnonce, channel.nonce, peer.ip,
                                                  self.clock())
        except CallFailed as exc:
            channel.close(exc.code, exc.message)
            return
        except Exception:   # the boundary: an auth backend's bug is logged, answered `internal`
            log.exception("login of %s:%s failed unexpectedly", msg.kind, msg.login)
            channel.close(INTERNAL, "internal error")
            return
        if channel.closed:   # gone (or timed out) while we looked: no proof will come
            self.desk.abandon(pending)
            return
        peer.login = pending
        channel.send(Challenge(pending.verifier.salt, pending.verifier.iterations))

    def _on_proof(self, peer: Peer, msg: Proof) -> None:
        pending, peer.login = peer.login, None
        if pending is None:   # the state machine only lets a proof follow our challenge
            peer.channel.close(PROTOCOL, "proof without login")
            return
        try:
            session, signature = self.desk.finish_login(pending, msg.proof, self.clock())
        except CallFailed as exc:
            peer.channel.close(exc.code, exc.message)
            return
        if session is None:   # an operator with a second factor: their code comes next
            peer.login = pending
            peer.channel.send(Otp(signature))
            return
        self._welcome(peer, session, signature)

    async def _on_otp(self, peer: Peer, msg: OtpCode) -> None:
        # a task nobody awaits, like _on_login: every outcome is answered here
        pending, peer.login = peer.login, None
        channel = peer.channel
        if pending is None or not pending.proven:   # the state machine only lets a code follow our otp
            channel.close(PROTOCOL, "code without otp")
            return
        try:
            session = await self.desk.finish_second_factor(pending, msg.code, self.clock())
        except CallFailed as exc:
            channel.close(exc.code, exc.message)
            return
        except Exception:
            log.exception("second factor of %s:%s failed unexpectedly", pending.kind, pending.login)
            channel.close(INTERNAL, "internal error")
            return
        if channel.closed:   # gone while the code was checked: nobody holds the session
            self.sessions.end(session.sid)
            return
        self._welcome(peer, session, pending.server_signature())

    def _welcome(self, peer: Peer, session: Session, signature: bytes) -> None:
        self._attach(peer, session)
        peer.channel.send(Welcome(session.sid, signature, session.kind, session.principal.login,
                                  int(self.config.session_timeout)))

    def _on_resume(self, peer: Peer, msg: Resume) -> None:
        try:
            session, signature = self.desk.resume(msg.sid, peer.ip, peer.channel.nonce, msg.cnonce, msg.proof,
                                                  self.clock())
        except CallFailed as exc:
            peer.channel.close(exc.code, exc.message)
            return
        old = session.owner
        if isinstance(old, Peer) and old is not peer:
            old.session = None
            self.hub.detach(old, session)
            old.channel.close(LOGGED_OUT, "session resumed on another connection")
        self._welcome(peer, session, signature)

    def _attach(self, peer: Peer, session: Session) -> None:
        peer.session = session
        session.owner = peer
        self.hub.attach(peer, session)

    def _session_ended(self, session: Session, code: str, why: str) -> None:
        """``SessionTable.on_end``: whatever ended a session, the connection
        holding it gets a bye saying why (after any reply being sent now,
        such as ``session.logout``'s own answer)."""
        peer = session.owner
        session.owner = None
        if isinstance(peer, Peer) and peer.session is session:
            peer.session = None
            self.hub.detach(peer, session)
            try:
                asyncio.get_running_loop().call_soon(peer.channel.close, code, why)
            except RuntimeError:   # no loop running (a test driving the table by hand)
                peer.channel.close(code, why)
