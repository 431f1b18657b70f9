"""RFC 5080 s.2.2.2 duplicate detection: one request, one processing.

Theory of operation
-------------------
A NAS that gets no answer in time retransmits the *same* packet: same source
address and port, Identifier and Request Authenticator.  The key is those
four plus the code.  ``lookup`` tells the server what to do with a datagram:

* ``MISS``       — new: the server calls ``begin`` and processes it;
* ``IN_PROGRESS`` — the first copy is still being decided: drop this one
  (the NAS will retransmit again, and by then there is a reply);
* bytes          — already answered: send these bytes again, decide nothing.

Replies stay for ``ttl`` seconds (RFC 5080 suggests a few seconds beyond the
client's retransmission window); the cache holds at most ``max_entries``
and forgets the oldest first, so a flood cannot grow it.  An entry whose
processing failed without a reply is ``abandon``-ed so a retransmission is
processed afresh — safe because accounting calls are idempotent in the core.
Time is passed in: no clock is read here.
"""

from __future__ import annotations

from collections import OrderedDict
from enum import Enum

__all__ = ["DedupKey", "DedupCache", "Verdict"]

DedupKey = tuple[str, int, int, int, bytes]  # (address, port, code, id, authenticator)


class Verdict(Enum):
    MISS = "miss"
    IN_PROGRESS = "in_progress"


_PENDING = b""


class DedupCache:
    __slots__ = ("ttl", "max_entries", "_entries", "evicted")

    def __init__(self, ttl: float = 30.0, max_entries: int = 65536) -> None:
        if ttl <= 0 or max_entries <= 0:
            raise ValueError("ttl and max_entries must be positive")
        self.ttl = ttl
        self.max_entries = max_entries
        # key -> (expires_at, reply bytes or _PENDING); ordered by insertion
        self._entries: OrderedDict[DedupKey, tuple[float, bytes]] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: DedupKey, now: float) -> Verdict | bytes:
        self._expire(now)
        entry = self._entries.get(key)
        if entry is None:
            return Verdict.MISS
        return Verdict.IN_PROGRESS if entry[1] is _PENDING else entry[1]

    def begin(self, key: DedupKey, now: float) -> None:
        if key in self._entries:
            raise KeyError("request already known: lookup first")
        while len(self._entries) >= self.max_entries:
            self._entries.popitem(last=False)
            self.evicted += 1
        self._entries[key] = (now + self.ttl, _PENDING)

    def finish(self, key: DedupKey, reply: bytes, now: float) -> None:
        """Remember the reply; the entry lives ``ttl`` from now."""
        if not reply:
            raise ValueError("an empty reply cannot be cached")
        self._entries.pop(key, None)
        self._entries[key] = (now + self.ttl, reply)

    def abandon(self, key: DedupKey) -> None:
        self._entries.pop(key, None)

    def _expire(self, now: float) -> None:
        # entries are in insertion order and share one ttl, so expiry times
        # are non-decreasing: stop at the first live one
        entries = self._entries
        while entries:
            key, (expires, _) = next(iter(entries.items()))
            if expires > now:
                break
            entries.popitem(last=False)
