"""Failed-redeem limit per caller, pure (``now`` is passed in).

A voucher code is ~79 bits, but a limit still keeps a subscriber's session
from being a guessing machine.  Each caller may have at most ``max_failures``
failed redeems in any ``window`` seconds; past that, every redeem (a right
code too, or a hit could still be found by guessing) is refused until the
oldest failure leaves the window.

An attempt takes a slot *before* the code is looked up and gives it back
only when it succeeds, so a burst of concurrent attempts on one session
cannot slip past the limit.  Callers are kept in LRU order, at most
``max_keys`` of them.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable


class FailureLimit:
    def __init__(self, max_failures: int = 5, window: float = 600.0, max_keys: int = 100_000) -> None:
        if max_failures < 1 or window <= 0 or max_keys < 1:
            raise ValueError("max_failures, window and max_keys must be positive")
        self.max_failures = max_failures
        self.window = window
        self.max_keys = max_keys
        self._attempts: OrderedDict[Hashable, deque[float]] = OrderedDict()

    def _live(self, key: Hashable, now: float) -> deque[float]:
        times = self._attempts.get(key)
        if times is None:
            times = self._attempts[key] = deque()
            while len(self._attempts) > self.max_keys:
                self._attempts.popitem(last=False)
        else:
            self._attempts.move_to_end(key)
        while times and times[0] <= now - self.window:
            times.popleft()
        return times

    def begin(self, key: Hashable, now: float) -> bool:
        """Take a slot for an attempt at ``now``; False when ``key`` is over the limit."""
        times = self._live(key, now)
        if len(times) >= self.max_failures:
            return False
        times.append(now)
        return True

    def succeeded(self, key: Hashable, started: float) -> None:
        """The attempt begun at ``started`` did not fail: give its slot back."""
        times = self._attempts.get(key)
        if times is not None:
            try:
                times.remove(started)
            except ValueError:
                pass  # already out of the window
            if not times:
                del self._attempts[key]

    def retry_after(self, key: Hashable, now: float) -> float:
        """Seconds until ``key`` may try again (0 when it may now)."""
        times = self._live(key, now)
        if len(times) < self.max_failures:
            return 0.0
        return max(0.0, times[0] + self.window - now)
