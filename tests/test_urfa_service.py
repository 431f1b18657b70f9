"""The URFA service end to end over real sockets (TCP, TLS, Unix)."""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from billcore.server.service import URFAConfig
from urfa import client as uc
from urfa import errors as E
from urfa.errors import CallFailed, ConnectionLost, LoginFailed
from urfa import scram
from urfa.framing import FrameDecoder, FrameEncoder
from urfa.messages import Challenge, Login, Proof, Welcome

from .test_urfa_harness import ITER, FakeClock, running_service
from .waiting import eventually
from tests.conftest import need_peer

CFG = dict(secret=b"k" * 32, mock_iterations=ITER)


class Raw:
    """A bare socket speaking frames: for sending what a good client would not."""

    def __init__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.r, self.w, self.dec, self.enc = r, w, FrameDecoder(), FrameEncoder()

    @classmethod
    async def open(cls, port: int) -> Raw:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    def send(self, msg: dict[str, Any]) -> None:
        self.w.write(self.enc.encode(msg))

    async def read(self, timeout: float = 3.0) -> dict[str, Any] | None:
        while (m := self.dec.next_message()) is None:
            data = await asyncio.wait_for(self.r.read(65536), timeout)
            if not data:
                return None
            self.dec.feed(data)
        return m


async def test_wrong_password_and_unknown_login_look_the_same() -> None:
    async with running_service() as (svc, auth, port):
        answers = []
        for login, pw in [("alice", "wrong"), ("ghost", "whatever"), ("ghost", "whatever")]:
            raw = await Raw.open(port)
            hello = await raw.read()
            assert hello is not None and len(hello["nonce"]) == 16
            raw.send({"t": "login", "proto": 1, "kind": "admin", "login": login, "cnonce": b"c" * 16})
            ch = await raw.read()
            assert ch is not None
            raw.send({"t": "proof", "proof": b"p" * 32})
            bye = await raw.read()
            answers.append((ch["t"], len(ch["salt"]), ch["iter"], bye))
            if login == "alice":
                real_salt = ch["salt"]
            else:
                ghost_salt = ch["salt"]
            assert await raw.read() is None      # closed after the bye
        assert answers[0] == answers[1] == answers[2] == \
            ("challenge", 16, ITER, {"t": "bye", "code": E.AUTH_FAILED, "msg": "login failed"})
        assert ghost_salt != real_salt
        c = await uc.connect("127.0.0.1", port)
        with pytest.raises(LoginFailed) as exc:
            await c.login("admin", "alice", "wrong")
        assert exc.value.code == E.AUTH_FAILED


async def test_replayed_login_messages_fail() -> None:
    async with running_service() as (svc, auth, port):
        # Record a good exchange on the wire, then play the client's half again.
        c = await uc.connect("127.0.0.1", port)
        cnonce = b"r" * 16
        c._send(Login("admin", "alice", cnonce))
        ch = await c._expect(Challenge)
        keys = scram.client_keys("alice-pw", ch.salt, ch.iterations)  # type: ignore[attr-defined]
        am = scram.auth_message("admin", "alice", cnonce, c.hello.nonce, ch.salt, ch.iterations)  # type: ignore
        proof = scram.client_proof(keys, am)
        raw = await Raw.open(port)
        await raw.read()
        raw.send({"t": "login", "proto": 1, "kind": "admin", "login": "alice", "cnonce": cnonce})
        await raw.read()
        raw.send({"t": "proof", "proof": proof})
        bye = await raw.read()
        assert bye == {"t": "bye", "code": E.AUTH_FAILED, "msg": "login failed"}
        c._send(Proof(proof))   # the original still works
        await c._expect(Welcome)
        await c.close()


async def test_calls_replies_out_of_order_and_errors_carry_codes() -> None:
    async with running_service() as (svc, auth, port):
        c = await uc.connect("127.0.0.1", port)
        await c.login("admin", "alice", "alice-pw")
        done: list[str] = []

        async def run(seconds: float, tag: str) -> None:
            done.append(await c.call("t.sleep", {"seconds": seconds, "tag": tag}))
        await asyncio.gather(run(0.3, "slow"), run(0.01, "fast"))
        assert done == ["fast", "slow"]
        with pytest.raises(CallFailed) as exc:
            await c.call("t.fail", {"code": "payments.duplicate"})
        assert (exc.value.code, exc.value.message) == ("payments.duplicate", "as asked")
        with pytest.raises(CallFailed) as exc:
            await c.call("t.crash")
        assert exc.value.code == E.INTERNAL and "secret" not in exc.value.message
        with pytest.raises(CallFailed) as exc:
            await c.call("t.echo", {"y": 1})
        assert exc.value.code == E.BAD_ARGS
        with pytest.raises(CallFailed) as exc:
            await c.call("t.fail", {"code": 5})
        assert exc.value.code == E.BAD_ARGS
        assert isinstance(await c.call("sys.time"), datetime)
        assert (await c.call("sys.time")).tzinfo is not None
        money = {"amount": 123_456_789_000, "ip": "192.0.2.1"}
        assert await c.call("t.echo", {"x": money}) == money
        calls = {d["name"]: d for d in await c.call("sys.calls")}
        assert calls["t.echo"]["args"] == {"x": "any"} and calls["adm.secret"]["right"] == "adm.secret"
        assert "acct.balance" not in calls and "session.proxy_login" not in calls
        await c.close()


async def test_call_outside_the_table_and_deleted_symbol() -> None:
    async with running_service() as (svc, auth, port):
        eve = await uc.connect("127.0.0.1", port)
        await eve.login("admin", "eve", "eve-pw")            # admin without adm.* rights
        with pytest.raises(CallFailed) as exc:
            await eve.call("adm.secret")
        assert exc.value.code == E.NOT_IN_TABLE
        with pytest.raises(CallFailed) as exc:
            await eve.call("no.such.function")
        assert exc.value.code == E.NOT_IN_TABLE
        alice = await uc.connect("127.0.0.1", port)
        await alice.login("admin", "alice", "alice-pw")
        assert await alice.call("adm.secret") == "admin"
        from billcore.server.calls import CallSpec

        async def later(ctx: Any) -> str:
            return "new"
        svc.registry.register(CallSpec("plug.new", later, module="plug"))
        with pytest.raises(CallFailed) as exc:              # registered after login
            await alice.call("plug.new")
        assert exc.value.code == E.NOT_IN_TABLE
        fresh = await uc.connect("127.0.0.1", port)
        await fresh.login("admin", "alice", "alice-pw")
        assert await fresh.call("plug.new") == "new"
        svc.registry.delete_module("plug")
        with pytest.raises(CallFailed) as exc:
            await fresh.call("plug.new")
        assert exc.value.code == E.DELETED
        assert svc.registry.module_refs("plug") == 1         # fresh's table still holds it
        await fresh.close()
        # admin session ended with its connection
        await eventually(lambda: svc.registry.module_refs("plug") == 0, what="plug's refs back to 0")
        for c in (eve, alice):
            await c.close()


async def test_cancel_streaming_and_busy() -> None:
    async with running_service(URFAConfig(**CFG, max_inflight=4)) as (svc, auth, port):
        c = await uc.connect("127.0.0.1", port)
        await c.login("admin", "alice", "alice-pw")
        p = c.start_call("t.sleep", {"seconds": 30})
        # part of the scenario, not a wait for a result: give the call a moment to be running
        # (frames are ordered, so the cancel is answered CANCELLED either way)
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        c.cancel(p)
        with pytest.raises(CallFailed) as exc:
            await p
        assert exc.value.code == E.CANCELLED and time.monotonic() - t0 < 1.0
        stream = c.stream("t.count", {"n": 2000})
        chunks = [chunk async for chunk in stream]
        assert chunks == [{"i": i} for i in range(2000)] and stream.result == 2000
        calls = [c.start_call("t.sleep", {"seconds": 0.2, "tag": i}) for i in range(6)]
        results = await asyncio.gather(*(x.future for x in calls), return_exceptions=True)
        busy = [r for r in results if isinstance(r, CallFailed)]
        assert results[:4] == [0, 1, 2, 3] and [b.code for b in busy] == [E.BUSY, E.BUSY]
        assert await c.call("sys.ping") == "pong"           # the connection survives busy
        await c.close()


async def test_resume_rules() -> None:
    async with running_service() as (svc, auth, port):
        radius = await uc.connect("127.0.0.1", port)
        info = await radius.login("system", "radius", "radius-pw")
        await radius.close()
        session = svc.sessions.get(info.sid)
        assert session is not None
        await eventually(lambda: session.owner is None, what="the server noticed the close")
        assert svc.sessions.get(info.sid) is session       # system sessions outlive the connection
        again = await radius.resume()
        assert again.sid == info.sid and await radius.call("sys.ping") == "pong"
        # A resume from another address fails and the SID is gone for everyone.
        thief = await uc.connect("127.0.0.1", port, local_addr=("127.0.0.2", 0))
        thief.info, thief._resume_key = radius.info, radius._resume_key
        with pytest.raises(LoginFailed) as exc:
            await thief.resume()
        assert exc.value.code == E.RESUME_FAILED and svc.sessions.get(info.sid) is None
        with pytest.raises((ConnectionLost, CallFailed)):
            await radius.call("sys.ping")
        with pytest.raises(LoginFailed):
            await radius.resume()
        # Admin sessions are never resumable: the client refuses, and so does the server.
        admin = await uc.connect("127.0.0.1", port)
        ainfo = await admin.login("admin", "alice", "alice-pw")
        with pytest.raises(LoginFailed):
            await admin.resume()
        admin._resume_key = b"x" * 32
        with pytest.raises(LoginFailed) as exc:
            await admin.resume()
        assert exc.value.code == E.RESUME_FAILED and svc.sessions.get(ainfo.sid) is None


async def test_expiry_by_driven_clock() -> None:
    clock = FakeClock()
    async with running_service(URFAConfig(**CFG, session_timeout=60), clock=clock) as (svc, auth, port):
        admin = await uc.connect("127.0.0.1", port)
        await admin.login("admin", "alice", "alice-pw")
        radius = await uc.connect("127.0.0.1", port)
        rinfo = await radius.login("system", "radius", "radius-pw")
        clock.t += 30
        assert await radius.call("sys.ping") == "pong"      # touches radius only
        clock.t += 31
        gone = svc.sweep()
        assert [s.principal.login for s in gone] == ["alice"]
        with pytest.raises(ConnectionLost):
            await admin.call("sys.ping")
        assert admin.close_reason is not None and admin.close_reason.code == E.EXPIRED
        await radius.close()
        clock.t += 61
        svc.sweep()
        assert svc.sessions.get(rinfo.sid) is None and len(svc.sessions) == 0
        with pytest.raises(LoginFailed):
            await radius.resume()


async def test_proxied_subscriber_sessions() -> None:
    async with running_service() as (svc, auth, port):
        portal = await uc.connect("127.0.0.1", port)
        await portal.login("system", "portal", "portal-pw")
        with pytest.raises(LoginFailed) as exc:
            await portal.proxy_login("bob", "wrong", "198.51.100.7")
        assert exc.value.code == E.AUTH_FAILED
        bob = await portal.proxy_login("bob", "bob-pw", "198.51.100.7")
        as_bob = {"as_sid": bob.sid, "as_ip": "198.51.100.7"}
        assert await portal.call("acct.balance", **as_bob) == {"account": auth.principals[("user", "bob")].id,
                                                                "balance": 12_340_000}
        me = await portal.call("sys.whoami", **as_bob)
        assert (me["kind"], me["login"], me["ip"], me["proxied"]) == ("user", "bob", "198.51.100.7", True)
        for fn, code in [("adm.secret", E.NOT_IN_TABLE), ("session.proxy_login", E.NOT_IN_TABLE)]:
            with pytest.raises(CallFailed) as cexc:
                await portal.call(fn, {}, **as_bob)
            assert cexc.value.code == code
        with pytest.raises(CallFailed) as cexc:
            await portal.call("acct.balance", as_sid=bob.sid, as_ip="198.51.100.8")
        assert cexc.value.code == E.NO_SESSION
        with pytest.raises(CallFailed) as cexc:
            await portal.call("events.subscribe", {"topics": ["x"]}, **as_bob)
        assert cexc.value.code == E.FORBIDDEN
        # A system session without session.proxy may not act for anyone.
        radius = await uc.connect("127.0.0.1", port)
        await radius.login("system", "radius", "radius-pw")
        with pytest.raises(CallFailed) as cexc:
            await radius.call("acct.balance", **as_bob)
        assert cexc.value.code == E.FORBIDDEN
        with pytest.raises(CallFailed) as cexc:
            await radius.call("session.proxy_login", {"login": "bob", "cnonce": b"c" * 16, "ip": "1.2.3.4"})
        assert cexc.value.code == E.NOT_IN_TABLE
        # Not an admin's session either, even with its SID and address.
        alice = await uc.connect("127.0.0.1", port)
        ainfo = await alice.login("admin", "alice", "alice-pw")
        with pytest.raises(CallFailed) as cexc:
            await portal.call("sys.whoami", as_sid=ainfo.sid, as_ip="127.0.0.1")
        assert cexc.value.code == E.NO_SESSION
        # The subscriber's session outlives the portal's connection; only logout ends it.
        await portal.close()
        portal2 = await uc.connect("127.0.0.1", port)
        await portal2.login("system", "portal", "portal-pw")
        assert (await portal2.call("acct.balance", **as_bob))["balance"] == 12_340_000
        assert await portal2.call("session.logout", **as_bob) is True
        with pytest.raises(CallFailed) as cexc:
            await portal2.call("acct.balance", **as_bob)
        assert cexc.value.code == E.NO_SESSION
        assert await portal2.call("sys.ping") == "pong"      # the portal's own session is untouched
        for c in (portal2, radius, alice):
            await c.close()


async def test_events_bounded_with_drop_count() -> None:
    async with running_service(URFAConfig(**CFG, event_queue=4)) as (svc, auth, port):
        c = await uc.connect("127.0.0.1", port)
        await c.login("system", "radius", "radius-pw")
        assert await c.subscribe("acct.balance", "nas.coa") == ["acct.balance", "nas.coa"]
        assert svc.publish("acct.balance", {"account": 1, "balance": -5_000_000}) == 1
        ev = await c.next_event(2)
        assert (ev.topic, ev.payload, ev.dropped) == ("acct.balance", {"account": 1, "balance": -5_000_000}, 0)
        for i in range(10):                     # faster than the pump can run: oldest dropped
            svc.publish("nas.coa", i)
        got = [await c.next_event(2) for _ in range(4)]
        assert [e.payload for e in got] == [6, 7, 8, 9] and got[0].dropped == 6
        assert svc.publish("unsubscribed.topic", 1) == 0
        assert await c.unsubscribe("nas.coa") == ["acct.balance"]
        assert svc.publish("nas.coa", 1) == 0
        await c.close()
        session = svc.sessions.get(c.info.sid)
        assert session is not None
        await eventually(lambda: session.owner is None, what="the server noticed the close")
        await c.resume()                        # subscriptions survive a resume
        assert svc.publish("acct.balance", "after") == 1
        assert (await c.next_event(2)).payload == "after"
        await c.close()


async def test_logout_closes_and_dropped_admin_connection_ends_session() -> None:
    async with running_service() as (svc, auth, port):
        c = await uc.connect("127.0.0.1", port)
        info = await c.login("admin", "alice", "alice-pw")
        await c.logout()
        await eventually(lambda: c.closed, what="the client closed after logout")
        assert c.closed and c.close_reason is not None and c.close_reason.code == E.LOGGED_OUT
        assert svc.sessions.get(info.sid) is None
        d = await uc.connect("127.0.0.1", port)
        dinfo = await d.login("user", "bob", "bob-pw")
        assert svc.sessions.get(dinfo.sid) is not None
        await d.close()
        await eventually(lambda: svc.sessions.get(dinfo.sid) is None, what="the user session ended")


@pytest.mark.parametrize("payload,code", [
    ((2 << 20).to_bytes(4, "big") + b"x" * 100, E.FRAME_TOO_LARGE),
    ((3).to_bytes(4, "big") + b"\xc1\xc1\xc1", E.PROTOCOL),
    (FrameEncoder().encode({"t": "call", "id": 1, "fn": "sys.ping", "args": {}}), E.PROTOCOL),
])
async def test_bad_frames_get_a_bye_then_close(payload: bytes, code: str) -> None:
    async with running_service() as (svc, auth, port):
        raw = await Raw.open(port)
        await raw.read()
        raw.w.write(payload)
        bye = await raw.read()
        assert bye is not None and bye["t"] == "bye" and bye["code"] == code
        assert await raw.read() is None


async def test_slow_loris_is_cut_at_the_handshake_deadline() -> None:
    async with running_service(URFAConfig(**CFG, handshake_timeout=0.3)) as (svc, auth, port):
        raw = await Raw.open(port)
        await raw.read()
        frame = FrameEncoder().encode({"t": "login", "proto": 1, "kind": "admin", "login": "a", "cnonce": b"c" * 16})
        t0 = time.monotonic()
        closed_after = None
        for byte in frame:
            try:
                raw.w.write(bytes([byte]))
                await raw.w.drain()
            except ConnectionError:
                break
            await asyncio.sleep(0.05)   # part of the scenario: a slow loris sends a byte at a time
            if raw.r.at_eof() or len(raw.r._buffer):  # type: ignore[attr-defined]
                break
        bye = await raw.read()
        closed_after = time.monotonic() - t0
        assert bye is not None and bye["code"] == E.TIMEOUT and closed_after < 1.0
        assert await raw.read() is None


async def test_login_rate_limit_per_login_and_address() -> None:
    async with running_service(URFAConfig(**CFG, login_failures=3, login_window=60)) as (svc, auth, port):
        for _ in range(3):
            c = await uc.connect("127.0.0.1", port)
            with pytest.raises(LoginFailed):
                await c.login("admin", "alice", "guess")
        c = await uc.connect("127.0.0.1", port)
        lookups = auth.lookups
        with pytest.raises(LoginFailed) as exc:
            await c.login("admin", "alice", "alice-pw")      # right password, still refused
        assert exc.value.code == E.RATE_LIMITED and auth.lookups == lookups
        c = await uc.connect("127.0.0.1", port)
        with pytest.raises(LoginFailed) as exc:              # the address is limited too
            await c.login("admin", "eve", "eve-pw")
        assert exc.value.code == E.RATE_LIMITED
        other = await uc.connect("127.0.0.1", port, local_addr=("127.0.0.3", 0))
        assert (await other.login("admin", "eve", "eve-pw")).login == "eve"
        await other.close()


async def test_unix_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "urfa.sock")
    async with running_service(unix=path) as (svc, auth, _):
        c = await uc.connect(unix=path)
        await c.login("system", "radius", "radius-pw")
        assert (await c.call("sys.whoami"))["ip"] == "unix"
        await c.close()


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    need_peer(shutil.which("openssl") is not None, "the openssl CLI (Debian openssl) is not installed")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-nodes", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return cert, key


async def test_tls_with_verified_server(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    async with running_service(tcp=("127.0.0.1", 0), ssl=server_ctx) as (svc, auth, port):
        client_ctx = ssl.create_default_context(cafile=str(cert))
        c = await uc.connect("127.0.0.1", port, ssl=client_ctx, server_hostname="localhost")
        await c.login("admin", "alice", "alice-pw")
        assert await c.call("sys.ping") == "pong"
        await c.close()
        with pytest.raises(ssl.SSLCertVerificationError):
            await uc.connect("127.0.0.1", port, ssl=ssl.create_default_context(), server_hostname="localhost")
    assert os.path.exists(cert)
