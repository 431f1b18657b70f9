"""Dynamic authorization client (RFC 5176): Disconnect-Request and
CoA-Request *to* a NAS.

Theory of operation
-------------------
One request, one ephemeral UDP socket connected to the NAS's CoA port (so
replies from anyone else are refused by the kernel).  The packet is encoded
once — Request Authenticator over zeroes (RFC 5176 s.2.3) and a
Message-Authenticator — and the *same bytes* are retransmitted on timeout,
so a NAS doing RFC 5080 duplicate detection answers a retry from its cache.
A reply is accepted only if its Identifier matches and its Response
Authenticator (and Message-Authenticator, when present) prove the NAS's
secret; anything else is ignored.  Reads are bounded to 4096 octets.

``session_attributes`` names the session the way RFC 5176 s.3 asks: the
NAS's own identification plus User-Name / Acct-Session-Id / Framed-IP.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter
from pyrad.dictionary import Dictionary
from pyrad.packet import CoAACK, CoANAK, CoAPacket, CoARequest, DisconnectACK, DisconnectNAK, DisconnectRequest

from .auth import MAX_PACKET, MalformedPacket, parse_header, response_ok

__all__ = ["DynAuthResult", "send_dynauth", "session_attributes", "CoaTimeout"]

log = logging.getLogger(__name__)

DYNAUTH = Counter("billcore_radius_dynauth", "Disconnect/CoA requests sent to NAS devices, by kind and outcome", ["kind", "outcome"])

ERROR_CAUSE = 101


class CoaTimeout(Exception):
    """The NAS did not answer (after every retransmission)."""


@dataclass(frozen=True, slots=True)
class DynAuthResult:
    acked: bool
    error_cause: int | None = None


def session_attributes(session: dict[str, Any]) -> list[tuple[str, Any]]:
    """RFC 5176 s.3 session identification from an active-session record."""
    attrs: list[tuple[str, Any]] = []
    if session.get("nas_ip"):
        attrs.append(("NAS-IP-Address", session["nas_ip"]))
    if session.get("login"):
        attrs.append(("User-Name", session["login"]))
    if session.get("session_id"):
        attrs.append(("Acct-Session-Id", session["session_id"]))
    if session.get("framed_ip"):
        attrs.append(("Framed-IP-Address", session["framed_ip"]))
    return attrs


class _Reply(asyncio.DatagramProtocol):
    def __init__(self, ident: int, request_auth: bytes, secret: bytes) -> None:
        self.ident = ident
        self.request_auth = request_auth
        self.secret = secret
        self.reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.reply.done() or len(data) > MAX_PACKET:
            return
        try:
            header, packet = parse_header(data)
            if header.id != self.ident or not response_ok(packet, self.request_auth, self.secret):
                log.warning("CoA reply from %s does not match the request; ignored", addr[0])
                return
        except MalformedPacket:
            return
        self.reply.set_result(packet)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP port unreachable: keep waiting, the timeout decides


async def send_dynauth(
    address: str,
    port: int,
    secret: bytes,
    kind: str,
    attributes: list[tuple[str, Any]],
    dictionary: Dictionary,
    *,
    timeout: float = 2.0,
    retries: int = 2,
) -> DynAuthResult:
    """Send a Disconnect-Request (kind "disconnect") or CoA-Request ("coa")."""
    code = {"disconnect": DisconnectRequest, "coa": CoARequest}[kind]
    request = CoAPacket(code, secret=secret, dict=dictionary, message_authenticator=True)
    for name, value in attributes:
        request.AddAttribute(name, value)
    data = bytes(request.RequestPacket())
    header, _ = parse_header(data)
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: _Reply(header.id, header.authenticator, secret), remote_addr=(address, port)
    )
    try:
        for _ in range(retries + 1):
            transport.sendto(data)
            try:
                packet = await asyncio.wait_for(asyncio.shield(proto.reply), timeout)
                break
            except asyncio.TimeoutError:
                continue
        else:
            DYNAUTH.labels(kind, "timeout").inc()
            raise CoaTimeout(f"{kind} to {address}:{port}: no answer after {retries + 1} tries")
    finally:
        transport.close()
    acked = packet[0] in (DisconnectACK, CoAACK)
    if not acked and packet[0] not in (DisconnectNAK, CoANAK):
        raise MalformedPacket(f"unexpected reply code {packet[0]} to a {kind} request")
    DYNAUTH.labels(kind, "ack" if acked else "nak").inc()
    return DynAuthResult(acked, None if acked else _error_cause(packet))


def _error_cause(packet: bytes) -> int | None:
    pos = 20
    while pos < len(packet):
        code, length = packet[pos], packet[pos + 1]
        if code == ERROR_CAUSE and length == 6:
            return int(struct.unpack("!I", packet[pos + 2 : pos + 6])[0])
        pos += length
    return None
