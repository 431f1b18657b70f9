"""A small NAS simulator: the far end of RFC 5176 for tests and demos.

It listens on a UDP port with one shared secret and knows a set of
sessions (Acct-Session-Id → User-Name).  A Disconnect-Request or
CoA-Request whose Request Authenticator (and Message-Authenticator, when
present) proves the secret is answered:

* ACK when it names a known session (by Acct-Session-Id, else by
  User-Name); a disconnected session is forgotten, a CoA records the
  attributes it asked to apply;
* NAK with Error-Cause 503 Session-Context-Not-Found otherwise;
* with ``coa_nak`` set, NAK to every CoA-Request with Error-Cause 405
  Unsupported-Service (a NAS that does not do CoA; Disconnects still work).

A request with a wrong secret is silently discarded (RFC 5176 s.3.5), like a
real NAS does.  Every verified request is kept in ``received``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from pyrad.dictionary import Dictionary
from pyrad.packet import CoAACK, CoANAK, CoAPacket, CoARequest, DisconnectACK, DisconnectNAK, DisconnectRequest

from .auth import MAX_PACKET, MalformedPacket, message_authenticator_ok, parse_header, request_authenticator_ok
from .requests import raw_attributes

__all__ = ["NasSimulator"]

SESSION_CONTEXT_NOT_FOUND = 503
UNSUPPORTED_SERVICE = 405


@dataclass
class NasSimulator:
    secret: bytes
    dictionary: Dictionary
    sessions: dict[str, str] = field(default_factory=dict)  # Acct-Session-Id -> User-Name
    received: list[tuple[int, dict[int, list[bytes]]]] = field(default_factory=list)
    applied: dict[str, list[dict[int, list[bytes]]]] = field(default_factory=dict)
    packets: list[bytes] = field(default_factory=list)  # every verified request, as received
    dropped: int = 0
    answer: bool = True  # False: a NAS that never answers (timeouts)
    coa_nak: bool = False  # True: every CoA-Request is refused (405 Unsupported-Service)
    transport: asyncio.DatagramTransport | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        loop = asyncio.get_running_loop()
        sim = self

        class Proto(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                reply = sim.handle(data)
                if reply is not None and sim.transport is not None:
                    sim.transport.sendto(reply, addr)

        transport, _ = await loop.create_datagram_endpoint(Proto, local_addr=(host, port))
        self.transport = transport
        return int(transport.get_extra_info("sockname")[1])

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    def handle(self, data: bytes) -> bytes | None:
        """One datagram in, the reply bytes out (or None: discarded)."""
        if len(data) > MAX_PACKET:
            self.dropped += 1
            return None
        try:
            header, packet = parse_header(data)
        except MalformedPacket:
            self.dropped += 1
            return None
        if header.code not in (DisconnectRequest, CoARequest) or not request_authenticator_ok(
            header, packet, self.secret
        ):
            self.dropped += 1
            return None
        if header.ma_offset >= 0 and not message_authenticator_ok(header, packet, self.secret):
            self.dropped += 1
            return None
        attrs = raw_attributes(packet)
        self.received.append((header.code, attrs))
        self.packets.append(packet)
        if not self.answer:
            return None
        session = self._find(attrs)
        disconnect = header.code == DisconnectRequest
        cause = SESSION_CONTEXT_NOT_FOUND
        if self.coa_nak and not disconnect:
            session, cause = None, UNSUPPORTED_SERVICE
        if session is None:
            code = DisconnectNAK if disconnect else CoANAK
        else:
            code = DisconnectACK if disconnect else CoAACK
            if disconnect:
                del self.sessions[session]
            else:
                self.applied.setdefault(session, []).append(attrs)
        reply = CoAPacket(code, header.id, self.secret, header.authenticator, dict=self.dictionary)
        reply._request_code = header.code
        reply.message_authenticator = True
        if session is None:
            reply.AddAttribute("Error-Cause", cause)
        return bytes(reply.ReplyPacket())

    def _find(self, attrs: dict[int, list[bytes]]) -> str | None:
        if 44 in attrs:
            sid = attrs[44][0].decode("utf-8", "replace")
            return sid if sid in self.sessions else None
        if 1 in attrs:
            login = attrs[1][0].decode("utf-8", "replace")
            for sid, user in self.sessions.items():
                if user == login:
                    return sid
        return None
