"""Shared pieces for the URFA tests: an in-memory auth backend and a live service.

``MemoryAuth`` stands in for the database-backed principal store (the real
one lives elsewhere); everything else here is the real service on a real
socket.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from billcore.server.calls import CallRegistry, CallSpec
from billcore.server.topics import Topic
from billcore.server.service import URFAConfig, URFAService
from billcore.server.sessions import Principal
from urfa import client as uc
from urfa import scram
from urfa.errors import CallFailed

ITER = 4096   # RFC 7677's minimum keeps the tests fast


class MemoryAuth:
    """Principals kept in a dict: a test double for the DB store."""

    def __init__(self) -> None:
        self.principals: dict[tuple[str, str], Principal] = {}
        self.lookups = 0

    def add(self, kind: str, login: str, password: str, rights: set[str] | frozenset[str] = frozenset()) -> Principal:
        p = Principal(kind, login, len(self.principals) + 1, frozenset(rights),
                      scram.make_verifier(password, iterations=ITER))
        self.principals[(kind, login)] = p
        return p

    async def find_principal(self, kind: str, login: str) -> Principal | None:
        self.lookups += 1
        return self.principals.get((kind, login))


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_registry() -> CallRegistry:
    """A registry with the application calls the tests use."""
    reg = CallRegistry()

    async def echo(ctx: Any, x: Any) -> Any:
        return x

    async def sleep(ctx: Any, seconds: float | int, tag: Any = None) -> Any:
        await asyncio.sleep(seconds)
        return tag

    async def fail(ctx: Any, code: str) -> None:
        raise CallFailed(code, "as asked")

    async def crash(ctx: Any) -> None:
        raise KeyError("secret internal detail")

    async def count(ctx: Any, n: int) -> int:
        for i in range(n):
            await ctx.stream({"i": i})
        return n

    async def balance(ctx: Any) -> dict[str, Any]:
        return {"account": ctx.principal.id, "balance": 12_340_000}

    async def admin_only(ctx: Any) -> str:
        return "admin"

    reg.register_all([
        CallSpec("t.echo", echo, args={"x": "any"}, result="any", doc="Returns x."),
        CallSpec("t.sleep", sleep, args={"seconds": "any", "tag": "any?"}),
        CallSpec("t.fail", fail, args={"code": "str"}),
        CallSpec("t.crash", crash),
        CallSpec("t.count", count, args={"n": "int"}, streaming=True, result="int"),
        CallSpec("acct.balance", balance, kinds=frozenset({"user"}), result="map"),
        CallSpec("adm.secret", admin_only, right="adm.secret", kinds=frozenset({"admin", "system"})),
    ])
    return reg


test_registry.__test__ = False  # type: ignore[attr-defined]


# Topics of the harness's own (a system session with right events.test reads them).
TEST_TOPICS = {name: Topic(name, ("events.test",), doc="a test topic") for name in ("acct.balance", "nas.coa")}


@contextlib.asynccontextmanager
async def running_service(config: URFAConfig | None = None, clock: Any = None,
                          **start: Any) -> AsyncIterator[tuple[URFAService, MemoryAuth, int]]:
    auth = MemoryAuth()
    auth.add("admin", "alice", "alice-pw", {"adm.*"})
    auth.add("admin", "eve", "eve-pw")
    auth.add("system", "portal", "portal-pw", {"session.proxy"})
    auth.add("system", "radius", "radius-pw", {"events.test"})
    auth.add("user", "bob", "bob-pw")
    kw: dict[str, Any] = {"topics": TEST_TOPICS}
    if clock is not None:
        kw["clock"] = clock
    svc = URFAService(test_registry(), auth, config or URFAConfig(secret=b"k" * 32, mock_iterations=ITER), **kw)
    if not start:
        start = {"tcp": ("127.0.0.1", 0)}
    await svc.start(**start)
    port = svc.sockets[0].getsockname()[1] if "tcp" in start else 0
    try:
        yield svc, auth, port
    finally:
        await svc.stop()


async def test_principal_lookup_is_exact() -> None:
    auth = MemoryAuth()
    p = auth.add("admin", "alice", "pw")
    assert await auth.find_principal("admin", "alice") == p
    assert await auth.find_principal("user", "alice") is None


async def test_service_answers_ping_over_tcp() -> None:
    async with running_service() as (svc, auth, port):
        c = await uc.connect("127.0.0.1", port)
        info = await c.login("admin", "alice", "alice-pw")
        assert (info.kind, info.login, len(info.sid)) == ("admin", "alice", 16)
        assert await c.call("sys.ping") == "pong"
        await c.close()

