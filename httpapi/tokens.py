"""API tokens to core sessions: the edge's only state.

Theory of operation
-------------------
The edge is logged in to the core as the system login ``httpapi``, whose
one right is ``session.proxy_token``; it never holds an operator's or a
superuser's session.  A request's bearer token becomes a core session with
``session.token_login {token, ip}``: the core checks the token (unknown,
revoked, expired → ``auth_failed``, counted against ``ip`` by its login
limiter) and opens a proxied session of kind ``token`` bound to the
client's address, whose call table is the token's groups' rights.  The
edge keeps ``(sha256(token), ip) → session`` in a bounded table, never the
token itself, and calls *as* that session (URFA ``as`` + ``ip``), so every
call is checked and audited by the core under the token's name.

When the core no longer knows a session (``no_session``: idle timeout, core
restart, the token revoked — the core ends its sessions at once) the
request logs in again once; a revoked or expired token then gets
``auth_failed``, a 401.  Concurrent first requests with one token share
one login.

Failures leave this module as three exceptions: ``CoreRefused(code,
message)`` (the core answered with an error code), ``CoreDown`` (the core
cannot be reached) and ``SessionGone`` (internal: log in again).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from urfa.errors import EXPIRED, FORBIDDEN, LOGGED_OUT, NO_SESSION, CallFailed, URFAError
from urfa.link import Link

__all__ = ["TokenDesk", "TokenSession", "CoreRefused", "CoreDown", "SessionGone", "token_key", "well_formed"]

log = logging.getLogger("httpapi")

TOKEN_RE: Final = re.compile(r"bct_[A-Za-z0-9_-]{43}")
_GONE: Final = frozenset({NO_SESSION, EXPIRED, LOGGED_OUT})
_T = TypeVar("_T")


class CoreRefused(Exception):
    """The core answered a call with an error code."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class CoreDown(Exception):
    """The core cannot be asked right now."""


class SessionGone(Exception):
    """The token's core session ended; log in again."""


def well_formed(token: str) -> bool:
    return TOKEN_RE.fullmatch(token) is not None


def token_key(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(slots=True)
class TokenSession:
    key: bytes                 # sha256 of the token: what the edge remembers of it
    ip: str
    sid: bytes
    name: str                  # the token's name (the access log's and the audit's)
    table: dict[str, dict[str, Any]] | None = field(default=None)   # its sys.calls, by name


async def _answer(step: Awaitable[_T]) -> _T:
    """``step``'s result with failures in this module's words (a call timeout stays ``TimeoutError``)."""
    try:
        return await step
    except CallFailed as exc:
        if exc.code in _GONE:
            raise SessionGone(exc.code) from None
        raise CoreRefused(exc.code, exc.message) from None
    except asyncio.TimeoutError:
        raise
    except (URFAError, OSError) as exc:
        raise CoreDown(str(exc) or type(exc).__name__) from None


class TokenDesk:
    """Token sessions over the edge's one link to the core."""

    def __init__(self, link: Link, *, call_timeout: float, login_timeout: float, max_sessions: int = 10000) -> None:
        self.link = link
        self.call_timeout = call_timeout
        self.login_timeout = login_timeout
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[tuple[bytes, str], TokenSession] = OrderedDict()
        self._logins: dict[tuple[bytes, str], asyncio.Future[TokenSession]] = {}

    async def session(self, token: str, ip: str) -> TokenSession:
        """The session of ``token`` from ``ip``, logging in when there is none."""
        slot = (token_key(token), ip)
        known = self._sessions.get(slot)
        if known is not None:
            self._sessions.move_to_end(slot)
            return known
        pending = self._logins.get(slot)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[TokenSession] = asyncio.get_running_loop().create_future()
        self._logins[slot] = future
        try:
            made = await self._login(token, ip, slot[0])
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()          # retrieved: no "never retrieved" warning when nobody else waited
            raise
        finally:
            self._logins.pop(slot, None)
        future.set_result(made)
        self._sessions[slot] = made
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
        return made

    async def _login(self, token: str, ip: str, key: bytes) -> TokenSession:
        try:
            answer = await _answer(self.link.call("session.token_login", {"token": token, "ip": ip},
                                                  timeout=self.login_timeout))
        except CoreRefused as exc:
            if exc.code == FORBIDDEN:     # our own login lacks session.proxy_token: the install is wrong
                log.error("the core refuses session.token_login to the httpapi login: %s", exc.message)
                raise CoreDown("httpapi's system login may not open token sessions") from None
            raise
        except SessionGone as exc:
            raise CoreDown(f"the edge's own session: {exc}") from None
        except asyncio.TimeoutError:
            raise CoreDown("the core did not answer the token login in time") from None
        return TokenSession(key=key, ip=ip, sid=bytes(answer["sid"]), name=str(answer.get("name") or "?"))

    def forget(self, session: TokenSession) -> None:
        if self._sessions.get((session.key, session.ip)) is session:
            del self._sessions[(session.key, session.ip)]

    async def call(self, session: TokenSession, fn: str, args: dict[str, Any]) -> Any:
        """``fn`` as the token's session; ``TimeoutError`` past ``call_timeout``."""
        return await _answer(self.link.call(fn, args, as_sid=session.sid, as_ip=session.ip,
                                            timeout=self.call_timeout))

    async def stream(self, session: TokenSession, fn: str, args: dict[str, Any]) -> AsyncGenerator[Any, None]:
        """The chunks of ``fn``, then (last) a ``_Summary`` holding its result."""
        chunks = await _answer(self.link.stream(fn, args, as_sid=session.sid, as_ip=session.ip,
                                                chunk_timeout=self.call_timeout))
        while True:
            try:
                chunk = await _answer(chunks.__anext__())
            except StopAsyncIteration:
                break
            yield chunk
        yield Summary(chunks.result)

    async def table(self, session: TokenSession) -> dict[str, dict[str, Any]]:
        """The session's ``sys.calls``, every page, by name (read once per session)."""
        if session.table is None:
            entries: list[dict[str, Any]] = []
            for _ in range(1000):          # 500 a page: half a million calls is more than any core has
                page = await self.call(session, "sys.calls", {"offset": len(entries)})
                if not page:
                    break
                entries.extend(page)
            session.table = {str(entry["name"]): entry for entry in entries}
        return session.table


@dataclass(frozen=True, slots=True)
class Summary:
    """The last item of ``TokenDesk.stream``: the streamed call's result."""

    result: Any
