"""The embedded PostgreSQL (the ``pgserver`` package) for the zero-config default.

With no DSN configured the supervisor starts a private PostgreSQL in
``<data_dir>/pg`` — it listens on a Unix socket in that directory only, no TCP
port — and stops it on exit.  A second supervisor on the same data directory
attaches to the running server instead of starting another one (pgserver
keeps a lock and a count of its users).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

__all__ = ["EmbeddedPostgres", "pg_binaries"]

log = logging.getLogger(__name__)


class EmbeddedPostgres:
    def __init__(self, data_dir: Path) -> None:
        self.pgdata = data_dir / "pg"
        self._server: Any = None

    def start(self) -> str:
        """Start (or attach to) the server and return its DSN."""
        import warnings

        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (root, CI)
            warnings.simplefilter("ignore")
            import pgserver

            self._server = pgserver.get_server(self.pgdata, cleanup_mode="stop")
        dsn: str = self._server.get_uri()
        log.info("embedded postgresql ready", extra={"pgdata": str(self.pgdata)})
        return dsn

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()  # stops the server when we were its last user
            self._server = None
            log.info("embedded postgresql released")


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
