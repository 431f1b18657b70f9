"""What the console remembers of each logged-in operator: their call table.

An operator's core session is fixed at login: its call table (``sys.calls``)
decides which pages the navigation shows and which routes answer 403.  The
console asks for it once per SID and keeps it in memory, keyed by the SID,
until the operator logs out, the core says the session is gone, or it has
been idle for the core's own session timeout.  The book is bounded: over
``max_operators`` the least recently seen entry is forgotten (its next
request simply asks the core again).  Pure: time comes in as ``now``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["Operator", "OperatorBook"]


@dataclass(frozen=True, slots=True)
class Operator:
    sid: bytes
    login: str
    calls: frozenset[str]     # the session's call table (deleted calls left out)
    timeout: float            # the core's idle timeout of the session

    def can(self, name: str) -> bool:
        return name in self.calls


class OperatorBook:
    def __init__(self, max_operators: int = 4096) -> None:
        self.max_operators = max_operators
        self._seen: OrderedDict[bytes, tuple[Operator, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def get(self, sid: bytes, now: float) -> Operator | None:
        entry = self._seen.get(sid)
        if entry is None:
            return None
        operator, last = entry
        if now - last >= operator.timeout:
            del self._seen[sid]
            return None
        self._seen[sid] = (operator, now)
        self._seen.move_to_end(sid)
        return operator

    def put(self, operator: Operator, now: float) -> None:
        self._seen[operator.sid] = (operator, now)
        self._seen.move_to_end(operator.sid)
        while len(self._seen) > self.max_operators:
            self._seen.popitem(last=False)

    def alive(self, sid: bytes, now: float) -> bool:
        """Held and not idle past its timeout, without counting as a use (a live stream asks this)."""
        entry = self._seen.get(sid)
        return entry is not None and now - entry[1] < entry[0].timeout

    def drop(self, sid: bytes) -> None:
        self._seen.pop(sid, None)
