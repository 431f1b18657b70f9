"""Metrics: every process's figures under the core's one endpoint, and the
periodic-run progress metrics an operator alerts on."""

from __future__ import annotations

import socket
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

from prometheus_client import REGISTRY

from billcore.billing.scheduler import RunProgress, RunResult
from billcore.server import metrics as M
from tests.conftest import free_port
from tests.running import BillcoreProcess


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def test_every_process_reports_through_the_core_endpoint(tmp_path: Path, db_dsn: str) -> None:
    radius = {"enabled": True, "host": "127.0.0.1", "auth_port": free_port(socket.SOCK_DGRAM),
              "acct_port": free_port(socket.SOCK_DGRAM)}
    with BillcoreProcess(tmp_path, dsn=db_dsn, radius=radius) as bc:
        bc.wait_for(r'role=radius .*msg="core connected"', timeout=60)
        deadline = time.monotonic() + 15
        while True:
            text = scrape(bc.metrics_port)
            if "billcore_radius_core_connected 1.0" in text or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        # written by two different processes (core, radius child), served by one
        assert 'billcore_process_up{role="core"} 1.0' in text           # the core
        assert 'billcore_process_up{role="radius"} 1.0' in text         # every role, edges too
        assert "billcore_radius_core_connected 1.0" in text, text       # the radius child's own gauge
        assert 'billcore_radius_core_connects_total{how=' in text       # and its counter
        assert 'billcore_radius_decision_seconds_bucket{kind="auth",le="0.005"}' in text   # decision latency
        assert 'billcore_radius_decision_seconds_count{kind="acct"}' in text
        assert "billcore_db_pool_size" in text                          # the core's pool watcher
        assert bc.stop() == 0


def value(name: str, labels: dict[str, str] | None = None) -> float:
    got = REGISTRY.get_sample_value(name, labels or {})
    return 0.0 if got is None else got


def test_periodic_progress_metrics_follow_a_run() -> None:
    runs = value("billcore_periodic_runs_total", {"outcome": "ok"})
    charges = value("billcore_periodic_charges_total")
    M.periodic_progress(RunProgress(accounts_done=5000, accounts_total=12000, batches=1, charges=4990, amount=-9))
    assert value("billcore_periodic_accounts_done") == 5000
    assert value("billcore_periodic_accounts_total") == 12000
    assert value("billcore_periodic_run_amount_micro") == -9
    M.periodic_progress(RunProgress(10000, 12000, 2, 9980, -18))
    assert value("billcore_periodic_charges_total") - charges == 9980
    now = datetime(2024, 4, 1, tzinfo=timezone.utc)
    M.periodic_finished(RunResult(now, now, 12000, 3, 11976, -27, 0, 0, ()), wall=1_711_929_600.0)
    assert value("billcore_periodic_charges_total") - charges == 11976    # each charge counted once
    assert value("billcore_periodic_accounts_done") == 12000
    assert value("billcore_periodic_runs_total", {"outcome": "ok"}) - runs == 1
    assert value("billcore_periodic_last_success_timestamp_seconds") == 1_711_929_600.0
    M.periodic_failed()
    assert value("billcore_periodic_runs_total", {"outcome": "error"}) >= 1


def test_call_counts_and_latency() -> None:
    before = value("billcore_urfa_calls_total", {"fn": "users.get", "code": "ok"})
    M.observe_call("users.get", "ok", 0.003)
    assert value("billcore_urfa_calls_total", {"fn": "users.get", "code": "ok"}) - before == 1
    assert value("billcore_urfa_call_seconds_bucket", {"fn": "users.get", "le": "0.005"}) >= 1
    M.observe_call("users.get", "bad_args", 0.0001)
    assert value("billcore_urfa_calls_total", {"fn": "users.get", "code": "bad_args"}) >= 1
