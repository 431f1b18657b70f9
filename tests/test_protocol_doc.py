"""docs/protocol.md is enough to write a URFA client.

``tests/clean_room_client.py`` was written from docs/protocol.md alone (no
``urfa``/``billcore`` import, implementation unread).  These tests check the
document's vectors with that client's own code, then drive a real core with
it: login, calls, error codes, a streaming call, resume, limits.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from tests.clean_room_client import (
    Bye,
    Client,
    ServerNotAuthentic,
    UrfaError,
    b64,
    decode,
    encode,
    resume_proof,
    resume_signature,
    scram,
    scram_for,
    totp,
)
from tests.running import BillcoreProcess

ROOT_PW = "root-password-1"
UTC = dt.timezone.utc

# ---------------------------------------------------------------------------
# pure: the document's vectors, reproduced with the clean-room code


def h(hexstr: str) -> bytes:
    return bytes.fromhex(hexstr)


def test_frame_example_bytes() -> None:
    """§2: the sys.ping call frame, byte for byte, both ways."""
    wire = h("0000001e84a174a463616c6ca2696401a2666ea87379732e70696e67a46172677380")
    msg = {"t": "call", "id": 1, "fn": "sys.ping", "args": {}}
    assert encode(msg) == wire
    assert len(wire) == 34
    assert decode(wire[4:]) == msg


def test_scram_vector() -> None:
    """§6.2: every intermediate value of the worked example."""
    s = scram("admin", "alice", "correct horse battery",
              cnonce=bytes(range(0x10, 0x20)), snonce=bytes(range(0x20, 0x30)),
              salt=bytes(range(0x00, 0x10)), iterations=4096)
    assert s.auth_message == (
        b"n=admin:alice,r=EBESExQVFhcYGRobHB0eHw==,"
        b"r=EBESExQVFhcYGRobHB0eHw==ICEiIyQlJicoKSorLC0uLw==,"
        b"s=AAECAwQFBgcICQoLDA0ODw==,i=4096,"
        b"c=biws,r=EBESExQVFhcYGRobHB0eHw==ICEiIyQlJicoKSorLC0uLw==")
    assert s.salted == h("25ec2e843d040853eb91d6ee9a96d626c48de1b5cb7eb4c549e71a3c990cb674")
    assert s.client_key == h("d927e25e86d51a12afe5c405f5e5a86514a94ecf78f96c452c523c81a3b0a396")
    assert s.stored_key == h("0d2391706e1d354c401d3128e412f6d32992a0b82df02f232d9d3d4be5545653")
    assert s.server_key == h("f612eb7e77fbcef0ad0c1f5dae455790c814b1de2fa477e0e584090eb6da677d")
    assert s.proof == h("d48e367856be5fcf1bc4b9318a39ce6ec723e6cfac26b6ec28c45e7352492d46")
    assert s.server_signature == h(
        "e39a87a01547f4fba664e4fae6a43391ea058b05e28c173264fb86668021bfcf")
    verifier = f"SCRAM-SHA-256$4096:{b64(bytes(range(16)))}${b64(s.stored_key)}:{b64(s.server_key)}"
    assert verifier == ("SCRAM-SHA-256$4096:AAECAwQFBgcICQoLDA0ODw==$"
                        "DSORcG4dNUxAHTEo5BL20ymSoLgt8C8jLZ09S+VUVlM=:"
                        "9hLrfnf7zvCtDB9drkVXkMgUsd4vpHfg5YQJDrbaZ30=")

    # §6.3 resume vector, continuing
    sid, nonce, cnonce = bytes(range(0x30, 0x40)), bytes(range(0x40, 0x50)), bytes(range(0x50, 0x60))
    assert s.resume_key == h("ef1c1d7a06cf45f35f1524bd04162eb4e6cf3e800a1b61175ce0e76c3cda3a78")
    assert resume_proof(s.resume_key, nonce, cnonce, sid) == h(
        "40fd12f072c4d8fcb22a695b7651132ddceae52c70c6734381d496b4facf54e6")
    assert resume_signature(s.resume_key, nonce, cnonce, sid) == h(
        "625275811d541737fedf3fc0f2a270ac101766009f8a8fd2912c12f6715cc182")


def test_rfc7677_vector() -> None:
    """§6.2: the RFC's own example, fed its own AuthMessage (the RFC's user
    has no kind and its nonces are not base64 of bytes)."""
    am = (b"n=user,r=rOprNGfwEbeRWgbNEkqO,"
          b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
          b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,"
          b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0")
    s = scram_for("pencil", base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ=="), 4096, am)
    assert b64(s.proof) == "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    assert b64(s.server_signature) == "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def test_login_name_escaping() -> None:
    """§6.1: '=' and ',' in kind:login are escaped (no real login has them)."""
    s = scram("admin", "a=b,c", "x", bytes(16), bytes(16), bytes(16), 1)
    assert s.auth_message.startswith(b"n=admin:a=3Db=2Cc,r=")


# ---------------------------------------------------------------------------
# the client refuses a server that cannot prove itself (a fake server)


def test_totp_vector() -> None:
    """§6.5's vector: RFC 6238's SHA-1 key, given as base32 the way self.otp_begin shows it."""
    secret = base64.b32decode("GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ")
    assert secret == b"12345678901234567890"
    assert 1111111109 // 30 == 37037036 == 0x23523EC
    assert totp(secret, 1111111109) == "081804"
    assert totp(secret, 59) == "287082"


def fake_server(iterations: int, good_sig: bool) -> tuple[int, threading.Thread]:
    """One-connection server that plays hello/challenge/welcome for the
    password 'pw' (knowing it, like a real server holding the verifier)."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    port = lsock.getsockname()[1]

    def run() -> None:
        conn, _ = lsock.accept()
        lsock.close()
        with conn:
            f = conn.makefile("rb")

            def read() -> dict[str, Any]:
                (n,) = struct.unpack(">I", f.read(4))
                return decode(f.read(n))

            nonce, salt = os.urandom(16), os.urandom(16)
            conn.sendall(encode({"t": "hello", "proto": [1], "nonce": nonce,
                                 "server": "fake", "max_frame": 1 << 20}))
            login = read()
            conn.sendall(encode({"t": "challenge", "salt": salt, "iter": iterations}))
            try:
                proof = read()
            except (struct.error, OSError):
                return  # the client hung up (iteration count refused)
            s = scram(login["kind"], login["login"], "pw", login["cnonce"], nonce, salt, iterations)
            assert proof["proof"] == s.proof
            sig = s.server_signature if good_sig else bytes(32)
            conn.sendall(encode({"t": "welcome", "proto": 1, "sid": os.urandom(16), "sig": sig,
                                 "kind": login["kind"], "login": login["login"], "timeout": 60}))
            f.read(1)  # wait for the client to go

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return port, t


def test_client_checks_server_signature() -> None:
    port, t = fake_server(4096, good_sig=True)
    with Client(port=port) as c:
        assert c.login("admin", "root", "pw")["login"] == "root"
    t.join(5)
    port, t = fake_server(4096, good_sig=False)
    with Client(port=port) as c, pytest.raises(ServerNotAuthentic):
        c.login("admin", "root", "pw")
    t.join(5)


def test_client_refuses_huge_iteration_count() -> None:
    port, t = fake_server(10_000_001, good_sig=True)
    with Client(port=port) as c, pytest.raises(ValueError, match="iteration"):
        c.login("admin", "root", "pw")
    t.join(5)


# ---------------------------------------------------------------------------
# against a real core


def cli(bc: BillcoreProcess, *args: str, password: str) -> None:
    env = dict(os.environ, PW=password)
    env.pop("BILLCORE_CONFIG", None)
    subprocess.run([sys.executable, "-m", "billcore.cli", "-c", str(bc.config_path), *args,
                    "--password-env", "PW"], env=env, check=True, capture_output=True)


@pytest.fixture
def start_core(tmp_path: Path, db_dsn: str) -> Iterator[Any]:
    started: list[BillcoreProcess] = []

    def start(**sections: dict[str, Any]) -> BillcoreProcess:
        bc = BillcoreProcess(tmp_path, dsn=db_dsn, **sections).start()
        started.append(bc)
        bc.child_pid("core")
        cli(bc, "admin", "create", "root", password=ROOT_PW)
        return bc

    yield start
    for bc in started:
        bc.__exit__(None, None, None)


@pytest.fixture
def core(start_core: Any) -> BillcoreProcess:
    return start_core()


def admin(bc: BillcoreProcess) -> Client:
    c = Client(port=bc.urfa_port)
    c.login("admin", "root", ROOT_PW)
    return c


def test_admin_session(core: BillcoreProcess) -> None:
    with Client(port=core.urfa_port) as c:
        assert c.hello["proto"] == [1]
        assert len(c.hello["nonce"]) == 16 and c.max_frame == 1_048_576
        w = c.login("admin", "root", ROOT_PW)  # checks welcome.sig itself
        assert (w["kind"], w["login"], w["proto"]) == ("admin", "root", 1)
        assert len(w["sid"]) == 16 and w["timeout"] == 1800

        # the call table describes itself
        table = {f["name"]: f for f in c.call("sys.calls")}
        for name in ("sys.ping", "sys.time", "sys.whoami", "sys.calls", "session.logout",
                     "events.subscribe", "users.create", "payments.add"):
            assert name in table, name
        pay = table["payments.add"]
        assert pay["args"] == {"account_id": "int", "amount": "money", "method": "str",
                               "external_id": "str?", "comment": "str?"}
        assert pay["streaming"] is False and pay["deleted"] is False
        assert table["sys.ping"]["right"] is None
        streaming = sorted(n for n, f in table.items() if f["streaming"])
        assert "reports.charges" in streaming

        assert c.call("sys.ping") == "pong"
        now = c.call("sys.time")
        assert isinstance(now, dt.datetime) and now.utcoffset() == dt.timedelta(0)
        who = c.call("sys.whoami")
        assert (who["kind"], who["login"], who["sid"]) == ("admin", "root", w["sid"])

        # application calls: money is int micro-units
        user = c.call("users.create", {"login": "bob", "password": "bob-password-1"})
        assert user["login"] == "bob"
        account = user["basic_account_id"]
        paid = c.call("payments.add", {"account_id": account, "amount": 12_500_000,
                                       "method": "cash", "external_id": "rcpt-1"})
        assert paid["created"] is True and paid["balance"] == 12_500_000
        again = c.call("payments.add", {"account_id": account, "amount": 12_500_000,
                                        "method": "cash", "external_id": "rcpt-1"})
        assert again["created"] is False and again["payment_id"] == paid["payment_id"]
        assert c.call("accounts.get", {"account_id": account})["balance"] == 12_500_000

        # errors by code; the connection stays usable after each
        def code_of(fn: str, args: dict[str, Any] | None = None) -> str:
            with pytest.raises(UrfaError) as e:
                c.call(fn, args)
            return e.value.code

        assert code_of("no.such.function") == "not_in_table"
        assert code_of("payments.add", {"account_id": account, "amount": 1.5,
                                        "method": "cash"}) == "bad_args"  # never a float
        assert code_of("payments.add", {"account_id": account}) == "bad_args"
        assert code_of("payments.add", {"account_id": account, "amount": 1, "method": "cash",
                                        "bogus": 1}) == "bad_args"  # unknown argument
        # an application error: a dotted code chosen by the module
        conflict = code_of("payments.add", {"account_id": account, "amount": 1,
                                            "method": "cash", "external_id": "rcpt-1"})
        assert "." in conflict
        # an optional argument may be nil
        assert c.call("payments.add", {"account_id": account, "amount": 1, "method": "cash",
                                       "external_id": None})["created"] is True

        # a streaming call: chunks (possibly none), then a result
        st = c.stream("reports.charges", {"since": dt.datetime(2020, 1, 1, tzinfo=UTC),
                                          "until": dt.datetime(2040, 1, 1, tzinfo=UTC)})
        assert isinstance(st.chunks, list) and st.result is not None

        # args may be absent; unknown message keys are ignored
        c.send({"t": "call", "id": 1000, "fn": "sys.ping"})
        assert c._reply(1000) == {"t": "result", "id": 1000, "value": "pong"}
        c.send({"t": "call", "id": 1001, "fn": "sys.ping", "args": {}, "future_key": [1, 2]})
        assert c._reply(1001)["value"] == "pong"
        # cancel of an unknown id is ignored; ping/pong
        c.send({"t": "cancel", "id": 424242})
        c.ping()
        # replies are matched by id, in any order
        ids = [c.start_call("sys.ping") for _ in range(10)]
        for i in reversed(ids):
            assert c._reply(i) == {"t": "result", "id": i, "value": "pong"}

        assert c.logout() == "logged_out"  # result true, then bye logged_out

    # a subscriber: NFKC password (ﬁ ligature) and its own, smaller call table
    with admin(core) as c:
        c.call("users.create", {"login": "carol", "password": "ﬁrst-pässwörd"})
    with Client(port=core.urfa_port) as u:
        assert u.login("user", "carol", "first-pässwörd")["kind"] == "user"
        names = {f["name"] for f in u.call("sys.calls")}
        assert "sys.ping" in names and "payments.add" not in names
        with pytest.raises(UrfaError) as e:
            u.call("payments.add", {"account_id": account, "amount": 1, "method": "cash"})
        assert e.value.code == "not_in_table"


def test_login_failures_and_rate_limit(core: BillcoreProcess) -> None:
    def attempt(kind: str, login: str, password: str) -> tuple[str, bool]:
        """bye code, and whether a challenge came first."""
        with Client(port=core.urfa_port) as c:
            c.send({"t": "login", "proto": 1, "kind": kind, "login": login,
                    "cnonce": os.urandom(16)})
            try:
                ch = c.recv()
            except Bye as bye:
                return bye.code, False
            s = scram(kind, login, password, os.urandom(16), c.hello["nonce"],
                      ch["salt"], ch["iter"])
            c.send({"t": "proof", "proof": s.proof})
            with pytest.raises(Bye) as e:
                c.recv()
            return e.value.code, True

    # wrong password: a challenge, then bye auth_failed
    with Client(port=core.urfa_port) as c, pytest.raises(Bye) as e:
        c.login("admin", "root", "wrong-password")
    assert (e.value.code, e.value.msg) == ("auth_failed", "login failed")
    # unknown login: a normal-looking challenge (stable salt, default iter)
    challenges = []
    for _ in range(2):
        with Client(port=core.urfa_port) as c:
            c.send({"t": "login", "proto": 1, "kind": "admin", "login": "ghost",
                    "cnonce": os.urandom(16)})
            challenges.append(c.recv())
    assert challenges[0] == challenges[1]
    assert challenges[0]["iter"] == 100_000 and len(challenges[0]["salt"]) == 16
    with Client(port=core.urfa_port) as c, pytest.raises(Bye) as e:
        c.login("admin", "ghost", "whatever")
    assert (e.value.code, e.value.msg) == ("auth_failed", "login failed")

    # 10 failures per minute from one address, then rate_limited right after
    # login (no challenge), whatever the password
    failures = 2
    while failures < 10:
        assert attempt("admin", "root", "wrong-password") == ("auth_failed", True)
        failures += 1
    assert attempt("admin", "root", "wrong-password") == ("rate_limited", False)
    with Client(port=core.urfa_port) as c, pytest.raises(Bye) as e:
        c.login("admin", "root", ROOT_PW)
    assert e.value.code == "rate_limited"


def test_protocol_errors(core: BillcoreProcess) -> None:
    # no common version
    with Client(port=core.urfa_port) as c:
        c.send({"t": "login", "proto": 2, "kind": "admin", "login": "root",
                "cnonce": os.urandom(16)})
        with pytest.raises(Bye) as e:
            c.recv()
        assert e.value.code == "version"
    # a message not allowed in this state
    with Client(port=core.urfa_port) as c:
        c.send({"t": "call", "id": 1, "fn": "sys.ping", "args": {}})
        with pytest.raises(Bye) as e:
            c.recv()
        assert e.value.code == "protocol"
    # bad msgpack
    with Client(port=core.urfa_port) as c:
        c.send_raw(b"\x00\x00\x00\x01\xc1")
        with pytest.raises(Bye) as e:
            c.recv()
        assert e.value.code == "protocol"
    # args nil (not a map) is malformed, unlike an absent args
    with admin(core) as c:
        c.send({"t": "call", "id": 1, "fn": "sys.ping", "args": None})
        with pytest.raises(Bye) as e:
            c.recv()
        assert e.value.code == "protocol"
    # a negative id
    with admin(core) as c:
        c.send({"t": "call", "id": -1, "fn": "sys.ping", "args": {}})
        with pytest.raises(Bye) as e:
            c.recv()
        assert e.value.code == "protocol"
    # a client's bye is not answered: the server just closes
    with admin(core) as c:
        c.send({"t": "bye", "code": "done", "msg": "client leaving"})
        with pytest.raises(Bye) as e:
            c.recv()
        assert e.value.code == "closed"  # our marker for EOF without bye


def test_frame_cap(core: BillcoreProcess) -> None:
    # exactly the cap is fine
    with admin(core) as c:
        cap = c.max_frame
        base = {"t": "call", "id": 7, "fn": "sys.ping", "args": {}, "pad": ""}
        pad = "x" * (cap - len(msgpack.packb(base)) - 4)  # str8 -> str32 header
        body = msgpack.packb({**base, "pad": pad})
        assert len(body) == cap
        c.send_raw(struct.pack(">I", len(body)) + body)
        assert c._reply(7)["value"] == "pong"
    # one byte more: refused on the 4 length bytes alone, then closed
    for logged_in in (True, False):
        c = admin(core) if logged_in else Client(port=core.urfa_port)
        with c:
            c.send_raw(struct.pack(">I", c.max_frame + 1))
            with pytest.raises(Bye) as e:
                c.recv()
            assert e.value.code == "frame_too_large"
            assert c.sock.recv(1) == b""


def test_configured_limits(start_core: Any) -> None:
    """hello announces a configured cap; the handshake deadline."""
    bc = start_core(urfa={"max_frame": 4096, "handshake_timeout": 1.0})
    with Client(port=bc.urfa_port) as c:
        assert c.hello["max_frame"] == 4096
        with pytest.raises(Bye) as e:
            c.recv()  # never log in
        assert e.value.code == "timeout"
    with admin(bc) as c:
        c.send_raw(struct.pack(">I", 4097))
        with pytest.raises(Bye) as e:
            c.recv()
        assert e.value.code == "frame_too_large"


def test_system_session_resume(core: BillcoreProcess) -> None:
    cli(core, "system", "create", "collector", "--rights", "payments.*", password="collector-pw-1")
    c = Client(port=core.urfa_port)
    w = c.login("system", "collector", "collector-pw-1")
    assert c.scram is not None
    sid, key = w["sid"], c.scram.resume_key
    c.close()  # the session survives its connection

    with Client(port=core.urfa_port) as r:
        w2 = r.resume(sid, key)  # checks the resume signature
        assert w2["sid"] == sid and w2["kind"] == "system"
        assert r.call("sys.whoami")["sid"] == sid
        # resuming elsewhere moves the session: the old connection gets bye
        with Client(port=core.urfa_port) as r2:
            r2.resume(sid, key)
            with pytest.raises(Bye) as e:
                r.recv()
            assert e.value.code == "logged_out"
            assert r2.call("sys.ping") == "pong"

    # a wrong proof deletes the SID: even the right key fails afterwards
    with Client(port=core.urfa_port) as bad, pytest.raises(Bye) as e:
        bad.resume(sid, bytes(32))
    assert e.value.code == "resume_failed"
    with Client(port=core.urfa_port) as late, pytest.raises(Bye) as e:
        late.resume(sid, key)
    assert e.value.code == "resume_failed"

    # an admin session does not survive its connection
    a = admin(core)
    assert a.welcome is not None and a.scram is not None
    asid, akey = a.welcome["sid"], a.scram.resume_key
    a.close()
    with Client(port=core.urfa_port) as r, pytest.raises(Bye) as e:
        r.resume(asid, akey)
    assert e.value.code == "resume_failed"


def test_second_factor_login(core: BillcoreProcess) -> None:
    """§6.5 as written: enrol with self.otp_*, then otp → otp_code → welcome; a code counts once;
    a recovery code logs billctl in (--otp)."""
    with admin(core) as root:
        root.call("operators.create", {"login": "olga", "password": "olga-password", "groups": ["support"]})
    with Client(port=core.urfa_port) as olga:
        olga.login("admin", "olga", "olga-password")
        begun = olga.call("self.otp_begin")
        assert begun["uri"] == f"otpauth://totp/billcore:olga?secret={begun['secret']}&issuer=billcore"
        secret = base64.b32decode(begun["secret"] + "=" * (-len(begun["secret"]) % 8))
        now = int(time.time())
        recovery = olga.call("self.otp_confirm", {"code": totp(secret, now)})["recovery_codes"]
        assert len(recovery) == 10
    with Client(port=core.urfa_port) as c, pytest.raises(ValueError, match="one-time code"):
        c.login("admin", "olga", "olga-password")            # the server asked (otp), we had nothing to give
    later = totp(secret, now + 30)                           # the next step: the window takes it
    with Client(port=core.urfa_port) as c:
        w = c.login("admin", "olga", "olga-password", otp=later)
        assert (w["kind"], w["login"]) == ("admin", "olga")
        assert c.call("sys.whoami")["login"] == "olga"
    with Client(port=core.urfa_port) as c, pytest.raises(Bye) as bye:
        c.login("admin", "olga", "olga-password", otp=later)  # the same code again
    assert bye.value.code == "auth_failed"
    env = dict(os.environ, BILLCTL_PASSWORD="olga-password")
    run = subprocess.run([sys.executable, "-m", "billcore.clients.billctl", "--port", str(core.urfa_port),
                          "--login", "olga", "--otp", recovery[0], "--json", "call", "sys.whoami"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert '"login": "olga"' in run.stdout
