"""asyncio server transport for URFA: sockets on one side, an app on the other.

Theory of operation
-------------------
``serve`` listens on TCP (optionally TLS) and/or a Unix socket.  Each
accepted connection gets a ``ServerChannel``: an ``asyncio.Protocol`` that
owns one sans-IO ``Connection`` (server role), sends the hello at once, arms
the handshake deadline, and hands every decoded message to the application
(``ServerApp.on_call`` for calls, ``on_message`` for the rest).  The app
answers with ``channel.send(msg)`` (or ``send_result``/``send_error``, which
skip building the message).  Outgoing frames are coalesced: whatever the app sends while a read is
being dispatched goes out in one write at the end of that read; what it
sends later (from tasks) goes out in one write per loop iteration.

Everything read is bounded: the frame cap and decoder bound buffered input,
the connection caps calls in flight, and reading pauses while our write
buffer is over its high-water mark (a peer that does not read its answers
stops being read).  On any protocol error the channel sends a ``bye`` with
the error code and closes.

Connections are counted per source address (an IPv4 address, an IPv6 /64):
one over ``max_connections_per_ip`` gets ``bye rate_limited`` instead of the
hello and is closed, so one host cannot hold thousands of sockets open for
the handshake time each.  The Unix socket is not counted (its file
permissions are its gate, and every local edge shares its "address").
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import ssl as ssl_module
from dataclasses import dataclass
from typing import Any, Protocol

from .connection import Closed, Connection, Role, State
from .errors import RATE_LIMITED, LocalProtocolError, RemoteProtocolError
from .framing import DEFAULT_MAX_FRAME
from .messages import Bye, Call, Hello, Message

__all__ = ["DEFAULT_PORT", "ServerLimits", "ServerApp", "ServerChannel", "ConnectionCounter", "address_key", "serve"]

DEFAULT_PORT = 11758
_DONE = (State.CLOSED, State.ERROR)


@dataclass(frozen=True, slots=True)
class ServerLimits:
    max_frame: int = DEFAULT_MAX_FRAME
    handshake_timeout: float = 10.0
    max_inflight: int = 64
    write_high_water: int = 1 << 20
    server_name: str = "billcore"
    max_connections_per_ip: int = 64    # open connections per address_key; 0: no cap
    otp_timeout: float = 120.0          # more handshake time for a login's second factor


def address_key(ip: str) -> str:
    """The unit connections are counted by: an IPv4 address or an IPv6 /64
    (one subscriber line usually gets a whole /64).  billcore's login limiter
    counts attempts by the same key."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip[:64]
    if addr.version == 6:
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.ip_network(f"{addr}/64", strict=False))
    return str(addr)


class ConnectionCounter:
    """Open connections per address key, at most ``limit`` each (0: no cap).
    Holds only keys with a connection open, so it is bounded by the sockets."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    def take(self, key: str) -> bool:
        n = self._open.get(key, 0)
        if self.limit and n >= self.limit:
            return False
        self._open[key] = n + 1
        return True

    def give_back(self, key: str) -> None:
        n = self._open.get(key, 0) - 1
        if n > 0:
            self._open[key] = n
        else:
            self._open.pop(key, None)

    def __len__(self) -> int:
        return len(self._open)


class ServerApp(Protocol):
    def on_open(self, channel: ServerChannel) -> None: ...
    def on_call(self, channel: ServerChannel, call: Call) -> None: ...        # the hot path
    def on_message(self, channel: ServerChannel, msg: Message) -> None: ...   # every other message
    def on_close(self, channel: ServerChannel) -> None: ...


class ServerChannel(asyncio.Protocol):
    """One accepted connection."""

    def __init__(self, app: ServerApp, limits: ServerLimits, counter: ConnectionCounter | None = None) -> None:
        self.app = app
        self.limits = limits
        self._counter = counter
        self._counted = ""    # the address key this connection holds in the counter
        self._refused = False  # over the per-address cap: the app never sees it
        self.loop = asyncio.get_running_loop()
        self.conn = Connection(
            Role.SERVER, self.loop.time(), max_frame=limits.max_frame,
            handshake_timeout=limits.handshake_timeout, max_inflight=limits.max_inflight,
            otp_timeout=limits.otp_timeout,
        )
        self.nonce = secrets.token_bytes(16)
        self.peer_ip = ""
        self.state: object = None   # the app's per-connection state
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._can_write = asyncio.Event()
        self._can_write.set()

    # -- asyncio callbacks -----------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: check the duck
        assert hasattr(transport, "write") and hasattr(transport, "set_write_buffer_limits")
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=self.limits.write_high_water)
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if isinstance(peer, tuple) and peer else "unix"
        if self._counter is not None and self.peer_ip != "unix":
            key = address_key(self.peer_ip)
            if not self._counter.take(key):
                self._refused = True
                self.close(RATE_LIMITED, "too many connections from this address")
                return
            self._counted = key
        self.conn.send(Hello(self.nonce, server=self.limits.server_name, max_frame=self.limits.max_frame))
        self._flush()
        self._timer = self.loop.call_at(self.conn.deadline or self.loop.time(), self._on_timer)
        self.app.on_open(self)

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        app = self.app
        # Nothing sent while we dispatch this read schedules a flush: the
        # ``finally`` below writes it all at once.
        self._flush_scheduled = True
        try:
            conn.receive_data(data)
            while not self.closed:
                msg = conn.next_event()
                if msg is None:
                    break
                t = type(msg)
                if t is Call:
                    app.on_call(self, msg)   # type: ignore[arg-type]
                elif t is Closed:
                    self.close()
                    break
                else:
                    app.on_message(self, msg)   # type: ignore[arg-type]
                    if t is Bye:
                        self.close()
        except RemoteProtocolError as exc:
            conn.fail(exc)
            self.close()
        finally:
            self._flush()
        if self._timer is not None and conn.state is State.OPEN:
            self._timer.cancel()
            self._timer = None

    def eof_received(self) -> bool | None:
        self.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._can_write.set()
        self.closed = True
        if self._counted:
            assert self._counter is not None
            self._counter.give_back(self._counted)
            self._counted = ""
        if not self._refused:
            self.app.on_close(self)

    def pause_writing(self) -> None:
        self._can_write.clear()
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._can_write.set()
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # -- for the app -----------------------------------------------------
    def send(self, msg: Message) -> bool:
        """Queue a message; False if the connection is already closing."""
        if self.closed or self.conn.state in _DONE:
            return False
        self.conn.send(msg)
        self._schedule_flush()
        return True

    def send_result(self, call_id: int, value: Any) -> bool:
        """Queue ``Result(call_id, value)``; False if the connection is closing."""
        if self.closed or not self.conn.send_result(call_id, value):
            return False
        if not self._flush_scheduled:
            self._schedule_flush()
        return True

    def send_error(self, call_id: int, code: str, message: str) -> bool:
        """Queue ``Error(call_id, code, message)``; False if the connection is closing."""
        if self.closed or not self.conn.send_error(call_id, code, message):
            return False
        if not self._flush_scheduled:
            self._schedule_flush()
        return True

    def close(self, code: str | None = None, message: str = "") -> None:
        """Close, telling the peer why with a bye when ``code`` is given."""
        if self.closed:
            return
        if code is not None:
            try:
                self.conn.send(Bye(code, message))
            except LocalProtocolError:
                pass  # already in ERROR/CLOSED: the bye (if any) is queued
        self._flush()
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def drain(self) -> None:
        """Wait while our write buffer is over its high-water mark."""
        if not self._can_write.is_set():
            await self._can_write.wait()

    # -- internals -------------------------------------------------------
    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
        if self.conn.state is State.ERROR and not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def _on_timer(self) -> None:
        self._timer = None
        if self.conn.handle_timer(self.loop.time()):
            self.close()
        elif not self.closed and self.conn.deadline is not None and self.conn.deadline > self.loop.time():
            self._timer = self.loop.call_at(self.conn.deadline, self._on_timer)   # moved: a second factor's time


async def serve(
    app: ServerApp,
    limits: ServerLimits = ServerLimits(),
    *,
    tcp: tuple[str, int] | None = None,
    unix: str | None = None,
    ssl: ssl_module.SSLContext | None = None,
) -> list[asyncio.Server]:
    """Start listening; returns the servers (close them to stop accepting)."""
    loop = asyncio.get_running_loop()
    servers = []
    counter = ConnectionCounter(limits.max_connections_per_ip)
    if tcp is not None:
        host, port = tcp
        servers.append(await loop.create_server(
            lambda: ServerChannel(app, limits, counter), host, port, ssl=ssl,
            ssl_handshake_timeout=limits.handshake_timeout if ssl else None,
            reuse_address=True,
        ))
    if unix is not None:
        servers.append(await loop.create_unix_server(lambda: ServerChannel(app, limits), unix))
    if not servers:
        raise ValueError("give tcp=(host, port) and/or unix=path")
    return servers
