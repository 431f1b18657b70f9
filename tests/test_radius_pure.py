"""Pure RADIUS pieces: authenticators, PAP/CHAP, framing, duplicate cache,
request records. No sockets."""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyrad.packet import AccessRequest, AccountingRequest, AcctPacket, AuthPacket

from radius.auth import (
    MalformedPacket,
    chap_ok,
    chap_response,
    message_authenticator_ok,
    pap_hide,
    pap_unhide,
    parse_header,
    request_authenticator_ok,
    response_ok,
)
from radius.dedup import DedupCache, Verdict
from radius.requests import BadUserName, accounting_record, auth_request
from radius.server import load_dictionary

SECRET = b"testing123"
DICT = load_dictionary()


def access_request(secret: bytes = SECRET, ma: bool = True, **attrs: object) -> AuthPacket:
    pkt = AuthPacket(AccessRequest, secret=secret, dict=DICT, message_authenticator=ma)
    for k, v in attrs.items():
        pkt.AddAttribute(k.replace("_", "-"), v)
    return pkt


def test_pap_round_trip_matches_pyrad() -> None:
    pkt = access_request(User_Name="alice")
    pkt.authenticator = os.urandom(16)
    hidden = pkt.PwCrypt("a password longer than sixteen")
    assert pap_hide(b"a password longer than sixteen", SECRET, pkt.authenticator) == hidden
    assert pap_unhide(hidden, SECRET, pkt.authenticator) == b"a password longer than sixteen"


@given(st.binary(min_size=0, max_size=128).map(lambda b: b.rstrip(b"\0")), st.binary(min_size=16, max_size=16))
def test_pap_unhide_inverts_hide(password: bytes, authenticator: bytes) -> None:
    assert pap_unhide(pap_hide(password, SECRET, authenticator), SECRET, authenticator) == password


def test_pap_rejects_bad_lengths() -> None:
    with pytest.raises(MalformedPacket):
        pap_unhide(b"x" * 15, SECRET, b"\0" * 16)
    with pytest.raises(MalformedPacket):
        pap_unhide(b"x" * 144, SECRET, b"\0" * 16)


def test_chap_is_md5_of_id_password_challenge() -> None:
    challenge = bytes(range(16))
    resp = chap_response(7, b"pw", challenge)
    assert resp == hashlib.md5(b"\x07pw" + challenge).digest()
    assert chap_ok(b"\x07" + resp, b"pw", challenge)
    assert not chap_ok(b"\x07" + resp, b"pW", challenge)
    assert not chap_ok(b"\x08" + resp, b"pw", challenge)
    assert not chap_ok(resp, b"pw", challenge)


def test_message_authenticator_detects_wrong_secret_and_tampering() -> None:
    raw = access_request(User_Name="alice", User_Password="x").RequestPacket()
    header, packet = parse_header(raw)
    assert header.ma_offset > 0
    assert message_authenticator_ok(header, packet, SECRET)
    assert not message_authenticator_ok(header, packet, b"wrong")
    tampered = bytearray(packet)
    tampered[-1] ^= 1
    h2, p2 = parse_header(bytes(tampered))
    assert not message_authenticator_ok(h2, p2, SECRET)


def test_accounting_request_authenticator() -> None:
    pkt = AcctPacket(AccountingRequest, secret=SECRET, dict=DICT)
    pkt.AddAttribute("Acct-Status-Type", "Start")
    pkt.AddAttribute("Acct-Session-Id", "s1")
    raw = pkt.RequestPacket()
    header, packet = parse_header(raw)
    assert request_authenticator_ok(header, packet, SECRET)
    assert not request_authenticator_ok(header, packet, b"other")


def test_response_authenticator_checked_like_pyrad() -> None:
    req = access_request(User_Name="alice")
    raw_req = req.RequestPacket()
    reply = req.CreateReply()
    reply.AddAttribute("Reply-Message", "hi")
    raw_reply = reply.ReplyPacket()
    assert response_ok(raw_reply, req.authenticator, SECRET)
    assert not response_ok(raw_reply, req.authenticator, b"other")
    assert raw_req  # request was encoded


@pytest.mark.parametrize(
    "data",
    [
        b"\x01\x01\x00\x14" + b"\0" * 15,  # short
        b"\x01\x01\x00\x13" + b"\0" * 16,  # Length < 20
        b"\x01\x01\x00\x30" + b"\0" * 16,  # Length > received
        b"\x01\x01\x00\x16" + b"\0" * 16 + b"\x01\x01",  # attribute length 1
        b"\x01\x01\x00\x17" + b"\0" * 16 + b"\x01\x05\x00",  # attribute past end
        b"\x01\x01\x00\x1a" + b"\0" * 16 + b"\x50\x06" + b"\0" * 4,  # short Message-Authenticator
        b"\x01" * 4097,
    ],
)
def test_malformed_framing_is_refused(data: bytes) -> None:
    with pytest.raises(MalformedPacket):
        parse_header(data)


def test_padding_beyond_length_is_ignored() -> None:
    raw = access_request(User_Name="alice").RequestPacket()
    header, packet = parse_header(raw + b"\0" * 10)
    assert packet == raw and header.length == len(raw)


@given(st.binary(max_size=300))
def test_parse_header_never_raises_anything_but_malformed(data: bytes) -> None:
    try:
        parse_header(data)
    except MalformedPacket:
        pass


def test_dedup_miss_in_progress_reply_expiry() -> None:
    cache = DedupCache(ttl=10, max_entries=100)
    key = ("10.0.0.1", 1000, 1, 5, b"a" * 16)
    assert cache.lookup(key, 0) is Verdict.MISS
    cache.begin(key, 0)
    assert cache.lookup(key, 1) is Verdict.IN_PROGRESS
    cache.finish(key, b"reply", 2)
    assert cache.lookup(key, 11) == b"reply"  # ttl counts from the reply
    assert cache.lookup(key, 12.01) is Verdict.MISS
    other = ("10.0.0.1", 1001, 1, 5, b"a" * 16)  # another source port: another request
    assert cache.lookup(other, 0) is Verdict.MISS


def test_dedup_abandon_lets_retry_through_and_begin_twice_fails() -> None:
    cache = DedupCache()
    key = ("10.0.0.1", 1000, 4, 5, b"b" * 16)
    cache.begin(key, 0)
    with pytest.raises(KeyError):
        cache.begin(key, 0)
    cache.abandon(key)
    assert cache.lookup(key, 0) is Verdict.MISS


def test_dedup_is_bounded() -> None:
    cache = DedupCache(ttl=1000, max_entries=3)
    keys = [("h", 1, 1, i, b"x" * 16) for i in range(5)]
    for k in keys:
        cache.begin(k, 0)
        cache.finish(k, b"r", 0)
    assert len(cache) == 3 and cache.evicted == 2
    assert cache.lookup(keys[0], 0) is Verdict.MISS
    assert cache.lookup(keys[4], 0) == b"r"


def test_auth_request_pap_and_chap_fields() -> None:
    pkt = access_request(User_Name="alice", NAS_Port_Id="ether1", Calling_Station_Id="aa:bb")
    pkt.AddAttribute("User-Password", pkt.PwCrypt("s3cret"))
    raw = pkt.RequestPacket()
    header, packet = parse_header(raw)
    rec = auth_request(packet, header.authenticator, SECRET, "10.0.0.1")
    assert rec["method"] == "pap" and rec["password"] == b"s3cret" and rec["login"] == "alice"
    assert rec["nas_port_id"] == "ether1" and rec["calling_station_id"] == "aa:bb"

    challenge = os.urandom(16)
    chap = access_request(User_Name="bob", CHAP_Challenge=challenge)
    chap.AddAttribute("CHAP-Password", b"\x09" + chap_response(9, b"pw", challenge))
    header, packet = parse_header(chap.RequestPacket())
    rec = auth_request(packet, header.authenticator, SECRET, "10.0.0.1")
    assert rec["method"] == "chap"
    assert chap_ok(bytes([rec["chap"]["id"]]) + rec["chap"]["response"], b"pw", rec["chap"]["challenge"])


def _raw_request(attrs: bytes) -> bytes:
    return bytes([1, 5]) + (20 + len(attrs)).to_bytes(2, "big") + b"a" * 16 + attrs


def test_a_user_name_no_login_can_be_and_a_short_chap_challenge_are_refused() -> None:
    pap = bytes([2, 18]) + b"p" * 16
    for name in (b"al\0ice", b"\xff\xfealice"):
        packet = _raw_request(bytes([1, len(name) + 2]) + name + pap)
        with pytest.raises(BadUserName):
            auth_request(packet, b"a" * 16, SECRET, "10.0.0.1")
    chap = bytes([3, 19, 9]) + b"r" * 16
    for challenge in (b"", b"abcd"):
        packet = _raw_request(b"\x01\x07alice" + chap + bytes([60, len(challenge) + 2]) + challenge)
        with pytest.raises(MalformedPacket, match="CHAP-Challenge"):
            auth_request(packet, b"a" * 16, SECRET, "10.0.0.1")
    packet = _raw_request(b"\x01\x07alice" + chap + bytes([60, 7]) + b"abcde")
    assert auth_request(packet, b"a" * 16, SECRET, "10.0.0.1")["chap"]["challenge"] == b"abcde"


def test_accounting_record_gigawords_and_event_time() -> None:
    pkt = AcctPacket(AccountingRequest, secret=SECRET, dict=DICT)
    for k, v in [
        ("Acct-Status-Type", "Interim-Update"),
        ("Acct-Session-Id", "s-1"),
        ("User-Name", "alice"),
        ("Framed-IP-Address", "10.1.2.3"),
        ("Acct-Input-Octets", 5),
        ("Acct-Input-Gigawords", 2),
        ("Acct-Output-Octets", 7),
        ("Acct-Session-Time", 600),
        ("Acct-Delay-Time", 3),
    ]:
        pkt.AddAttribute(k, v)
    header, packet = parse_header(pkt.RequestPacket())
    rec = accounting_record(packet, "10.0.0.1", now=1000.0)
    assert rec["status"] == "interim" and rec["session_id"] == "s-1"
    assert rec["input_octets"] == 2 * 2**32 + 5 and rec["output_octets"] == 7
    assert rec["framed_ip"] == "10.1.2.3" and rec["session_time"] == 600
    assert rec["event_time"] == 997.0


def test_accounting_record_needs_session_id() -> None:
    pkt = AcctPacket(AccountingRequest, secret=SECRET, dict=DICT)
    pkt.AddAttribute("Acct-Status-Type", "Start")
    _, packet = parse_header(pkt.RequestPacket())
    with pytest.raises(MalformedPacket):
        accounting_record(packet, "10.0.0.1", now=0)
    on = AcctPacket(AccountingRequest, secret=SECRET, dict=DICT)
    on.AddAttribute("Acct-Status-Type", "Accounting-On")
    _, packet = parse_header(on.RequestPacket())
    assert accounting_record(packet, "10.0.0.1", now=0)["status"] == "on"


def test_hmac_used_is_md5_over_zeroed_attribute() -> None:
    # independent computation of RFC 2869 s.5.14 for one known packet
    pkt = access_request(User_Name="x")
    raw = pkt.RequestPacket()
    header, packet = parse_header(raw)
    zeroed = packet[: header.ma_offset] + b"\0" * 16 + packet[header.ma_offset + 16 :]
    assert hmac.new(SECRET, zeroed, hashlib.md5).digest() == packet[header.ma_offset : header.ma_offset + 16]
    assert struct.unpack("!H", packet[2:4])[0] == len(packet)


def test_fast_reply_decodes_in_pyrad_and_proves_the_secret() -> None:
    from pyrad.packet import AccessAccept, Packet

    from radius.auth import parse_header as parse
    from radius.replies import BadAttribute, ReplyEncoder, finish_reply

    d = load_dictionary()
    enc = ReplyEncoder(d)
    req_auth = os.urandom(16)
    attrs, skipped = enc.attributes([
        ["Framed-IP-Address", "10.1.2.3"], ["Session-Timeout", 3600], ["Service-Type", "Framed-User"],
        ["Mikrotik-Rate-Limit", "10M/20M"], ["Cisco-AVPair", "ip:addr-pool=x"], ["Reply-Message", "hi"],
        ["No-Such-Attribute", 1], ["Session-Timeout", "soon"],
    ])
    assert [name for name, _ in skipped] == ["No-Such-Attribute", "Session-Timeout"]
    reply = finish_reply(AccessAccept, 7, req_auth, b"s3cret", attrs)
    # the Message-Authenticator comes first and proves the secret, like the response authenticator
    assert reply[20:22] == b"\x50\x12"
    header, packet = parse(reply)
    assert message_authenticator_ok(header, packet, b"s3cret", req_auth)
    assert not message_authenticator_ok(header, packet, b"other", req_auth)
    assert response_ok(reply, req_auth, b"s3cret") and not response_ok(reply, req_auth, b"other")
    pkt = Packet(dict=d, packet=reply, secret=b"s3cret")
    assert pkt.code == AccessAccept and pkt.id == 7
    assert pkt["Framed-IP-Address"] == ["10.1.2.3"] and pkt["Session-Timeout"] == [3600]
    assert pkt["Service-Type"] == ["Framed-User"] and pkt["Mikrotik-Rate-Limit"] == ["10M/20M"]
    assert pkt["Cisco-AVPair"] == ["ip:addr-pool=x"] and pkt["Reply-Message"] == ["hi"]
    # one attribute never takes more than its 253 octets
    with pytest.raises(BadAttribute):
        enc.attribute("Reply-Message", "x" * 300)
