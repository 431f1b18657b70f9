"""The URFA service's decisions without sockets: the login desk, the
dispatcher's admission and the event hub's rules, driven by a ``now`` we
pass in (no transport, no sleeps)."""

from __future__ import annotations

import secrets
from typing import Any

import pytest

from billcore.server.calls import CallRegistry, CallSpec
from billcore.server.dispatcher import PROXY_RIGHT, admit
from billcore.server.event_hub import MAX_TOPICS, Outbox, check_subscription, delivery
from billcore.server.login_desk import LoginDesk, PendingLogin
from billcore.server.login_limiter import LoginLimiter
from billcore.server.sessions import Principal, Session, SessionTable
from billcore.server.topics import TOPICS
from tests.test_urfa_harness import ITER, MemoryAuth
from urfa import scram
from urfa.errors import (
    AUTH_FAILED, BAD_ARGS, DELETED, FORBIDDEN, NO_SESSION, NOT_IN_TABLE, RATE_LIMITED, RESUME_FAILED, CallFailed,
)
from urfa.messages import Call

PASSWORD = "correct horse"


async def _echo(ctx: Any, x: int) -> int:
    return x


def registry() -> CallRegistry:
    reg = CallRegistry()
    reg.register(CallSpec("t.echo", _echo, args={"x": "int"}, module="t"))
    reg.register(CallSpec("t.mine", _echo, args={"x": "int"}, module="t", kinds=frozenset({"user"})))
    return reg


def desk(auth: MemoryAuth, failures: int = 3) -> LoginDesk:
    sessions = SessionTable(timeout=60.0)
    return LoginDesk(registry(), auth, sessions, LoginLimiter(failures, window=300.0), b"s" * 32, lambda: 0.0,
                     lookup_timeout=1.0, handshake_timeout=10.0, mock_iterations=ITER, max_proxy_logins=4)


def proof_for(pending: PendingLogin, password: str) -> bytes:
    keys = scram.client_keys(password, pending.verifier.salt, pending.verifier.iterations)
    return scram.client_proof(keys, pending.auth_message())


def nonce() -> bytes:
    return secrets.token_bytes(scram.NONCE_BYTES)


async def login(front: LoginDesk, kind: str, name: str, password: str, ip: str, now: float) -> Session:
    pending = await front.begin_login(kind, name, nonce(), nonce(), ip, now)
    session, _signature = front.finish_login(pending, proof_for(pending, password), now)
    return session


# -- the login desk -----------------------------------------------------------

async def test_a_right_password_opens_a_session_bound_to_the_address() -> None:
    auth = MemoryAuth()
    auth.add("admin", "root", PASSWORD)
    front = desk(auth)
    session = await login(front, "admin", "root", PASSWORD, "192.0.2.1", now=5.0)
    assert session.principal.login == "root" and session.ip == "192.0.2.1"
    assert front.sessions.get(session.sid) is session and session.resume_key is None   # admins do not resume


async def test_an_unknown_login_fails_like_a_wrong_password() -> None:
    auth = MemoryAuth()
    auth.add("admin", "root", PASSWORD)
    front = desk(auth)
    for name, password in (("root", "wrong"), ("nobody", PASSWORD)):
        pending = await front.begin_login("admin", name, nonce(), nonce(), "192.0.2.1", 0.0)
        with pytest.raises(CallFailed) as failed:
            front.finish_login(pending, proof_for(pending, password), 0.0)
        assert (failed.value.code, failed.value.message) == (AUTH_FAILED, "login failed")
    assert len(front.sessions) == 0


async def test_logins_in_flight_count_against_the_address_before_any_proof() -> None:
    """Three challenges handed out from one address: the fourth login from it
    is refused before the backend is asked, whoever it is for."""
    auth = MemoryAuth()
    front = desk(auth, failures=3)
    for i in range(3):
        await front.begin_login("admin", f"guess{i}", nonce(), nonce(), "198.51.100.7", float(i))
    lookups = auth.lookups
    with pytest.raises(CallFailed) as refused:
        await front.begin_login("admin", "another", nonce(), nonce(), "198.51.100.7", 3.0)
    assert refused.value.code == RATE_LIMITED and auth.lookups == lookups
    # the window passes: the address may try again
    await front.begin_login("admin", "another", nonce(), nonce(), "198.51.100.7", 3.0 + 300.0)


async def test_over_the_unix_socket_only_the_login_is_counted() -> None:
    auth = MemoryAuth()
    front = desk(auth, failures=2)
    for i in range(5):   # many local services at once: the socket is not one "address"
        await front.begin_login("system", f"svc{i}", nonce(), nonce(), "unix", 0.0)
    await front.begin_login("system", "svc0", nonce(), nonce(), "unix", 0.0)
    with pytest.raises(CallFailed) as refused:
        await front.begin_login("system", "svc0", nonce(), nonce(), "unix", 0.0)
    assert refused.value.code == RATE_LIMITED


async def test_an_abandoned_challenge_stops_counting() -> None:
    auth = MemoryAuth()
    front = desk(auth, failures=1)
    pending = await front.begin_login("admin", "root", nonce(), nonce(), "192.0.2.9", 0.0)
    front.abandon(pending)   # the connection closed before its proof: no guess was checked
    await front.begin_login("admin", "root", nonce(), nonce(), "192.0.2.9", 0.0)


async def test_a_proxied_login_expires_unless_its_proof_comes_in_time() -> None:
    auth = MemoryAuth()
    auth.add("user", "alice", PASSWORD)
    front = desk(auth)
    pending = await front.begin_login("user", "alice", nonce(), nonce(), "203.0.113.5", 0.0)
    late = front.add_proxy_login(pending)
    assert front.take_proxy_login(late, 10.0) is None          # handshake_timeout is 10 s
    pending = await front.begin_login("user", "alice", nonce(), nonce(), "203.0.113.5", 20.0)
    handle = front.add_proxy_login(pending)
    taken = front.take_proxy_login(handle, 25.0)
    assert taken is pending and front.take_proxy_login(handle, 25.0) is None   # one use
    session, _signature = front.finish_login(taken, proof_for(taken, PASSWORD), 25.0, proxied=True)
    assert session.proxied and session.resume_key is None


async def test_parked_proxy_logins_are_bounded_and_swept() -> None:
    auth = MemoryAuth()
    front = desk(auth)
    handles = [front.add_proxy_login(await front.begin_login("user", f"u{i}", nonce(), nonce(),
                                                             f"203.0.113.{i}", float(i))) for i in range(6)]
    assert front.take_proxy_login(handles[0], 6.0) is None     # at most 4 kept: the oldest went first
    front.sweep(15.5)                                          # u2..u5 expire at 12..15
    assert all(front.take_proxy_login(handle, 0.0) is None for handle in handles)


async def test_a_resume_with_a_wrong_proof_deletes_the_session_and_counts() -> None:
    auth = MemoryAuth()
    auth.add("system", "radius", PASSWORD)
    front = desk(auth, failures=1)
    session = await login(front, "system", "radius", PASSWORD, "192.0.2.2", 0.0)
    assert session.resume_key is not None
    snonce, cnonce = nonce(), nonce()
    with pytest.raises(CallFailed) as refused:
        front.resume(session.sid, "192.0.2.2", snonce, cnonce, b"\0" * 32, 1.0)
    assert refused.value.code == RESUME_FAILED and front.sessions.get(session.sid) is None
    with pytest.raises(CallFailed) as limited:   # that failure used the address's one try
        front.resume(session.sid, "192.0.2.2", snonce, cnonce, b"\0" * 32, 2.0)
    assert limited.value.code == RATE_LIMITED


async def test_a_resume_with_the_right_proof_takes_the_session_up() -> None:
    auth = MemoryAuth()
    auth.add("system", "radius", PASSWORD)
    front = desk(auth)
    session = await login(front, "system", "radius", PASSWORD, "192.0.2.2", 0.0)
    assert session.resume_key is not None
    snonce, cnonce = nonce(), nonce()
    proof = scram.resume_proof(session.resume_key, snonce, cnonce, session.sid)
    resumed, signature = front.resume(session.sid, "192.0.2.2", snonce, cnonce, proof, 30.0)
    assert resumed is session and session.last_seen == 30.0
    assert signature == scram.resume_signature(session.resume_key, snonce, cnonce, session.sid)


# -- the dispatcher's admission -------------------------------------------------

def principal(kind: str, rights: frozenset[str] = frozenset(), pid: int = 1) -> Principal:
    return Principal(kind, f"{kind}{pid}", pid, rights, scram.make_verifier("x", iterations=ITER))


def open_session(sessions: SessionTable, reg: CallRegistry, who: Principal, ip: str, *,
                 proxied: bool = False) -> Session:
    return sessions.create(who, ip, reg.snapshot(who.kind, who.rights), 0.0, proxied=proxied)


def refusal(sessions: SessionTable, session: Session, call: Call, now: float = 1.0) -> str:
    with pytest.raises(CallFailed) as refused:
        admit(sessions, session, call, now)
    return refused.value.code


def test_admit_checks_the_table_and_the_arguments() -> None:
    reg, sessions = registry(), SessionTable(timeout=60.0)
    admin = open_session(sessions, reg, principal("admin"), "192.0.2.1")
    session, proxy, symbol = admit(sessions, admin, Call(1, "t.echo", {"x": 1}), now=7.0)
    assert session is admin and proxy is None and symbol.spec.name == "t.echo" and admin.last_seen == 7.0
    assert refusal(sessions, admin, Call(2, "t.mine", {"x": 1})) == NOT_IN_TABLE    # a subscriber's call
    assert refusal(sessions, admin, Call(3, "t.echo", {"x": "1"})) == BAD_ARGS
    assert refusal(sessions, admin, Call(4, "t.echo", {})) == BAD_ARGS
    reg.delete_module("t")
    assert refusal(sessions, admin, Call(5, "t.echo", {"x": 1})) == DELETED


def test_admit_lets_only_a_proxy_right_act_for_a_proxied_session_at_its_address() -> None:
    reg, sessions = registry(), SessionTable(timeout=60.0)
    office = open_session(sessions, reg, principal("system", frozenset({PROXY_RIGHT}), pid=1), "unix")
    other = open_session(sessions, reg, principal("system", pid=2), "unix")
    alice = open_session(sessions, reg, principal("user", pid=3), "203.0.113.5", proxied=True)
    bob = open_session(sessions, reg, principal("user", pid=4), "203.0.113.6")

    session, proxy, _symbol = admit(sessions, office, Call(1, "t.mine", {"x": 1}, alice.sid, "203.0.113.5"), 2.0)
    assert session is alice and proxy == office.principal
    assert refusal(sessions, other, Call(2, "t.mine", {"x": 1}, alice.sid, "203.0.113.5")) == FORBIDDEN
    assert refusal(sessions, office, Call(3, "t.mine", {"x": 1}, alice.sid, "203.0.113.99")) == NO_SESSION
    assert refusal(sessions, office, Call(4, "t.mine", {"x": 1}, bob.sid, "203.0.113.6")) == NO_SESSION
    assert refusal(sessions, office, Call(5, "t.mine", {"x": 1}, alice.sid, "203.0.113.5"), now=200.0) == NO_SESSION
    assert sessions.get(alice.sid) is None   # found idle too long: ended


# -- the event hub's rules ----------------------------------------------------

def test_who_may_subscribe_to_what() -> None:
    reg, sessions = registry(), SessionTable(timeout=60.0)
    reader = open_session(sessions, reg, principal("admin", frozenset({"blocks.read"})), "192.0.2.1")
    nobody = open_session(sessions, reg, principal("admin", pid=2), "192.0.2.1")
    subscriber = open_session(sessions, reg, principal("user", pid=3), "192.0.2.3")
    office_user = open_session(sessions, reg, principal("user", pid=4), "192.0.2.4", proxied=True)
    check_subscription(TOPICS, reader, ["blocks"])
    check_subscription(TOPICS, subscriber, ["blocks"])
    for session, topics, code in ((nobody, ["blocks"], FORBIDDEN), (subscriber, ["classifier"], FORBIDDEN),
                                  (office_user, ["blocks"], FORBIDDEN), (reader, ["no.such"], BAD_ARGS),
                                  (reader, [["blocks"]], BAD_ARGS), (reader, [""], BAD_ARGS)):
        with pytest.raises(CallFailed) as refused:
            check_subscription(TOPICS, session, topics)  # type: ignore[arg-type]
        assert refused.value.code == code, (session, topics)
    reader.topics.update(f"t{i}" for i in range(MAX_TOPICS))
    with pytest.raises(CallFailed):
        check_subscription(TOPICS, reader, ["blocks"])


def test_a_subscriber_gets_only_their_own_accounts_events_without_the_operators_words() -> None:
    reg, sessions = registry(), SessionTable(timeout=60.0)
    admin = open_session(sessions, reg, principal("admin", frozenset({"blocks.read"})), "192.0.2.1")
    subscriber = open_session(sessions, reg, principal("user", pid=3), "192.0.2.3")
    subscriber.accounts = frozenset({42})
    event = {"account_id": 42, "kind": "admin", "action": "set", "reason": "unpaid, rude on the phone", "by": "root"}
    assert delivery(TOPICS["blocks"], admin, event) == (True, event)
    visible, seen = delivery(TOPICS["blocks"], subscriber, event)
    assert visible and seen["account_id"] == 42 and "reason" not in seen and "by" not in seen
    assert delivery(TOPICS["blocks"], subscriber, {**event, "account_id": 43}) == (False, None)


async def test_a_full_outbox_drops_the_oldest_and_says_how_many() -> None:
    outbox = Outbox(cap=2)
    for i in range(5):
        outbox.push("blocks", {"n": i})
    assert outbox.wake.is_set()
    first, second = outbox.take(), outbox.take()
    assert first is not None and second is not None and outbox.take() is None
    assert (first.payload, first.dropped) == ({"n": 3}, 3) and (second.payload, second.dropped) == ({"n": 4}, 0)
