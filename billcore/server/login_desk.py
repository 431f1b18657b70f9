"""The login desk: logins, proxied logins, resumes and their rate limit.

Theory of operation
-------------------
Login is SCRAM-SHA-256 (``urfa.scram``) in two steps.  ``begin_login``
admits the attempt with the ``LoginLimiter`` (it counts from this moment,
so logins in flight count too; over the limit: ``rate_limited`` before any
lookup) and asks the auth backend for the principal.  An unknown login, or
one of another kind, gets a fake verifier derived from the desk's secret,
so its challenge looks like a real one and the failure is the same
``auth_failed``.  A backend that cannot answer (its database is down) gets
the login ``core.db_unavailable``.  ``finish_login`` checks the proof and
opens the session with the call table snapshot of the principal's rights.

Attempts count per source address (an IPv4 address, an IPv6 /64) and per
login.  The Unix socket is every local edge's one "address", gated by its
file permissions: attempts over it count per login only.

An operator with a second factor (``Principal.second_factor``) is not
logged in by the proof alone: ``finish_login`` then answers no session, the
proof's attempt stops counting (the password was right), and
``finish_second_factor`` checks the code with the auth backend; every code
checked is an attempt of its own, so wrong codes count against the address
and the login like wrong passwords.

A system session with right ``session.proxy`` (the web office) relays a
subscriber's SCRAM exchange (``session.proxy_login``/``proxy_proof``), one
with ``session.proxy_admin`` (the operator's console) an operator's, and
their code (``session.proxy_otp``, ``OTP_TRIES`` codes per exchange); the
half-done exchanges wait here under a random handle, bounded in number and
in time.  Only system sessions logged in directly can be resumed from a new
connection (``resume``); a failed resume counts against the address.

A system session with right ``session.proxy_token`` (the HTTP API edge)
turns an API token into a proxied session of kind ``token``
(``token_login``): one attempt per token shown, counted against the HTTP
client's address like a password login, so guessing tokens is as slow as
guessing passwords (and hopeless anyway: 256 bits).  A wrong, revoked or
expired token is the same ``auth_failed``.  The token's call table is what
an operator with its rights would get, without the event and proxy calls
(``token_keeps``), and the session ends at the token's expiry.

Every decision takes ``now``; the desk does no I/O but the auth lookup.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from billcore.db.pool import DB_UNAVAILABLE
from billcore.server.calls import CallRegistry, CallTable
from billcore.server.login_limiter import Attempt, LimitKey, LoginLimiter
from billcore.server.sessions import (
    ENDED_LOGGED_OUT, AuthUnavailable, Principal, ResumeRefused, Session, SessionTable, TokenGrant,
    TooManySessions,
)
from urfa import scram
from urfa.errors import AUTH_FAILED, BUSY, RATE_LIMITED, RESUME_FAILED, CallFailed
from urfa.server import address_key

__all__ = ["AuthBackend", "LoginDesk", "PendingLogin", "KINDS", "OTP_TRIES", "address_keys", "limit_keys",
           "token_keeps"]

log = logging.getLogger("billcore.urfa")
KINDS = ("system", "admin", "user")
OTP_TRIES = 3   # codes one proxied login may try (a direct login: one, then its connection closes)


class AuthBackend(Protocol):
    """Who may log in.  A backend may also have ``accounts_of(user_id)``,
    a subscriber's account ids, for the event hub (``URFAService``),
    ``check_second_factor(principal, code) -> bool`` for principals found
    with ``second_factor`` (without it, no code is ever right), and
    ``find_token(token) -> TokenGrant | None`` for API tokens (without it,
    no token is ever right)."""

    # None: no such (enabled) principal; raises AuthUnavailable when it cannot tell now
    async def find_principal(self, kind: str, login: str) -> Principal | None: ...


@dataclass(slots=True)
class PendingLogin:
    """A login between our challenge and the client's proof."""

    kind: str
    login: str
    cnonce: bytes
    snonce: bytes
    ip: str
    principal: Principal | None      # None: unknown, the verifier is a fake
    verifier: scram.Verifier
    expires: float
    attempt: Attempt                 # what the limiter counts until the proof is checked
    proven: bool = False             # the proof was right; the second factor's code is awaited
    codes_left: int = 0              # codes a proxied login may still try

    def auth_message(self) -> bytes:
        verifier = self.verifier
        return scram.auth_message(self.kind, self.login, self.cnonce, self.snonce,
                                  verifier.salt, verifier.iterations)

    def server_signature(self) -> bytes:
        return scram.server_signature(self.verifier.server_key, self.auth_message())


def address_keys(ip: str) -> tuple[LimitKey, ...]:
    """What a resume from ``ip`` counts against (nothing over the Unix socket)."""
    return () if ip == "unix" else (("ip", address_key(ip)),)


def token_keeps(name: str) -> bool:
    """Whether a token session's call table keeps ``name``: it has no connection of its own to hear
    events on, acts for nobody, and is no operator: ``self.*`` (an operator's own second factor) would
    take the token's id for an operator's, whatever rights (``*``) its groups hold."""
    return not name.startswith(("events.", "session.proxy", "session.token", "self."))


def limit_keys(ip: str, kind: str, login: str) -> tuple[LimitKey, ...]:
    """What a login of ``kind:login`` from ``ip`` counts against."""
    return (*address_keys(ip), ("login", f"{kind}:{login}"))


class LoginDesk:
    def __init__(
        self, registry: CallRegistry, auth: AuthBackend, sessions: SessionTable, limiter: LoginLimiter,
        secret: bytes, clock: Callable[[], float], *, lookup_timeout: float, handshake_timeout: float,
        mock_iterations: int, max_proxy_logins: int, otp_timeout: float = 120.0,
    ) -> None:
        self.registry = registry
        self.auth = auth
        self.sessions = sessions
        self.limiter = limiter
        self.secret = secret               # keeps fake salts stable
        self.clock = clock                 # for the callers that have no `now` of their own
        self.lookup_timeout = lookup_timeout
        self.handshake_timeout = handshake_timeout
        self.mock_iterations = mock_iterations
        self.max_proxy_logins = max_proxy_logins
        self.otp_timeout = otp_timeout     # a person types the code: more than the handshake's time
        self._proxy_logins: OrderedDict[bytes, PendingLogin] = OrderedDict()   # oldest first
        # token sessions (SID → token id) and, per token, the table time its use was last reported
        self._token_sessions: dict[bytes, int] = {}
        self._token_noted: dict[int, float] = {}

    # -- login -----------------------------------------------------------
    async def begin_login(self, kind: str, login: str, cnonce: bytes, snonce: bytes, ip: str,
                          now: float) -> PendingLogin:
        """Admit the attempt (it counts from now) and look the principal up;
        unknown ones get a deterministic fake verifier."""
        attempt = self.limiter.begin(limit_keys(ip, kind, login), now)
        if attempt is None:
            raise CallFailed(RATE_LIMITED, "too many login attempts; wait and retry")
        principal = None
        # a NUL cannot be in any login (PostgreSQL text): unknown, without asking
        if kind in KINDS and "\0" not in login:
            try:
                principal = await asyncio.wait_for(self.auth.find_principal(kind, login), self.lookup_timeout)
            except (AuthUnavailable, asyncio.TimeoutError) as exc:
                self.limiter.abandon(attempt)   # no proof will be checked
                log.warning("login of %s:%s refused: the auth backend cannot answer (%s)",
                            kind, login, "timed out" if isinstance(exc, asyncio.TimeoutError) else exc)
                raise CallFailed(DB_UNAVAILABLE, "the database is unavailable; retry later") from None
            except BaseException:
                self.limiter.abandon(attempt)
                raise
        if principal is not None and (principal.kind != kind or principal.login != login):
            principal = None
        verifier = principal.verifier if principal is not None else scram.fake_verifier(
            self.secret, scram.scram_username(kind, login), self.mock_iterations)
        return PendingLogin(kind, login, cnonce, snonce, ip, principal, verifier,
                            now + self.handshake_timeout, attempt)

    def abandon(self, pending: PendingLogin) -> None:
        """The exchange ended before its proof was checked: it stops counting."""
        self.limiter.abandon(pending.attempt)

    def finish_login(self, pending: PendingLogin, proof: bytes, now: float, *,
                     proxied: bool = False) -> tuple[Session | None, bytes]:
        """Check the proof; the new session and the ServerSignature, or ``CallFailed``.

        No session (``None``) when the principal has a second factor: the
        proof was right, ``pending`` is marked ``proven`` and waits for
        ``finish_second_factor``."""
        message = pending.auth_message()
        client_key = scram.recover_client_key(pending.verifier, message, proof)
        attempt = pending.attempt
        if client_key is None or pending.principal is None:
            self.limiter.failed(attempt)
            raise CallFailed(AUTH_FAILED, "login failed")
        principal = pending.principal
        signature = scram.server_signature(pending.verifier.server_key, message)
        if principal.second_factor:
            # the password was right: that attempt stops counting, but clears nothing yet
            self.limiter.succeeded(attempt)
            pending.proven = True
            pending.codes_left = OTP_TRIES if proxied else 1
            pending.expires = now + self.otp_timeout
            return None, signature
        # a success clears the login's count of failures (not the address's)
        self.limiter.succeeded(attempt, clear=[key for key in attempt.keys if key[0] == "login"])
        resume_key = scram.resume_key(client_key, message) if principal.kind == "system" and not proxied else None
        return self._open(principal, pending.ip, now, proxied, resume_key), signature

    async def finish_second_factor(self, pending: PendingLogin, code: str, now: float, *,
                                   proxied: bool = False) -> Session:
        """Check a proven login's code (TOTP or recovery); the new session, or ``CallFailed``
        (``rate_limited``, ``auth_failed``: counted as a failed login, ``core.db_unavailable``)."""
        principal = pending.principal
        assert pending.proven and principal is not None, "only a proven login takes a code"
        attempt = self.limiter.begin(limit_keys(pending.ip, pending.kind, pending.login), now)
        if attempt is None:
            raise CallFailed(RATE_LIMITED, "too many login attempts; wait and retry")
        check = getattr(self.auth, "check_second_factor", None)
        try:
            right = check is not None and await asyncio.wait_for(check(principal, code), self.lookup_timeout)
        except (AuthUnavailable, asyncio.TimeoutError):
            self.limiter.abandon(attempt)   # no code was checked
            raise CallFailed(DB_UNAVAILABLE, "the database is unavailable; retry later") from None
        except BaseException:
            self.limiter.abandon(attempt)
            raise
        pending.codes_left -= 1
        if not right:
            self.limiter.failed(attempt)
            log.info("second factor of %s:%s refused from %s", pending.kind, pending.login, pending.ip)
            raise CallFailed(AUTH_FAILED, "login failed: wrong code")
        self.limiter.succeeded(attempt, clear=[key for key in attempt.keys if key[0] == "login"])
        return self._open(principal, pending.ip, now, proxied, None)

    async def token_login(self, token: str, ip: str, now: float) -> tuple[Session, TokenGrant]:
        """Open a token session bound to ``ip`` (the HTTP client's address); ``CallFailed``
        (``rate_limited``, ``auth_failed``: counted against ``ip``, ``core.db_unavailable``) otherwise."""
        attempt = self.limiter.begin(address_keys(ip), now)   # a token is no login: its address counts
        if attempt is None:
            raise CallFailed(RATE_LIMITED, "too many login attempts; wait and retry")
        find = getattr(self.auth, "find_token", None)
        mark = self.sessions.token_ends   # a revoke while we look the token up wins (see below)
        try:
            grant = None if find is None else await asyncio.wait_for(find(token), self.lookup_timeout)
        except (AuthUnavailable, asyncio.TimeoutError):
            self.limiter.abandon(attempt)   # no token was checked
            raise CallFailed(DB_UNAVAILABLE, "the database is unavailable; retry later") from None
        except BaseException:
            self.limiter.abandon(attempt)
            raise
        if (not isinstance(grant, TokenGrant) or grant.principal.kind != "token"
                or self.sessions.token_ended_since(grant.principal.id, mark)):
            # (revoked after the look-up read it: tokens.revoke ended its sessions before this one opened)
            self.limiter.failed(attempt)
            log.info("token login refused from %s", ip)
            raise CallFailed(AUTH_FAILED, "login failed")
        self.limiter.succeeded(attempt)
        ends_at = None if grant.seconds_left is None else now + max(0.0, grant.seconds_left)
        table = self.registry.snapshot("admin", grant.principal.rights, keep=token_keeps)
        session = self._open(grant.principal, ip, now, True, None, table=table, ends_at=ends_at)
        self._token_sessions[session.sid] = grant.principal.id
        self._token_noted[grant.principal.id] = now   # the backend noted this use at the login
        return session, grant

    def tokens_used(self, now: float, every: float = 60.0) -> list[int]:
        """The tokens whose sessions were called since their use was last reported, at most once per
        ``every`` seconds each (the backend writes ``last_used_at``); forgets ended sessions."""
        used: set[int] = set()
        for sid, token_id in list(self._token_sessions.items()):
            session = self.sessions.get(sid)
            if session is None:
                del self._token_sessions[sid]
                continue
            noted = self._token_noted.get(token_id, float("-inf"))
            if session.last_seen > noted and now - noted >= every:
                used.add(token_id)
        for token_id in used:
            self._token_noted[token_id] = now
        live = set(self._token_sessions.values())
        for token_id in [token_id for token_id in self._token_noted if token_id not in live]:
            del self._token_noted[token_id]
        return sorted(used)

    def _open(self, principal: Principal, ip: str, now: float, proxied: bool, resume_key: bytes | None, *,
              table: CallTable | None = None, ends_at: float | None = None) -> Session:
        if table is None:
            table = self.registry.snapshot(principal.kind, principal.rights)
        for _old in self.sessions.make_room(principal):   # at its cap: the oldest ends (bye logged_out)
            log.info("session of %s:%s ended: over %d sessions", principal.kind, principal.login,
                     self.sessions.cap(principal))
        try:
            return self.sessions.create(principal, ip, table, now, resume_key=resume_key, proxied=proxied,
                                        ends_at=ends_at)
        except TooManySessions:
            raise CallFailed(BUSY, "session table full") from None

    # -- proxied logins ----------------------------------------------------
    def add_proxy_login(self, pending: PendingLogin, handle: bytes | None = None) -> bytes:
        """Park a relayed exchange until its proof (or, proven, its code); the
        handle to finish it with (a new one, or ``handle`` to park it again)."""
        handle = handle or secrets.token_bytes(16)
        self._proxy_logins[handle] = pending
        while len(self._proxy_logins) > self.max_proxy_logins:
            self.abandon(self._proxy_logins.popitem(last=False)[1])
        return handle

    def take_proxy_login(self, handle: bytes, now: float) -> PendingLogin | None:
        pending = self._proxy_logins.pop(handle, None)
        if pending is not None and pending.expires <= now:
            self.abandon(pending)
            return None
        return pending

    def sweep(self, now: float) -> None:
        """Forget the relayed exchanges whose proof (or code) did not come in time.
        (Not in expiry order: one waiting for a code expires later, so all are looked at.)"""
        for handle in [handle for handle, pending in self._proxy_logins.items() if pending.expires <= now]:
            self.abandon(self._proxy_logins.pop(handle))

    # -- resume and logout -------------------------------------------------
    def resume(self, sid: bytes, ip: str, snonce: bytes, cnonce: bytes, proof: bytes,
               now: float) -> tuple[Session, bytes]:
        """A system session taken up on a new connection, and our signature;
        ``CallFailed`` (``rate_limited``, ``resume_failed``) otherwise."""
        attempt = self.limiter.begin(address_keys(ip), now)
        if attempt is None:
            raise CallFailed(RATE_LIMITED, "too many failed attempts; wait and retry")
        try:
            session = self.sessions.resume(sid, ip, snonce, cnonce, proof, now)
        except ResumeRefused as exc:
            self.limiter.failed(attempt)
            log.info("resume refused from %s: %s", ip, exc)
            raise CallFailed(RESUME_FAILED, "resume refused; log in again") from None
        self.limiter.succeeded(attempt)
        assert session.resume_key is not None, "SessionTable.resume takes only resumable sessions"
        return session, scram.resume_signature(session.resume_key, snonce, cnonce, sid)

    def logout(self, session: Session) -> None:
        """End a session; its own connection (if any) closes after the reply."""
        self.sessions.end(session.sid, ENDED_LOGGED_OUT, "logged out")
