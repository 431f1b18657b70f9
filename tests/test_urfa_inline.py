"""Handlers made with ``runs_inline``: plain functions answered in the socket callback.

A client must not be able to tell an inline handler from a task: results,
errors, the in-flight cap and ordering with task handlers behave the same.
The service makes no task and takes no module reference for them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from billcore.server.calls import CallRegistry, CallSpec
from billcore.server.dispatcher import runs_inline
from billcore.server.service import URFAConfig, URFAService
from urfa import client as uc
from urfa import errors as E
from urfa.errors import CallFailed

from .test_urfa_harness import ITER, MemoryAuth
from .waiting import eventually

GATE: dict[str, asyncio.Event] = {}
SEEN: list[Any] = []


def inline_registry() -> CallRegistry:
    reg = CallRegistry()

    @runs_inline
    def now(ctx: Any, x: Any) -> Any:
        SEEN.append(asyncio.current_task())
        return x

    @runs_inline
    def refuse(ctx: Any, code: str) -> None:
        raise CallFailed(code, "as asked")

    @runs_inline
    def crash(ctx: Any) -> None:
        raise KeyError("internal detail")

    @runs_inline
    def unencodable(ctx: Any) -> Any:
        return object()

    async def later(ctx: Any, gate: str) -> str:
        await GATE.setdefault(gate, asyncio.Event()).wait()
        return gate

    reg.register_all([
        CallSpec("i.now", now, args={"x": "any"}, module="mod_i"),
        CallSpec("i.refuse", refuse, args={"code": "str"}, module="mod_i"),
        CallSpec("i.crash", crash, module="mod_i"),
        CallSpec("i.unencodable", unencodable, module="mod_i"),
        CallSpec("i.later", later, args={"gate": "str"}, module="mod_i"),
    ])
    return reg


async def _service(max_inflight: int = 64) -> tuple[URFAService, uc.Client]:
    GATE.clear()
    SEEN.clear()
    auth = MemoryAuth()
    auth.add("system", "svc", "svc-pw")
    svc = URFAService(inline_registry(), auth,
                      URFAConfig(secret=b"k" * 32, mock_iterations=ITER, max_inflight=max_inflight))
    await svc.start(tcp=("127.0.0.1", 0))
    c = await uc.connect("127.0.0.1", svc.sockets[0].getsockname()[1])
    await c.login("system", "svc", "svc-pw")
    return svc, c


def test_runs_inline_refuses_coroutine_functions_and_stays_awaitable() -> None:
    async def coro(ctx: Any) -> None:
        return None

    with pytest.raises(TypeError):
        runs_inline(coro)
    handler = runs_inline(lambda ctx, x: x + 1)
    assert asyncio.run(handler(None, x=1)) == 2   # what plugins and tests see: an async handler


async def test_inline_results_and_errors_match_task_handlers() -> None:
    svc, c = await _service()
    try:
        got = await asyncio.gather(*(c.call("i.now", {"x": i}) for i in range(200)))
        assert got == list(range(200)) and SEEN == [None] * 200   # no task was made for them
        with pytest.raises(CallFailed) as exc:
            await c.call("i.refuse", {"code": "t.refused"})
        assert (exc.value.code, exc.value.message) == ("t.refused", "as asked")
        for fn in ("i.crash", "i.unencodable"):
            with pytest.raises(CallFailed) as exc:
                await c.call(fn)
            assert exc.value.code == E.INTERNAL and "detail" not in exc.value.message
        assert await c.call("sys.ping") == "pong"
        assert svc.registry.module_refs("mod_i") == 1      # only the session's table
    finally:
        await c.close()
        await svc.stop()


async def test_inline_replies_overtake_a_running_task_call() -> None:
    svc, c = await _service()
    try:
        slow = c.start_call("i.later", {"gate": "a"})
        await eventually(lambda: svc.registry.module_refs("mod_i") == 2, what="the table + the call in its task hold the module")
        assert await c.call("i.now", {"x": "fast"}) == "fast"
        assert not slow.future.done()
        GATE["a"].set()
        assert await slow == "a"
        await eventually(lambda: svc.registry.module_refs("mod_i") == 1, what="the finished call released the module")
    finally:
        await c.close()
        await svc.stop()


async def test_inflight_cap_counts_task_calls_and_inline_calls_free_their_slot_at_once() -> None:
    svc, c = await _service(max_inflight=2)
    try:
        # Each inline call is over before the next frame is read: many fit under a cap of 2.
        assert await asyncio.gather(*(c.call("i.now", {"x": i}) for i in range(50))) == list(range(50))
        held = [c.start_call("i.later", {"gate": "b"}) for _ in range(2)]
        with pytest.raises(CallFailed) as exc:
            await c.call("i.now", {"x": 1})
        assert exc.value.code == E.BUSY
        GATE["b"].set()
        assert await asyncio.gather(*(h.future for h in held)) == ["b", "b"]
        assert await c.call("i.now", {"x": 7}) == 7
    finally:
        await c.close()
        await svc.stop()


async def test_cancel_and_connection_drop_release_task_calls() -> None:
    svc, c = await _service()
    try:
        p = c.start_call("i.later", {"gate": "never"})
        await eventually(lambda: svc.registry.module_refs("mod_i") == 2, what="the call is running")
        c.cancel(p)
        with pytest.raises(CallFailed) as exc:
            await p
        assert exc.value.code == E.CANCELLED
        c.start_call("i.later", {"gate": "never"})
        await eventually(lambda: svc.registry.module_refs("mod_i") == 2, what="the second call is running")
        await c.close()
        await eventually(lambda: svc.registry.module_refs("mod_i") == 1, what="the dropped connection's call released the module")
        # The call was cancelled; only the (resumable) system session's table remains.
        assert svc.registry.module_refs("mod_i") == 1 and not svc._peers
    finally:
        await svc.stop()


async def test_cancel_in_the_same_read_as_its_call_is_answered_and_frees_the_slot() -> None:
    svc, c = await _service(max_inflight=1)
    try:
        for _ in range(20):
            p = c.start_call("i.later", {"gate": "never"})
            c.cancel(p)               # both frames leave in one write
            with pytest.raises(CallFailed) as exc:
                await asyncio.wait_for(p.future, 2.0)
            assert exc.value.code == E.CANCELLED
        assert await c.call("i.now", {"x": 1}) == 1    # the one slot is free again
        await eventually(lambda: svc.registry.module_refs("mod_i") == 1, what="the cancelled calls released the module")
        assert not next(iter(svc._peers)).tasks
    finally:
        await c.close()
        await svc.stop()
