"""MS-CHAPv2: the crypto against the RFCs' own vectors (RFC 2759 s.9.2,
RFC 3079 s.3.5), the core deciding batches of MS-CHAPv2 requests against a real
PostgreSQL, the decision's bytes over URFA's msgpack framing, and the radius
edge (the request's attributes in, Message-Authenticator rules, the MPPE keys
salt-encrypted out, decrypted here with pyrad's own RFC 2868 code)."""

from __future__ import annotations

import datetime as dt
import hmac
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from pyrad.packet import AccessAccept, AuthPacket

from billcore.radius import mschap
from billcore.radius.accounting import apply_accounting
from billcore.radius.authorize import authorize_many
from billcore.radius.nas import add_link, add_nas
from billcore.radius.records import Decision as CoreDecision
from billcore.radius.records import Refusal, read_access_request, read_accounting_record
from billcore.radius.secrets import SecretStore
from radius.auth import MalformedPacket, parse_header, response_ok
from radius.replies import ReplyEncoder, mppe_decrypt_key, mppe_encrypt_key
from radius.requests import auth_request
from radius.server import Decision, Nas, NasTable, RadiusServer, load_dictionary
from tests.test_radius_server import exchange
from urfa.framing import FrameDecoder, FrameEncoder

USER = b"User"
PASSWORD = b"clientPass"
AUTH_CHALLENGE = bytes.fromhex("5B5D7C7D7B3F2F3E3C2C602132262628")
PEER_CHALLENGE = bytes.fromhex("21402324255E262A28295F2B3A337C7E")
CHALLENGE = bytes.fromhex("D02E4386BCE91226")
PASSWORD_HASH = bytes.fromhex("44EBBA8D5312B8D611474411F56989AE")
NT_RESPONSE = bytes.fromhex("82309ECD8D708B5EA08FAA3981CD83544233114A3D85D6DF")
PASSWORD_HASH_HASH = bytes.fromhex("41C00C584BD2D91C4017A2A12FA59F3F")
AUTHENTICATOR_RESPONSE = b"S=407A5589115FD0D6209F510FE9C04566932CDA56"
MASTER_KEY = bytes.fromhex("FDECE3717A8C838CB388E527AE3CDD31")
SEND_START_KEY_128 = bytes.fromhex("8B7CDC149B993A1BA118CB153F56DCCB")


def test_rfc2759_vectors() -> None:
    assert mschap.challenge_hash(PEER_CHALLENGE, AUTH_CHALLENGE, USER) == CHALLENGE
    assert mschap.nt_password_hash(PASSWORD) == PASSWORD_HASH
    assert mschap.challenge_response(CHALLENGE, PASSWORD_HASH) == NT_RESPONSE
    assert mschap.generate_nt_response(AUTH_CHALLENGE, PEER_CHALLENGE, USER, PASSWORD) == NT_RESPONSE
    assert mschap.hash_nt_password_hash(PASSWORD_HASH) == PASSWORD_HASH_HASH
    assert mschap.generate_authenticator_response(PASSWORD, NT_RESPONSE, PEER_CHALLENGE, AUTH_CHALLENGE,
                                                  USER) == AUTHENTICATOR_RESPONSE


def test_rfc3079_master_and_start_keys() -> None:
    master = mschap.master_key(PASSWORD_HASH_HASH, NT_RESPONSE)
    assert master == MASTER_KEY
    # RFC 3079 s.3.5.3 lists the server's send key (the client's receive key)
    assert mschap.asymmetric_start_key(master, 16, is_send=True, is_server=True) == SEND_START_KEY_128
    assert mschap.asymmetric_start_key(master, 16, is_send=False, is_server=False) == SEND_START_KEY_128
    send, recv = mschap.server_mppe_keys(PASSWORD, NT_RESPONSE)
    assert send == SEND_START_KEY_128
    # the server receives what the client sends
    assert recv == mschap.asymmetric_start_key(master, 16, is_send=True, is_server=False) != send
    assert len(recv) == 16
    # the 40/56-bit keys are the first 8 octets of the same derivation
    assert mschap.asymmetric_start_key(master, 8, True, True) == SEND_START_KEY_128[:8]


def test_check_nt_response_and_parse() -> None:
    wire = bytes([7, 0]) + PEER_CHALLENGE + b"\x00" * 8 + NT_RESPONSE
    response = mschap.parse_response(wire)
    assert (response.ident, response.flags, response.peer_challenge, response.nt_response) == (
        7, 0, PEER_CHALLENGE, NT_RESPONSE)
    assert mschap.check_nt_response(AUTH_CHALLENGE, response, USER, PASSWORD)
    assert not mschap.check_nt_response(AUTH_CHALLENGE, response, USER, b"clientPasS")
    assert not mschap.check_nt_response(bytes(16), response, USER, PASSWORD)
    # a Windows domain does not enter the challenge hash (RFC 2759 s.8.2)
    assert mschap.check_nt_response(AUTH_CHALLENGE, response, b"CORP\\User", PASSWORD)
    with pytest.raises(ValueError):
        mschap.parse_response(wire[:49])



# -- the core: a batch of MS-CHAPv2 requests against a real PostgreSQL ---------------

T0 = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.timezone.utc)
NAS = "10.0.0.1"
ERROR = re.compile(rb"^(.)E=(\d+) R=0 C=([0-9A-F]{32}) V=3 M=(.+)$", re.DOTALL)


@pytest.fixture
def store(tmp_path: Path) -> SecretStore:
    return SecretStore(SecretStore.load_or_create_key(tmp_path / "secret.key"))


def client_response(login: str, password: str, ident: int, challenge: bytes | None = None,
                    peer: bytes | None = None) -> tuple[bytes, bytes]:
    """What a peer sends (RFC 2759 client side): (MS-CHAP-Challenge, MS-CHAP2-Response)."""
    challenge = os.urandom(16) if challenge is None else challenge
    peer = os.urandom(16) if peer is None else peer
    nt = mschap.generate_nt_response(challenge, peer, login.encode(), password.encode())
    return challenge, bytes([ident, 0]) + peer + bytes(8) + nt


def request_map(login: str, challenge: bytes, response: bytes) -> dict[str, Any]:
    return {"nas": NAS, "login": login, "method": "mschapv2", "mschap_challenge": challenge,
            "mschap_response": response}


async def make_account(conn: asyncpg.Connection, login: str, balance: int = 0) -> int:
    uid = await conn.fetchval(
        "INSERT INTO users(login, scram_salt, scram_iterations, scram_stored_key, scram_server_key)"
        " VALUES ($1, '\\x00', 4096, '\\x00', '\\x00') RETURNING id", login)
    return int(await conn.fetchval("INSERT INTO accounts(user_id, balance) VALUES ($1, $2) RETURNING id",
                                   uid, balance))


def mschap_error(decision: CoreDecision | Decision) -> tuple[int, int, str]:
    """(ident, code, message) of a rejection's MS-CHAP-Error."""
    value = next(v for k, v in decision.reply if k == "MS-CHAP-Error")
    assert isinstance(value, bytes)
    match = ERROR.match(value)
    assert match is not None, value
    return match.group(1)[0], int(match.group(2)), match.group(4).decode()


def urfa_round_trip(maps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Maps through URFA's own frame encoder and decoder (msgpack, bin type)."""
    decoder = FrameDecoder()
    decoder.feed(FrameEncoder().encode({"t": "result", "id": 1, "v": maps}))
    message = decoder.next_message()
    assert message is not None
    out: list[dict[str, Any]] = message["v"]
    return out


async def test_a_batch_of_mschapv2_requests_is_decided_in_order(pool: asyncpg.Pool, store: SecretStore) -> None:
    async with pool.acquire() as conn:
        await add_nas(conn, store, name="nas", address=NAS, secret="x")
        # the RFC's own subscriber: the reply must be the RFC's authenticator response and keys
        await add_link(conn, store, account_id=await make_account(conn, "rfc", 1000), login="User",
                       password="clientPass", static_ip="10.5.0.1", rate_limit="5M/5M")
        for i in range(12):
            await add_link(conn, store, account_id=await make_account(conn, f"u{i}", 1000), login=f"sub{i}",
                           password=f"pässword-{i}")
        blocked = await make_account(conn, "blocked", 1000)
        await add_link(conn, store, account_id=blocked, login="blocked", password="pw")
        await conn.execute("INSERT INTO blocks(account_id, kind, set_at, set_by) VALUES ($1, 'admin', now(), 't')",
                           blocked)
        await add_link(conn, store, account_id=await make_account(conn, "busy", 1000), login="busy", password="pw")
        async with conn.transaction():
            await apply_accounting(conn, read_accounting_record(
                {"nas": NAS, "status": "start", "session_id": "S1", "login": "busy",
                 "event_time": T0.timestamp()}), T0)

        raws: list[dict[str, Any]] = [request_map("User", *client_response(
            "User", "clientPass", 7, AUTH_CHALLENGE, PEER_CHALLENGE))]
        good = {}
        for i in range(12):
            challenge, response = client_response(f"sub{i}", f"pässword-{i}", i)
            good[len(raws)] = (f"sub{i}", f"pässword-{i}", challenge, response)
            raws.append(request_map(f"sub{i}", challenge, response))
        wrong = len(raws)
        raws.append(request_map("sub3", *client_response("sub3", "not-it", 99)))
        unknown = len(raws)
        raws.append(request_map("nobody", *client_response("nobody", "pw", 98)))
        blocked_at = len(raws)
        raws.append(request_map("blocked", *client_response("blocked", "pw", 97)))
        busy_at = len(raws)
        raws.append(request_map("busy", *client_response("busy", "pw", 96)))
        short = len(raws)
        challenge, response = client_response("sub1", "pässword-1", 5)
        raws.append(request_map("sub1", challenge, response[:49]))
        no_challenge = len(raws)
        raws.append({"nas": NAS, "login": "sub1", "method": "mschapv2", "mschap_response": response})
        # the other side of the batch: a PAP request is untouched by MS-CHAP
        pap_at = len(raws)
        raws.append({"nas": NAS, "login": "sub2", "method": "pap", "password": "pässword-2".encode()})

        async with conn.transaction():
            decisions = await authorize_many(conn, store, [read_access_request(raw) for raw in raws], T0)
    assert len(decisions) == len(raws)

    rfc = decisions[0]
    assert rfc.accept and rfc.attribute("Framed-IP-Address") == "10.5.0.1"
    assert rfc.attribute("Mikrotik-Rate-Limit") == "5M/5M"
    assert rfc.attribute("MS-CHAP2-Success") == b"\x07" + AUTHENTICATOR_RESPONSE
    assert rfc.attribute("MS-MPPE-Send-Key") == SEND_START_KEY_128
    assert rfc.attribute("MS-MPPE-Encryption-Policy") == 1 and rfc.attribute("MS-MPPE-Encryption-Types") == 6
    for at, (login, password, challenge, response) in good.items():
        decision = decisions[at]
        assert decision.accept, (login, decision)
        nt, peer = response[26:], response[2:18]
        assert decision.attribute("MS-CHAP2-Success") == bytes([response[0]]) + (
            mschap.generate_authenticator_response(password.encode(), nt, peer, challenge, login.encode()))
        assert (decision.attribute("MS-MPPE-Send-Key"), decision.attribute("MS-MPPE-Recv-Key")) == (
            mschap.server_mppe_keys(password.encode(), nt))

    for at, ident, code, reason in ((wrong, 99, 691, Refusal.WRONG_PASSWORD),
                                    (unknown, 98, 691, Refusal.WRONG_PASSWORD),
                                    (blocked_at, 97, 647, Refusal.BLOCKED),
                                    (busy_at, 96, 649, Refusal.TOO_MANY_SESSIONS)):
        decision = decisions[at]
        assert not decision.accept and decision.reason is reason
        assert mschap_error(decision) == (ident, code, reason.value)
        assert decision.attribute("MS-CHAP2-Success") is None and decision.attribute("MS-MPPE-Send-Key") is None
    # each rejection offers a fresh challenge
    assert len({ERROR.match(d.attribute("MS-CHAP-Error")).group(3)  # type: ignore[arg-type, union-attr]
                for d in (decisions[wrong], decisions[unknown])}) == 2
    for at in (short, no_challenge):
        assert decisions[at].reason is Refusal.MALFORMED_MSCHAP
        assert decisions[at].attribute("Reply-Message") == "malformed MS-CHAP"
    assert decisions[pap_at].accept and decisions[pap_at].attribute("MS-CHAP2-Success") is None

    # the decisions' bytes survive URFA's msgpack framing as bytes
    wired = urfa_round_trip([decision.wire() for decision in decisions])
    assert wired == [decision.wire() for decision in decisions]
    edge = Decision.from_wire(wired[0])
    assert edge.accept and ["MS-MPPE-Send-Key", SEND_START_KEY_128] in edge.reply
    assert isinstance({k: v for k, v in wired[wrong]["reply"]}["MS-CHAP-Error"], bytes)


async def test_malformed_mschap_maps_are_refused_not_internal() -> None:
    challenge, response = client_response("a", "b", 1)
    for raw in ({"mschap_challenge": challenge[:15], "mschap_response": response},
                {"mschap_challenge": challenge, "mschap_response": response + b"x"},
                {"mschap_challenge": "text", "mschap_response": response},
                {"mschap_challenge": challenge, "mschap_response": None}, {}):
        request = read_access_request({"nas": NAS, "login": "a", "method": "mschapv2", **raw})
        assert getattr(request, "refusal", None) is Refusal.MALFORMED_MSCHAP, raw


# -- the radius edge: request attributes in, MPPE keys encrypted out ----------------

SECRET = b"mschap-secret"
MICROSOFT = 311


def vsa(vtype: int, value: bytes) -> bytes:
    return bytes((26, len(value) + 8)) + struct.pack("!I", MICROSOFT) + bytes((vtype, len(value) + 2)) + value


def access_request(login: str, challenge: bytes, response: bytes, secret: bytes = SECRET, ma: bool = True,
                   ident: int = 1) -> bytes:
    """A raw MS-CHAPv2 Access-Request as a NAS builds it (Message-Authenticator first)."""
    attrs = bytes((1, len(login) + 2)) + login.encode() + vsa(11, challenge) + vsa(25, response)
    if ma:
        attrs = b"\x50\x12" + bytes(16) + attrs
    packet = struct.pack("!BBH", 1, ident, 20 + len(attrs)) + os.urandom(16) + attrs
    if ma:
        packet = packet[:22] + hmac.digest(secret, packet, "md5") + packet[38:]
    return packet


def reply_attributes(reply: bytes) -> list[tuple[int, int, bytes]]:
    """(code, Microsoft vendor type or 0, value) of each attribute of a reply."""
    out, pos = [], 20
    while pos < len(reply):
        code, length = reply[pos], reply[pos + 1]
        value = reply[pos + 2:pos + length]
        if code == 26 and value[:4] == struct.pack("!I", MICROSOFT):
            out.append((code, value[4], value[6:]))
        else:
            out.append((code, 0, value))
        pos += length
    return out


def salt_decrypt(value: bytes, secret: bytes, request_auth: bytes) -> bytes:
    """pyrad's own RFC 2868 s.3.5 salt decryption (the same scheme as RFC 2548 s.2.4.2)."""
    packet = AuthPacket(code=AccessAccept, secret=secret, dict=load_dictionary())
    packet.request_authenticator = request_auth
    return bytes(packet.SaltDecrypt(value))


@dataclass
class MschapDecider:
    """Decides like the core (the RFC subscriber "User"/"clientPass" only), from
    the request map the edge built."""

    seen: list[dict[str, Any]] = field(default_factory=list)

    async def authorize(self, nas: Nas, request: dict[str, Any]) -> Decision:
        self.seen.append(request)
        parsed = read_access_request(request)
        if getattr(parsed, "refusal", None) is not None:
            return Decision(False, (("Reply-Message", "malformed MS-CHAP"),))
        response = mschap.parse_response(request["mschap_response"])
        if not mschap.check_nt_response(request["mschap_challenge"], response, request["login"].encode(),
                                        PASSWORD):
            return Decision(False, (("Reply-Message", "wrong login or password"),
                                    ("MS-CHAP-Error", bytes([response.ident]) + b"E=691 R=0 C=" + b"A" * 32
                                     + b" V=3 M=wrong login or password")))
        send, recv = mschap.server_mppe_keys(PASSWORD, response.nt_response)
        proof = mschap.generate_authenticator_response(PASSWORD, response.nt_response, response.peer_challenge,
                                                       request["mschap_challenge"], b"User")
        return Decision(True, (("Framed-IP-Address", "10.9.0.7"), ("MS-CHAP2-Success", bytes([response.ident]) + proof),
                               ("MS-MPPE-Send-Key", send), ("MS-MPPE-Recv-Key", recv),
                               ("MS-MPPE-Encryption-Policy", 1), ("MS-MPPE-Encryption-Types", 6)))

    async def account(self, nas: Nas, record: dict[str, Any]) -> None:
        raise AssertionError("no accounting here")


def dropped(reason: str) -> float:
    return REGISTRY.get_sample_value("billcore_radius_dropped_total", {"reason": reason}) or 0.0


async def test_edge_parses_mschap_and_encrypts_the_keys() -> None:
    rfc_response = bytes([7, 0]) + PEER_CHALLENGE + bytes(8) + NT_RESPONSE
    packet = access_request("User", AUTH_CHALLENGE, rfc_response)
    rec = auth_request(packet, packet[4:20], SECRET, "127.0.0.1")
    assert rec["method"] == "mschapv2" and rec["login"] == "User"
    assert rec["mschap_challenge"] == AUTH_CHALLENGE and rec["mschap_response"] == rfc_response

    decider = MschapDecider()
    server = RadiusServer(decider=decider, nas_table=NasTable([Nas("127.0.0.1", SECRET,
                                                                   require_message_authenticator=True)]))
    auth_port, _ = await server.listen("127.0.0.1", 0, 0)
    try:
        # the Message-Authenticator rules hold for MS-CHAPv2 as for PAP: required here,
        # and a wrong secret is dropped before any decision
        before = dropped("missing_message_authenticator")
        assert await exchange(auth_port, [access_request("User", AUTH_CHALLENGE, rfc_response, ma=False)], expect=0,
                              until=lambda: dropped("missing_message_authenticator") == before + 1) == []
        before = dropped("bad_message_authenticator")
        assert await exchange(auth_port, [access_request("User", AUTH_CHALLENGE, rfc_response, secret=b"bad")],
                              expect=0, until=lambda: dropped("bad_message_authenticator") == before + 1) == []
        assert decider.seen == []

        [reply] = await exchange(auth_port, [packet], expect=1)
        assert reply[0] == AccessAccept and response_ok(reply, packet[4:20], SECRET)
        attrs = reply_attributes(reply)
        assert attrs[0][0] == 80   # Message-Authenticator first
        ms = {vtype: value for code, vtype, value in attrs if code == 26}
        assert ms[26] == b"\x07" + AUTHENTICATOR_RESPONSE
        assert ms[7] == struct.pack("!I", 1) and ms[8] == struct.pack("!I", 6)
        send_value, recv_value = ms[16], ms[17]
        # salt: high bit set, unique in the packet; the key is never on the wire in clear
        assert len(send_value) == 34 and send_value[0] & 0x80 and recv_value[0] & 0x80
        assert send_value[:2] != recv_value[:2] and SEND_START_KEY_128 not in reply
        send, recv = mschap.server_mppe_keys(PASSWORD, NT_RESPONSE)
        assert salt_decrypt(send_value, SECRET, packet[4:20]) == SEND_START_KEY_128 == send
        assert salt_decrypt(recv_value, SECRET, packet[4:20]) == recv

        # wrong password: Access-Reject with the MS-CHAP-Error the core chose
        bad_challenge, bad_response = client_response("User", "wrong", 9)
        bad = access_request("User", bad_challenge, bad_response)
        [reject] = await exchange(auth_port, [bad], expect=1)
        assert reject[0] == 3 and response_ok(reject, bad[4:20], SECRET)
        errors = [value for code, vtype, value in reply_attributes(reject) if code == 26 and vtype == 2]
        assert len(errors) == 1 and errors[0].startswith(b"\x09E=691 R=0 C=")

        # a malformed MS-CHAP2-Response reaches the decider (and is refused there), never dropped
        [malformed] = await exchange(auth_port, [access_request("User", AUTH_CHALLENGE, rfc_response[:40])], expect=1)
        assert malformed[0] == 3 and b"malformed MS-CHAP" in malformed
    finally:
        await server.close()


@given(st.binary(max_size=60), st.binary(min_size=0, max_size=40))
def test_microsoft_attributes_decode_or_are_malformed(inner: bytes, tail: bytes) -> None:
    """Any bytes in a vendor-311 attribute: a record, or MalformedPacket — nothing else."""
    value = struct.pack("!I", MICROSOFT) + inner
    packet = struct.pack("!BBH", 1, 1, 0) + bytes(16) + bytes((26, len(value) + 2)) + value + tail
    packet = packet[:2] + struct.pack("!H", len(packet)) + packet[4:]
    try:
        _, checked = parse_header(packet)
        rec = auth_request(checked, checked[4:20], SECRET, "127.0.0.1")
    except MalformedPacket:
        return
    assert rec["method"] in ("mschapv2", "none", "pap", "chap")
    if rec["method"] == "mschapv2":
        assert isinstance(rec["mschap_response"], bytes)


def test_broken_microsoft_framing_is_malformed_and_a_foreign_vendor_is_ignored() -> None:
    for inner in (b"\x19", b"\x19\x01", b"\x19\x40abc", bytes((11, 18)) + bytes(16) + b"\x19\x00"):
        value = struct.pack("!I", MICROSOFT) + inner
        packet = struct.pack("!BBH", 1, 1, 22 + len(value)) + bytes(16) + bytes((26, len(value) + 2)) + value
        with pytest.raises(MalformedPacket):
            auth_request(packet, bytes(16), SECRET, "127.0.0.1")
    # MS-CHAP2-Response numbered under another vendor is not MS-CHAPv2
    value = struct.pack("!I", 9) + bytes((25, 52)) + bytes(50)
    packet = struct.pack("!BBH", 1, 1, 22 + len(value)) + bytes(16) + bytes((26, len(value) + 2)) + value
    assert auth_request(packet, bytes(16), SECRET, "127.0.0.1")["method"] == "none"


def test_mppe_keys_are_never_sent_in_clear_and_round_trip() -> None:
    encoder = ReplyEncoder(load_dictionary())
    pairs = [("MS-MPPE-Send-Key", SEND_START_KEY_128), ("Session-Timeout", 60)]
    attrs, skipped = encoder.attributes(pairs)   # no secret: the key is left out
    assert [name for name, _ in skipped] == ["MS-MPPE-Send-Key"] and SEND_START_KEY_128 not in attrs
    request_auth = os.urandom(16)
    one, _ = encoder.attributes(pairs, SECRET, request_auth)
    two, _ = encoder.attributes(pairs, SECRET, request_auth)
    assert one != two   # a fresh salt each reply: encrypted keys are not cached
    for key in (b"k", bytes(15), bytes(16), bytes(31)):
        value = mppe_encrypt_key(key, SECRET, request_auth, b"\x80\x01")
        assert len(value) == 2 + 16 * -(-(len(key) + 1) // 16)
        assert mppe_decrypt_key(value, SECRET, request_auth) == key == salt_decrypt(value, SECRET, request_auth)
    with pytest.raises(ValueError):
        mppe_encrypt_key(bytes(16), SECRET, request_auth, b"\x00\x01")   # the salt's high bit is required
    _, skipped = encoder.attributes([("MS-CHAP2-Success", "text"), ("MS-MPPE-Encryption-Types", -1)])
    assert len(skipped) == 2
