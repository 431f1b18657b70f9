"""The NetFlow worker's session with the core over URFA: connect, log in, retry, classifier events.

Theory of operation
-------------------
`session_opener` makes the one function that opens a logged-in URFA client
(TCP, TLS or a Unix socket), used by the supervised worker (``run``) and the
remote collector (``python -m netflow``). `CoreLink` keeps a session up with
backoff, retries calls that lost their connection (every call the worker
makes is safe to repeat: ``netflow.submit`` is idempotent by its watermark)
and pumps ``classifier`` events into what `Worker.stale` asks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from netflow.metrics import CORE_CONNECTED
from netflow.snapshot import SnapshotLoader
from urfa.errors import CallFailed, ConnectionLost

__all__ = ["CoreLink", "CoreUnavailable", "session_opener"]

_R = TypeVar("_R")

log = logging.getLogger("netflow.worker")  # the worker's log lines keep their logger

# codes a retry cannot help (an epoch conflict: restart and decide again)
FINAL_CODES = frozenset({"not_in_table", "bad_args", "forbidden", "deleted", "billing.epoch_mismatch",
                         "netflow.epoch_conflict"})


def session_opener(login: str, password: Callable[[], str], host: str | None = None, port: int = 0,
                   unix: str | None = None, tls: ssl.SSLContext | None = None,
                   server_name: str | None = None) -> Callable[[], Awaitable[Any]]:
    """An opener of logged-in system sessions; ``password()`` is read at each login (it may be rotated)."""
    from urfa.client import connect

    async def open_session() -> Any:
        if unix is not None:
            client = await connect(unix=unix, timeout=10.0)
        else:
            client = await connect(host, port, ssl=tls, server_hostname=server_name, timeout=10.0)
        try:
            await client.login("system", login, password())
        except BaseException:
            await client.close()
            raise
        return client

    return open_session


class CoreLink:
    """The worker's session with the core: (re)login with backoff, calls, classifier events.

    A call that fails because the connection dropped is retried on a new
    session; that is safe for every call the worker makes (``netflow.submit``
    is idempotent by its watermark). Calls give up only once ``stop`` is set.
    """

    def __init__(self, open_session: Callable[[], Awaitable[Any]], worker: str) -> None:
        self._open = open_session
        self.client: Any = None
        self.snapshot_stale = True
        self.seen_version = 0  # the newest classifier version an event announced
        self._connected = CORE_CONNECTED.labels(worker)
        self._events: asyncio.Task[None] | None = None

    async def session(self, stop: asyncio.Event) -> Any:
        delay = 0.1
        while self.client is None or self.client.closed:
            self._connected.set(0)
            try:
                client = await self._open()
                await client.subscribe("classifier")
            except Exception as exc:  # noqa: BLE001 - unreachable, restarting or refusing: retry
                log.warning("core unreachable; the journal keeps everything",
                            extra={"reason": f"{type(exc).__name__}: {exc}"})
                if stop.is_set():
                    raise CoreUnavailable("stopping while the core is unreachable") from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 3.0)
                continue
            self.client = client
            self.snapshot_stale = True  # events may have been missed while away
            self.seen_version = 0  # versions are the database's: a restored one may count from lower
            self._connected.set(1)
            if self._events is not None:
                self._events.cancel()
            self._events = asyncio.create_task(self._pump(client))
        return self.client

    async def _pump(self, client: Any) -> None:
        """Classifier events into `seen_version` / `snapshot_stale`, until the session ends.

        Any failure marks the snapshot stale: a lost connection (through
        `session`, which marks it when it opens the next one; not here, so a
        worker stopping after the core did not try to reload), an event the
        apply step cannot take (logged; the pump goes on), or a failure to read
        events at all (logged; the session is closed so the next call opens
        one with a new pump). A pump that ended silently would leave the
        classifier frozen.
        """
        try:
            while True:
                event = await client.next_event()
                try:
                    self.apply(event)
                except Exception:
                    self.snapshot_stale = True
                    log.exception("classifier event not understood; the snapshot is reloaded")
        except (ConnectionLost, OSError):
            pass  # the session is gone; the next one marks the snapshot stale
        except Exception:
            self.snapshot_stale = True
            log.exception("classifier events stopped; the snapshot is reloaded and the session reopened")
            with contextlib.suppress(Exception):
                await client.close()

    def apply(self, event: Any) -> None:
        """One event of the core. A classifier event names the version that changed (see `Worker.stale`)."""
        if event.topic != "classifier":
            return
        version = event.payload.get("version") if isinstance(event.payload, dict) else None
        if isinstance(version, int):  # compared with the loaded version: see Worker.stale
            self.seen_version = max(self.seen_version, version)
        else:
            self.snapshot_stale = True

    async def call(self, fn: str, args: dict[str, Any], stop: asyncio.Event, timeout: float = 300.0) -> Any:
        return await self._retrying(fn, stop, lambda client: client.call(fn, args, timeout=timeout))

    async def load(self, fn: str, stop: asyncio.Event, chunk_timeout: float = 60.0) -> tuple[SnapshotLoader, Any]:
        """A streaming call's chunks fed to a fresh `SnapshotLoader`, with the call's answer.

        Retried from the start like `call` (a half-loaded stream is thrown
        away); each chunk must come within ``chunk_timeout`` seconds.
        """
        async def attempt(client: Any) -> tuple[SnapshotLoader, Any]:
            loader = SnapshotLoader()
            stream = client.stream(fn, {})
            try:
                while True:
                    try:
                        chunk = await asyncio.wait_for(stream.__anext__(), chunk_timeout)
                    except StopAsyncIteration:
                        return loader, stream.result
                    loader.feed(chunk)
            except BaseException:
                with contextlib.suppress(Exception):
                    client.cancel(stream)
                raise

        return await self._retrying(fn, stop, attempt)

    async def _retrying(self, fn: str, stop: asyncio.Event, attempt: Callable[[Any], Awaitable[_R]]) -> _R:
        delay = 0.1
        while True:
            client = await self.session(stop)
            try:
                return await attempt(client)
            except (ConnectionLost, OSError, asyncio.TimeoutError) as exc:
                log.warning("core call interrupted; retrying", extra={"fn": fn, "reason": f"{type(exc).__name__}: {exc}"})
                with contextlib.suppress(Exception):
                    await client.close()
                self.client = None
            except CallFailed as exc:
                if exc.code in FINAL_CODES:
                    raise
                # the core could not commit (database down, restarting): the journal waits
                log.error("core refused a call; retrying", extra={"fn": fn, "code": exc.code, "reason": str(exc)})
            if stop.is_set():
                raise CoreUnavailable(f"stopping before {fn} succeeded")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 3.0)

    async def close(self) -> None:
        if self._events is not None:
            self._events.cancel()
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.close()
        self._connected.set(0)



class CoreUnavailable(Exception):
    """The worker is stopping and the core did not answer; the journal keeps the rest."""
