"""asyncio URFA client: connect, log in, call, stream, cancel, events, resume.

Theory of operation
-------------------
``connect`` opens TCP, TLS or a Unix socket and waits for the server's
hello.  ``Client.login`` runs SCRAM-SHA-256 (the PBKDF2 step in a thread so
the loop keeps running) and checks the server's signature before trusting
the session: a server that does not know our verifier cannot pass.  An
operator with a second factor gets ``otp`` after the proof: its signature
is checked the same way *before* the code (``login(otp=…)``: the code, or
a function asked for it only then, e.g. a prompt) goes out.

Calls get increasing ids; any number may be in flight (up to the server's
cap, beyond which the server answers ``busy``) and replies are matched by
id, in whatever order they come.  A streaming call's chunks are queued for
its ``Stream`` iterator; reading from the socket pauses while a consumer
lags, so memory stays bounded.  Events go to a bounded queue that drops the
oldest and counts the drops, like the server's.

A ``system`` login keeps the session's resume key; after the connection
drops, ``resume()`` opens a new one and proves knowledge of that key over
the new server nonce.  Calls that were in flight when the connection
dropped fail with ``ConnectionLost`` and are *not* retried (they may have
run).
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import secrets
import ssl as ssl_module
from collections import deque
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from . import scram
from .connection import Closed, Connection, Role
from .errors import (
    AUTH_FAILED, CallFailed, ConnectionLost, LocalProtocolError, LoginFailed, RemoteProtocolError,
)
from .framing import DEFAULT_MAX_FRAME
from .messages import (
    Bye, Call, Cancel, Challenge, Chunk, Error, Event, Hello, Login, Message, Otp, OtpCode, Ping,
    Pong, Proof, Result, Resume, Welcome,
)

__all__ = ["DEFAULT_PORT", "OTP_REQUIRED", "Client", "OtpSource", "Stream", "PendingCall", "connect", "LoginInfo",
           "otp_code"]

DEFAULT_PORT = 11758
OTP_REQUIRED = "otp_required"   # LoginFailed code: the login takes a one-time code and none was given
_STREAM_HIGH = 256

# A login's one-time code: the code, or a function (plain or async) that gives it when the server asks
OtpSource = str | Callable[[], str] | Callable[[], Awaitable[str]]


async def otp_code(otp: OtpSource | None) -> str:
    """The code ``otp`` gives (a plain function runs in a thread: it may be a terminal prompt)."""
    if otp is None:
        raise LoginFailed(OTP_REQUIRED, "this login takes a one-time code (TOTP) and none was given")
    if isinstance(otp, str):
        return otp
    if inspect.iscoroutinefunction(otp):
        return str(await otp())
    code: object = await asyncio.to_thread(otp)
    if inspect.isawaitable(code):
        code = await code
    return str(code)
_STREAM_LOW = 64


@dataclass(frozen=True, slots=True)
class LoginInfo:
    sid: bytes
    kind: str
    login: str
    timeout: int


@dataclass(frozen=True, slots=True)
class _Endpoint:
    host: str | None
    port: int
    unix: str | None
    ssl: ssl_module.SSLContext | None
    server_hostname: str | None
    timeout: float
    max_frame: int
    local_addr: tuple[str, int] | None = None


class PendingCall:
    """A call in flight: await it for the result."""

    __slots__ = ("id", "fn", "future", "chunks", "_client")

    def __init__(self, client: Client, call_id: int, fn: str, streaming: bool) -> None:
        self._client = client
        self.id = call_id
        self.fn = fn
        self.future: asyncio.Future[Any] = client._loop.create_future()
        self.chunks: deque[Any] | None = deque() if streaming else None

    def __await__(self) -> Any:
        return self.future.__await__()


class Stream:
    """Async iterator over a streaming call's chunks; ``result`` after the end."""

    def __init__(self, client: Client, pending: PendingCall) -> None:
        self._client = client
        self._pending = pending
        self._wake = asyncio.Event()
        self.result: Any = None

    @property
    def id(self) -> int:
        return self._pending.id

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Any:
        p = self._pending
        assert p.chunks is not None
        while True:
            if p.chunks:
                chunk = p.chunks.popleft()
                if len(p.chunks) < _STREAM_LOW:
                    self._client._resume_reading()
                return chunk
            if p.future.done():
                self.result = p.future.result()   # raises the call's error, if any
                raise StopAsyncIteration
            self._wake.clear()
            waiter = asyncio.ensure_future(self._wake.wait())
            await asyncio.wait({waiter, p.future}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()


class _Protocol(asyncio.Protocol):
    """Forwards to the client while it is the client's current connection;
    a connection replaced by ``resume`` must not touch the new one's state."""

    def __init__(self, client: Client) -> None:
        self.client = client
        client._protocol = self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.client._protocol is self:
            self.client._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.client._protocol is self:
            self.client._data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.client._protocol is self:
            self.client._connection_lost(exc)


class Client:
    """One URFA connection, client side.  Create it with ``connect``."""

    def __init__(self, endpoint: _Endpoint, event_queue: int = 1024) -> None:
        self._endpoint = endpoint
        self._loop = asyncio.get_running_loop()
        self._ids = itertools.count(1)
        self._pending: dict[int, PendingCall] = {}
        self._streams: dict[int, Stream] = {}
        self._events: deque[Event] = deque()
        self._event_cap = event_queue
        self.events_dropped = 0            # dropped here because we did not read them
        self._event_wake = asyncio.Event()
        self._handshake: asyncio.Future[Message] | None = None
        self._transport: asyncio.Transport | None = None
        self._protocol: _Protocol | None = None
        self._conn: Connection | None = None
        self._paused = False
        self._bye: Bye | None = None
        self.hello: Hello | None = None
        self.info: LoginInfo | None = None
        self._resume_key: bytes | None = None
        self.closed = True

    # -- connection ------------------------------------------------------
    async def _open(self) -> None:
        ep = self._endpoint
        self._conn = Connection(Role.CLIENT, self._loop.time(), max_frame=ep.max_frame,
                                handshake_timeout=ep.timeout)
        self._bye = None
        self._handshake = self._loop.create_future()
        self.closed = False
        if ep.unix is not None:
            await asyncio.wait_for(self._loop.create_unix_connection(lambda: _Protocol(self), ep.unix), ep.timeout)
        else:
            # host None is getaddrinfo's local host, as it always was
            await asyncio.wait_for(self._loop.create_connection(
                lambda: _Protocol(self), ep.host, ep.port, ssl=ep.ssl,  # type: ignore[arg-type]
                server_hostname=ep.server_hostname if ep.ssl else None, local_addr=ep.local_addr), ep.timeout)
        msg = await self._expect(Hello)
        assert isinstance(msg, Hello)
        if 1 not in msg.proto:
            await self.close()
            raise LoginFailed("version", f"server speaks protocol {msg.proto}, we speak [1]")
        self.hello = msg

    async def _expect(self, *types: type) -> Message:
        assert self._handshake is not None
        try:
            msg = await asyncio.wait_for(asyncio.shield(self._handshake), self._endpoint.timeout)
        except asyncio.TimeoutError:
            await self.close()
            raise ConnectionLost("timeout", "server did not answer the handshake") from None
        self._handshake = self._loop.create_future()
        if isinstance(msg, Bye):
            await self.close()
            raise LoginFailed(msg.code, msg.message)
        if not isinstance(msg, types):
            await self.close()
            raise ConnectionLost("protocol", f"unexpected {type(msg).__name__}")
        return msg

    def _send(self, msg: Message) -> None:
        if self.closed or self._conn is None or self._transport is None:
            raise ConnectionLost(self._bye.code if self._bye else "", "not connected")
        self._conn.send(msg)
        self._transport.write(self._conn.data_to_send())

    def _data_received(self, data: bytes) -> None:
        conn = self._conn
        assert conn is not None
        try:
            conn.receive_data(data)
            while True:
                msg = conn.next_event()
                if msg is None:
                    break
                self._dispatch(msg)
        except RemoteProtocolError as exc:
            self._bye = Bye(exc.code, str(exc))
            if self._transport is not None:
                self._transport.close()

    def _dispatch(self, msg: Message | Closed) -> None:
        t = type(msg)
        if t is Result or t is Error:
            p = self._pending.pop(msg.id, None)  # type: ignore[union-attr]
            if p is None or p.future.done():
                return   # e.g. the answer to a call we gave up on
            if t is Result:
                p.future.set_result(msg.value)  # type: ignore[union-attr]
            else:
                p.future.set_exception(CallFailed(msg.code, msg.message))  # type: ignore[union-attr]
        elif t is Chunk:
            p = self._pending.get(msg.id)  # type: ignore[union-attr]
            if p is not None and p.chunks is None:
                # a streaming function read with call(): its rows would be dropped without a word
                if not p.future.done():
                    p.future.set_exception(LocalProtocolError(
                        f"{p.fn} streams its rows: read it with Client.stream, not Client.call"))
                    self.cancel(p.id)
            elif p is not None and p.chunks is not None:
                p.chunks.append(msg.data)  # type: ignore[union-attr]
                stream = self._streams.get(msg.id)  # type: ignore[union-attr]
                if stream is not None:
                    stream._wake.set()
                if len(p.chunks) > _STREAM_HIGH and not self._paused and self._transport is not None:
                    self._paused = True
                    self._transport.pause_reading()
        elif t is Event:
            if len(self._events) >= self._event_cap:
                self._events.popleft()
                self.events_dropped += 1
            self._events.append(msg)  # type: ignore[arg-type]
            self._event_wake.set()
        elif t is Pong:
            p = self._pending.pop(msg.id, None)  # type: ignore[union-attr]
            if p is not None and not p.future.done():
                p.future.set_result(None)
        elif t is Bye:
            self._bye = msg  # type: ignore[assignment]
            if self._handshake is not None and not self._handshake.done():
                self._handshake.set_result(msg)  # type: ignore[arg-type]
            if self._transport is not None:
                self._transport.close()
        elif t is Closed:
            if self._transport is not None:
                self._transport.close()
        elif self._handshake is not None and not self._handshake.done():
            self._handshake.set_result(msg)  # type: ignore[arg-type]

    def _resume_reading(self) -> None:
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()

    def _connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        bye = self._bye
        err = ConnectionLost(bye.code, bye.message) if bye else ConnectionLost("", str(exc or "connection closed"))
        if self._handshake is not None and not self._handshake.done():
            self._handshake.set_exception(err)
            self._handshake.exception()   # mark retrieved: nobody may be waiting
        pending, self._pending = self._pending, {}
        for p in pending.values():
            if not p.future.done():
                p.future.set_exception(err)
        for stream in self._streams.values():
            stream._wake.set()
        self._event_wake.set()

    @property
    def close_reason(self) -> Bye | None:
        """The server's bye (code, message), if it said why it closed."""
        return self._bye

    async def close(self) -> None:
        if self._transport is not None and not self.closed:
            self._transport.close()
            self._connection_lost(None)    # fail what is pending now, not later
        self._protocol = None
        self._transport = None
        self.closed = True

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- login -----------------------------------------------------------
    async def login(self, kind: str, login: str, password: str | None = None, *,
                    keys: scram.ClientKeys | None = None, otp: OtpSource | None = None) -> LoginInfo:
        """SCRAM login; ``LoginFailed`` if refused or the server is not authentic.
        ``otp``: the one-time code, if the server asks for one (``otp_required`` when it does and none is given)."""
        assert self.hello is not None
        cnonce = secrets.token_bytes(scram.NONCE_BYTES)
        self._send(Login(kind, login, cnonce))
        ch = await self._expect(Challenge)
        assert isinstance(ch, Challenge)
        if not 1 <= ch.iterations <= scram.MAX_ITERATIONS:
            await self.close()
            raise LoginFailed("protocol", f"server asks for {ch.iterations} iterations")
        if keys is None:
            if password is None:
                raise ValueError("give password or keys")
            keys = await asyncio.to_thread(scram.client_keys, password, ch.salt, ch.iterations)
        am = scram.auth_message(kind, login, cnonce, self.hello.nonce, ch.salt, ch.iterations)
        self._send(Proof(scram.client_proof(keys, am)))
        signature = scram.server_signature(keys.server_key, am)
        w = await self._expect(Welcome, Otp)
        if isinstance(w, Otp):
            # the server proves itself before our code goes out: a code is worth a login for 30 s
            if not hmac.compare_digest(signature, w.signature):
                await self.close()
                raise LoginFailed(AUTH_FAILED, "server signature is wrong: not the server we know")
            try:
                code = await otp_code(otp)
            except BaseException:
                await self.close()
                raise
            self._send(OtpCode(code))
            w = await self._expect(Welcome)
        assert isinstance(w, Welcome)
        if not hmac.compare_digest(signature, w.signature):
            await self.close()
            raise LoginFailed(AUTH_FAILED, "server signature is wrong: not the server we know")
        self.info = LoginInfo(w.sid, w.kind, w.login, w.timeout)
        self._resume_key = scram.resume_key(keys.client_key, am) if kind == "system" else None
        return self.info

    async def resume(self) -> LoginInfo:
        """Reconnect and resume this client's system session."""
        if self.info is None or self._resume_key is None:
            raise LoginFailed("resume_failed", "only a logged-in system session can be resumed")
        await self.close()
        await self._open()
        assert self.hello is not None
        cnonce = secrets.token_bytes(scram.NONCE_BYTES)
        sid = self.info.sid
        self._send(Resume(sid, cnonce, scram.resume_proof(self._resume_key, self.hello.nonce, cnonce, sid)))
        w = await self._expect(Welcome)
        assert isinstance(w, Welcome)
        if not hmac.compare_digest(scram.resume_signature(self._resume_key, self.hello.nonce, cnonce, sid),
                                   w.signature):
            await self.close()
            raise LoginFailed(AUTH_FAILED, "server resume signature is wrong")
        self.info = LoginInfo(w.sid, w.kind, w.login, w.timeout)
        return self.info

    async def proxy_login(self, login: str, password: str, ip: str, *, kind: str = "user",
                          otp: OtpSource | None = None) -> LoginInfo:
        """Log a subscriber (or, ``kind="admin"``, an operator: right session.proxy_admin) in on
        their behalf (needs right session.proxy); ``otp`` as in ``login``."""
        cnonce = secrets.token_bytes(scram.NONCE_BYTES)
        args: dict[str, Any] = {"login": login, "cnonce": cnonce, "ip": ip}
        if kind != "user":
            args["kind"] = kind
        ch = await self.call("session.proxy_login", args)
        iterations = ch["iter"]
        if not 1 <= iterations <= scram.MAX_ITERATIONS:
            raise LoginFailed("protocol", f"server asks for {iterations} iterations")
        keys = await asyncio.to_thread(scram.client_keys, password, ch["salt"], iterations)
        am = scram.auth_message(kind, login, cnonce, ch["nonce"], ch["salt"], iterations)
        try:
            w = await self.call("session.proxy_proof", {"handle": ch["handle"], "proof": scram.client_proof(keys, am)})
            if not hmac.compare_digest(scram.server_signature(keys.server_key, am), w["sig"]):
                raise LoginFailed(AUTH_FAILED, "server signature is wrong")
            if w.get("otp_required"):
                w = await self.call("session.proxy_otp", {"handle": ch["handle"], "code": await otp_code(otp)})
        except CallFailed as exc:
            raise LoginFailed(exc.code, exc.message) from None
        return LoginInfo(w["sid"], kind, login, w["timeout"])

    # -- calls -----------------------------------------------------------
    def start_call(self, fn: str, args: dict[str, Any] | None = None, *,
                   as_sid: bytes | None = None, as_ip: str | None = None, streaming: bool = False) -> PendingCall:
        """Send a call now; await the returned ``PendingCall`` for its result."""
        call_id = next(self._ids)
        p = PendingCall(self, call_id, fn, streaming)
        self._send(Call(call_id, fn, args or {}, as_sid, as_ip))
        self._pending[call_id] = p
        return p

    async def call(self, fn: str, args: dict[str, Any] | None = None, *,
                   as_sid: bytes | None = None, as_ip: str | None = None, timeout: float | None = None) -> Any:
        """Call ``fn``; its result, or ``CallFailed(code, message)``."""
        p = self.start_call(fn, args, as_sid=as_sid, as_ip=as_ip)
        if timeout is None:
            return await p.future
        try:
            return await asyncio.wait_for(asyncio.shield(p.future), timeout)
        except asyncio.TimeoutError:
            self.cancel(p)
            raise

    def stream(self, fn: str, args: dict[str, Any] | None = None, *,
               as_sid: bytes | None = None, as_ip: str | None = None) -> Stream:
        p = self.start_call(fn, args, as_sid=as_sid, as_ip=as_ip, streaming=True)
        s = Stream(self, p)
        self._streams[p.id] = s

        def finished(_f: asyncio.Future[Any]) -> None:
            if self._streams.pop(p.id, None) is not None:
                s._wake.set()

        p.future.add_done_callback(finished)
        return s

    def cancel(self, call: PendingCall | Stream | int) -> None:
        """Ask the server to cancel a call; it then fails with code ``cancelled``."""
        call_id = call if isinstance(call, int) else call.id
        if call_id in self._pending and not self.closed:
            self._send(Cancel(call_id))

    async def ping(self) -> None:
        """Protocol-level round trip (no session work on the server)."""
        call_id = next(self._ids)
        p = PendingCall(self, call_id, "ping", False)
        self._send(Ping(call_id))
        self._pending[call_id] = p
        await p.future

    async def logout(self) -> None:
        await self.call("session.logout")
        self._resume_key = None

    # -- events ----------------------------------------------------------
    async def subscribe(self, *topics: str) -> list[str]:
        return await self.call("events.subscribe", {"topics": list(topics)})  # type: ignore[no-any-return]

    async def unsubscribe(self, *topics: str) -> list[str]:
        return await self.call("events.unsubscribe", {"topics": list(topics)})  # type: ignore[no-any-return]

    async def next_event(self, timeout: float | None = None) -> Event:
        """The next event (topic, payload, dropped-by-server count)."""
        async def wait() -> Event:
            while not self._events:
                if self.closed:
                    raise ConnectionLost(self._bye.code if self._bye else "", "connection closed")
                self._event_wake.clear()
                await self._event_wake.wait()
            return self._events.popleft()
        return await asyncio.wait_for(wait(), timeout)

    async def events(self) -> AsyncIterator[Event]:
        while True:
            yield await self.next_event()


async def connect(
    host: str | None = "127.0.0.1", port: int = DEFAULT_PORT, *, unix: str | None = None,
    ssl: ssl_module.SSLContext | None = None, server_hostname: str | None = None,
    timeout: float = 10.0, max_frame: int = DEFAULT_MAX_FRAME, event_queue: int = 1024,
    local_addr: tuple[str, int] | None = None,
) -> Client:
    """Open a connection and wait for the server's hello."""
    client = Client(_Endpoint(host, port, unix, ssl, server_hostname, timeout, max_frame, local_addr), event_queue)
    await client._open()
    return client
