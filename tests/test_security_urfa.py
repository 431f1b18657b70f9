"""URFA as a black box over TCP: a real ``billcore serve`` attacked by raw
frames from loopback addresses (127.0.0.x, one per test, so one test's
failed logins do not rate-limit another's).

What an attacker on the URFA port can try: a subscriber calling admin
functions or acting as another session, a proxy acting with an admin's SID,
another address using a proxied SID, guessed SIDs, a replayed proof,
msgpack depth/length bombs inside the frame cap, a call flood past
``max_inflight``, idle and many connections.  Every refusal must be the
documented code (docs/protocol.md §10) and the server must keep serving.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from tests.conftest import TEMPLATE, _create_db, _drop_db, with_database
from tests.running import BillcoreProcess
from tests.waiting import eventually_awaited
from urfa import scram

ADMIN_PW = "admin-password-9"
PROXY_PW = "proxy-password-9"
HANDSHAKE = 2.0


class Raw:
    """One URFA connection spoken by hand: frames in, maps out."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.hello: dict[str, Any] = {}
        self.sid = b""

    @classmethod
    async def open(cls, port: int, src: str) -> Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))
        raw = cls(reader, writer)
        raw.hello = await raw.read()
        assert raw.hello["t"] == "hello" and len(raw.hello["nonce"]) == 16
        return raw

    def send_bytes(self, body: bytes) -> None:
        self.writer.write(len(body).to_bytes(4, "big") + body)

    def send(self, msg: dict[str, Any]) -> None:
        self.send_bytes(msgpack.packb(msg, use_bin_type=True))

    async def read(self, timeout: float = 10.0) -> dict[str, Any]:
        head = await asyncio.wait_for(self.reader.readexactly(4), timeout)
        body = await asyncio.wait_for(self.reader.readexactly(int.from_bytes(head, "big")), timeout)
        return msgpack.unpackb(body, raw=False, timestamp=3)  # type: ignore[no-any-return]

    async def bye(self, timeout: float = 10.0) -> str:
        """Read until the server's bye; its code.  The connection must then close."""
        while True:
            msg = await self.read(timeout)
            if msg["t"] == "bye":
                assert await asyncio.wait_for(self.reader.read(), timeout) == b""
                return str(msg["code"])

    async def login(self, kind: str, login: str, password: str, cnonce: bytes | None = None) -> bytes:
        """SCRAM by hand; the proof sent (so a test can replay it)."""
        cnonce = cnonce or secrets.token_bytes(16)
        self.send({"t": "login", "proto": 1, "kind": kind, "login": login, "cnonce": cnonce})
        ch = await self.read()
        assert ch["t"] == "challenge", ch
        keys = scram.client_keys(password, ch["salt"], ch["iter"])
        am = scram.auth_message(kind, login, cnonce, self.hello["nonce"], ch["salt"], ch["iter"])
        proof = scram.client_proof(keys, am)
        self.send({"t": "proof", "proof": proof})
        w = await self.read()
        assert w["t"] == "welcome", w
        assert w["sig"] == scram.server_signature(keys.server_key, am)
        self.sid = w["sid"]
        return proof

    async def call(self, fn: str, args: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        call_id = secrets.randbelow(1 << 62)
        self.send({"t": "call", "id": call_id, "fn": fn, "args": args or {}, **extra})
        while True:
            msg = await self.read()
            if msg.get("id") == call_id:
                return msg

    async def calls(self, batch: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        """Send every call before reading any answer; the answers in call order."""
        ids = [secrets.randbelow(1 << 62) for _ in batch]
        for call_id, (fn, args) in zip(ids, batch):
            self.send({"t": "call", "id": call_id, "fn": fn, "args": args})
        got: dict[int, dict[str, Any]] = {}
        while len(got) < len(ids):
            msg = await self.read()
            if msg.get("id") in ids:
                got[msg["id"]] = msg
        return [got[i] for i in ids]

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


def code(answer: dict[str, Any]) -> str:
    return "ok" if answer["t"] == "result" else str(answer.get("code"))


def cli(bc: BillcoreProcess, *args: str, env: dict[str, str]) -> None:
    done = subprocess.run([sys.executable, "-m", "billcore.cli", "-c", str(bc.config_path), *args],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
async def core(tmp_path_factory: pytest.TempPathFactory, pg_server_dsn: str,
               template_dsn: str) -> AsyncIterator[dict[str, Any]]:
    db = await _create_db(pg_server_dsn, TEMPLATE)
    bc = BillcoreProcess(tmp_path_factory.mktemp("sec-urfa"), dsn=with_database(pg_server_dsn, db),
                         urfa={"handshake_timeout": HANDSHAKE, "login_failures_per_minute": 10})
    bc.start()
    try:
        bc.child_pid("core")
        cli(bc, "admin", "create", "root", "--password-env", "PW", env={"PW": ADMIN_PW})
        cli(bc, "system", "create", "office", "--rights", "session.proxy", "--password-env", "PW",
            env={"PW": PROXY_PW})
        cli(bc, "system", "create", "collector", "--rights", "netflow.*", "--password-env", "PW",
            env={"PW": PROXY_PW})
        admin = await Raw.open(bc.urfa_port, "127.0.0.1")
        await admin.login("admin", "root", ADMIN_PW)
        ids = {}
        for name in ("alice", "bob"):
            made = await admin.call("users.create", {"login": name, "password": f"{name}-password"})
            assert code(made) == "ok", made
            ids[name] = made["value"]["basic_account_id"]
        yield {"bc": bc, "port": bc.urfa_port, "admin": admin, "ids": ids}
        await admin.close()
    finally:
        bc.__exit__(None, None, None)
        await _drop_db(pg_server_dsn, db)


async def still_serving(port: int, src: str) -> None:
    c = await Raw.open(port, src)
    await c.login("user", "bob", "bob-password")
    assert code(await c.call("sys.ping")) == "ok"
    await c.close()


async def test_a_subscriber_stays_in_their_own_table(core: dict[str, Any]) -> None:
    alice = await Raw.open(core["port"], "127.0.0.2")
    await alice.login("user", "alice", "alice-password")
    for fn, args in (("users.create", {"login": "x", "password": "y"}),
                     ("payments.add", {"account_id": core["ids"]["alice"], "amount": 10**9, "method": "cash"}),
                     ("accounts.get", {"account_id": core["ids"]["bob"]}), ("plugins.list", {}),
                     ("radius.nas_list", {}), ("session.proxy_login", {"login": "bob", "cnonce": b"x" * 16,
                                                                         "ip": "127.0.0.2"}),
                     ("audit.query", {})):
        assert code(await alice.call(fn, args)) == "not_in_table", fn
    table = (await alice.call("sys.calls"))["value"]
    assert all("user" in c["kinds"] and (c["right"] is None or c["right"].startswith("me.")) for c in table)
    # another subscriber's account through her own calls: refused by the core
    assert code(await alice.call("me.history", {"account_id": core["ids"]["bob"]})) == "accounts.unknown"
    # acting as another session needs session.proxy
    assert code(await alice.call("me.accounts", **{"as": core["admin"].sid, "ip": "127.0.0.1"})) == "forbidden"
    assert code(await alice.call("me.accounts", **{"as": secrets.token_bytes(16), "ip": "127.0.0.2"})) == "forbidden"
    mine = (await alice.call("me.accounts"))["value"]
    assert [a["id"] for a in mine] == [core["ids"]["alice"]]
    await alice.close()


async def test_proxied_sids_are_bound_to_proxy_and_address(core: dict[str, Any]) -> None:
    src = "127.0.0.3"
    office = await Raw.open(core["port"], src)
    await office.login("system", "office", PROXY_PW)
    cnonce = secrets.token_bytes(16)
    ch = (await office.call("session.proxy_login", {"login": "alice", "cnonce": cnonce, "ip": "192.0.2.10"}))["value"]
    keys = scram.client_keys("alice-password", ch["salt"], ch["iter"])
    am = scram.auth_message("user", "alice", cnonce, ch["nonce"], ch["salt"], ch["iter"])
    proof = scram.client_proof(keys, am)
    w = (await office.call("session.proxy_proof", {"handle": ch["handle"], "proof": proof}))["value"]
    sid = w["sid"]
    assert len(sid) == 16
    # the handle is single-use: replaying the proof is refused
    assert code(await office.call("session.proxy_proof", {"handle": ch["handle"], "proof": proof})) in (
        "auth_failed", "bad_args", "no_session")

    as_alice = {"as": sid, "ip": "192.0.2.10"}
    assert code(await office.call("me.accounts", **as_alice)) == "ok"
    assert code(await office.call("me.accounts", **{"as": sid, "ip": "192.0.2.11"})) == "no_session"
    assert code(await office.call("me.accounts", **{"as": sid})) == "no_session"                # no address at all
    assert code(await office.call("users.create", {"login": "x", "password": "y"}, **as_alice)) == "not_in_table"
    assert code(await office.call("events.subscribe", {"topics": ["blocks"]}, **as_alice)) in ("forbidden",
                                                                                                  "not_in_table")
    # an admin's SID or a subscriber's own (unproxied) SID cannot be borrowed, even from their address
    assert code(await office.call("users.search", {}, **{"as": core["admin"].sid, "ip": "127.0.0.1"})) == "no_session"
    bob = await Raw.open(core["port"], src)
    await bob.login("user", "bob", "bob-password")
    assert code(await office.call("me.accounts", **{"as": bob.sid, "ip": src})) == "no_session"
    # guessed SIDs
    for _ in range(50):
        assert code(await office.call("me.accounts", **{"as": secrets.token_bytes(16),
                                                        "ip": "192.0.2.10"})) == "no_session"
    # a system login without session.proxy may not act for anyone, not even with the right SID
    collector = await Raw.open(core["port"], src)
    await collector.login("system", "collector", PROXY_PW)
    assert code(await collector.call("me.accounts", **as_alice)) == "forbidden"
    # a SID of the wrong size is a malformed message
    office.send({"t": "call", "id": 1, "fn": "me.accounts", "args": {}, "as": b"x" * 15, "ip": "192.0.2.10"})
    assert await office.bye() == "protocol"
    for c in (bob, collector):
        await c.close()


async def test_guessed_resumes_and_replayed_proofs_fail(core: dict[str, Any]) -> None:
    src, port = "127.0.0.4", core["port"]
    # a captured proof is worthless on another connection (fresh server nonce)
    first = await Raw.open(port, src)
    cnonce = secrets.token_bytes(16)
    proof = await first.login("user", "alice", "alice-password", cnonce=cnonce)
    await first.close()
    replay = await Raw.open(port, src)
    replay.send({"t": "login", "proto": 1, "kind": "user", "login": "alice", "cnonce": cnonce})
    assert (await replay.read())["t"] == "challenge"
    replay.send({"t": "proof", "proof": proof})
    assert await replay.bye() == "auth_failed"
    # resuming a guessed SID: refused, then the address is rate limited
    codes = []
    for _ in range(12):
        c = await Raw.open(port, src)
        c.send({"t": "resume", "proto": 1, "sid": secrets.token_bytes(16), "cnonce": secrets.token_bytes(16),
                "proof": secrets.token_bytes(32)})
        codes.append(await c.bye())
    assert codes[0] == "resume_failed" and codes[-1] == "rate_limited", codes
    # even the right password now waits, from this address
    c = await Raw.open(port, src)
    c.send({"t": "login", "proto": 1, "kind": "user", "login": "bob", "cnonce": secrets.token_bytes(16)})
    assert await c.bye() == "rate_limited"
    await still_serving(port, "127.0.0.14")


def nested(depth: int) -> bytes:
    return b"\x91" * depth + b"\xc0"       # [[[...[nil]...]]]


async def test_msgpack_bombs_inside_the_cap_are_refused(core: dict[str, Any]) -> None:
    src, port = "127.0.0.5", core["port"]
    cap = 1 << 20

    def call_with(arg: bytes) -> bytes:   # {"t":"call","id":1,"fn":"sys.ping","args":{"x": <arg>}}
        return (b"\x84\xa1t\xa4call\xa2id\x01\xa2fn\xa8sys.ping\xa4args\x81\xa1x" + arg)

    bombs = {
        "depth 100k": call_with(nested(100_000)),
        "depth 2000": call_with(nested(2000)),
        "array of 2^32-1": call_with(b"\xdd\xff\xff\xff\xff"),
        "map of 2^32-1": call_with(b"\xdf\xff\xff\xff\xff"),
        "str of 2^32-1": call_with(b"\xdb\xff\xff\xff\xff"),
        "bin of 2^32-1": call_with(b"\xc6\xff\xff\xff\xff"),
        "ext type 5": call_with(b"\xd4\x05\x00"),
        "trailing bytes": call_with(b"\xc0") + b"\xc0",
        "non-str key": b"\x81\x01\x02",
        "not a map": b"\x93\x01\x02\x03",
    }
    for name, body in bombs.items():
        for logged_in in (False, True):
            c = await Raw.open(port, src)
            if logged_in:
                await c.login("user", "alice", "alice-password")
            started = time.monotonic()
            c.send_bytes(body)
            assert await c.bye() == "protocol", (name, logged_in)
            assert time.monotonic() - started < 2, name
    # a length over the cap is refused from its 4 bytes, before any body
    c = await Raw.open(port, src)
    c.writer.write((0xFFFFFFFF).to_bytes(4, "big"))
    assert await c.bye() == "frame_too_large"
    c = await Raw.open(port, src)
    c.writer.write((cap + 1).to_bytes(4, "big"))
    assert await c.bye() == "frame_too_large"

    # the widest containers that fit in the cap: decoded, refused by the schema, connection kept
    c = await Raw.open(port, src)
    await c.login("user", "alice", "alice-password")
    for arg in (b"\xdd" + (cap - 100).to_bytes(4, "big") + b"\x00" * (cap - 100),   # ~1M-element array
                b"\xde\x7f\xff" + b"\xa0\x00" * 0x7FFF,                                # 32k-key map ("" keys)
                nested(500)):
        body = call_with(arg)
        assert len(body) <= cap
        started = time.monotonic()
        c.send_bytes(body)
        answer = await c.read()
        assert answer["t"] == "error" and answer["code"] == "bad_args", answer
        assert time.monotonic() - started < 3
    assert code(await c.call("sys.ping")) == "ok"
    await c.close()
    await still_serving(port, "127.0.0.15")


async def test_a_call_flood_is_answered_busy_and_nothing_is_lost(core: dict[str, Any]) -> None:
    src, port = "127.0.0.6", core["port"]
    c = await Raw.open(port, src)
    await c.login("user", "alice", "alice-password")
    n = 600
    c.writer.write(b"".join(len(b).to_bytes(4, "big") + b for b in (
        msgpack.packb({"t": "call", "id": i, "fn": "me.accounts", "args": {}}) for i in range(n))))
    answers: dict[int, str] = {}
    while len(answers) < n:
        msg = await c.read(timeout=30)
        assert msg["id"] not in answers, "each call answered once"
        answers[msg["id"]] = code(msg)
    assert set(answers) == set(range(n))
    assert set(answers.values()) <= {"ok", "busy"}, set(answers.values())
    assert "busy" in answers.values() and "ok" in answers.values()
    assert code(await c.call("sys.ping")) == "ok"
    # an id repeated while its call is in flight is a protocol error
    # both in one write, so the server reads them together and the first is still
    # in flight when the second arrives (two writes raced on a loaded machine)
    twice = msgpack.packb({"t": "call", "id": 7, "fn": "me.accounts", "args": {}}, use_bin_type=True)
    c.writer.write((len(twice).to_bytes(4, "big") + twice) * 2)
    assert await c.bye() == "protocol"


async def test_an_idle_or_slow_connection_is_closed_at_the_handshake_deadline(core: dict[str, Any]) -> None:
    src, port = "127.0.0.7", core["port"]
    idle = await Raw.open(port, src)
    slow = await Raw.open(port, src)
    started = time.monotonic()

    async def dribble() -> None:   # a frame, a byte at a time (slowloris)
        body = msgpack.packb({"t": "login", "proto": 1, "kind": "user", "login": "alice", "cnonce": b"x" * 16})
        for b in len(body).to_bytes(4, "big") + body:
            slow.writer.write(bytes([b]))
            await asyncio.sleep(0.3)   # part of the scenario: a slow loris sends a byte at a time
            if slow.reader.at_eof():
                return
    task = asyncio.create_task(dribble())
    assert await idle.bye(timeout=HANDSHAKE + 3) == "timeout"
    assert await slow.bye(timeout=HANDSHAKE + 3) == "timeout"
    assert time.monotonic() - started < HANDSHAKE + 2
    task.cancel()


async def test_one_address_cannot_hold_hundreds_of_connections(core: dict[str, Any]) -> None:
    src, port = "127.0.0.8", core["port"]
    conns, refused = [], 0
    try:
        for _ in range(300):
            try:
                conns.append(await Raw.open(port, src))
            except (AssertionError, ConnectionError, asyncio.IncompleteReadError, KeyError):
                refused += 1
        assert refused > 0, "300 unauthenticated connections from one address were all accepted"
        assert len(conns) == 64                                     # the default cap
        over = await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))
        extra = Raw(*over)
        assert await extra.bye() == "rate_limited"                 # said why, instead of the hello
        other = await Raw.open(port, "127.0.0.9")                  # another address is not affected
        other.writer.close()
    finally:
        for c in conns:
            c.writer.close()

    async def reopen() -> Raw | None:
        try:
            return await Raw.open(port, src)
        except (AssertionError, ConnectionError, asyncio.IncompleteReadError, KeyError):
            return None

    again = await eventually_awaited(reopen, what="a place given back")   # closing gives the places back
    again.writer.close()


async def test_one_subscriber_cannot_fill_the_session_table(db_dsn: str, tmp_path: Path) -> None:
    import asyncpg

    from billcore.server.calls import CallRegistry
    from billcore.server.principals import DatabaseAuth
    from billcore.server.service import URFAConfig, URFAService
    from tests.test_portal_harness import LiveCore, all_calls
    from webedge.core_link import SessionGone

    pool = await asyncpg.create_pool(db_dsn, min_size=1, max_size=4)
    live = LiveCore(pool, tmp_path)
    await live.provision()
    registry = CallRegistry()
    service = URFAService(registry, DatabaseAuth(pool), URFAConfig(max_sessions=30, login_failures=1000))
    live.core.publish = service.publish
    registry.register_all(all_calls(live.core))
    await service.start(tcp=("127.0.0.1", live.port))
    try:
        admin = await live.admin()
        await admin.call("users.create", {"login": "alice", "password": "alice-password"})
        await admin.close()
        office = live.link()
        sids = []
        for _ in range(40):                           # she logs in again and again
            try:
                sids.append((await office.proxy_login("alice", "alice-password", "192.0.2.10")).sid)
            except Exception:
                break
        assert len(sids) == 40                        # every login succeeds ...
        live_sids = [x.sid for x in service.sessions if x.principal.login == "alice"]
        assert live_sids == sids[-16:]                # ... ending her oldest sessions beyond the cap
        with pytest.raises(SessionGone):              # the office shows its login form again
            await office.call(sids[0], "192.0.2.10", "sys.whoami")
        assert (await office.call(sids[-1], "192.0.2.10", "sys.whoami"))["login"] == "alice"
        await office.close()
        again = await live.admin()                    # an administrator must still get in
        await again.close()
    finally:
        await service.stop()
        await pool.close()


async def test_a_nul_in_the_login_name_gets_a_prompt_answer(core: dict[str, Any]) -> None:
    c = await Raw.open(core["port"], "127.0.0.10")
    c.send({"t": "login", "proto": 1, "kind": "user", "login": "al\0ice", "cnonce": secrets.token_bytes(16)})
    msg = await c.read(timeout=HANDSHAKE / 2)
    assert msg["t"] == "bye" and msg["code"] == "protocol", msg      # docs/protocol.md §4
    await c.close()


async def test_a_nul_in_a_text_argument_is_a_clear_error(core: dict[str, Any]) -> None:
    answer = await core["admin"].call("users.search", {"text": "a\0b"})
    assert code(answer) == "bad_args", answer                      # docs/protocol.md §8
    office = await Raw.open(core["port"], "127.0.0.11")
    await office.login("system", "office", PROXY_PW)
    answer = await office.call("session.proxy_login", {"login": "al\0ice", "cnonce": secrets.token_bytes(16),
                                                       "ip": "192.0.2.1"})
    assert code(answer) == "bad_args", answer
    await office.close()


async def guess_in_parallel(port: int, sources: list[str], logins: list[tuple[str, str]]) -> dict[str, int]:
    """Issue 14 item 1's attack: open every connection, send every ``login``,
    read every challenge, then send every (wrong) proof.  What each got; the
    count of ``auth_failed`` is the number of proofs the server checked."""
    conns = await asyncio.gather(*(Raw.open(port, src) for src in sources))
    try:
        for c, (kind, login) in zip(conns, logins):
            c.send({"t": "login", "proto": 1, "kind": kind, "login": login, "cnonce": secrets.token_bytes(16)})
        firsts = await asyncio.gather(*(c.read() for c in conns))
        seen: dict[str, int] = {}
        challenged = []
        for c, first in zip(conns, firsts):
            if first["t"] == "challenge":
                challenged.append(c)
            else:
                assert first["t"] == "bye", first
                seen[first["code"]] = seen.get(first["code"], 0) + 1
        for c in challenged:
            c.send({"t": "proof", "proof": secrets.token_bytes(32)})
        for got in await asyncio.gather(*(c.bye() for c in challenged)):
            seen[got] = seen.get(got, 0) + 1
        return seen
    finally:
        await asyncio.gather(*(c.close() for c in conns))


async def test_parallel_logins_cannot_pass_the_rate_limit(core: dict[str, Any]) -> None:
    """At most the documented number of proofs is checked per minute (10 in
    this core), per login and per address, however many are in flight."""
    port = core["port"]
    cli(core["bc"], "admin", "create", "victim", "--password-env", "PW", env={"PW": "victim-password-9"})
    # per login: 200 guesses against one admin from 200 addresses at once
    sources = [f"127.0.3.{i}" for i in range(1, 201)]
    seen = await guess_in_parallel(port, sources, [("admin", "victim")] * 200)
    print(f"200 parallel guesses against one admin from 200 addresses: {seen}")
    assert seen.get("auth_failed", 0) <= 10 and sum(seen.values()) == 200, seen
    assert seen["rate_limited"] >= 190, seen
    late = await Raw.open(port, "127.0.3.201")             # even the right password waits now
    late.send({"t": "login", "proto": 1, "kind": "admin", "login": "victim", "cnonce": secrets.token_bytes(16)})
    assert await late.bye() == "rate_limited"
    # per address: 64 connections (the per-address cap) from one address, each a different login
    seen = await guess_in_parallel(port, ["127.0.4.1"] * 64, [("user", f"nobody{i}") for i in range(64)])
    print(f"64 parallel guesses from one address: {seen}")
    assert seen.get("auth_failed", 0) <= 10 and sum(seen.values()) == 64, seen
    # and through the office: proxied logins for one subscriber, all started before any proof
    made = await core["admin"].call("users.create", {"login": "carol", "password": "carol-password"})
    assert code(made) == "ok", made
    office = await Raw.open(port, "127.0.4.2")
    await office.login("system", "office", PROXY_PW)
    starts = await office.calls([("session.proxy_login", {
        "login": "carol", "cnonce": secrets.token_bytes(16), "ip": f"192.0.2.{i}"}) for i in range(1, 51)])
    handles = [s["value"]["handle"] for s in starts if code(s) == "ok"]
    assert len(handles) <= 10 and all(code(s) in ("ok", "rate_limited") for s in starts), starts
    proofs = await office.calls([("session.proxy_proof", {"handle": h, "proof": secrets.token_bytes(32)})
                                 for h in handles])
    assert [code(p) for p in proofs] == ["auth_failed"] * len(handles)
    print(f"50 parallel proxied logins for one subscriber: {len(handles)} challenged, {len(proofs)} proofs checked")
    await office.close()
    await still_serving(port, "127.0.4.3")


async def read_until_bye(c: Raw) -> tuple[list[dict[str, Any]], str]:
    """Everything before the server's bye, and its code (the connection must then close)."""
    before = []
    while True:
        msg = await c.read(5.0)
        if msg["t"] == "bye":
            assert await asyncio.wait_for(c.reader.read(), 5.0) == b""
            return before, str(msg["code"])
        before.append(msg)


async def test_a_failed_resume_ends_a_live_session_with_a_bye(core: dict[str, Any]) -> None:
    """Issue 14 item 2: B's failed resume of A's SID deletes it (documented);
    A's connection then hears bye `expired`, and the core logs no traceback."""
    port, bc = core["port"], core["bc"]
    mark = len(bc.log())
    a = await Raw.open(port, "127.0.0.16")
    await a.login("user", "bob", "bob-password")
    assert code(await a.call("sys.ping")) == "ok"
    b = await Raw.open(port, "127.0.0.17")
    b.send({"t": "resume", "proto": 1, "sid": a.sid, "cnonce": secrets.token_bytes(16),
            "proof": secrets.token_bytes(32)})
    assert await b.bye() == "resume_failed"
    before, bye = await read_until_bye(a)
    assert bye == "expired", (before, bye)
    await a.close()
    # a window for a late error to be logged: there is no event to wait for when nothing goes wrong
    await asyncio.sleep(0.2)
    tail = bc.log()[mark:]
    assert "Traceback" not in tail and "KeyError" not in tail, tail
    await still_serving(port, "127.0.0.18")


async def test_a_deleted_subscriber_loses_their_open_session(core: dict[str, Any]) -> None:
    """Deleting a subscriber ends their live sessions: the connection gets bye
    `logged_out` at once instead of working on until it is closed."""
    made = await core["admin"].call("users.create", {"login": "dave", "password": "dave-password"})
    assert code(made) == "ok", made
    dave = await Raw.open(core["port"], "127.0.0.19")
    await dave.login("user", "dave", "dave-password")
    assert code(await dave.call("me.accounts")) == "ok"
    gone = await core["admin"].call("users.delete", {"user_id": made["value"]["id"]})
    assert code(gone) == "ok", gone
    before, bye = await read_until_bye(dave)
    assert bye == "logged_out" and before == [], (before, bye)


async def test_local_services_logging_in_at_once_over_the_unix_socket_all_get_in(tmp_path: Path) -> None:
    """Attempts in flight count, but the Unix socket (every local edge's one
    "address") counts per login only: 16 services starting together, more
    than the login limit, all log in at once."""
    from tests.test_urfa_harness import running_service
    from urfa import client as uc
    from billcore.server.service import URFAConfig

    path = str(tmp_path / "urfa.sock")
    async with running_service(URFAConfig(secret=b"k" * 32, mock_iterations=4096, login_failures=5),
                               unix=path) as (svc, auth, _):
        for i in range(16):
            auth.add("system", f"worker{i}", "worker-pw")
        clients = await asyncio.gather(*(uc.connect(unix=path) for _ in range(16)))
        infos = await asyncio.gather(*(c.login("system", f"worker{i}", "worker-pw") for i, c in enumerate(clients)))
        assert [i.kind for i in infos] == ["system"] * 16
        for c in clients:
            await c.close()


async def proven(port: int, src: str, kind: str, login: str, password: str) -> tuple[Raw, dict[str, Any], bytes]:
    """A connection that sent a right proof: the server's answer to it, and the ServerSignature expected."""
    raw = await Raw.open(port, src)
    cnonce = secrets.token_bytes(16)
    raw.send({"t": "login", "proto": 1, "kind": kind, "login": login, "cnonce": cnonce})
    ch = await raw.read()
    keys = scram.client_keys(password, ch["salt"], ch["iter"])
    am = scram.auth_message(kind, login, cnonce, raw.hello["nonce"], ch["salt"], ch["iter"])
    raw.send({"t": "proof", "proof": scram.client_proof(keys, am)})
    return raw, await raw.read(), scram.server_signature(keys.server_key, am)


async def test_the_second_factor_cannot_be_skipped(core: dict[str, Any]) -> None:
    """An enrolled operator's right password opens nothing: until the code, every other frame is a
    protocol error, a wrong or over-long code ends the connection, and the web office's login can
    neither start an operator's proxied login nor act as one."""
    from billcore.common.totp import parse_b32, totp

    port, src = core["port"], "127.0.0.9"
    made = await core["admin"].call("operators.create", {"login": "otto", "password": "otto-password",
                                                         "groups": ["support"]})
    assert code(made) == "ok", made
    otto = await Raw.open(port, src)
    await otto.login("admin", "otto", "otto-password")
    begun = (await otto.call("self.otp_begin"))["value"]
    secret = parse_b32(begun["secret"])
    assert code(await otto.call("self.otp_confirm", {"code": totp(secret, time.time())})) == "ok"
    await otto.close()

    raw, answer, signature = await proven(port, src, "admin", "otto", "otto-password")
    assert answer == {"t": "otp", "sig": signature}
    raw.send({"t": "call", "id": 1, "fn": "sys.whoami", "args": {}})      # skipping the code
    assert await raw.bye() == "protocol"
    raw, answer, _ = await proven(port, src, "admin", "otto", "otto-password")
    raw.send({"t": "otp_code", "code": "1" * 65})
    assert await raw.bye() == "protocol"
    raw, answer, _ = await proven(port, src, "admin", "otto", "otto-password")
    raw.send({"t": "otp_code", "code": "000000"})
    assert await raw.bye() == "auth_failed"
    # a code before any proof, and from a subscriber's login, is out of turn
    raw = await Raw.open(port, src)
    raw.send({"t": "otp_code", "code": "000000"})
    assert await raw.bye() == "protocol"
    raw, answer, _ = await proven(port, src, "user", "bob", "bob-password")
    assert answer["t"] == "welcome"
    raw.send({"t": "otp_code", "code": "000000"})
    assert await raw.bye() == "protocol"

    # the office (session.proxy) cannot log an operator in; the console (session.proxy_admin) can
    cli(core["bc"], "system", "create", "console-test", "--rights", "session.proxy_admin", "--password-env", "PW",
        env={"PW": PROXY_PW})
    office, console = await Raw.open(port, src), await Raw.open(port, src)
    await office.login("system", "office", PROXY_PW)
    await console.login("system", "console-test", PROXY_PW)
    cnonce = secrets.token_bytes(16)
    start = {"login": "root", "cnonce": cnonce, "ip": "192.0.2.77", "kind": "admin"}
    assert code(await office.call("session.proxy_login", start)) == "forbidden"
    started = await console.call("session.proxy_login", start)
    ch = started["value"]
    keys = scram.client_keys(ADMIN_PW, ch["salt"], ch["iter"])
    am = scram.auth_message("admin", "root", cnonce, ch["nonce"], ch["salt"], ch["iter"])
    finished = await console.call("session.proxy_proof", {"handle": ch["handle"], "proof": scram.client_proof(keys, am)})
    as_root = {"as": finished["value"]["sid"], "ip": "192.0.2.77"}
    assert code(await office.call("sys.whoami", **as_root)) == "forbidden"
    assert code(await office.call("users.create", {"login": "z", "password": "zz-password"}, **as_root)) == "forbidden"
    whoami = await console.call("sys.whoami", **as_root)
    assert (whoami["value"]["kind"], whoami["value"]["login"]) == ("admin", "root")
    await office.close()
    await console.close()
    await still_serving(port, src)
