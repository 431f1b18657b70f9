"""URFA sessions: the table of who is logged in, pure (``now`` is passed in).

Theory of operation
-------------------
A session is created by a successful login.  It has a 128-bit random SID,
the principal that logged in, the client address it is bound to, and the
call table snapshot taken at login.  Every use *touches* it; a session idle
for ``timeout`` seconds is removed by ``expire(now)``.  Removing a session
closes its call table, so unloaded modules can be torn down.

The table is an ordered dict kept in last-touched order, so ``expire``
looks only at the sessions it removes plus one.

Only ``system`` sessions keep a *resume key* (derived during login, see
``urfa.scram.resume_key``) and may be resumed from a new connection, from
the same address, by proving knowledge of it over a fresh server nonce.
Any failed resume deletes the SID: a guessed or stolen SID is good for one
try at most.

``proxied`` sessions are subscriber (or operator) sessions that a system
session (the web office, the operator's console) opened on their behalf;
they are bound to the declared browser address and belong to no connection.

``token`` sessions are proxied sessions an HTTP API edge opened with an
API token (``session.token_login``): they also end at the token's expiry,
however busy (``Session.ends_at``; ``lookup`` and ``expire`` check it), and
at once when the token is revoked (``end_principal``).

Each principal (kind and id) may hold at most ``max_per_login`` live
sessions (``max_per_system`` for system principals, whose edges run many
processes, and for tokens, which many clients of one integration share);
``make_room`` ends its oldest ones before a new login, so one subscriber
logging in again and again through the office cannot fill the table and
lock everybody else out.

Every way a session ends goes through ``SessionTable.end``, which calls
the table's ``on_end(session, code, why)``: the service closes the
session's connection there with a bye, so no deletion path (idle expiry,
a failed resume, logout, a newer login over the cap, the principal
deleted) can leave a connection holding a session the table no longer has.
"""

from __future__ import annotations

import datetime as dt
import hmac
import secrets
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from billcore.server.calls import CallTable
from urfa.errors import EXPIRED, LOGGED_OUT
from urfa.scram import Verifier, resume_proof

__all__ = [
    "Principal", "Session", "TokenGrant", "SessionTable", "SessionError", "NoSession",
    "ResumeRefused", "TooManySessions", "AuthUnavailable",
    "ENDED_EXPIRED", "ENDED_LOGGED_OUT",
]

SID_BYTES = 16


class SessionError(Exception):
    """Root of the session table's errors."""


class NoSession(SessionError):
    """Unknown or expired SID, or used from another address."""


class ResumeRefused(SessionError):
    """A resume attempt failed; the SID (if it existed) has been deleted."""


class TooManySessions(SessionError):
    """The table is full."""


class AuthUnavailable(SessionError):
    """The auth backend cannot answer now (its database is down)."""


# The bye code a session's connection gets when the session ends.
ENDED_EXPIRED = EXPIRED          # idle too long, or deleted by a failed resume
ENDED_LOGGED_OUT = LOGGED_OUT    # logged out, ended by a newer login, principal gone

# on_end(session, code, why): a session has just left the table
EndHook = Callable[["Session", str, str], None]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who logged in: what the auth backend returns for a (kind, login)."""

    kind: str
    login: str
    id: int
    rights: frozenset[str]
    verifier: Verifier
    second_factor: bool = False   # an operator with TOTP: the login takes a code after the proof


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """A usable API token, as the auth backend answers it to ``session.token_login``."""

    principal: Principal          # kind "token": login = the token's name, id = its id
    expires_at: dt.datetime | None
    seconds_left: float | None    # until expires_at, by the backend's wall clock


class Session:
    """One logged-in session.  Mutable: ``last_seen`` moves, topics change."""

    __slots__ = (
        "sid", "principal", "ip", "table", "created", "last_seen",
        "resume_key", "proxied", "topics", "accounts", "owner", "ends_at",
    )

    def __init__(
        self, sid: bytes, principal: Principal, ip: str, table: CallTable, now: float,
        resume_key: bytes | None, proxied: bool,
    ) -> None:
        self.sid = sid
        self.principal = principal
        self.ip = ip
        self.table = table
        self.created = now
        self.last_seen = now
        self.resume_key = resume_key
        self.proxied = proxied
        self.topics: set[str] = set()
        self.accounts: frozenset[int] = frozenset()   # a subscriber's, read when they subscribe
        self.owner: object | None = None   # the connection serving it (a Peer), if any
        self.ends_at: float | None = None  # a token session: its token's expiry (table clock), busy or not

    @property
    def kind(self) -> str:
        return self.principal.kind

    def __repr__(self) -> str:
        return f"<Session {self.sid.hex()[:8]} {self.kind}:{self.principal.login} @{self.ip}>"


class SessionTable:
    """SID → Session, with idle expiry, resume and a cap per principal."""

    def __init__(self, timeout: float = 1800.0, max_sessions: int = 100_000, *,
                 max_per_login: int = 16, max_per_system: int = 256,
                 on_end: EndHook | None = None) -> None:
        if max_per_login < 1 or max_per_system < 1:
            raise ValueError("the per-principal session caps must be positive")
        self.on_end = on_end
        self.timeout = timeout
        self.max_sessions = max_sessions
        self.max_per_login = max_per_login
        self.max_per_system = max_per_system
        self._by_sid: OrderedDict[bytes, Session] = OrderedDict()
        # (kind, principal id) → its SIDs, oldest first
        self._by_principal: dict[tuple[str, int], OrderedDict[bytes, None]] = {}
        self._deadlines: dict[bytes, float] = {}   # SID → ends_at, for the sessions that have one
        # token id → the value of ``token_ends`` when its sessions were last ended (revoked): a token
        # login that looked its token up before that cannot open a session after it
        self.token_ends = 0
        self._token_ended: dict[int, int] = {}

    def cap(self, principal: Principal) -> int:
        return self.max_per_system if principal.kind in ("system", "token") else self.max_per_login

    def of(self, principal: Principal) -> list[Session]:
        """The principal's live sessions, oldest first."""
        sids = self._by_principal.get((principal.kind, principal.id))
        return [self._by_sid[sid] for sid in sids] if sids else []

    def make_room(self, principal: Principal) -> list[Session]:
        """End the principal's oldest sessions so that one more fits under
        its cap; the ended sessions (their connections are the caller's)."""
        sids = self._by_principal.get((principal.kind, principal.id))
        ended: list[Session] = []
        while sids and len(sids) >= self.cap(principal):
            session = self.end(next(iter(sids)), ENDED_LOGGED_OUT,
                               "too many sessions for this login; the oldest ended")
            assert session is not None
            ended.append(session)
        return ended

    def __len__(self) -> int:
        return len(self._by_sid)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._by_sid.values()))

    def create(
        self, principal: Principal, ip: str, table: CallTable, now: float, *,
        resume_key: bytes | None = None, proxied: bool = False, ends_at: float | None = None,
    ) -> Session:
        if len(self._by_sid) >= self.max_sessions:
            self.expire(now)
            if len(self._by_sid) >= self.max_sessions:
                table.close()
                raise TooManySessions(f"{self.max_sessions} sessions open")
        if resume_key is not None and principal.kind != "system":
            raise ValueError("only system sessions may be resumed")
        key = (principal.kind, principal.id)
        sids = self._by_principal.setdefault(key, OrderedDict())
        if len(sids) >= self.cap(principal):
            table.close()
            raise TooManySessions(f"{principal.kind}:{principal.login} holds {len(sids)} sessions; make_room first")
        sid = secrets.token_bytes(SID_BYTES)
        session = Session(sid, principal, ip, table, now, resume_key, proxied)
        self._by_sid[sid] = session
        sids[sid] = None
        if ends_at is not None:
            session.ends_at = ends_at
            self._deadlines[sid] = ends_at
        return session

    def get(self, sid: bytes) -> Session | None:
        return self._by_sid.get(sid)

    def touch(self, session: Session, now: float) -> None:
        session.last_seen = now
        self._by_sid.move_to_end(session.sid)

    def lookup(self, sid: bytes, ip: str, now: float) -> Session:
        """The live session ``sid`` used from ``ip``, touched; else ``NoSession``."""
        session = self._by_sid.get(sid)
        if session is None or now - session.last_seen >= self.timeout:
            if session is not None:
                self.end(sid, ENDED_EXPIRED, "session idle too long")
            raise NoSession("unknown or expired session")
        if session.ends_at is not None and now >= session.ends_at:
            self.end(sid, ENDED_EXPIRED, "the session's token expired")
            raise NoSession("unknown or expired session")
        if session.ip != ip:
            raise NoSession("session used from another address")
        self.touch(session, now)
        return session

    def end(self, sid: bytes, code: str = ENDED_LOGGED_OUT, why: str = "session ended") -> Session | None:
        """Remove a session, close its call table and tell ``on_end`` (whose
        connection then gets bye ``code``); idempotent."""
        session = self._by_sid.pop(sid, None)
        if session is not None:
            session.table.close()
            self._deadlines.pop(sid, None)
            key = (session.principal.kind, session.principal.id)
            sids = self._by_principal[key]
            del sids[sid]
            if not sids:
                del self._by_principal[key]
            if self.on_end is not None:
                self.on_end(session, code, why)
        return session

    def end_principal(self, kind: str, principal_id: int, why: str) -> list[Session]:
        """End every session of one principal (deleted or disabled)."""
        sids = list(self._by_principal.get((kind, principal_id), ()))
        if kind == "token":
            self.token_ends += 1
            self._token_ended[principal_id] = self.token_ends
        ended = (self.end(sid, ENDED_LOGGED_OUT, why) for sid in sids)
        return [session for session in ended if session is not None]

    def token_ended_since(self, token_id: int, mark: int) -> bool:
        """Were the token's sessions ended (it was revoked) after ``token_ends`` was ``mark``?"""
        return self._token_ended.get(token_id, 0) > mark

    def expire(self, now: float) -> list[Session]:
        """Remove every session idle for ``timeout`` or longer, and every one past its ``ends_at``."""
        gone = []
        for sid in [sid for sid, ends_at in self._deadlines.items() if now >= ends_at]:
            ended = self.end(sid, ENDED_EXPIRED, "the session's token expired")
            if ended is not None:
                gone.append(ended)
        while self._by_sid:
            sid, session = next(iter(self._by_sid.items()))
            if now - session.last_seen < self.timeout:
                break
            self.end(sid, ENDED_EXPIRED, "session idle too long")
            gone.append(session)
        return gone

    def resume(self, sid: bytes, ip: str, snonce: bytes, cnonce: bytes, proof: bytes, now: float) -> Session:
        """Check a resume proof; on any failure delete the SID and raise."""
        session = self._by_sid.get(sid)
        if session is None:
            raise ResumeRefused("unknown session")
        expected = (
            resume_proof(session.resume_key, snonce, cnonce, sid) if session.resume_key is not None
            else secrets.token_bytes(32)
        )
        ok = hmac.compare_digest(expected, proof)
        reason = (
            "expired" if now - session.last_seen >= self.timeout
            else "not resumable" if session.resume_key is None or session.proxied
            else "another address" if session.ip != ip
            else "" if ok else "bad proof"
        )
        if reason:
            # a live connection holding it hears why it lost its session
            self.end(sid, ENDED_EXPIRED, "session deleted by a failed resume; log in again")
            raise ResumeRefused(reason)
        self.touch(session, now)
        return session
