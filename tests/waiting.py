"""Waiting on a condition instead of sleeping a fixed time.

A fixed sleep followed by an assert passes on an idle machine and fails on
a loaded one (the flake loop runs the suite beside a CPU hog).  These
helpers poll a predicate until it is true and return its value, so a test
waits exactly as long as the system needs and no longer; the timeout is
only the point at which the test gives up, so it is generous.

- ``wait_for``: blocking, for tests that drive threads or subprocesses;
- ``eventually``: in a coroutine, with a plain predicate;
- ``eventually_awaited``: in a coroutine, with a coroutine predicate
  (a database query, a call to the core).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

Result = TypeVar("Result")

DEFAULT_TIMEOUT = 15.0
POLL_EVERY = 0.02


def _gave_up(what: str, timeout: float, last: object) -> AssertionError:
    return AssertionError(f"{what} not true within {timeout}s (last value: {last!r})")


def wait_for(check: Callable[[], Result], timeout: float = DEFAULT_TIMEOUT,
             every: float = POLL_EVERY, what: str = "condition") -> Result:
    """Block until ``check()`` is truthy and return its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _gave_up(what, timeout, value)
        time.sleep(every)


async def eventually(check: Callable[[], Result], timeout: float = DEFAULT_TIMEOUT,
                     every: float = POLL_EVERY, what: str = "condition") -> Result:
    """Yield to the loop until ``check()`` is truthy and return its value."""
    async def awaited() -> Result:
        return check()
    return await eventually_awaited(awaited, timeout, every, what)


async def eventually_awaited(check: Callable[[], Awaitable[Result]], timeout: float = DEFAULT_TIMEOUT,
                             every: float = POLL_EVERY, what: str = "condition") -> Result:
    """Like ``eventually`` for a predicate that must be awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _gave_up(what, timeout, value)
        await asyncio.sleep(every)
