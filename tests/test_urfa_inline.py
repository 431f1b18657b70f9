"""Handlers marked ``runs_inline``: started in the socket callback, a task only if they suspend.

A client must not be able to tell an inline handler from a task: results,
errors, cancel, the in-flight cap and the module reference all behave the
same whether the handler finished at once or suspended half-way.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from billcore.calls import CallRegistry, CallSpec
from billcore.urfa_server import URFAConfig, URFAService, runs_inline
from urfa import client as uc
from urfa import errors as E
from urfa.errors import CallFailed

from .test_urfa_harness import ITER, MemoryAuth

GATE: dict[str, asyncio.Event] = {}


def inline_registry() -> CallRegistry:
    reg = CallRegistry()

    @runs_inline
    async def now(ctx: Any, x: Any) -> Any:
        return x

    @runs_inline
    async def later(ctx: Any, gate: str) -> str:
        # No task exists yet when this starts; after the await it runs in one.
        before = asyncio.current_task()
        await GATE.setdefault(gate, asyncio.Event()).wait()
        return f"{gate}:{before is None}:{asyncio.current_task() is not None}"

    @runs_inline
    async def refuse(ctx: Any, when: str) -> None:
        if when == "late":
            await asyncio.sleep(0)
        raise CallFailed("t.refused", when)

    @runs_inline
    async def crash(ctx: Any) -> None:
        raise KeyError("internal detail")

    reg.register_all([
        CallSpec("i.now", now, args={"x": "any"}, module="mod_i"),
        CallSpec("i.later", later, args={"gate": "str"}, module="mod_i"),
        CallSpec("i.refuse", refuse, args={"when": "str"}, module="mod_i"),
        CallSpec("i.crash", crash, module="mod_i"),
    ])
    return reg


async def _service(max_inflight: int = 64) -> tuple[URFAService, uc.Client]:
    auth = MemoryAuth()
    auth.add("system", "svc", "svc-pw")
    svc = URFAService(inline_registry(), auth,
                      URFAConfig(secret=b"k" * 32, mock_iterations=ITER, max_inflight=max_inflight))
    await svc.start(tcp=("127.0.0.1", 0))
    c = await uc.connect("127.0.0.1", svc.sockets[0].getsockname()[1])
    await c.login("system", "svc", "svc-pw")
    return svc, c


async def test_inline_results_and_errors_match_task_handlers() -> None:
    GATE.clear()
    svc, c = await _service()
    try:
        got = await asyncio.gather(*(c.call("i.now", {"x": i}) for i in range(200)))
        assert got == list(range(200))
        for when in ("early", "late"):
            with pytest.raises(CallFailed) as exc:
                await c.call("i.refuse", {"when": when})
            assert (exc.value.code, exc.value.message) == ("t.refused", when)
        with pytest.raises(CallFailed) as exc:
            await c.call("i.crash")
        assert exc.value.code == E.INTERNAL and "detail" not in exc.value.message
        assert await c.call("sys.ping") == "pong"
    finally:
        await c.close()
        await svc.stop()


async def test_suspended_inline_call_finishes_in_a_task_and_holds_its_module() -> None:
    GATE.clear()
    svc, c = await _service()
    try:
        p = c.start_call("i.later", {"gate": "a"})
        await asyncio.sleep(0.05)
        assert svc.registry.module_refs("mod_i") >= 2   # the session's table + the call
        link = next(iter(svc._links))
        assert len(link.tasks) == 1
        GATE["a"].set()
        assert await p == "a:True:True"
        await asyncio.sleep(0.01)
        assert not link.tasks and svc.registry.module_refs("mod_i") == 1
    finally:
        await c.close()
        await svc.stop()


async def test_cancel_reaches_a_suspended_inline_call() -> None:
    GATE.clear()
    svc, c = await _service()
    try:
        p = c.start_call("i.later", {"gate": "never"})
        await asyncio.sleep(0.05)
        c.cancel(p)
        with pytest.raises(CallFailed) as exc:
            await p
        assert exc.value.code == E.CANCELLED
        await asyncio.sleep(0.01)
        assert svc.registry.module_refs("mod_i") == 1
    finally:
        await c.close()
        await svc.stop()


async def test_inflight_cap_counts_suspended_inline_calls_and_frees_finished_ones() -> None:
    GATE.clear()
    svc, c = await _service(max_inflight=2)
    try:
        # Calls that finish at once free their slot at once: many fit under a cap of 2.
        assert await asyncio.gather(*(c.call("i.now", {"x": i}) for i in range(50))) == list(range(50))
        held = [c.start_call("i.later", {"gate": "b"}) for _ in range(2)]
        over = c.start_call("i.now", {"x": 1})
        with pytest.raises(CallFailed) as exc:
            await over
        assert exc.value.code == E.BUSY
        GATE["b"].set()
        assert await asyncio.gather(*(h.future for h in held)) == ["b:True:True"] * 2
        assert await c.call("i.now", {"x": 7}) == 7
    finally:
        await c.close()
        await svc.stop()


async def test_connection_drop_cancels_suspended_inline_calls() -> None:
    GATE.clear()
    svc, c = await _service()
    try:
        c.start_call("i.later", {"gate": "c"})
        await asyncio.sleep(0.05)
        assert svc.registry.module_refs("mod_i") == 2
        await c.close()
        for _ in range(100):
            await asyncio.sleep(0.01)
            if svc.registry.module_refs("mod_i") == 1:
                break
        # The call was cancelled; only the (resumable) system session's table remains.
        assert svc.registry.module_refs("mod_i") == 1 and not svc._links
    finally:
        await svc.stop()
