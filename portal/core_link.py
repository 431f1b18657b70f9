"""The portal's one URFA connection to the core, as the ``portal`` system login.

Theory of operation
-------------------
Every browser request borrows this link: ``proxy_login`` opens a subscriber
session bound to the browser's address; ``call(sid, ip, fn, args)`` calls
*as* that session, so the core checks each call against the subscriber's
own call table and address.  The link holds no subscriber state.

When the connection is gone (the core restarted, the network blinked) the
next request reconnects: first ``resume`` of the system session, else a
fresh login with the password from the file the core provisions.  One lock
makes concurrent requests wait for a single reconnect.  While the core
cannot be reached, calls fail fast with ``CoreDown`` (the office answers
503); a call that was in flight when the link dropped also becomes
``CoreDown`` and is not retried — it may have run.

Subscriber sessions live in the core's memory: after a core restart their
SIDs answer ``no_session`` and the office asks the subscriber to log in
again (``SessionGone``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from urfa import errors as E
from urfa.client import Client, LoginInfo, connect
from urfa.errors import CallFailed, ConnectionLost, LoginFailed

__all__ = ["CoreLink", "CoreDown", "SessionGone", "Refused", "BadLogin"]

log = logging.getLogger("portal.core")

# a subscriber session that the core no longer knows
_GONE = frozenset({E.NO_SESSION, E.EXPIRED, E.LOGGED_OUT})


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


Connector = Callable[[], Awaitable[Client]]


class CoreLink:
    def __init__(self, connector: Connector, login: str, password: Callable[[], str],
                 timeout: float = 5.0) -> None:
        self._connector = connector
        self._login = login
        self._password = password
        self.timeout = timeout
        self._client: Client | None = None
        self._lock = asyncio.Lock()
        self.reconnects = 0

    @classmethod
    def for_endpoint(cls, *, host: str | None, port: int, unix: str | None, login: str,
                     password: Callable[[], str], timeout: float = 5.0) -> CoreLink:
        async def connector() -> Client:
            if unix:
                return await connect(unix=unix, timeout=timeout)
            return await connect(host, port, timeout=timeout)
        return cls(connector, login, password, timeout)

    async def _ready(self) -> Client:
        client = self._client
        if client is not None and not client.closed:
            return client
        async with self._lock:
            client = self._client
            if client is not None and not client.closed:
                return client
            try:
                if client is not None and client.info is not None:
                    try:
                        await asyncio.wait_for(client.resume(), self.timeout)
                        log.info("system session resumed")
                        self.reconnects += 1
                        return client
                    except (LoginFailed, ConnectionLost, OSError, asyncio.TimeoutError):
                        await client.close()
                fresh = await asyncio.wait_for(self._connector(), self.timeout)
                try:
                    await asyncio.wait_for(fresh.login("system", self._login, self._password()), self.timeout)
                except BaseException:
                    await fresh.close()
                    raise
            except (ConnectionLost, OSError, asyncio.TimeoutError) as exc:
                raise CoreDown(str(exc) or type(exc).__name__) from None
            except LoginFailed as exc:
                log.error("the core refused the portal's system login: %s", exc)
                raise CoreDown(f"system login refused: {exc.code}") from None
            if client is not None:
                self.reconnects += 1
            self._client = fresh
            log.info("logged in to the core", extra={"login": self._login})
            return fresh

    async def call(self, sid: bytes, ip: str, fn: str, args: dict[str, Any] | None = None) -> Any:
        """Call ``fn`` as the subscriber session ``sid`` from ``ip``."""
        client = await self._ready()
        try:
            return await client.call(fn, args or {}, as_sid=sid, as_ip=ip, timeout=self.timeout)
        except CallFailed as exc:
            if exc.code in _GONE:
                raise SessionGone(exc.code) from None
            if exc.code in (E.SHUTDOWN, E.BUSY):
                raise CoreDown(exc.code) from None
            raise Refused(exc.code, exc.message) from None
        except (ConnectionLost, asyncio.TimeoutError) as exc:
            raise CoreDown(str(exc) or "timeout") from None

    async def proxy_login(self, login: str, password: str, ip: str) -> LoginInfo:
        client = await self._ready()
        try:
            return await asyncio.wait_for(client.proxy_login(login, password, ip), self.timeout * 2)
        except LoginFailed as exc:
            raise BadLogin(exc.code) from None
        except CallFailed as exc:
            if exc.code in (E.AUTH_FAILED, E.RATE_LIMITED):
                raise BadLogin(exc.code) from None
            raise Refused(exc.code, exc.message) from None
        except (ConnectionLost, asyncio.TimeoutError) as exc:
            raise CoreDown(str(exc) or "timeout") from None

    async def logout(self, sid: bytes, ip: str) -> None:
        try:
            await self.call(sid, ip, "session.logout")
        except SessionGone:
            pass

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
