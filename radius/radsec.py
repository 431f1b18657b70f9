"""RadSec: RADIUS over TLS (RFC 6614) into the same server as UDP.

Theory of operation
-------------------
``RadsecListener`` accepts TCP connections on ``[radius] radsec_port`` and
runs TLS itself over memory BIOs (``_Tls``: ``ssl.SSLObject``), so that every
failed handshake is seen with its reason and counted (asyncio's own TLS
transport, under TLS 1.3, loses a server-side handshake failure such as a
client certificate of an unknown CA: the transport is closed, the waiter
never told).  TLS 1.2 or later; a client
certificate is required and must chain to ``radsec_ca`` (RFC 6614 s.2.3:
mutual authentication).  A connection is then a ``RadsecStream``: one
``Endpoint`` of ``radius.server`` of kind "radsec" (Access, Accounting and
Status-Server on one stream), and every packet read from it goes through
``RadiusServer.receive`` — the same checks, duplicate cache, in-flight cap
and decider as a UDP datagram; the reply is written back on the stream.

Which NAS: the peer address picks the row of the NAS table, as for UDP (its
name, options and CoA port), with the shared secret replaced by "radsec"
(RFC 6614 s.2.3): the certificate says "a client of this RadSec service", the
address says which one.  A peer whose address is no NAS is closed once the
table is loaded (``unknown_nas``); issue client certificates from a CA used
for nothing else.

Framing is by the RADIUS Length field: a packet of Length 20..4096 is read
whole; any other Length closes the connection (the stream cannot be
resynchronised).  Every read is bounded in time: the handshake
(``HANDSHAKE_TIMEOUT``), the wait for a packet's first byte (``IDLE_TIMEOUT``:
radsecproxy and FreeRADIUS keep connections open and send Status-Server
watchdogs), and the rest of a packet once it began (``PACKET_TIMEOUT``: a
sender that stalls mid-packet is cut).  A peer that does not read its replies
(more than ``MAX_UNSENT`` bytes queued) is cut too.  At most
``max_connections`` streams are open; more are closed at once.

Every close is counted in ``billcore_radius_radsec_closed{reason}`` and said
in the log (at most once a minute per address and reason); nothing
a peer sends can raise out of here (an unexpected error is logged and
counted as ``error``, the listener keeps serving).  CoA and Disconnect still
go to the NAS over UDP (``coa_port``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Gauge

from .server import Nas, NasTable, RadiusError, RadiusServer

__all__ = ["RADSEC_SECRET", "RadsecConfigError", "RadsecListener", "RadsecStream", "server_context", "start_radsec"]

log = logging.getLogger(__name__)

RADSEC_SECRET = b"radsec"           # RFC 6614 s.2.3
MIN_LENGTH, MAX_LENGTH = 20, 4096   # RFC 2865 s.3
HANDSHAKE_TIMEOUT = 10.0
IDLE_TIMEOUT = 300.0
PACKET_TIMEOUT = 10.0
MAX_UNSENT = 1 << 20
LOG_INTERVAL = 60.0

ACCEPTED = Counter("billcore_radius_radsec_connections", "RadSec (RADIUS over TLS) connections established")
CLOSED = Counter("billcore_radius_radsec_closed", "RadSec connections closed, by reason (eof, idle, slow_sender,"
                 " bad_length, truncated, unknown_nas, not_reading, no_client_cert, bad_client_cert, not_tls,"
                 " handshake_timeout, handshake_eof, handshake_failed, too_many, stopping, error)", ["reason"])
OPEN = Gauge("billcore_radius_radsec_open", "RadSec connections open", multiprocess_mode="livesum")


class RadsecConfigError(RadiusError):
    """The [radius] radsec_* keys cannot make a TLS server."""


def server_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    """TLS 1.2+, our certificate, client certificates required and checked against ``ca``."""
    missing = [name for name, value in (("radsec_cert", cert), ("radsec_key", key), ("radsec_ca", ca)) if not value]
    if missing:
        raise RadsecConfigError(f"[radius] radsec_port is set but {', '.join(missing)} is empty:"
                                " RadSec needs a server certificate, its key and the CA of the clients' certificates")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise RadsecConfigError(f"[radius] radsec_cert/radsec_key/radsec_ca: {exc}") from exc
    return ctx


def _handshake_reason(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "handshake_timeout"
    text = f"{getattr(exc, 'reason', '')} {exc}".upper()
    if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in text or "CERTIFICATE_REQUIRED" in text:
        return "no_client_cert"
    if "CERTIFICATE_VERIFY_FAILED" in text or "UNKNOWN_CA" in text or "BAD_CERTIFICATE" in text:
        return "bad_client_cert"
    if ("WRONG_VERSION_NUMBER" in text or "HTTP_REQUEST" in text or "UNSUPPORTED_PROTOCOL" in text
            or "UNKNOWN_PROTOCOL" in text or "RECORD_LAYER_FAILURE" in text or "PACKET_LENGTH_TOO_LONG" in text):
        return "not_tls"
    return "handshake_failed"


class _Tls:
    """TLS over a TCP stream through memory BIOs: bounded reads, every error seen."""

    CHUNK = 16384

    def __init__(self, context: ssl.SSLContext, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.reader = reader
        self.writer = writer
        self.buffer = bytearray()

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    async def _fill(self) -> None:
        data = await self.reader.read(self.CHUNK)
        if not data:
            raise asyncio.IncompleteReadError(b"", None)
        self.incoming.write(data)

    async def handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                await self._fill()
                continue
            except ssl.SSLError:
                self._flush()   # the alert, so the peer learns why
                raise
            self._flush()
            return

    async def read_exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            try:
                chunk = self.obj.read(self.CHUNK)
            except ssl.SSLWantReadError:
                self._flush()
                await self._fill()
                continue
            except ssl.SSLZeroReturnError:
                chunk = b""
            if not chunk:   # close_notify
                raise asyncio.IncompleteReadError(bytes(self.buffer), n)
            self.buffer += chunk
        out = bytes(self.buffer[:n])
        del self.buffer[:n]
        return out

    def write(self, data: bytes) -> None:
        self.obj.write(data)
        self._flush()


class _Closed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RadsecStream:
    """One TLS connection as a ``radius.server.Endpoint`` of kind "radsec"."""

    kind = "radsec"

    def __init__(self, server: RadiusServer, tls: _Tls, peer: tuple[Any, ...]) -> None:
        self.server = server
        self.tls = tls
        self.writer = tls.writer
        self.peer = peer
        self.closed = False
        self._base: Nas | None = None
        self._nas: Nas | None = None

    def nas_for(self, table: NasTable, address: str) -> Nas | None:
        nas = table.get(address)
        if nas is None:
            return None
        if nas is not self._base:    # the row changed (table reloaded): derive once
            self._base, self._nas = nas, dataclasses.replace(nas, secret=RADSEC_SECRET)
        return self._nas

    def send(self, data: bytes, addr: tuple[Any, ...], code: int) -> None:
        if self.closed or self.writer.is_closing():
            return
        transport = self.writer.transport
        if transport.get_write_buffer_size() > MAX_UNSENT:
            self.closed = True
            CLOSED.labels("not_reading").inc()
            transport.abort()
            return
        try:
            self.tls.write(data)
        except ssl.SSLError:
            self.closed = True
            return
        tally = self.server.tally
        tally[code] = tally.get(code, 0) + 1


@dataclass
class RadsecListener:
    server: RadiusServer
    context: ssl.SSLContext
    max_connections: int = 1024
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    idle_timeout: float = IDLE_TIMEOUT
    packet_timeout: float = PACKET_TIMEOUT
    _listener: asyncio.Server | None = None
    _tasks: set[asyncio.Task[Any]] = dataclasses.field(default_factory=set)
    _open: int = 0
    _said: dict[tuple[str, str], float] = dataclasses.field(default_factory=dict)

    async def start(self, host: str, port: int) -> int:
        """Listen (0 = a free port); the bound port."""
        self._listener = await asyncio.start_server(self._connected, host, port, limit=_Tls.CHUNK)
        return int(self._listener.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = writer.get_extra_info("peername") or ("", 0)
        reason = "error"
        self._open += 1
        OPEN.inc()
        try:
            reason = await self._serve(reader, writer, peer)
        except asyncio.CancelledError:
            reason = "stopping"
        except Exception as exc:   # a bug here must not stop the listener
            log.error("radsec connection from %s failed: %r", peer[0], exc, exc_info=exc)
            reason = "error"
        finally:
            self._open -= 1
            OPEN.dec()
            self._tasks.discard(task)
            CLOSED.labels(reason).inc()
            if reason not in ("eof", "stopping"):
                self._say_closed(str(peer[0]), reason)
            writer.transport.abort()

    def _say_closed(self, address: str, reason: str) -> None:
        """Log a close, at most once a minute per address and reason (a scanner must not flood the log)."""
        now = asyncio.get_running_loop().time()
        key = (address, reason)
        if now - self._said.get(key, -LOG_INTERVAL) < LOG_INTERVAL:
            return
        if len(self._said) >= 4096:
            self._said.clear()
        self._said[key] = now
        log.info("radsec connection closed", extra={"address": address, "reason": reason})

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: tuple[Any, ...]) -> str:
        if self._open > self.max_connections:
            return "too_many"
        tls = _Tls(self.context, reader, writer)
        try:
            async with asyncio.timeout(self.handshake_timeout):
                await tls.handshake()
        except asyncio.IncompleteReadError:
            return "handshake_eof"
        except (ssl.SSLError, OSError, asyncio.TimeoutError) as exc:
            return _handshake_reason(exc)
        table = self.server.nas_table
        if table.loaded and table.get(peer[0]) is None:
            self.server._notice(peer[0], "", "unknown_nas", 0)
            return "unknown_nas"
        ACCEPTED.inc()
        stream = RadsecStream(self.server, tls, peer)
        try:
            while True:
                try:
                    data = await self._packet(tls)
                except _Closed as closed:
                    return closed.reason
                self.server.receive(stream, data, peer)
                if stream.closed:
                    return "not_reading"
        finally:
            stream.closed = True

    async def _packet(self, tls: _Tls) -> bytes:
        """One whole RADIUS packet, or ``_Closed`` with the reason."""
        try:
            async with asyncio.timeout(self.idle_timeout):
                first = await tls.read_exactly(1)
        except asyncio.IncompleteReadError:
            raise _Closed("eof") from None
        except asyncio.TimeoutError:
            raise _Closed("idle") from None
        except (ssl.SSLError, OSError):
            raise _Closed("eof") from None
        try:
            async with asyncio.timeout(self.packet_timeout):
                head = first + await tls.read_exactly(3)
                length = int.from_bytes(head[2:4], "big")
                if not MIN_LENGTH <= length <= MAX_LENGTH:
                    raise _Closed("bad_length")
                return head + await tls.read_exactly(length - 4)
        except asyncio.IncompleteReadError:
            raise _Closed("truncated") from None
        except asyncio.TimeoutError:
            raise _Closed("slow_sender") from None
        except (ssl.SSLError, OSError):
            raise _Closed("truncated") from None


async def start_radsec(server: RadiusServer, settings: Any) -> tuple[RadsecListener, int]:
    """The listener of ``[radius] radsec_*`` (``radius.process.RadiusSettings``) and its bound port."""
    listener = RadsecListener(server, server_context(settings.radsec_cert, settings.radsec_key, settings.radsec_ca),
                              handshake_timeout=settings.radsec_handshake_timeout,
                              idle_timeout=settings.radsec_idle_timeout,
                              packet_timeout=settings.radsec_packet_timeout)
    bound = await listener.start(settings.radsec_host, settings.radsec_port)
    log.info("radsec serving", extra={"radsec": bound})
    return listener, bound
