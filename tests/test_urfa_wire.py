"""Pure protocol tests: frames, messages, SCRAM vectors, the state machine
driven by two sans-IO endpoints joined in memory, and a decoder fuzz."""

from __future__ import annotations

import base64
import tracemalloc
from datetime import datetime, timezone

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from urfa import errors as E
from urfa import scram
from urfa.connection import Closed, Connection, Role, State, TRANSITIONS
from urfa.errors import LocalProtocolError, RemoteProtocolError
from urfa.framing import FrameDecoder, FrameEncoder
from urfa.server import ConnectionCounter, address_key
from urfa.messages import (
    Bye, Call, Cancel, Challenge, Chunk, Error, Event, Hello, Login, Otp, OtpCode, Ping, Pong, Proof,
    Result, Resume, Welcome, parse, to_wire,
)

# -- the worked test vector of docs/protocol.md §6 -------------------------
PASSWORD = "correct horse battery"
SALT = bytes(range(16))
CNONCE = bytes(range(16, 32))
SNONCE = bytes(range(32, 48))
VECTOR = {
    "SaltedPassword": "25ec2e843d040853eb91d6ee9a96d626c48de1b5cb7eb4c549e71a3c990cb674",
    "ClientKey": "d927e25e86d51a12afe5c405f5e5a86514a94ecf78f96c452c523c81a3b0a396",
    "StoredKey": "0d2391706e1d354c401d3128e412f6d32992a0b82df02f232d9d3d4be5545653",
    "ServerKey": "f612eb7e77fbcef0ad0c1f5dae455790c814b1de2fa477e0e584090eb6da677d",
    "ClientProof": "d48e367856be5fcf1bc4b9318a39ce6ec723e6cfac26b6ec28c45e7352492d46",
    "ServerSignature": "e39a87a01547f4fba664e4fae6a43391ea058b05e28c173264fb86668021bfcf",
    "ResumeKey": "ef1c1d7a06cf45f35f1524bd04162eb4e6cf3e800a1b61175ce0e76c3cda3a78",
    "ResumeProof": "40fd12f072c4d8fcb22a695b7651132ddceae52c70c6734381d496b4facf54e6",
    "ResumeSignature": "625275811d541737fedf3fc0f2a270ac101766009f8a8fd2912c12f6715cc182",
}
AUTH_MESSAGE = (
    "n=admin:alice,r=EBESExQVFhcYGRobHB0eHw==,"
    "r=EBESExQVFhcYGRobHB0eHw==ICEiIyQlJicoKSorLC0uLw==,s=AAECAwQFBgcICQoLDA0ODw==,i=4096,"
    "c=biws,r=EBESExQVFhcYGRobHB0eHw==ICEiIyQlJicoKSorLC0uLw=="
)
PING_FRAME = "0000001e84a174a463616c6ca2696401a2666ea87379732e70696e67a46172677380"


def test_worked_vector_matches_protocol_doc() -> None:
    am = scram.auth_message("admin", "alice", CNONCE, SNONCE, SALT, 4096)
    assert am.decode() == AUTH_MESSAGE
    keys = scram.client_keys(PASSWORD, SALT, 4096)
    sid, snonce2, cnonce2 = bytes(range(48, 64)), bytes(range(64, 80)), bytes(range(80, 96))
    rkey = scram.resume_key(keys.client_key, am)
    got = {
        "SaltedPassword": scram.salted_password(PASSWORD, SALT, 4096).hex(),
        "ClientKey": keys.client_key.hex(),
        "StoredKey": keys.stored_key.hex(),
        "ServerKey": keys.server_key.hex(),
        "ClientProof": scram.client_proof(keys, am).hex(),
        "ServerSignature": scram.server_signature(keys.server_key, am).hex(),
        "ResumeKey": rkey.hex(),
        "ResumeProof": scram.resume_proof(rkey, snonce2, cnonce2, sid).hex(),
        "ResumeSignature": scram.resume_signature(rkey, snonce2, cnonce2, sid).hex(),
    }
    assert got == VECTOR
    verifier = scram.make_verifier(PASSWORD, SALT, 4096)
    assert scram.recover_client_key(verifier, am, bytes.fromhex(VECTOR["ClientProof"])) == keys.client_key
    assert FrameEncoder().encode(to_wire(Call(1, "sys.ping", {}))).hex() == PING_FRAME


def test_rfc7677_scram_sha256_vector() -> None:
    salt = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
    keys = scram.client_keys("pencil", salt, 4096)
    am = scram.auth_message_text(
        "user", "rOprNGfwEbeRWgbNEkqO", "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0", salt, 4096)
    assert base64.b64encode(scram.client_proof(keys, am)) == b"dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    assert base64.b64encode(scram.server_signature(keys.server_key, am)) == \
        b"6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def test_verifier_text_round_trip_and_wrong_proof() -> None:
    v = scram.make_verifier("pw", iterations=4096)
    assert scram.Verifier.from_text(v.to_text()) == v
    assert len(v.salt) == 16 and v.iterations == 4096
    am = scram.auth_message("user", "bob", CNONCE, SNONCE, v.salt, v.iterations)
    wrong = scram.client_keys("not-pw", v.salt, v.iterations)
    assert scram.recover_client_key(v, am, scram.client_proof(wrong, am)) is None
    assert scram.recover_client_key(v, am, b"short") is None
    with pytest.raises(ValueError):
        scram.Verifier.from_text("md5$abc")


def test_fake_verifier_is_stable_per_login_and_secret() -> None:
    a = scram.fake_verifier(b"s" * 32, "admin:ghost", 4096)
    assert a == scram.fake_verifier(b"s" * 32, "admin:ghost", 4096)
    assert a.salt != scram.fake_verifier(b"s" * 32, "admin:ghost2", 4096).salt
    assert a.salt != scram.fake_verifier(b"t" * 32, "admin:ghost", 4096).salt


def test_saslname_escaping_binds_kind() -> None:
    assert scram.scram_username("user", "a,b=c") == "user:a=2Cb=3Dc"


# -- frames ---------------------------------------------------------------
def test_frames_split_anywhere_decode_the_same() -> None:
    enc = FrameEncoder()
    when = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)
    msgs = [{"t": "result", "id": i, "value": {"money": 10**15 + i, "when": when, "ip": "10.0.0.1"}} for i in range(5)]
    data = b"".join(enc.encode(m) for m in msgs)
    for step in (1, 3, 7, len(data)):
        dec = FrameDecoder()
        out = []
        for i in range(0, len(data), step):
            dec.feed(data[i:i + step])
            while (m := dec.next_message()) is not None:
                out.append(m)
        assert out == msgs
    assert out[0]["value"]["when"].tzinfo is not None


def test_oversize_frame_is_refused_before_its_body_arrives() -> None:
    dec = FrameDecoder(max_frame=1024)
    dec.feed((1025).to_bytes(4, "big"))
    with pytest.raises(RemoteProtocolError) as exc:
        dec.next_message()
    assert exc.value.code == E.FRAME_TOO_LARGE
    with pytest.raises(RemoteProtocolError):
        dec.feed(b"more")


@pytest.mark.parametrize("body", [
    b"\xc1",                                  # never-used msgpack byte
    msgpack.packb([1, 2, 3]),                 # not a map
    msgpack.packb({"t": "call"}) + b"\x00",   # trailing bytes inside the frame
    msgpack.packb({1: 2}),                    # non-string key
    b"\xd4\x05\x00",                          # unknown extension type
    b"",                                      # empty frame
])
def test_garbage_frames_raise_remote_protocol_error(body: bytes) -> None:
    dec = FrameDecoder()
    dec.feed(len(body).to_bytes(4, "big") + body)
    with pytest.raises(RemoteProtocolError):
        dec.next_message()


def test_naive_datetime_cannot_be_sent() -> None:
    with pytest.raises(LocalProtocolError):
        FrameEncoder().encode({"t": "result", "id": 1, "value": datetime(2024, 1, 1)})


def test_every_message_round_trips_and_unknown_keys_are_ignored() -> None:
    n16, m32 = b"n" * 16, b"m" * 32
    for msg in [
        Hello(n16), Login("admin", "a", n16), Challenge(b"s" * 16, 4096), Proof(m32),
        Resume(n16, n16, m32), Welcome(n16, m32, "system", "x", 1800), Call(7, "f", {"a": 1}),
        Call(8, "g", {}, n16, "10.1.1.1"), Cancel(7), Ping(1), Pong(1), Result(7, [1]),
        Chunk(7, b"x"), Error(7, "busy", "m"), Event("topic", {"a": 1}, 3), Bye("timeout", "slow"),
        Otp(m32), OtpCode("123456"),
    ]:
        wire = to_wire(msg)
        assert parse({**wire, "future_key": [1, 2]}) == msg


@pytest.mark.parametrize("wire", [
    {"t": "nope"}, {"t": "call", "id": -1, "fn": "x"}, {"t": "call", "id": 1, "fn": "x", "args": []},
    {"t": "call", "id": 1, "fn": "x" * 300}, {"t": "proof", "proof": b"short"}, {"t": "call", "id": True, "fn": "x"},
    {"t": "login", "kind": "admin", "login": "a", "cnonce": b"x" * 16, "proto": "1"},
    {"t": "login", "kind": "user", "login": "al\0ice", "cnonce": b"x" * 16, "proto": 1},   # no database text
    {"t": "login", "kind": "user", "login": "a" * 257, "cnonce": b"x" * 16, "proto": 1},
    {"t": "otp", "sig": b"short"}, {"t": "otp_code", "code": 123456}, {"t": "otp_code", "code": "1" * 65},
])
def test_malformed_messages_are_refused(wire: dict) -> None:
    with pytest.raises(RemoteProtocolError):
        parse(wire)


def test_connections_are_counted_per_address_and_ipv6_per_64() -> None:
    assert address_key("192.0.2.7") == "192.0.2.7"
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert address_key("fe80::1%eth0") == "fe80::/64"
    counter = ConnectionCounter(2)
    assert counter.take("a") and counter.take("a") and not counter.take("a") and counter.take("b")
    counter.give_back("a")
    assert counter.take("a") and not counter.take("a")
    for _ in range(3):
        counter.give_back("a")
        counter.give_back("b")
    assert len(counter) == 0                        # only addresses with a connection open are kept
    assert all(ConnectionCounter(0).take("a") for _ in range(1000))   # 0: no cap


# -- the state machine, two endpoints joined in memory --------------------
class Pair:
    """A client and a server Connection with a perfect in-memory link."""

    def __init__(self, now: float = 0.0, **kw: object) -> None:
        self.client = Connection(Role.CLIENT, now, **kw)  # type: ignore[arg-type]
        self.server = Connection(Role.SERVER, now, **kw)  # type: ignore[arg-type]

    def send(self, sender: Connection, msg: object) -> list[object]:
        sender.send(msg)  # type: ignore[arg-type]
        return self.pump(sender)

    def pump(self, sender: Connection) -> list[object]:
        peer = self.server if sender is self.client else self.client
        peer.receive_data(sender.data_to_send())
        out = []
        while (ev := peer.next_event()) is not None:
            out.append(ev)
        return out


def login_pair(password: str = PASSWORD) -> tuple[Pair, bytes | None]:
    """Run a whole SCRAM login over the sans-IO pair; returns the client's view."""
    verifier = scram.make_verifier(PASSWORD, SALT, 4096)
    pair = Pair()
    assert pair.send(pair.server, Hello(SNONCE)) == [Hello(SNONCE)]
    [login] = pair.send(pair.client, Login("admin", "alice", CNONCE))
    assert isinstance(login, Login) and pair.server.state is State.CHALLENGE
    [ch] = pair.send(pair.server, Challenge(verifier.salt, verifier.iterations))
    am = scram.auth_message("admin", "alice", CNONCE, SNONCE, ch.salt, ch.iterations)  # type: ignore[attr-defined]
    keys = scram.client_keys(password, ch.salt, ch.iterations)  # type: ignore[attr-defined]
    [proof] = pair.send(pair.client, Proof(scram.client_proof(keys, am)))
    ck = scram.recover_client_key(verifier, am, proof.proof)  # type: ignore[attr-defined]
    if ck is None:
        [bye] = pair.send(pair.server, Bye(E.AUTH_FAILED, "login failed"))
        assert pair.client.state is State.CLOSED and bye == Bye(E.AUTH_FAILED, "login failed")
        return pair, None
    [w] = pair.send(pair.server, Welcome(b"S" * 16, scram.server_signature(verifier.server_key, am), "admin", "alice", 60))
    assert w.signature == scram.server_signature(keys.server_key, am)  # type: ignore[attr-defined]
    return pair, ck


def test_in_memory_login_then_calls_out_of_order() -> None:
    pair, ck = login_pair()
    assert ck is not None and pair.client.state is pair.server.state is State.OPEN
    assert pair.client.deadline is None
    got = pair.send(pair.client, Call(1, "a", {})) + pair.send(pair.client, Call(2, "b", {}))
    assert [c.id for c in got] == [1, 2] and pair.server.inflight == {1, 2}  # type: ignore[attr-defined]
    assert pair.send(pair.server, Result(2, "two")) == [Result(2, "two")]
    assert pair.send(pair.server, Chunk(1, "part")) + pair.send(pair.server, Result(1, "one")) == \
        [Chunk(1, "part"), Result(1, "one")]
    assert pair.server.inflight == set()


def test_in_memory_wrong_password_ends_in_bye() -> None:
    pair, ck = login_pair("wrong")
    assert ck is None and pair.server.state is State.CLOSED


def test_illegal_sends_raise_local_and_receives_raise_remote() -> None:
    pair = Pair()
    with pytest.raises(LocalProtocolError):
        pair.client.send(Call(1, "sys.ping", {}))     # not logged in
    with pytest.raises(LocalProtocolError):
        pair.server.send(Result(1, None))
    pair.send(pair.server, Hello(SNONCE))
    # A client that skips login and calls at once: the server's machine refuses.
    rogue = FrameEncoder().encode(to_wire(Call(1, "sys.ping", {})))
    pair.server.receive_data(rogue)
    with pytest.raises(RemoteProtocolError):
        pair.server.next_event()
    assert pair.server.state is State.ERROR
    pair.server.fail(RemoteProtocolError("call before login"))
    [bye] = pair.pump(pair.server)
    assert bye == Bye(E.PROTOCOL, "call before login") and pair.client.state is State.CLOSED


def test_replayed_proof_is_refused_by_the_machine() -> None:
    pair, _ = login_pair()
    with pytest.raises(RemoteProtocolError):
        pair.server.receive_data(FrameEncoder().encode(to_wire(Proof(b"m" * 32))))
        pair.server.next_event()


def test_unsupported_version_is_a_version_error() -> None:
    pair = Pair()
    pair.send(pair.server, Hello(SNONCE))
    pair.server.receive_data(FrameEncoder().encode(to_wire(Login("admin", "a", CNONCE, proto=9))))
    with pytest.raises(RemoteProtocolError) as exc:
        pair.server.next_event()
    assert exc.value.code == E.VERSION


def test_handshake_deadline_closes_slow_peers() -> None:
    pair = Pair(now=100.0, handshake_timeout=5.0)
    pair.send(pair.server, Hello(SNONCE))
    assert pair.server.handle_timer(104.9) is False
    assert pair.server.handle_timer(105.0) is True and pair.server.state is State.ERROR
    [bye] = pair.pump(pair.server)
    assert bye.code == E.TIMEOUT  # type: ignore[attr-defined]


def test_calls_over_the_cap_are_answered_busy_by_the_machine() -> None:
    pair = Pair(max_inflight=2)
    pair.send(pair.server, Hello(SNONCE))
    pair.send(pair.client, Login("admin", "a", CNONCE))
    pair.send(pair.server, Challenge(SALT, 4096))
    pair.send(pair.client, Proof(b"p" * 32))
    pair.send(pair.server, Welcome(b"S" * 16, b"g" * 32, "admin", "a", 60))
    seen = [e for i in range(1, 4) for e in pair.send(pair.client, Call(i, "f", {}))]
    assert [c.id for c in seen] == [1, 2]  # type: ignore[attr-defined]
    assert pair.pump(pair.server) == [Error(3, E.BUSY, "too many calls in flight")]
    with pytest.raises(RemoteProtocolError):
        pair.send(pair.client, Call(1, "dup", {}))   # id 1 still in flight


def asked_for_a_code() -> Pair:
    """A pair whose server has just answered a right proof with ``otp`` (handshake 5 s from 100, code 60 s more)."""
    pair = Pair(now=100.0, handshake_timeout=5.0, otp_timeout=60.0)
    pair.send(pair.server, Hello(SNONCE))
    pair.send(pair.client, Login("admin", "a", CNONCE))
    pair.send(pair.server, Challenge(SALT, 4096))
    pair.send(pair.client, Proof(b"p" * 32))
    with pytest.raises(LocalProtocolError):
        pair.client.send(OtpCode("123456"))          # not asked yet
    assert pair.send(pair.server, Otp(b"g" * 32)) == [Otp(b"g" * 32)]
    assert pair.client.state is pair.server.state is State.OTP
    return pair


def test_second_factor_step_over_the_pair() -> None:
    """proof → otp(S) → otp_code(C) → welcome(S); the deadline grows by otp_timeout meanwhile."""
    pair = asked_for_a_code()
    assert pair.server.handle_timer(106.0) is False    # past the handshake's 5 s, within the code's 60 more
    with pytest.raises(LocalProtocolError):
        pair.client.send(Call(1, "sys.ping", {}))
    assert pair.send(pair.client, OtpCode("123 456")) == [OtpCode("123 456")]
    assert pair.server.state is State.OTP_VERIFY
    pair.send(pair.server, Welcome(b"S" * 16, b"g" * 32, "admin", "a", 60))
    assert (pair.client.state, pair.server.state, pair.server.deadline) == (State.OPEN, State.OPEN, None)


def test_nothing_but_the_code_is_legal_and_it_must_come_in_time() -> None:
    pair = asked_for_a_code()
    pair.server.receive_data(FrameEncoder().encode(to_wire(Call(1, "sys.ping", {}))))
    with pytest.raises(RemoteProtocolError):
        pair.server.next_event()
    assert pair.server.state is State.ERROR
    pair = asked_for_a_code()
    assert pair.server.handle_timer(165.0) is True and pair.server.state is State.ERROR


def test_eof_gives_closed() -> None:
    pair = Pair()
    pair.server.receive_data(b"")
    assert isinstance(pair.server.next_event(), Closed) and pair.server.state is State.CLOSED


def test_transition_table_has_one_entry_per_legal_step() -> None:
    open_to_open = {t for (s, r, t), n in TRANSITIONS.items() if s is n is State.OPEN}
    assert open_to_open == {Call, Cancel, Ping, Result, Chunk, Error, Event, Pong}
    assert all(n is State.CLOSED for (s, r, t), n in TRANSITIONS.items() if t is Bye)


def test_an_idle_connection_costs_little_memory() -> None:
    # msgpack's defaults would reserve 1 MiB (unpacker) + 256 KiB (packer) per connection.
    tracemalloc.start()
    try:
        conns = [Connection(Role.SERVER, 0.0) for _ in range(200)]
        used, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(conns) == 200 and used / 200 < 128 * 1024


def test_pipelined_frames_larger_than_one_feed_cap_still_decode() -> None:
    # The decoder's buffer cap bounds *undecoded* bytes: a reader that decodes
    # as it goes may receive any amount.
    conn = Connection(Role.SERVER, 0.0, max_frame=4096)
    conn.send(Hello(SNONCE))
    conn.state = State.OPEN
    frame = FrameEncoder().encode(to_wire(Call(1, "t.echo", {"x": "y" * 3000})))
    got = 0
    for i in range(1000):
        conn.receive_data(frame[:-1] if i == 0 else frame[-1:] + frame[:-1])
        while (ev := conn.next_event()) is not None:
            assert isinstance(ev, Call)
            conn.send_result(ev.id, None)
            got += 1
    assert got == 999 and conn.data_to_send()


# -- fuzz -----------------------------------------------------------------
@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_fuzz_random_bytes_only_raise_protocol_errors(chunks: list[bytes]) -> None:
    conn = Connection(Role.SERVER, 0.0, max_frame=4096)
    conn.send(Hello(SNONCE))
    tracemalloc.start()
    try:
        for chunk in chunks:
            conn.receive_data(chunk)
            while conn.next_event() is not None:
                pass
    except RemoteProtocolError:
        assert conn.state is State.ERROR
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 256 * 1024


@settings(max_examples=300, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
), st.sampled_from(["call", "login", "hello", "result", "resume", "proof", "bye", "event"]))
def test_fuzz_wellformed_msgpack_with_random_fields(value: object, t: str) -> None:
    frame = msgpack.packb({"t": t, "id": value, "fn": value, "args": value, "proto": value, "nonce": value})
    conn = Connection(Role.SERVER, 0.0)
    conn.send(Hello(SNONCE))
    conn.receive_data(len(frame).to_bytes(4, "big") + frame)
    try:
        conn.next_event()
    except RemoteProtocolError:
        assert conn.state is State.ERROR
