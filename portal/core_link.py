"""The portal's calls to the core, as the ``portal`` system login, in the office's words.

Theory of operation
-------------------
Every browser request borrows one ``urfa.link.Link``: ``proxy_login`` opens
a subscriber session bound to the browser's address; ``call(sid, ip, fn,
args)`` calls *as* that session, so the core checks each call against the
subscriber's own call table and address.  The office holds no subscriber
state, and no reconnect logic of its own: the link resumes its system
session after a drop, or logs in afresh with the password from the file the
core provisions.  While the core cannot be reached, a request waits at most
``timeout`` for the link (asking it to try at once) and then fails with
``CoreDown`` (the office answers 503); a call that was in flight when the
link dropped also becomes ``CoreDown`` and is not retried — it may have run.

Subscriber sessions live in the core's memory: after a core restart their
SIDs answer ``no_session`` and the office asks the subscriber to log in
again (``SessionGone``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from urfa.client import LoginInfo
from urfa.errors import AUTH_FAILED, EXPIRED, LOGGED_OUT, NO_SESSION, RATE_LIMITED, CallFailed, LoginFailed, URFAError
from urfa.link import Address, Link
from urfa.reconnect import Verdict, verdict

__all__ = ["CoreLink", "CoreDown", "SessionGone", "Refused", "BadLogin"]

log = logging.getLogger("portal.core")

# a subscriber session that the core no longer knows
_GONE = frozenset({NO_SESSION, EXPIRED, LOGGED_OUT})


class CoreDown(Exception):
    """The core cannot be asked right now."""


class SessionGone(Exception):
    """The subscriber's core session ended (logout, idle timeout, core restart)."""


class Refused(Exception):
    """The core refused the call; ``code`` is its stable error code."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class BadLogin(Exception):
    """Wrong login or password (``code`` auth_failed), or rate limited by the core."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class CoreLink:
    """The office's use of the one ``urfa.link.Link``: calls as a subscriber, failures in the office's words."""

    def __init__(self, link: Link) -> None:
        self.link = link

    @classmethod
    def for_endpoint(cls, *, host: str | None, port: int, unix: str | None, login: str,
                     password: Callable[[], str], timeout: float = 5.0) -> CoreLink:
        address = Address(host=None, unix=unix) if unix else Address(host, port)
        return cls(Link([address], "system", login, password, timeout=timeout, wait_for_core=timeout,
                        logger=log).start())

    @property
    def reconnects(self) -> int:
        return self.link.reconnects

    async def call(self, sid: bytes, ip: str, fn: str, args: dict[str, Any] | None = None) -> Any:
        """Call ``fn`` as the subscriber session ``sid`` from ``ip``."""
        try:
            return await self.link.call(fn, args or {}, as_sid=sid, as_ip=ip)
        except CallFailed as exc:
            if exc.code in _GONE:
                raise SessionGone(exc.code) from None
            if verdict(exc.code) is not Verdict.NEVER:
                raise CoreDown(exc.code) from None
            raise Refused(exc.code, exc.message) from None
        except (URFAError, OSError, asyncio.TimeoutError) as exc:
            raise CoreDown(str(exc) or type(exc).__name__) from None

    async def proxy_login(self, login: str, password: str, ip: str) -> LoginInfo:
        try:
            return await self.link.proxy_login(login, password, ip)
        except LoginFailed as exc:
            raise BadLogin(exc.code) from None
        except CallFailed as exc:
            if exc.code in (AUTH_FAILED, RATE_LIMITED):
                raise BadLogin(exc.code) from None
            raise Refused(exc.code, exc.message) from None
        except (URFAError, OSError, asyncio.TimeoutError) as exc:
            raise CoreDown(str(exc) or type(exc).__name__) from None

    async def logout(self, sid: bytes, ip: str) -> None:
        try:
            await self.call(sid, ip, "session.logout")
        except SessionGone:
            pass

    async def close(self) -> None:
        await self.link.close()
