"""Per-token request rate: a token bucket per key, pure (time comes in as ``now``).

Each key (a token's hash) has a bucket of ``burst`` requests that refills
at ``rate`` per second.  A request takes one; an empty bucket answers how
many seconds until one is back (the ``Retry-After`` of a 429).  The table
is bounded: past ``max_keys`` the least recently used bucket is forgotten
(a forgotten key starts full again, which errs on the client's side).
"""

from __future__ import annotations

import math
from collections import OrderedDict

__all__ = ["RateLimiter"]


class RateLimiter:
    def __init__(self, rate: float, burst: int, max_keys: int = 65536) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[bytes, tuple[float, float]] = OrderedDict()   # key -> (tokens, at)

    def take(self, key: bytes, now: float) -> float:
        """0.0 when the request may go; else the seconds to wait before the next one may."""
        tokens, at = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + max(0.0, now - at) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return 0.0 if allowed else (1.0 - tokens) / self.rate

    @staticmethod
    def retry_after(wait: float) -> int:
        """Whole seconds for a ``Retry-After`` header (at least 1)."""
        return max(1, math.ceil(wait))
