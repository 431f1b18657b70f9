"""The supervisor as an operator sees it: a real ``billcore serve``."""

from __future__ import annotations

import os
import signal
import socket
import time
import urllib.request
from pathlib import Path

from billcore.db.embedded import EmbeddedPostgres
from tests.running import BillcoreProcess, pid_alive


def _serving(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def test_kill_9_core_is_restarted_within_3s_and_sigterm_exits_0(tmp_path: Path, db_dsn: str) -> None:
    with BillcoreProcess(tmp_path, dsn=db_dsn) as bc:
        core = bc.child_pid("core")
        mark = len(bc.log())
        os.kill(core, signal.SIGKILL)
        killed_at = time.monotonic()
        new_core = bc.child_pid("core", after=mark)
        assert new_core != core
        while not _serving(bc.urfa_port):
            assert time.monotonic() - killed_at < 3.0, "core not serving again within 3 s"
            time.sleep(0.02)
        assert time.monotonic() - killed_at < 3.0
        assert 'msg="child died, restarting" child=core' in bc.log()
        assert "how=\"signal 9\"" in bc.log()

        metrics = urllib.request.urlopen(f"http://127.0.0.1:{bc.metrics_port}/metrics", timeout=5).read().decode()
        assert 'billcore_restarts_total{role="core"} 1.0' in metrics
        assert 'billcore_process_up{role="core"} 1.0' in metrics
        assert "billcore_db_pool_size" in metrics

        started = time.monotonic()
        assert bc.stop(timeout=10) == 0
        assert time.monotonic() - started < 10
        assert not pid_alive(new_core)
        assert 'msg="supervisor stopped"' in bc.log()
        assert "Traceback" not in bc.log()


def test_embedded_default_starts_and_stops_its_database(tmp_path: Path) -> None:
    with BillcoreProcess(tmp_path) as bc:
        bc.child_pid("core")
        pgdata = tmp_path / "var" / "pg"
        pid = int((pgdata / "postmaster.pid").read_text().split()[0])
        assert pid_alive(pid)
        assert bc.stop(timeout=10) == 0
        deadline = time.monotonic() + 5
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pid_alive(pid), "embedded postgresql left running after stop"


def test_database_down_at_start_is_retried_without_traceback(tmp_path: Path) -> None:
    later = EmbeddedPostgres(tmp_path / "db-later")
    dsn = f"postgresql://postgres@/postgres?host={later.pgdata}"
    later.pgdata.mkdir(parents=True)
    with BillcoreProcess(tmp_path, dsn=dsn) as bc:
        m = bc.wait_for(r'msg="database unreachable, retrying" .*retry_in=')
        assert str(later.pgdata) in m.group(0)
        bc.wait_for(r'msg="database unreachable, retrying"', after=m.end())   # it retried, and
        assert bc.proc is not None and bc.proc.poll() is None                 # is still running
        later.start()
        try:
            bc.child_pid("core", after=m.end())
            assert "Traceback" not in bc.log()
            assert 'msg="child died' not in bc.log(), "a down database must not crash-loop the core"
            assert bc.stop(timeout=10) == 0
        finally:
            later.stop()
