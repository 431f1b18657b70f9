"""Session table and login limiter: pure, driven by a clock we pass in."""

from __future__ import annotations

import secrets

import pytest

from billcore.server.calls import CallRegistry, CallSpec
from billcore.server.login_limiter import LoginLimiter
from billcore.server.sessions import NoSession, Principal, ResumeRefused, SessionTable, TooManySessions
from urfa.server import address_key
from urfa import scram


async def _noop(ctx: object) -> None:
    return None


def principal(kind: str) -> Principal:
    return Principal(kind, f"{kind}1", 1, frozenset(), scram.make_verifier("x", iterations=4096))


def table_and_registry() -> tuple[SessionTable, CallRegistry]:
    reg = CallRegistry()
    reg.register(CallSpec("m.f", _noop, module="m"))
    return SessionTable(timeout=60.0), reg


def test_lookup_checks_address_and_touches() -> None:
    t, reg = table_and_registry()
    s = t.create(principal("user"), "10.0.0.1", reg.snapshot("user", frozenset()), now=0.0)
    assert len(s.sid) == 16
    assert t.lookup(s.sid, "10.0.0.1", now=50.0) is s
    with pytest.raises(NoSession):
        t.lookup(s.sid, "10.0.0.2", now=51.0)
    assert t.lookup(s.sid, "10.0.0.1", now=100.0) is s    # touched at 50, idle 50 < 60
    with pytest.raises(NoSession):
        t.lookup(secrets.token_bytes(16), "10.0.0.1", now=100.0)


def test_expiry_by_driven_clock_closes_call_tables() -> None:
    t, reg = table_and_registry()
    a = t.create(principal("admin"), "1.1.1.1", reg.snapshot("admin", frozenset()), now=0.0)
    b = t.create(principal("admin"), "1.1.1.1", reg.snapshot("admin", frozenset()), now=30.0)
    assert reg.module_refs("m") == 2
    assert t.expire(59.9) == []
    assert t.expire(60.0) == [a] and len(t) == 1 and reg.module_refs("m") == 1
    t.touch(b, 80.0)
    assert t.expire(139.0) == [] and t.expire(140.0) == [b]
    assert reg.module_refs("m") == 0


def test_each_principal_holds_at_most_its_cap_the_oldest_ending_first() -> None:
    reg = CallRegistry()
    reg.register(CallSpec("m.f", _noop, module="m"))
    t = SessionTable(timeout=60.0, max_per_login=3, max_per_system=5)
    alice, bob = principal("user"), Principal("user", "bob", 2, frozenset(), principal("user").verifier)
    made = []
    for i in range(3):
        assert t.make_room(alice) == []
        made.append(t.create(alice, "10.0.0.1", reg.snapshot("user", frozenset()), now=float(i)))
    with pytest.raises(TooManySessions):          # the table keeps the cap even if a caller forgets
        t.create(alice, "10.0.0.1", reg.snapshot("user", frozenset()), now=3.0)
    b = t.create(bob, "10.0.0.2", reg.snapshot("user", frozenset()), now=3.0)    # others are not affected
    assert t.make_room(alice) == [made[0]]
    made.append(t.create(alice, "10.0.0.1", reg.snapshot("user", frozenset()), now=4.0))
    assert t.of(alice) == made[1:] and t.of(bob) == [b] and len(t) == 4
    assert reg.module_refs("m") == 4               # the ended session's call table was closed
    t.end(made[2].sid)                             # an ended session frees its place
    assert t.make_room(alice) == [] and t.of(alice) == [made[1], made[3]]
    system = principal("system")                   # system principals have their own, larger cap
    for i in range(5):
        t.create(system, "10.0.0.9", reg.snapshot("system", frozenset()), now=5.0)
    assert len(t.make_room(system)) == 1
    assert t.expire(1000.0) and t.of(alice) == t.of(system) == []


def _system_session(t: SessionTable, reg: CallRegistry) -> tuple[bytes, bytes]:
    rkey = secrets.token_bytes(32)
    s = t.create(principal("system"), "10.0.0.9", reg.snapshot("system", frozenset()), now=0.0, resume_key=rkey)
    return s.sid, rkey


def test_resume_with_right_proof_from_same_address() -> None:
    t, reg = table_and_registry()
    sid, rkey = _system_session(t, reg)
    sn, cn = secrets.token_bytes(16), secrets.token_bytes(16)
    s = t.resume(sid, "10.0.0.9", sn, cn, scram.resume_proof(rkey, sn, cn, sid), now=10.0)
    assert s.sid == sid and s.last_seen == 10.0


@pytest.mark.parametrize("case", ["other_ip", "bad_proof", "expired", "replayed_nonce"])
def test_any_failed_resume_deletes_the_sid(case: str) -> None:
    t, reg = table_and_registry()
    sid, rkey = _system_session(t, reg)
    sn, cn = secrets.token_bytes(16), secrets.token_bytes(16)
    proof = scram.resume_proof(rkey, sn, cn, sid)
    ip, now, nonce = "10.0.0.9", 10.0, sn
    if case == "other_ip":
        ip = "10.0.0.10"
    elif case == "bad_proof":
        proof = bytes(32)
    elif case == "expired":
        now = 61.0
    else:
        nonce = secrets.token_bytes(16)   # a proof recorded under an old server nonce
    with pytest.raises(ResumeRefused):
        t.resume(sid, ip, nonce, cn, proof, now)
    assert t.get(sid) is None
    with pytest.raises(ResumeRefused):   # even the right proof is now useless
        t.resume(sid, "10.0.0.9", sn, cn, scram.resume_proof(rkey, sn, cn, sid), 11.0)


def test_admin_sessions_cannot_be_resumed_or_given_a_resume_key() -> None:
    t, reg = table_and_registry()
    s = t.create(principal("admin"), "1.1.1.1", reg.snapshot("admin", frozenset()), now=0.0)
    with pytest.raises(ResumeRefused):
        t.resume(s.sid, "1.1.1.1", bytes(16), bytes(16), bytes(32), 1.0)
    assert t.get(s.sid) is None
    with pytest.raises(ValueError):
        t.create(principal("admin"), "1.1.1.1", reg.snapshot("admin", frozenset()), 0.0, resume_key=b"k" * 32)


def test_limiter_counts_per_key_in_a_window() -> None:
    lim = LoginLimiter(max_failures=3, window=60.0)
    ip, login = ("ip", "1.2.3.4"), ("login", "admin:alice")
    for i in range(3):
        attempt = lim.begin([ip, login], now=float(i))
        assert attempt is not None
        lim.failed(attempt)
    assert lim.blocked([ip], 3.0) and lim.blocked([login], 3.0)
    assert lim.begin([ip, login], 3.0) is None
    assert not lim.blocked([("ip", "5.6.7.8")], 3.0)
    assert not lim.blocked([ip], 60.0)          # the oldest failure left the window
    ok = lim.begin([("ip", "5.6.7.8"), login], 61.0)
    assert ok is not None
    lim.succeeded(ok, clear=[login])            # a success clears the login's failures
    assert not lim.blocked([login], 61.5)


def test_limiter_counts_attempts_in_flight() -> None:
    """Attempts count from begin(), before any proof fails: N logins sent at
    once cannot all pass the check (issue 14 item 1)."""
    lim = LoginLimiter(max_failures=3, window=60.0)
    login = ("login", "admin:root")
    admitted = [lim.begin([("ip", f"10.0.0.{i}"), login], 0.0) for i in range(200)]
    assert sum(a is not None for a in admitted) == 3
    first = admitted[0]
    assert first is not None
    lim.abandon(first)                           # closed before its proof: it stops counting
    again = lim.begin([("ip", "10.0.0.250"), login], 1.0)
    assert again is not None
    assert lim.begin([("ip", "10.0.0.251"), login], 1.0) is None
    lim.failed(again)
    lim.abandon(again)                           # a checked proof cannot be taken back
    assert lim.blocked([login], 2.0)


def test_limiter_memory_is_bounded() -> None:
    lim = LoginLimiter(max_failures=2, window=60.0, max_keys=100)
    for i in range(1000):
        for _ in range(2):
            attempt = lim.begin([("ip", str(i))], 0.0)
            assert attempt is not None
            lim.failed(attempt)
    assert len(lim._seen) == 100


def test_ipv6_addresses_are_limited_per_64() -> None:
    assert address_key("2001:db8::1") == address_key("2001:db8::ffff") == "2001:db8::/64"
    assert address_key("::ffff:10.0.0.1") == "10.0.0.1"
