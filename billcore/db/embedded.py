"""The embedded PostgreSQL (the ``pgserver`` package) for the zero-config default.

Theory of operation
-------------------
With no DSN configured, PostgreSQL runs privately in ``<data_dir>/pg`` and
listens on a Unix socket in that directory only (no TCP port).  Two kinds of
process use it:

* ``billcore serve`` owns it through ``Postmaster``: it runs the postmaster
  as its own child (not daemonised through ``pg_ctl``), so it learns of its
  death at once, with the exit status, and restarts it like any other child.
  The child is in its own session (a Ctrl-C on the terminal reaches the
  supervisor, which stops the database last) and gets SIGINT — PostgreSQL's
  fast shutdown — when the supervisor dies.  A live postmaster named in
  ``postmaster.pid`` (left by a supervisor killed with SIGKILL before that
  signal could help, or started by a command-line tool) is adopted, watched
  by a pidfd, and stopped at the end like our own.
* command-line tools (``admin``, ``backup``, ``migrate``…) use
  ``EmbeddedPostgres``: they attach to the running server through pgserver,
  or start one for their own use.

Every user registers its pid in pgserver's handle list
(``<pgdata>/.handle_pids.json``, under pgserver's lock) and the last one to
leave stops the server.  Pids of processes that no longer exist are dropped
from the list first: a supervisor killed with SIGKILL never unregisters, and
its stale pid would otherwise keep the server running for ever after every
later clean stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["EmbeddedPostgres", "Postmaster", "EmbeddedStartFailed", "pg_binaries", "live_postmaster"]

log = logging.getLogger(__name__)

_SYSTEM_USER = "pgserver"  # pgserver's convention: PostgreSQL refuses to run as root
_READY_TIMEOUT = 60.0      # crash recovery after a kill replays WAL before "ready"
_POLL = 0.05
_HANDLES = ".handle_pids.json"  # pgserver's list of the server's users
_LOCK_WAIT = 3.0


class EmbeddedStartFailed(Exception):
    """The embedded server did not come up (the reason carries its log's last lines)."""


@contextlib.contextmanager
def _pgserver() -> Iterator[Any]:
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (root, CI)
        warnings.simplefilter("ignore")
        import pgserver
        import pgserver.postgres_server

        yield pgserver


def _alive(pid: int) -> bool:
    """A running process (a zombie is dead: it only waits to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _is_postgres(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "postgres"
    except OSError:
        return False


def _postmaster_file(pgdata: Path) -> list[str]:
    try:
        return (pgdata / "postmaster.pid").read_text().splitlines()
    except OSError:
        return []


def live_postmaster(pgdata: Path) -> int | None:
    """The pid of the live postmaster that ``postmaster.pid`` names, if any
    (a stale file after a kill names a dead or reused pid)."""
    lines = _postmaster_file(pgdata)
    if not lines or not lines[0].strip().isdigit():
        return None
    pid = int(lines[0])
    return pid if _alive(pid) and _is_postgres(pid) else None


_handles_guard = threading.Lock()


def _handles(pgdata: Path, *, add: int | None = None, remove: int | None = None) -> list[int]:
    """Update pgserver's list of the server's users (under its lock), dropping
    pids that no longer exist; the live users that remain."""
    with _pgserver() as pgserver:
        import fasteners
        from pgserver.utils import DiskList

        # pgserver's lock is one file for every pgserver user on the machine
        # (held through a whole initdb by any of them); its lock object is not
        # safe to share between threads, and a file lock does not exclude two
        # threads of one process: a fresh object, a thread lock around it, and
        # a bounded wait — a lost update here costs less than a stuck start or stop.
        lock = fasteners.InterProcessLock(pgserver.PostgresServer.lock_path)
        with _handles_guard:
            locked = lock.acquire(timeout=_LOCK_WAIT)
            try:
                handles = DiskList(pgdata / _HANDLES)
                pids = [p for p in handles.get() if p != remove and _alive(p)]
                if add is not None and add not in pids:
                    pids.append(add)
                handles.put(pids)
                return pids
            finally:
                if locked:
                    lock.release()


def _tail(path: Path, lines: int = 3) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.splitlines()[-lines:])


class EmbeddedPostgres:
    """Attach to (or start) the embedded server from a command-line tool or a test."""

    def __init__(self, data_dir: Path) -> None:
        self.pgdata = data_dir / "pg"
        self._server: Any = None

    def start(self) -> str:
        """Start (or attach to) the server and return its DSN."""
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        if (self.pgdata / _HANDLES).exists():  # (initdb wants an empty directory)
            _handles(self.pgdata)  # a dead user's pid must not keep the server alive after us
        with _pgserver() as pgserver:
            self._server = pgserver.get_server(self.pgdata, cleanup_mode="stop")
        dsn: str = self._server.get_uri()
        log.info("embedded postgresql ready", extra={"pgdata": str(self.pgdata)})
        return dsn

    def stop(self) -> None:
        if self._server is not None:
            _handles(self.pgdata)
            self._server.cleanup()  # stops the server when we were its last user
            self._server = None
            log.info("embedded postgresql released")


def _prepare(pgdata: Path) -> tuple[int | None, int | None]:
    """Initialise the data directory if it is new; as root, the uid and gid
    the server runs as (the same preparation pgserver does)."""
    with _pgserver():
        from pgserver import _commands
        from pgserver.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

        pgdata.mkdir(parents=True, exist_ok=True)
        uid = gid = None
        user = None
        if os.geteuid() == 0:
            import stat

            user = _SYSTEM_USER
            entry = ensure_user_exists(user)
            assert entry is not None
            uid, gid = entry.pw_uid, entry.pw_gid
            bin_path = _commands.POSTGRES_BIN_PATH
            ensure_prefix_permissions(pgdata)
            ensure_prefix_permissions(bin_path)
            read = stat.S_IRGRP | stat.S_IROTH
            ensure_folder_permissions(bin_path, stat.S_IXGRP | stat.S_IXOTH | read)
            ensure_folder_permissions(bin_path.parent / "lib", read)
            os.chown(pgdata, uid, gid)
        if not (pgdata / "PG_VERSION").exists():
            log.info("initialising the embedded postgresql", extra={"pgdata": str(pgdata)})
            # pgserver makes one function per binary at import time (setattr), out of mypy's sight
            initdb = _commands.initdb  # type: ignore[attr-defined]
            initdb(["--auth=trust", "--auth-local=trust", "--encoding=utf8", "-U", "postgres"],
                   pgdata=pgdata, user=user)
        return uid, gid


def _socket_dir(pgdata: Path, uid: int | None) -> Path:
    with _pgserver() as pgserver:
        from pgserver.utils import ensure_prefix_permissions, find_suitable_socket_dir

        path: Path = find_suitable_socket_dir(pgdata, pgserver.PostgresServer.runtime_path)
        if uid is not None and path != pgdata:
            ensure_prefix_permissions(path)
            path.chmod(0o777)
        return path


def _dsn(pgdata: Path) -> str:
    with _pgserver():
        from pgserver.utils import PostmasterInfo

        info = PostmasterInfo.read_from_pgdata(pgdata)
        assert info is not None
        return str(info.get_uri())


def _postmaster_preexec(uid: int | None, gid: int | None) -> Any:
    def preexec() -> None:
        if uid is not None and gid is not None:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
        # after the uid change, which would clear it: our death is a fast shutdown
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG

    return preexec


async def _pid_exit(pid: int) -> None:
    """Wait for a process that is not our child to end."""
    loop = asyncio.get_running_loop()
    try:
        fd = os.pidfd_open(pid)
    except (OSError, AttributeError):  # gone already, or no pidfd here: poll
        while _alive(pid):
            await asyncio.sleep(0.2)
        return
    ended: asyncio.Future[None] = loop.create_future()

    def readable() -> None:  # the process ended
        if not ended.done():
            ended.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await ended
    finally:
        loop.remove_reader(fd)
        os.close(fd)


class Postmaster:
    """The supervisor's embedded server: start or adopt it, watch it, stop it."""

    def __init__(self, data_dir: Path) -> None:
        self.pgdata = data_dir / "pg"
        self.log_path = self.pgdata / "log"
        self.pid: int | None = None
        self.adopted = False
        self.started_at = 0.0
        self._proc: asyncio.subprocess.Process | None = None
        self._ids: tuple[int | None, int | None] | None = None

    async def start(self) -> str:
        """Adopt the live server ``postmaster.pid`` names, or start our own;
        return the DSN once it accepts connections."""
        if self._ids is None:
            self._ids = await asyncio.to_thread(_prepare, self.pgdata)
        deadline = time.monotonic() + _READY_TIMEOUT
        other = live_postmaster(self.pgdata)
        if other is not None and self._proc is not None and self._proc.pid == other:
            return await self._registered()  # ours, started by a try that failed after the spawn
        if other is not None:
            # one still starting becomes ready; one shutting down (told by its
            # supervisor's death) ends
            while time.monotonic() < deadline and _alive(other) and self._status() in ("starting", "stopping"):
                await asyncio.sleep(_POLL)
            if _alive(other) and self._status() == "ready":
                self.pid, self.adopted, self._proc = other, True, None
                log.warning("adopted a running embedded postgresql (left by an earlier run)",
                            extra={"postmaster_pid": other, "pgdata": str(self.pgdata)})
                return await self._registered()
        await self._wait_gone(deadline)
        await self._spawn(deadline)
        return await self._registered()

    async def _wait_gone(self, deadline: float) -> None:
        """PostgreSQL refuses to start while the pid in its lock file exists,
        and a dead postmaster that was not our child stays a zombie until
        init reaps it (seconds, on some machines)."""
        lines = _postmaster_file(self.pgdata)
        if not lines or not lines[0].strip().isdigit():
            return
        pid = int(lines[0])
        while _is_postgres(pid) and os.path.exists(f"/proc/{pid}"):
            if _alive(pid) and self._status() not in ("stopping", "starting"):
                raise EmbeddedStartFailed(f"another postgresql (pid {pid}) holds {self.pgdata}")
            if time.monotonic() > deadline:
                raise EmbeddedStartFailed(f"the previous postgresql (pid {pid}) did not go away")
            await asyncio.sleep(_POLL)

    def _status(self) -> str:
        lines = _postmaster_file(self.pgdata)
        return lines[7].strip() if len(lines) > 7 else ""

    async def _spawn(self, deadline: float) -> None:
        uid, gid = self._ids or (None, None)
        socket_dir = await asyncio.to_thread(_socket_dir, self.pgdata, uid)
        with _pgserver():
            from pgserver._commands import POSTGRES_BIN_PATH
        with open(self.log_path, "ab") as out:
            self._proc = await asyncio.create_subprocess_exec(
                str(POSTGRES_BIN_PATH / "postgres"), "-D", str(self.pgdata), "-h", "", "-k", str(socket_dir),
                stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True, preexec_fn=_postmaster_preexec(uid, gid),
            )
        self.pid, self.adopted = self._proc.pid, False
        while True:
            lines = _postmaster_file(self.pgdata)
            if self._proc.returncode is not None or time.monotonic() > deadline:
                break
            if len(lines) > 7 and lines[0].strip() == str(self.pid) and lines[7].strip() == "ready":
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._proc.wait(), _POLL)
        if self._proc.returncode is None:
            await self._halt(self.pid, 5.0)
        raise EmbeddedStartFailed(f"postgresql did not start: {_tail(self.log_path)}")

    async def _registered(self) -> str:
        await asyncio.to_thread(_handles, self.pgdata, add=os.getpid())
        self.started_at = time.monotonic()
        return await asyncio.to_thread(_dsn, self.pgdata)

    async def wait_exit(self) -> str:
        """Wait until the server ends; how it ended, for the log."""
        if self._proc is not None:
            code = await self._proc.wait()
            return f"signal {-code}" if code < 0 else f"exit code {code}"
        assert self.pid is not None
        await _pid_exit(self.pid)
        return "ended (adopted: no exit status)"

    async def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown, unless a command-line tool still uses the server
        (the last of them stops it)."""
        pid = self.pid
        if pid is None:  # never started (initdb failed): nothing registered, nothing to stop
            return
        others = await asyncio.to_thread(_handles, self.pgdata, remove=os.getpid())
        if not _alive(pid):
            return
        if others:
            log.warning("embedded postgresql left running for its other users", extra={"pids": others})
            return
        await self._halt(pid, timeout)
        log.info("embedded postgresql stopped", extra={"postmaster_pid": pid})

    async def _halt(self, pid: int, timeout: float) -> None:
        # fast shutdown (clients cut, checkpoint), then immediate, then kill
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            waiter = self._proc.wait() if self._proc is not None and self._proc.pid == pid else _pid_exit(pid)
            try:
                await asyncio.wait_for(waiter, wait)
                return
            except asyncio.TimeoutError:
                log.warning("embedded postgresql did not stop in time", extra={"signal": sig.name})


def pg_binaries() -> Path | None:
    """Directory of PostgreSQL client binaries (pg_dump…): the embedded
    server's own, else the system's."""
    try:
        import pgserver

        path = Path(pgserver.__file__).parent / "pginstall" / "bin"
        if (path / "pg_dump").exists():
            return path
    except ImportError:
        pass
    found = shutil.which("pg_dump")
    return Path(found).parent if found else None
