"""Turn a checked RADIUS request into the plain record a URFA call carries.

Pure: raw packet bytes in, dicts of str/int/bytes out.  The core never sees
RADIUS attributes, only these named fields, so the wire format stays at the
edge.  PAP passwords are unhidden here (the core compares cleartexts); CHAP
travels as (id, challenge, response) because only the core has the
cleartext to compute MD5(id + password + challenge); MS-CHAPv2 likewise
travels as the two Microsoft attributes' values (MS-CHAP-Challenge,
MS-CHAP2-Response, vendor 311, RFC 2548), unchecked here: the core answers a
wrong length as "malformed MS-CHAP", so the NAS hears a reject, not silence.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

from .auth import MalformedPacket, pap_unhide

__all__ = ["raw_attributes", "auth_request", "accounting_record", "BadUserName", "STATUS_NAMES"]

STATUS_NAMES = {1: "start", 2: "stop", 3: "interim", 7: "on", 8: "off"}

# attribute codes (RFC 2865, 2866, 2869)
USER_NAME, USER_PASSWORD, CHAP_PASSWORD, NAS_IP, NAS_PORT = 1, 2, 3, 4, 5
SERVICE_TYPE, FRAMED_PROTOCOL, FRAMED_IP = 6, 7, 8
CALLED_STATION, CALLING_STATION, NAS_IDENTIFIER = 30, 31, 32
STATUS_TYPE, DELAY_TIME, IN_OCTETS, OUT_OCTETS, SESSION_ID = 40, 41, 42, 43, 44
SESSION_TIME, IN_PACKETS, OUT_PACKETS, TERMINATE_CAUSE, MULTI_SESSION = 46, 47, 48, 49, 50
IN_GIGAWORDS, OUT_GIGAWORDS, EVENT_TIMESTAMP = 52, 53, 55
CHAP_CHALLENGE, NAS_PORT_ID = 60, 87
VENDOR_SPECIFIC, MICROSOFT = 26, 311
MS_CHAP_CHALLENGE, MS_CHAP2_RESPONSE = 11, 25   # RFC 2548 s.2.3.2, s.2.3.3
_MICROSOFT_ID = MICROSOFT.to_bytes(4, "big")
FRAMED_IPV6_PREFIX, DELEGATED_IPV6_PREFIX = 97, 123   # RFC 3162 s.2.3, RFC 4818


class BadUserName(MalformedPacket):
    """An Access-Request whose User-Name no login can ever be: a NUL octet
    (PostgreSQL text cannot hold one) or not UTF-8.  The server answers it
    Access-Reject itself, without asking the core: a silent drop would make
    the NAS retry and, after a few, mark this server dead for everyone, and
    a subscriber chooses what goes into User-Name."""


def _user_name(value: bytes) -> str:
    if b"\0" in value:
        raise BadUserName("User-Name contains a NUL octet")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise BadUserName("User-Name is not UTF-8") from None


def raw_attributes(packet: bytes) -> dict[int, list[bytes]]:
    """Attribute code → raw values, in order (framing already checked by
    ``auth.parse_header``; vendor attributes stay under 26)."""
    out: dict[int, list[bytes]] = {}
    pos, end = 20, len(packet)
    while pos < end:
        code, length = packet[pos], packet[pos + 1]
        out.setdefault(code, []).append(packet[pos + 2 : pos + length])
        pos += length
    return out


def _text(attrs: dict[int, list[bytes]], code: int) -> str | None:
    values = attrs.get(code)
    if not values:
        return None
    if b"\0" in values[0]:  # the core stores these as PostgreSQL text, which has no NUL
        raise MalformedPacket(f"attribute {code} contains a NUL octet")
    return values[0].decode("utf-8", "replace")


def _int(attrs: dict[int, list[bytes]], code: int) -> int | None:
    values = attrs.get(code)
    if not values:
        return None
    if len(values[0]) != 4:
        raise MalformedPacket(f"attribute {code} is not a 4-octet integer")
    return int(struct.unpack("!I", values[0])[0])


def _ip(attrs: dict[int, list[bytes]], code: int) -> str | None:
    values = attrs.get(code)
    if not values:
        return None
    if len(values[0]) != 4:
        raise MalformedPacket(f"attribute {code} is not an IPv4 address")
    return str(ipaddress.IPv4Address(values[0]))


def _ipv6_prefixes(attrs: dict[int, list[bytes]]) -> list[str]:
    """Framed-IPv6-Prefix and Delegated-IPv6-Prefix values as CIDR text (RFC
    3162 s.2.3: Reserved(1) Prefix-Length(1) Prefix(0..16), bits past the
    length zero-filled here), in that order, each once."""
    out: list[str] = []
    for code in (FRAMED_IPV6_PREFIX, DELEGATED_IPV6_PREFIX):
        for value in attrs.get(code, ()):
            if not 2 <= len(value) <= 18 or value[1] > 128 or len(value) - 2 < (value[1] + 7) // 8:
                raise MalformedPacket(f"attribute {code} is not an IPv6 prefix")
            address = int.from_bytes(value[2:].ljust(16, b"\0")[:16], "big")
            network = ipaddress.IPv6Network((address, value[1]), strict=False)
            if network.with_prefixlen not in out:
                out.append(network.with_prefixlen)
    return out


def _common(attrs: dict[int, list[bytes]], nas_address: str) -> dict[str, Any]:
    return {
        "nas": nas_address,
        "login": _text(attrs, USER_NAME),
        "nas_ip": _ip(attrs, NAS_IP),
        "nas_identifier": _text(attrs, NAS_IDENTIFIER),
        "nas_port": _int(attrs, NAS_PORT),
        "nas_port_id": _text(attrs, NAS_PORT_ID),
        "calling_station_id": _text(attrs, CALLING_STATION),
        "called_station_id": _text(attrs, CALLED_STATION),
    }


_AUTH_TEXT = {USER_NAME: "login", NAS_IDENTIFIER: "nas_identifier", NAS_PORT_ID: "nas_port_id",
              CALLING_STATION: "calling_station_id", CALLED_STATION: "called_station_id"}
_AUTH_INT = {NAS_PORT: "nas_port", SERVICE_TYPE: "service_type", FRAMED_PROTOCOL: "framed_protocol"}


def _microsoft(value: bytes, found: dict[int, bytes]) -> None:
    """The MS-CHAP attributes of one Vendor-Specific value of vendor 311 (its
    sub-attributes: type, length, data), first of each kept."""
    pos, end = 4, len(value)
    while pos < end:
        if pos + 2 > end or value[pos + 1] < 2 or pos + value[pos + 1] > end:
            raise MalformedPacket("Microsoft Vendor-Specific attribute runs past its length")
        vtype, vlen = value[pos], value[pos + 1]
        if vtype in (MS_CHAP_CHALLENGE, MS_CHAP2_RESPONSE):
            found.setdefault(vtype, value[pos + 2 : pos + vlen])
        pos += vlen


def auth_request(packet: bytes, authenticator: bytes, secret: bytes, nas_address: str) -> dict[str, Any]:
    """The fields of an Access-Request for ``radius.authorize``.

    Exactly one of ``password`` (PAP, cleartext), ``chap`` or
    ``mschap_response`` (with ``mschap_challenge`` when the NAS sent one:
    MS-CHAPv2) is present, in that order of preference; a request with none
    is passed on with ``method = "none"`` and the core rejects it.  Absent
    attributes are left out.  A User-Name with a NUL octet or not UTF-8
    raises ``BadUserName``; a CHAP-Challenge shorter than 5 octets (RFC 2865
    s.5.40), or a Microsoft Vendor-Specific attribute whose sub-attributes
    run past it, raises ``MalformedPacket``.  One pass over the
    attributes (the hot path: every Access-Request comes here); the first
    value of an attribute counts."""
    rec: dict[str, Any] = {"nas": nas_address}
    password = chap = challenge = None
    microsoft: dict[int, bytes] = {}
    pos, end = 20, len(packet)
    while pos < end:
        code, length = packet[pos], packet[pos + 1]
        value = packet[pos + 2 : pos + length]
        pos += length
        name = _AUTH_TEXT.get(code)
        if name is not None:
            if name not in rec:
                rec[name] = _user_name(value) if code == USER_NAME else value.decode("utf-8", "replace")
        elif code == USER_PASSWORD:
            password = password if password is not None else value
        elif code == CHAP_PASSWORD:
            chap = chap if chap is not None else value
        elif code == CHAP_CHALLENGE:
            challenge = challenge if challenge is not None else value
        elif code == VENDOR_SPECIFIC:
            if value[:4] == _MICROSOFT_ID:
                _microsoft(value, microsoft)
        elif code == NAS_IP:
            if len(value) != 4:
                raise MalformedPacket("NAS-IP-Address is not an IPv4 address")
            rec.setdefault("nas_ip", str(ipaddress.IPv4Address(value)))
        elif code in _AUTH_INT:
            if len(value) != 4:
                raise MalformedPacket(f"attribute {code} is not a 4-octet integer")
            rec.setdefault(_AUTH_INT[code], int.from_bytes(value, "big"))
    if password is not None:
        rec["method"] = "pap"
        rec["password"] = pap_unhide(password, secret, authenticator)
    elif chap is not None:
        if len(chap) != 17:
            raise MalformedPacket("CHAP-Password is not 17 octets")
        if challenge is not None and len(challenge) < 5:
            # an empty or short challenge makes the response (nearly) a fixed
            # MD5(id + password): replayable
            raise MalformedPacket("CHAP-Challenge shorter than 5 octets")
        rec["method"] = "chap"
        rec["chap"] = {"id": chap[0], "challenge": challenge if challenge is not None else authenticator,
                       "response": chap[1:]}
    elif MS_CHAP2_RESPONSE in microsoft:
        rec["method"] = "mschapv2"
        rec["mschap_response"] = microsoft[MS_CHAP2_RESPONSE]
        if MS_CHAP_CHALLENGE in microsoft:
            rec["mschap_challenge"] = microsoft[MS_CHAP_CHALLENGE]
    else:
        rec["method"] = "none"
    return rec


def _counter(attrs: dict[int, list[bytes]], low: int, high: int) -> int | None:
    lo = _int(attrs, low)
    if lo is None:
        return None
    return ((_int(attrs, high) or 0) << 32) | lo


def accounting_record(packet: bytes, nas_address: str, now: float) -> dict[str, Any]:
    """The fields of an Accounting-Request for ``radius.accounting``.

    Octet counters are 64-bit (Gigawords, RFC 2869 s.5.1).  ``event_time``
    is Event-Timestamp, or ``now`` minus Acct-Delay-Time (RFC 2866 s.5.2)."""
    attrs = raw_attributes(packet)
    status = _int(attrs, STATUS_TYPE)
    if status is None:
        raise MalformedPacket("Accounting-Request without Acct-Status-Type")
    rec = _common(attrs, nas_address)
    stamp = _int(attrs, EVENT_TIMESTAMP)
    event_time = float(stamp) if stamp is not None else now - (_int(attrs, DELAY_TIME) or 0)
    rec.update(
        status=STATUS_NAMES.get(status, str(status)),
        session_id=_text(attrs, SESSION_ID),
        multi_session_id=_text(attrs, MULTI_SESSION),
        framed_ip=_ip(attrs, FRAMED_IP),
        session_time=_int(attrs, SESSION_TIME),
        input_octets=_counter(attrs, IN_OCTETS, IN_GIGAWORDS),
        output_octets=_counter(attrs, OUT_OCTETS, OUT_GIGAWORDS),
        input_packets=_int(attrs, IN_PACKETS),
        output_packets=_int(attrs, OUT_PACKETS),
        terminate_cause=_int(attrs, TERMINATE_CAUSE),
        event_time=event_time,
    )
    prefixes = _ipv6_prefixes(attrs)
    if prefixes:
        rec["ipv6_prefixes"] = prefixes
    if rec["status"] in ("start", "stop", "interim") and not rec["session_id"]:
        raise MalformedPacket("Accounting-Request without Acct-Session-Id")
    return rec
