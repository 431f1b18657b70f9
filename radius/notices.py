"""Rate-limited log notices for RADIUS requests dropped unanswered.

Theory of operation
-------------------
A dropped RADIUS request gets no answer, by design: an answer to a forged
or unauthenticated request would help an attacker (BlastRADIUS).  But a
silent drop of every request of a misconfigured NAS looks, to the operator,
like a dead billing server.  So each drop of a request from a *known* NAS
for an authenticity reason (no Message-Authenticator where one is required,
a wrong one, a wrong Request Authenticator) — or from an address that is no
NAS at all — is reported in the log, naming the NAS (or address) and saying
what to change, at most once per ``interval`` seconds per (address, reason);
the next line says how many were dropped in between.

Sans-IO: ``note(address, name, reason, now)`` returns the line's fields or
``None``; the server logs them.  The table holds at most ``MAX_KEYS``
(address, reason) pairs: spoofed source addresses cannot grow it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ADVICE", "DropNotices", "Notice"]

ADVICE: dict[str, str] = {
    "missing_message_authenticator": (
        "Access-Request without Message-Authenticator dropped: this NAS has require_message_authenticator"
        " on (BlastRADIUS protection). Make the NAS send Message-Authenticator, or, only if it cannot,"
        " turn the requirement off for it: radius.nas_edit id=… require_message_authenticator=false"),
    "missing_message_authenticator_status": (
        "Status-Server without Message-Authenticator dropped (RFC 5997 requires one)"),
    "bad_message_authenticator": (
        "request with a wrong Message-Authenticator dropped: the NAS and billcore do not share the same secret"),
    "bad_authenticator": (
        "Accounting-Request with a wrong Request Authenticator dropped: the NAS and billcore do not share"
        " the same secret"),
    "unknown_nas": (
        "request from an address that is no NAS dropped: if it is one, add it with radius.nas_add"
        " (the address its packets come from, after any NAT)"),
}
MAX_KEYS = 4096   # unknown addresses can be spoofed at will: the table stays bounded


@dataclass(frozen=True, slots=True)
class Notice:
    text: str
    nas: str
    address: str
    reason: str
    dropped: int   # requests dropped for this reason since the previous line, this one included


class DropNotices:
    def __init__(self, interval: float = 60.0) -> None:
        self.interval = interval
        self._last: dict[tuple[str, str], float] = {}
        self._since: dict[tuple[str, str], int] = {}
        self._swept = float("-inf")

    def note(self, address: str, name: str, reason: str, now: float) -> Notice | None:
        """Count one drop; the line to log now, or ``None`` when one was logged lately."""
        text = ADVICE.get(reason)
        if text is None:
            return None
        key = (address, reason)
        if key not in self._last and len(self._last) >= MAX_KEYS:
            if now - self._swept >= 1.0:   # a sweep costs MAX_KEYS steps: not once per spoofed packet
                self._swept = now
                self._expire(now)
            if len(self._last) >= MAX_KEYS:   # a flood of new addresses: counted by the metric alone
                return None
        self._since[key] = self._since.get(key, 0) + 1
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            return None
        self._last[key] = now
        return Notice(text, name, address, reason, self._since.pop(key))

    def _expire(self, now: float) -> None:
        """Forget the keys whose last line is older than the interval (their count restarts)."""
        for key in [k for k, t in self._last.items() if now - t >= self.interval]:
            del self._last[key]
            self._since.pop(key, None)
