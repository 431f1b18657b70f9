"""A web edge's calls to the core, as its system login, in the edge's words.

Theory of operation
-------------------
Every browser request borrows one ``urfa.link.Link``, logged in as the
edge's system login (the office's ``portal``, right ``session.proxy``; the
console's ``console``, right ``session.proxy_admin``).  A proxied login
opens a subscriber's or an operator's session bound to the browser's
address; ``call(sid, ip, fn, args)`` calls *as* that session, so the core
checks each call against that session's own call table and address.  The
edge keeps no reconnect logic of its own: the link resumes its system
session after a drop, or logs in afresh with the password from the file the
core provisions.  While the core cannot be reached, a request waits at most
``timeout`` for the link (asking it to try at once) and then fails with
``CoreDown`` (the edge answers 503); a call that was in flight when the
link dropped also becomes ``CoreDown`` and is not retried — it may have run.

A proxied login comes two ways: ``proxy_login`` computes the SCRAM proof
here from a password the office's form posted; the console's browser
computes it itself (it never sends the password), and the console only
relays the steps (``proxy_start``, ``proxy_proof``, ``proxy_otp``).

Proxied sessions live in the core's memory: after a core restart their SIDs
answer ``no_session`` and the edge asks the user to log in again
(``SessionGone``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from urfa.client import Client, LoginInfo
from urfa.errors import AUTH_FAILED, EXPIRED, LOGGED_OUT, NO_SESSION, RATE_LIMITED, CallFailed, LoginFailed, URFAError
from urfa.link import Address, Link
from urfa.reconnect import Verdict, verdict

__all__ = ["CoreLink", "CoreDown", "SessionGone", "Refused", "BadLogin"]

# a proxied session that the core no longer knows
_GONE = frozenset({NO_SESSION, EXPIRED, LOGGED_OUT})
_Answer = TypeVar("_Answer")


class CoreDown(Exception):
    """The core cannot be asked right now."""


class SessionGone(Exception):
    """The proxied session ended (logout, idle timeout, core restart)."""


class Refused(Exception):
    """The core refused the call; ``code`` is its stable error code."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class BadLogin(Exception):
    """Wrong login, password or code (``code`` auth_failed), or rate limited by the core."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


def _down(exc: BaseException) -> CoreDown:
    return CoreDown(str(exc) or type(exc).__name__)


class CoreLink:
    """An edge's use of the one ``urfa.link.Link``: calls as a proxied session, failures in the edge's words."""

    def __init__(self, link: Link) -> None:
        self.link = link

    @classmethod
    def for_endpoint(cls, *, host: str | None, port: int, unix: str | None, login: str,
                     password: Callable[[], str], timeout: float = 5.0, logger_name: str = "portal.core",
                     on_connected: Callable[[Client, str], Awaitable[None]] | None = None,
                     on_event: Callable[[Any], None] | None = None,
                     on_missed: Callable[[str], None] | None = None) -> CoreLink:
        address = Address(host=None, unix=unix) if unix else Address(host, port)
        return cls(Link([address], "system", login, password, timeout=timeout, wait_for_core=timeout,
                        on_connected=on_connected, on_event=on_event, on_missed=on_missed,
                        logger=logging.getLogger(logger_name)).start())

    @property
    def reconnects(self) -> int:
        return self.link.reconnects

    async def call(self, sid: bytes, ip: str, fn: str, args: dict[str, Any] | None = None) -> Any:
        """Call ``fn`` as the proxied session ``sid`` from ``ip``."""
        try:
            return await self.link.call(fn, args or {}, as_sid=sid, as_ip=ip)
        except CallFailed as exc:
            raise self._failure(exc) from None
        except (URFAError, OSError, asyncio.TimeoutError) as exc:
            raise _down(exc) from None

    async def call_own(self, fn: str, args: dict[str, Any] | None = None) -> Any:
        """Call ``fn`` as the edge's own system login (an edge that acts for no browser session:
        the payment callbacks); failures as ``call`` raises them."""
        try:
            return await self.link.call(fn, args or {})
        except CallFailed as exc:
            raise self._failure(exc) from None
        except (URFAError, OSError, asyncio.TimeoutError) as exc:
            raise _down(exc) from None

    async def stream(self, sid: bytes, ip: str, fn: str, args: dict[str, Any] | None = None) -> AsyncIterator[Any]:
        """The chunks of the streamed call ``fn`` as ``sid``; failures as ``call`` raises them."""
        try:
            chunks = await self.link.stream(fn, args or {}, as_sid=sid, as_ip=ip)
            async for chunk in chunks:
                yield chunk
        except CallFailed as exc:
            raise self._failure(exc) from None
        except (URFAError, OSError, asyncio.TimeoutError) as exc:
            raise _down(exc) from None

    async def stream_all(self, sid: bytes, ip: str, fn: str, args: dict[str, Any] | None = None, *,
                         max_rows: int) -> tuple[list[Any], Any]:
        """Every row of the streamed call ``fn`` (chunks are lists of rows) and its result, as ``sid``;
        more than ``max_rows`` rows is ``Refused("too_many_rows")`` (what needs them all is bounded)."""
        rows: list[Any] = []
        try:
            chunks = await self.link.stream(fn, args or {}, as_sid=sid, as_ip=ip)
            async for chunk in chunks:
                rows.extend(chunk if isinstance(chunk, list) else [chunk])
                if len(rows) > max_rows:
                    raise Refused("too_many_rows", f"more than {max_rows} rows: ask for a shorter range")
            return rows, chunks.result
        except CallFailed as exc:
            raise self._failure(exc) from None
        except (URFAError, OSError, asyncio.TimeoutError) as exc:
            raise _down(exc) from None

    @staticmethod
    def _failure(exc: CallFailed) -> Exception:
        if exc.code in _GONE:
            return SessionGone(exc.code)
        if verdict(exc.code) is not Verdict.NEVER:
            return CoreDown(exc.code)
        return Refused(exc.code, exc.message)

    async def proxy_login(self, login: str, password: str, ip: str) -> LoginInfo:
        """A subscriber's whole login, the proof computed here from the posted password."""
        return await self._login_step(self.link.proxy_login(login, password, ip))

    async def proxy_start(self, login: str, cnonce: bytes, ip: str, kind: str) -> dict[str, Any]:
        """The first step of a login whose proof the browser computes: ``{handle, nonce, salt, iter}``."""
        return await self._login_step(self.link.call(
            "session.proxy_login", {"login": login, "cnonce": cnonce, "ip": ip, "kind": kind}))

    async def proxy_proof(self, handle: bytes, proof: bytes) -> dict[str, Any]:
        """``{sid, sig, timeout}``, or ``{sig, otp_required: true}`` when a second factor follows."""
        return await self._login_step(self.link.call("session.proxy_proof", {"handle": handle, "proof": proof}))

    async def proxy_otp(self, handle: bytes, code: str) -> dict[str, Any]:
        """The second factor of a proxied login: ``{sid, timeout}``."""
        return await self._login_step(self.link.call("session.proxy_otp", {"handle": handle, "code": code}))

    async def _login_step(self, step: Awaitable[_Answer]) -> _Answer:
        try:
            return await step
        except LoginFailed as exc:
            raise BadLogin(exc.code) from None
        except CallFailed as exc:
            if exc.code in (AUTH_FAILED, RATE_LIMITED):
                raise BadLogin(exc.code) from None
            if verdict(exc.code) is not Verdict.NEVER:
                raise CoreDown(exc.code) from None
            raise Refused(exc.code, exc.message) from None
        except (URFAError, OSError, asyncio.TimeoutError) as exc:
            raise _down(exc) from None

    async def logout(self, sid: bytes, ip: str) -> None:
        try:
            await self.call(sid, ip, "session.logout")
        except SessionGone:
            pass

    async def close(self) -> None:
        await self.link.close()
