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

A session's call table is the registry as it was when it opened (URFA's
rule: a new call needs a new login).  So the edge renews a token's session
when its table may be stale: when the core says a call was ``deleted``
(unloaded), and when a name is not in a table older than ``renew_after``
(a plugin may have been loaded since) or ``openapi.json`` is asked of one.
The old session is logged out once no request uses it any more.

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
import logging
from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from billcore.common.api_token import hash_token
from urfa.errors import DELETED, EXPIRED, FORBIDDEN, LOGGED_OUT, NO_SESSION, CallFailed, URFAError
from urfa.link import Link

__all__ = ["TokenDesk", "TokenSession", "CoreRefused", "CoreDown", "SessionGone", "Summary", "DELETED"]

log = logging.getLogger("httpapi")

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




@dataclass(slots=True)
class TokenSession:
    key: bytes                 # sha256 of the token: what the edge remembers of it
    ip: str
    sid: bytes
    name: str                  # the token's name (the access log's and the audit's)
    born: float                # monotonic time of its login
    table: dict[str, dict[str, Any]] | None = field(default=None)   # its sys.calls, by name
    users: int = 0             # requests using it now
    retired: bool = False      # replaced by a newer session: log out when users reaches 0


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

    def __init__(self, link: Link, *, call_timeout: float, login_timeout: float, max_sessions: int = 10000,
                 renew_after: float = 60.0, inflight: int = 56) -> None:
        self.link = link
        # the core answers `busy` past urfa.max_inflight calls on one connection: requests past
        # ``inflight`` wait here for a slot instead (within call_timeout), logins keep a reserve
        self._slots = asyncio.Semaphore(inflight)
        self.call_timeout = call_timeout
        self.login_timeout = login_timeout
        self.max_sessions = max_sessions
        self.renew_after = renew_after
        self._logouts: set[asyncio.Task[None]] = set()
        self._sessions: OrderedDict[tuple[bytes, str], TokenSession] = OrderedDict()
        self._logins: dict[tuple[bytes, str], asyncio.Future[TokenSession]] = {}

    async def session(self, token: str, ip: str) -> TokenSession:
        """The session of ``token`` from ``ip``, logging in when there is none."""
        slot = (hash_token(token), ip)   # the edge keeps a token's SHA-256, never the token
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
            self._retire(self._sessions.popitem(last=False)[1])
        return made

    def stale(self, session: TokenSession, now: float) -> bool:
        """Old enough that the registry may have changed since its login."""
        return now - session.born >= self.renew_after

    def renew(self, session: TokenSession) -> None:
        """Forget ``session`` for new requests (the next one logs in afresh); it is logged out when unused."""
        self.forget(session)
        self._retire(session)

    def hold(self, session: TokenSession) -> None:
        session.users += 1

    def release(self, session: TokenSession) -> None:
        session.users -= 1
        if session.retired and session.users <= 0:
            self._logout(session)

    def _retire(self, session: TokenSession) -> None:
        if not session.retired:
            session.retired = True
            if session.users <= 0:
                self._logout(session)

    def _logout(self, session: TokenSession) -> None:
        async def logout() -> None:
            try:
                await _answer(self.link.call("session.logout", {}, as_sid=session.sid, as_ip=session.ip,
                                             timeout=self.login_timeout))
            except (CoreRefused, CoreDown, SessionGone, asyncio.TimeoutError):
                pass            # gone already, or the core is: it ends idle sessions itself
        task = asyncio.get_running_loop().create_task(logout())
        self._logouts.add(task)
        task.add_done_callback(self._logouts.discard)

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
        return TokenSession(key=key, ip=ip, sid=bytes(answer["sid"]), name=str(answer.get("name") or "?"),
                            born=asyncio.get_running_loop().time())

    def forget(self, session: TokenSession) -> None:
        if self._sessions.get((session.key, session.ip)) is session:
            del self._sessions[(session.key, session.ip)]

    async def _slot(self) -> None:
        async with asyncio.timeout(self.call_timeout):
            await self._slots.acquire()

    async def call(self, session: TokenSession, fn: str, args: dict[str, Any]) -> Any:
        """``fn`` as the token's session; ``TimeoutError`` past ``call_timeout``."""
        await self._slot()
        try:
            return await _answer(self.link.call(fn, args, as_sid=session.sid, as_ip=session.ip,
                                                timeout=self.call_timeout))
        finally:
            self._slots.release()

    async def stream(self, session: TokenSession, fn: str, args: dict[str, Any]) -> AsyncGenerator[Any, None]:
        """The chunks of ``fn``, then (last) a ``Summary`` holding its result; one slot throughout."""
        await self._slot()
        try:
            chunks = await _answer(self.link.stream(fn, args, as_sid=session.sid, as_ip=session.ip,
                                                    chunk_timeout=self.call_timeout))
            while True:
                try:
                    chunk = await _answer(chunks.__anext__())
                except StopAsyncIteration:
                    break
                yield chunk
            yield Summary(chunks.result)
        finally:
            self._slots.release()

    async def table(self, session: TokenSession, fresh: bool = False) -> dict[str, dict[str, Any]]:
        """The session's ``sys.calls``, every page, by name (read once per session, or ``fresh``)."""
        if session.table is None or fresh:
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
