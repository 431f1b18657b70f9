"""Operators' logins between their steps, by the browser's pre-session cookie (bounded in number and age)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["PendingLogin", "PendingLogins"]


@dataclass(slots=True)
class PendingLogin:
    handle: bytes
    login: str
    started: float
    stage: str            # "proof"; "used" once a proof went; "otp" when the core asks for a second factor


class PendingLogins:
    """Logins between their steps, by pre-session cookie; bounded in number and age."""

    def __init__(self, max_pending: int = 4096, max_age: float = 180.0) -> None:
        self.max_pending = max_pending
        self.max_age = max_age
        self._pending: OrderedDict[bytes, PendingLogin] = OrderedDict()

    def put(self, pre: bytes, pending: PendingLogin) -> None:
        self._pending[pre] = pending
        self._pending.move_to_end(pre)
        while len(self._pending) > self.max_pending:
            self._pending.popitem(last=False)

    def get(self, pre: bytes, stage: str, now: float) -> PendingLogin | None:
        pending = self._pending.get(pre)
        if pending is None or pending.stage != stage or now - pending.started > self.max_age:
            return None
        return pending

    def drop(self, pre: bytes) -> None:
        self._pending.pop(pre, None)
