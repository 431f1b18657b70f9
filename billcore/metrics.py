"""Prometheus metrics of every billcore process, gathered under one endpoint.

The supervisor points ``PROMETHEUS_MULTIPROC_DIR`` at ``<data_dir>/metrics``
(emptied at start) before any child starts, so each process's counters and
gauges live in its own memory-mapped files there.  The core serves
``/metrics`` and aggregates every file (prometheus_client's multiprocess
collector): one scrape shows the supervisor's restart counts, the core's
pool and URFA figures, and the workers' flow counters.

Import this module only after ``PROMETHEUS_MULTIPROC_DIR`` is set
(``billcore.supervisor.prepare_metrics_dir``, inherited by children):
prometheus_client picks its storage when it is first imported.
"""

from __future__ import annotations

import os

__all__ = ["serve", "mark_dead", "PROCESS_UP", "RESTARTS", "DB_POOL_SIZE", "DB_POOL_IDLE"]

from prometheus_client import CollectorRegistry, Counter, Gauge, multiprocess
from prometheus_client import start_http_server as _start_http_server

ENV = "PROMETHEUS_MULTIPROC_DIR"

PROCESS_UP = Gauge("billcore_process_up", "1 for each live billcore process, by role", ["role"], multiprocess_mode="livesum")
RESTARTS = Counter("billcore_restarts", "Children restarted by the supervisor after they died", ["role"])
DB_POOL_SIZE = Gauge("billcore_db_pool_size", "Open connections in the core's pool", multiprocess_mode="livemax")
DB_POOL_IDLE = Gauge("billcore_db_pool_idle", "Idle connections in the core's pool", multiprocess_mode="livemax")


def serve(host: str, port: int) -> None:
    """Serve /metrics for every process (a daemon thread)."""
    registry = CollectorRegistry()
    if os.environ.get(ENV):
        multiprocess.MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    _start_http_server(port, addr=host, registry=registry)


def mark_dead(pid: int) -> None:
    if os.environ.get(ENV):
        multiprocess.mark_process_dead(pid)
