"""The supervisor: the composition root of ``billcore serve``.

Theory of operation
-------------------
It reads the config, starts the embedded PostgreSQL when no DSN is given,
and spawns each child (the core, and the edges as they are enabled) as its
own OS process: ``python -m billcore.server.proc ROLE``.  A child that dies is
logged and restarted after a backoff that doubles while it keeps dying and
resets once it has run ``stable_after`` seconds.  SIGTERM or SIGINT sends
SIGTERM to every child, gives them ``stop_timeout`` seconds to flush and
exit, kills what is left, stops the embedded database and returns 0.

The embedded PostgreSQL is watched like a child (``billcore.db.embedded.
Postmaster``): when it dies it is restarted with the same backoff, its
restarts counted as ``billcore_restarts{role="postgresql"}``; the children
keep running and wait for it (the core answers ``core.db_unavailable`` and
reports ``billcore_db_up 0`` meanwhile).  One that an earlier supervisor,
killed with SIGKILL, left running is adopted at start and stopped at the
end.  An external database is not ours to restart: the core watches it and
reports it the same way.

Children get ``PR_SET_PDEATHSIG`` so that a supervisor killed with SIGKILL
does not leave orphans holding the ports.

``[radius] processes`` above 1: the supervisor binds the RADIUS ports
itself, once, as SO_REUSEPORT groups (``billcore.common.udpgroup``: a port
anyone else holds stops it with the port named, and is retried with the
children's backoff), hands radius[i] its socket of each group (``pass_fds``,
``ENV_FDS``) at every (re)start, and every ``STRANGER_CHECK`` seconds looks
for a socket that joined the port and is not ours (an error in the log, at
most once a minute).  With one process the radius child binds exclusively
itself, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from billcore.common.config import Config
from billcore.common.udpgroup import ENV_FDS, PortTaken, bind_group, inode, strangers
from billcore.db.embedded import EmbeddedStartFailed, Postmaster
from billcore.server.proc import ENV_CONFIG, ENV_DSN, ENV_INDEX

__all__ = ["Supervisor", "ChildSpec", "prepare_metrics_dir", "children_for"]

log = logging.getLogger(__name__)

STRANGER_CHECK = 5.0   # seconds between looks for a stranger on a shared RADIUS port


def prepare_metrics_dir(data_dir: Path) -> Path:
    """Empty the multiprocess metrics directory and point every process at it
    (before prometheus_client is imported anywhere)."""
    path = data_dir / "metrics"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    return path


# the roles given the database's DSN (the rest reach the core only through URFA)
DATABASE_ROLES = frozenset({"core"})


@dataclass(frozen=True, slots=True)
class ChildSpec:
    role: str
    index: int = 0

    @property
    def name(self) -> str:
        return f"{self.role}[{self.index}]" if self.index else self.role


def children_for(config: Config) -> list[ChildSpec]:
    """The processes this config asks for; the core first."""
    children = [ChildSpec("core")]
    if config.radius.enabled:
        children.extend(ChildSpec("radius", i) for i in range(config.radius.processes))
    if config.portal.enabled:
        children.append(ChildSpec("portal"))
    if config.console.enabled:
        children.append(ChildSpec("console"))
    if config.httpapi.enabled:
        children.append(ChildSpec("httpapi"))
    if config.paygate.enabled:
        children.append(ChildSpec("paygate"))
    if config.netflow.enabled:
        children.extend(ChildSpec("netflow", i) for i in range(config.netflow_workers))
    if config.notify.enabled:
        children.append(ChildSpec("notify"))
    return children


def _set_pdeathsig() -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class _Child:
    def __init__(self, spec: ChildSpec, initial_backoff: float) -> None:
        self.spec = spec
        self.proc: asyncio.subprocess.Process | None = None
        self.started_at = 0.0
        self.backoff = initial_backoff
        self.restarts = 0


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.section = config.supervisor
        self._stopping = asyncio.Event()
        self._children: list[_Child] = []
        self._embedded: Postmaster | None = None
        self.dsn = config.database.dsn
        # [radius] processes > 1: the (auth, acct) sockets of radius[i], bound once
        self._radius_socks: list[tuple[socket.socket, socket.socket]] = []
        self._stranger_noted = 0.0

    def request_stop(self) -> None:
        self._stopping.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        data_dir = self.config.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        prepare_metrics_dir(data_dir)
        from billcore.server import metrics  # after PROMETHEUS_MULTIPROC_DIR is set

        self._metrics = metrics
        if not self.dsn:
            self._embedded = Postmaster(data_dir)
            try:
                self.dsn = await self._embedded.start()
            except Exception as exc:  # pgserver's initdb raises plain exceptions
                log.error("embedded postgresql failed to start", extra={"reason": str(exc)})
                await self._embedded.stop()
                return 1
            log.info("embedded postgresql ready",
                     extra={"pgdata": str(self._embedded.pgdata), "postmaster_pid": self._embedded.pid})
        from billcore.common.sysfiles import read_or_make_password, service_password_file

        for role in {spec.role for spec in children_for(self.config)} - {"core"}:
            # the core sets each edge's verifier from this file
            read_or_make_password(service_password_file(data_dir, role))
        try:
            self._children = [_Child(spec, self.section.restart_backoff_initial) for spec in children_for(self.config)]
            watchers = [asyncio.create_task(self._watch(child)) for child in self._children]
            if self._embedded is not None:
                watchers.append(asyncio.create_task(self._watch_database(self._embedded)))
            if self.config.radius.enabled and self.config.radius.processes > 1:
                watchers.append(asyncio.create_task(self._watch_radius_port()))
            log.info("supervisor started", extra={"children": ",".join(child.spec.name for child in self._children)})
            await self._stopping.wait()
            log.info("stopping children")
            await self._stop_children()
            for watcher in watchers:
                watcher.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
        finally:
            for pair in self._radius_socks:
                for sock in pair:
                    sock.close()
            if self._embedded is not None:
                await self._embedded.stop()
        log.info("supervisor stopped")
        return 0

    def _env(self, spec: ChildSpec) -> dict[str, str]:
        env = dict(os.environ)
        env[ENV_CONFIG] = self.config.source
        # only the core opens the database: an edge (a web edge faces browsers) never holds its DSN
        if spec.role in DATABASE_ROLES:
            env[ENV_DSN] = self.dsn
        else:
            env.pop(ENV_DSN, None)
        env.pop(ENV_FDS, None)   # set by ``_spawn`` for a radius child of a group only
        env[ENV_INDEX] = str(spec.index)
        return env

    def _radius_group(self) -> list[tuple[socket.socket, socket.socket]]:
        """The RADIUS ports as SO_REUSEPORT groups, bound at the first radius child's start."""
        if not self._radius_socks:
            r = self.config.radius
            auth = bind_group(r.host, r.auth_port, r.processes)
            try:
                acct = bind_group(r.host, r.acct_port, r.processes)
            except BaseException:
                for sock in auth:
                    sock.close()
                raise
            self._radius_socks = list(zip(auth, acct))
            log.info("radius ports bound as a group", extra={
                "processes": r.processes, "auth": auth[0].getsockname()[1], "acct": acct[0].getsockname()[1]})
        return self._radius_socks

    async def _watch_radius_port(self) -> None:
        """Say when a socket that is not ours has joined a RADIUS port group."""
        while True:
            await asyncio.sleep(STRANGER_CHECK)
            if not self._radius_socks:
                continue
            ours = {inode(sock) for pair in self._radius_socks for sock in pair}
            host = self.config.radius.host
            found = [s for i in (0, 1) for s in strangers(host, self._radius_socks[0][i].getsockname()[1], ours)]
            if found and time.monotonic() - self._stranger_noted >= 60.0:
                self._stranger_noted = time.monotonic()
                log.error("a socket that is not billcore's shares the RADIUS port: it takes a share of the NAS"
                          " traffic; stop it (same user, SO_REUSEPORT)",
                          extra={"port": found[0].port, "address": found[0].address, "inode": found[0].inode,
                                 "uid": found[0].uid})

    async def _spawn(self, child: _Child) -> None:
        env = self._env(child.spec)
        fds: tuple[int, ...] = ()
        if child.spec.role == "radius" and self.config.radius.processes > 1:
            auth, acct = self._radius_group()[child.spec.index]
            fds = (auth.fileno(), acct.fileno())
            env[ENV_FDS] = f"{fds[0]},{fds[1]}"
        child.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "billcore.server.proc", child.spec.role,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            preexec_fn=_set_pdeathsig,
            pass_fds=fds,
        )
        child.started_at = time.monotonic()
        log.info("child started", extra={"child": child.spec.name, "child_pid": child.proc.pid})

    async def _watch(self, child: _Child) -> None:
        while not self._stopping.is_set():
            try:
                await self._spawn(child)
            except PortTaken as exc:   # the RADIUS group's port: retried like a child that died
                log.error("%s", exc, extra={"child": child.spec.name, "restart_in": child.backoff})
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=child.backoff)
                child.backoff = min(child.backoff * 2, self.section.restart_backoff_max)
                continue
            assert child.proc is not None
            code = await child.proc.wait()
            self._metrics.mark_dead(child.proc.pid)
            if self._stopping.is_set():
                return
            ran = time.monotonic() - child.started_at
            if ran >= self.section.stable_after:
                child.backoff = self.section.restart_backoff_initial
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            log.warning(
                "child died, restarting",
                extra={"child": child.spec.name, "child_pid": child.proc.pid, "how": how,
                       "ran_s": round(ran, 1), "restart_in": child.backoff},
            )
            child.restarts += 1
            self._metrics.RESTARTS.labels(child.spec.role).inc()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=child.backoff)
            child.backoff = min(child.backoff * 2, self.section.restart_backoff_max)

    async def _watch_database(self, pg: Postmaster) -> None:
        """Restart the embedded PostgreSQL whenever it dies, with the children's backoff."""
        backoff = self.section.restart_backoff_initial
        while True:
            how = await pg.wait_exit()
            if self._stopping.is_set():
                return
            died_at = time.monotonic()
            ran = died_at - pg.started_at
            if ran >= self.section.stable_after:
                backoff = self.section.restart_backoff_initial
            log.warning("embedded postgresql died, restarting",
                        extra={"postmaster_pid": pg.pid, "how": how, "ran_s": round(ran, 1), "restart_in": backoff})
            self._metrics.RESTARTS.labels("postgresql").inc()
            while True:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=backoff)
                if self._stopping.is_set():
                    return
                backoff = min(backoff * 2, self.section.restart_backoff_max)
                try:
                    dsn = await pg.start()
                    break
                except EmbeddedStartFailed as exc:
                    log.warning("embedded postgresql did not start, retrying",
                                extra={"reason": str(exc), "restart_in": backoff})
                except Exception:  # this watcher must outlive any surprise, or nothing restarts the database
                    log.exception("embedded postgresql restart failed, retrying", extra={"restart_in": backoff})
            if dsn != self.dsn:  # the children hold the old one; cannot happen with the same data dir
                log.error("embedded postgresql came back at another address", extra={"dsn": dsn})
            log.info("embedded postgresql restarted",
                     extra={"postmaster_pid": pg.pid, "down_s": round(time.monotonic() - died_at, 2)})

    async def _stop_children(self) -> None:
        live = [child.proc for child in self._children if child.proc is not None and child.proc.returncode is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        if not live:
            return
        _, pending = await asyncio.wait(
            [asyncio.create_task(proc.wait()) for proc in live], timeout=self.section.stop_timeout
        )
        for proc in live:
            if proc.returncode is None:
                log.warning("child did not stop in time, killing", extra={"child_pid": proc.pid})
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        if pending:
            await asyncio.wait(pending, timeout=2)


def serve(config: Config) -> int:
    import uvloop

    return uvloop.run(Supervisor(config).run())
