"""The login rate limiter, pure (``now`` is passed in).

Theory of operation
-------------------
``LoginLimiter`` counts login attempts per key (source address, login) in a
sliding window.  An attempt counts from the moment it is admitted (before
the principal is looked up and the challenge sent), not when its proof
fails: otherwise N connections that all send ``login`` before any proof is
checked all pass the check, and N guesses get checked however small the
limit.  A successful attempt stops counting; so does one abandoned before
its proof (the connection closed, the lookup failed): its guess was never
checked.  So whatever the concurrency, at most ``max_failures`` proofs per
key are checked and fail in any ``window``.  Both the number of keys and
the attempts kept per key are bounded.

Keys are pairs: ``("ip", urfa.server.address_key(ip))`` and ``("login", "kind:login")``
(``billcore.server.login_desk`` chooses them).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable

__all__ = ["Attempt", "LimitKey", "LoginLimiter"]

# (what is counted, its value): ("ip", "192.0.2.1"), ("login", "admin:root")
LimitKey = tuple[str, str]


class Attempt:
    """One login (or resume) attempt admitted by ``LoginLimiter.begin``."""

    __slots__ = ("keys", "at", "pending")

    def __init__(self, keys: tuple[LimitKey, ...], at: float) -> None:
        self.keys = keys
        self.at = at
        self.pending = True   # admitted, its proof not yet checked


class LoginLimiter:
    """At most ``max_failures`` unsuccessful attempts per key per ``window``
    seconds, attempts in flight included (see the module notes)."""

    def __init__(self, max_failures: int = 5, window: float = 300.0, max_keys: int = 100_000) -> None:
        if max_failures < 1:
            raise ValueError("max_failures must be positive")
        self.max_failures = max_failures
        self.window = window
        self.max_keys = max_keys
        self._seen: OrderedDict[LimitKey, deque[Attempt]] = OrderedDict()

    def _live(self, key: LimitKey, now: float) -> deque[Attempt] | None:
        """The key's attempts still inside the window (older ones dropped)."""
        attempts = self._seen.get(key)
        if attempts is None:
            return None
        while attempts and now - attempts[0].at >= self.window:
            attempts.popleft()
        if not attempts:
            del self._seen[key]
            return None
        return attempts

    def blocked(self, keys: Iterable[LimitKey], now: float) -> bool:
        for key in keys:
            attempts = self._live(key, now)
            if attempts is not None and len(attempts) >= self.max_failures:
                return True
        return False

    def begin(self, keys: Iterable[LimitKey], now: float) -> Attempt | None:
        """Admit one attempt (it counts at once), or ``None``: over the limit."""
        keys = tuple(keys)
        if self.blocked(keys, now):
            return None
        attempt = Attempt(keys, now)
        for key in keys:
            attempts = self._seen.get(key)
            if attempts is None:
                attempts = self._seen[key] = deque()
                while len(self._seen) > self.max_keys:
                    self._seen.popitem(last=False)
            else:
                self._seen.move_to_end(key)
            attempts.append(attempt)
        return attempt

    def failed(self, attempt: Attempt) -> None:
        """Its proof was checked and wrong: it keeps counting for the window."""
        attempt.pending = False

    def abandon(self, attempt: Attempt) -> None:
        """It ended before any proof was checked: it stops counting."""
        if attempt.pending:
            attempt.pending = False
            self._forget(attempt, ())

    def succeeded(self, attempt: Attempt, clear: Iterable[LimitKey] = ()) -> None:
        """It logged in: it stops counting, and so do the earlier failures
        under the keys in ``clear`` (attempts still in flight keep counting)."""
        attempt.pending = False
        self._forget(attempt, tuple(clear))

    def _forget(self, attempt: Attempt, clear: tuple[LimitKey, ...]) -> None:
        for key in attempt.keys:
            attempts = self._seen.get(key)
            if attempts is None:
                continue
            kept = [a for a in attempts if a is not attempt and (key not in clear or a.pending)]
            if kept:
                self._seen[key] = deque(kept)
            else:
                del self._seen[key]
