"""A web edge's own defences (the subscriber office's and the console's), pure:
time comes in as an argument.

* CSRF: a form's token is HMAC(key, purpose ‖ SID) — bound to the core
  session, so a token stolen from one session is worthless in another and
  dies with it.  The login form, which has no SID yet, binds its token to
  a random pre-session cookie instead.  Tokens are compared with
  ``hmac.compare_digest``.
* Login rate limit: failed logins per browser address in a sliding window;
  over the limit the edge refuses before it asks the core (the core has
  its own limiter per address and per login as well).  The table is bounded:
  when it is full the oldest address is forgotten.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import OrderedDict, deque

__all__ = ["csrf_token", "csrf_ok", "LoginLimiter"]


def csrf_token(key: bytes, bound_to: bytes, purpose: str = "form") -> str:
    return hmac.new(key, purpose.encode() + b"\0" + bound_to, hashlib.sha256).hexdigest()


def csrf_ok(key: bytes, bound_to: bytes | None, given: object, purpose: str = "form") -> bool:
    if bound_to is None or type(given) is not str or len(given) != 64:
        return False
    return hmac.compare_digest(csrf_token(key, bound_to, purpose), given)


class LoginLimiter:
    def __init__(self, failures: int, window: float = 60.0, max_addresses: int = 65536) -> None:
        self.failures = failures
        self.window = window
        self.max_addresses = max_addresses
        self._seen: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, ip: str, now: float) -> deque[float]:
        times = self._seen.get(ip)
        if times is None:
            return deque()
        while times and now - times[0] >= self.window:
            times.popleft()
        if not times:
            del self._seen[ip]
        return times

    def blocked(self, ip: str, now: float) -> bool:
        return len(self._recent(ip, now)) >= self.failures

    def failed(self, ip: str, now: float) -> None:
        times = self._recent(ip, now)
        if not times:
            self._seen[ip] = times
        self._seen.move_to_end(ip)
        times.append(now)
        while len(times) > self.failures:
            times.popleft()
        while len(self._seen) > self.max_addresses:
            self._seen.popitem(last=False)

    def succeeded(self, ip: str) -> None:
        self._seen.pop(ip, None)
