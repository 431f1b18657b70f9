"""When to reconnect, where to, and which failures are worth a retry (sans-IO).

Theory of operation
-------------------
``urfa.link.Link`` keeps one session with the core.  Every decision it
makes about reconnecting lives here, with no socket and no clock of its
own: the caller passes ``now`` in and gets back what to do next, so tests
drive a clock instead of sleeping (aioquic's ``handle_timer(now)``).

``RETRY`` is the one table that says, per wire error code, what a retry can
achieve: ``NEVER`` (the request itself is wrong or refused: the same answer
comes again), ``LATER`` (the core is there but cannot now: ask again after a
pause, the connection is fine) or ``RECONNECT`` (the connection or our
session is gone: open a new one, then ask again).  The code ``""`` stands
for a connection that failed without the server saying why (refused, reset,
timed out).  Application codes (with a dot) are ``NEVER`` unless listed.

``LinkPlan`` answers "connect to address k, at time t, resuming or logging
in" or "give up".  It tries every address of the list once before it pauses
(so a standby core is reached at once when the first is down), pauses from
``first_delay`` doubling to ``max_delay`` between rounds, and starts again at
the address that last worked.  After a loss it first tries to *resume* the
session on the same address (a network blink keeps the session alive in the
core); a core that answers ``resume_failed`` gets a fresh login at once.
A refused login (``NEVER``) ends a tool's plan (``persistent=False``) and
makes a service's plan wait ``max_delay``: the operator may be fixing the
password file, and the service must come back by itself when they have.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .errors import (
    AUTH_FAILED, BAD_ARGS, BUSY, CANCELLED, DELETED, EXPIRED, FORBIDDEN, FRAME_TOO_LARGE, INTERNAL,
    LOGGED_OUT, NO_SESSION, NOT_IN_TABLE, PROTOCOL, RATE_LIMITED, RESUME_FAILED, SHUTDOWN, TIMEOUT, VERSION,
)

__all__ = ["Verdict", "RETRY", "DB_UNAVAILABLE", "CONNECTION_FAILED", "verdict", "Backoff", "Attempt", "GiveUp",
           "LinkPlan"]


class Verdict(enum.Enum):
    NEVER = "never"          # the same request gets the same answer
    LATER = "later"          # the core cannot now; the connection is fine
    RECONNECT = "reconnect"  # the connection or the session is gone


# The core's "the database went away; nothing was changed, retry later"
# (billcore.db.pool.DB_UNAVAILABLE, spelled here: urfa imports nothing of billcore).
DB_UNAVAILABLE = "core.db_unavailable"
CONNECTION_FAILED = ""   # refused, reset, timed out: the server did not say why

RETRY: dict[str, Verdict] = {
    CONNECTION_FAILED: Verdict.RECONNECT,
    TIMEOUT: Verdict.RECONNECT,          # handshake too slow: the server closed
    PROTOCOL: Verdict.RECONNECT,         # the connection is closed; a new one starts clean
    FRAME_TOO_LARGE: Verdict.NEVER,      # the same frame is too large again
    VERSION: Verdict.NEVER,
    AUTH_FAILED: Verdict.NEVER,
    RATE_LIMITED: Verdict.LATER,
    RESUME_FAILED: Verdict.RECONNECT,    # log in afresh
    NO_SESSION: Verdict.NEVER,           # a proxied session is gone: its owner logs in again
    NOT_IN_TABLE: Verdict.NEVER,
    DELETED: Verdict.NEVER,
    BAD_ARGS: Verdict.NEVER,
    FORBIDDEN: Verdict.NEVER,
    BUSY: Verdict.LATER,
    CANCELLED: Verdict.NEVER,
    INTERNAL: Verdict.NEVER,             # the handler failed: it may have done part of its work
    SHUTDOWN: Verdict.RECONNECT,         # the core restarts (or a standby takes over)
    LOGGED_OUT: Verdict.RECONNECT,       # our own session ended: log in again
    EXPIRED: Verdict.RECONNECT,
    DB_UNAVAILABLE: Verdict.LATER,
}


def verdict(code: str) -> Verdict:
    """What a retry of a request that failed with ``code`` can achieve."""
    return RETRY.get(code, Verdict.NEVER)


class Backoff:
    """Pauses from ``first`` doubling to ``cap``; ``reset`` after a success."""

    def __init__(self, first: float = 0.1, cap: float = 2.0) -> None:
        if not 0 < first <= cap:
            raise ValueError(f"backoff needs 0 < first <= cap, got {first}, {cap}")
        self.first = first
        self.cap = cap
        self._next = first

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self.cap)
        return delay

    def reset(self) -> None:
        self._next = self.first


@dataclass(frozen=True, slots=True)
class Attempt:
    """Connect to address ``index`` at time ``at``; ``resume`` the old session, else log in."""

    index: int
    at: float
    resume: bool


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Stop trying; ``code`` is the failure that ended it."""

    code: str
    reason: str


class LinkPlan:
    """Where and when the next connection attempt goes (see the module's comment)."""

    def __init__(self, addresses: int, *, can_resume: bool, persistent: bool = True, rounds: int | None = None,
                 first_delay: float = 0.1, max_delay: float = 2.0) -> None:
        if addresses < 1:
            raise ValueError("a link needs at least one core address")
        if rounds is not None and rounds < 1:
            raise ValueError("rounds is at least 1 (or None: never give up)")
        self.addresses = addresses
        self.can_resume = can_resume
        self.persistent = persistent
        self.rounds = rounds
        self.backoff = Backoff(first_delay, max_delay)
        self._home = 0            # the address that worked last
        self._index = 0           # the address of the attempt in progress
        self._tried = 0           # addresses tried in this round
        self._round = 1
        self._resumable = False   # the old session may still live in the core at ``_home``
        self.attempts = 0

    def start(self, now: float) -> Attempt:
        """The first attempt: the first address, at once, with a login."""
        return self._attempt(self._home, now, resume=False)

    def connected(self, now: float) -> None:
        self._home = self._index
        self._tried = 0
        self._round = 1
        self.backoff.reset()

    def lost(self, now: float) -> Attempt:
        """The connection dropped: try the same core again at once, resuming when we can."""
        self._tried = 0
        self._round = 1
        self._resumable = self.can_resume
        return self._attempt(self._home, now, resume=True)

    def failed(self, now: float, code: str) -> Attempt | GiveUp:
        """The attempt in progress failed with ``code``."""
        kind = verdict(code)
        if code == RESUME_FAILED:
            # the core answered and knows no such session (it restarted): log in there, now
            self._resumable = False
            return self._attempt(self._index, now, resume=False)
        if kind is Verdict.NEVER:
            if not self.persistent:
                return GiveUp(code, "the core refused, and a retry gets the same answer")
            self.backoff.reset()
            return self._attempt(self._index, now + self.backoff.cap, resume=False)
        self._tried += 1
        if self._tried < self.addresses:
            # the rest of the list before any pause: a standby answers now
            return self._attempt((self._index + 1) % self.addresses, now, resume=False)
        if self.rounds is not None and self._round >= self.rounds:
            return GiveUp(code, f"no core answered in {self._round} round(s) over {self.addresses} address(es)")
        self._round += 1
        self._tried = 0
        return self._attempt(self._home, now + self.backoff.next_delay(), resume=True)

    def kicked(self, now: float, pending: Attempt) -> Attempt:
        """A caller needs the core now: the waiting attempt happens at once."""
        return Attempt(pending.index, min(pending.at, now), pending.resume)

    def _attempt(self, index: int, at: float, *, resume: bool) -> Attempt:
        self._index = index
        self.attempts += 1
        # a session lives in one core: resume only where it was made, while it may live
        return Attempt(index, at, resume and self._resumable and index == self._home)
