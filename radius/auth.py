"""RADIUS packet authentication, on raw bytes: no I/O, no dictionary.

Theory of operation
-------------------
The server checks a datagram *before* it decodes it with pyrad, so that a
forged or mangled packet costs one MD5 and never reaches a decision:

* ``parse_header`` bounds the packet (RFC 2865 s.3: 20..4096 octets; octets
  beyond Length are padding and are cut off) and walks the attributes once
  to check their lengths and to find the Message-Authenticator.
* An Access-Request carries no proof of the secret except its
  Message-Authenticator (RFC 2869 s.5.14): with one, a wrong secret is
  detected and dropped; without one, only PAP/CHAP failing reveals it — that
  is the BlastRADIUS hole, closed per NAS by requiring the attribute.
* Accounting-Request, Disconnect-Request and CoA-Request carry a Request
  Authenticator = MD5(Code+Id+Length+16 zero octets+Attributes+Secret)
  (RFC 2866 s.3, RFC 5176 s.2.3); a response's authenticator is
  MD5(Code+Id+Length+RequestAuth+Attributes+Secret) (RFC 2865 s.3).
* Status-Server must carry a Message-Authenticator (RFC 5997 s.3).

PAP (RFC 2865 s.5.2) and CHAP (RFC 1994, RFC 2865 s.5.3) are computed here
too; the core, which holds the cleartext, uses ``chap_response``.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_PACKET",
    "MalformedPacket",
    "Header",
    "parse_header",
    "hmac_md5",
    "message_authenticator_ok",
    "request_authenticator_ok",
    "request_authenticator",
    "response_authenticator",
    "response_ok",
    "pap_hide",
    "pap_unhide",
    "chap_response",
    "chap_ok",
]

MAX_PACKET = 4096
MIN_PACKET = 20
MESSAGE_AUTHENTICATOR = 80
PROXY_STATE = 33

ACCESS_REQUEST = 1
ACCOUNTING_REQUEST = 4
STATUS_SERVER = 12
DISCONNECT_REQUEST = 40
COA_REQUEST = 43


class MalformedPacket(ValueError):
    """The datagram is not a well-formed RADIUS packet (the peer's fault)."""


@dataclass(frozen=True, slots=True)
class Header:
    code: int
    id: int
    length: int
    authenticator: bytes
    # offset of the Message-Authenticator's value in the packet, or -1
    ma_offset: int
    # a Proxy-State (33) is present: the reply must echo it (RFC 2865 s.5.33)
    proxy_state: bool = False


def parse_header(data: bytes) -> tuple[Header, bytes]:
    """Check a datagram's framing; return its header and the packet
    truncated to its Length field."""
    n = len(data)
    if n < MIN_PACKET:
        raise MalformedPacket(f"{n} octets is shorter than a RADIUS header")
    if n > MAX_PACKET:
        raise MalformedPacket(f"{n} octets is longer than {MAX_PACKET}")
    code, ident, length = struct.unpack_from("!BBH", data)
    if length < MIN_PACKET or length > MAX_PACKET:
        raise MalformedPacket(f"Length field {length} out of range")
    if length > n:
        raise MalformedPacket(f"Length field {length} exceeds the {n} octets received")
    packet = data[:length]
    ma_offset = -1
    proxy_state = False
    pos = MIN_PACKET
    while pos < length:
        if pos + 2 > length:
            raise MalformedPacket("attribute header runs past the packet")
        attr_type, attr_len = packet[pos], packet[pos + 1]
        if attr_len < 2 or pos + attr_len > length:
            raise MalformedPacket(f"attribute {attr_type} has bad length {attr_len}")
        if attr_type == MESSAGE_AUTHENTICATOR:
            if attr_len != 18 or ma_offset >= 0:
                raise MalformedPacket("bad or repeated Message-Authenticator")
            ma_offset = pos + 2
        elif attr_type == PROXY_STATE:
            proxy_state = True
        pos += attr_len
    return Header(code, ident, length, packet[4:20], ma_offset, proxy_state), packet


_PADS: dict[bytes, tuple[Any, Any]] = {}
_MAX_PADS = 4096
_IPAD = bytes(b ^ 0x36 for b in range(256))
_OPAD = bytes(b ^ 0x5C for b in range(256))


def hmac_md5(key: bytes, data: bytes) -> bytes:
    """HMAC-MD5 (RFC 2104) with the key's inner and outer MD5 states kept.

    Every Access-Request costs two (its Message-Authenticator checked, the
    reply's made), always with one of a few NAS secrets; ``hmac.digest``
    asks OpenSSL 3 to fetch the MAC anew at each call (EVP_Q_mac), twice
    the time of two copied MD5 states."""
    pads = _PADS.get(key)
    if pads is None:
        block = (hashlib.md5(key).digest() if len(key) > 64 else key).ljust(64, b"\x00")
        pads = (hashlib.md5(block.translate(_IPAD)), hashlib.md5(block.translate(_OPAD)))
        if len(_PADS) >= _MAX_PADS:
            _PADS.clear()
        _PADS[bytes(key)] = pads
    inner = pads[0].copy()
    inner.update(data)
    outer = pads[1].copy()
    outer.update(inner.digest())
    return bytes(outer.digest())


def _ma_digest(packet: bytes, ma_offset: int, secret: bytes, authenticator: bytes) -> bytes:
    zeroed = packet[:4] + authenticator + packet[20:ma_offset] + b"\x00" * 16 + packet[ma_offset + 16 :]
    return hmac_md5(secret, zeroed)


def message_authenticator_ok(
    header: Header, packet: bytes, secret: bytes, request_authenticator: bytes | None = None
) -> bool:
    """Verify the Message-Authenticator of a packet that has one.

    For Access-Request and Status-Server the HMAC covers the packet's own
    authenticator; for Accounting/Disconnect/CoA requests 16 zero octets
    (RFC 5176 s.3.3); for a response, the request's authenticator."""
    if header.ma_offset < 0:
        return False
    if request_authenticator is not None:
        vector = request_authenticator
    elif header.code in (ACCOUNTING_REQUEST, DISCONNECT_REQUEST, COA_REQUEST):
        vector = b"\x00" * 16
    else:
        vector = header.authenticator
    expected = _ma_digest(packet, header.ma_offset, secret, vector)
    return hmac.compare_digest(expected, packet[header.ma_offset : header.ma_offset + 16])


def request_authenticator(packet_without_auth: bytes, secret: bytes) -> bytes:
    """Request Authenticator of an Accounting/Disconnect/CoA request whose
    authenticator field is still zero."""
    return hashlib.md5(packet_without_auth[:4] + b"\x00" * 16 + packet_without_auth[20:] + secret).digest()


def request_authenticator_ok(header: Header, packet: bytes, secret: bytes) -> bool:
    return hmac.compare_digest(request_authenticator(packet, secret), header.authenticator)


def response_authenticator(response: bytes, request_auth: bytes, secret: bytes) -> bytes:
    return hashlib.md5(response[:4] + request_auth + response[20:] + secret).digest()


def response_ok(response: bytes, request_auth: bytes, secret: bytes) -> bool:
    """Does a received response belong to our request (used by the CoA client)?"""
    header, packet = parse_header(response)
    if not hmac.compare_digest(response_authenticator(packet, request_auth, secret), header.authenticator):
        return False
    if header.ma_offset >= 0:
        return message_authenticator_ok(header, packet, secret, request_auth)
    return True


def _pap_blocks(secret: bytes, authenticator: bytes, data: bytes, hiding: bool) -> bytes:
    out = []
    prev = authenticator
    md5 = hashlib.md5
    for i in range(0, len(data), 16):
        chunk = data[i : i + 16]
        # XOR as one big-integer operation: a per-byte loop costs ten times more
        block = (int.from_bytes(chunk, "big") ^ int.from_bytes(md5(secret + prev).digest(), "big")).to_bytes(16, "big")
        out.append(block)
        prev = block if hiding else chunk
    return b"".join(out)


def pap_hide(password: bytes, secret: bytes, authenticator: bytes) -> bytes:
    if len(password) > 128:
        raise ValueError("a User-Password is at most 128 octets")
    # an empty password still takes one block (RFC 2865 s.5.2)
    padded = password.ljust(max(16, -(-len(password) // 16) * 16), b"\x00")
    return _pap_blocks(secret, authenticator, padded, hiding=True)


def pap_unhide(hidden: bytes, secret: bytes, authenticator: bytes) -> bytes:
    """The cleartext of a User-Password attribute (trailing NULs removed)."""
    if not hidden or len(hidden) % 16 or len(hidden) > 128:
        raise MalformedPacket(f"User-Password of {len(hidden)} octets is not 16..128 in steps of 16")
    return _pap_blocks(secret, authenticator, hidden, hiding=False).rstrip(b"\x00")


def chap_response(chap_id: int, password: bytes, challenge: bytes) -> bytes:
    """RFC 1994: MD5(Identifier + secret + Challenge)."""
    return hashlib.md5(bytes([chap_id]) + password + challenge).digest()


def chap_ok(chap_password: bytes, password: bytes, challenge: bytes) -> bool:
    """Check a CHAP-Password attribute value (1-octet id + 16-octet
    response) against the cleartext; the challenge is CHAP-Challenge or,
    when absent, the Request Authenticator (RFC 2865 s.5.3)."""
    if len(chap_password) != 17:
        return False
    expected = chap_response(chap_password[0], password, challenge)
    return hmac.compare_digest(expected, chap_password[1:])
