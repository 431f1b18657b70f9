"""Prometheus metrics of every billcore process, gathered under one endpoint.

The supervisor points ``PROMETHEUS_MULTIPROC_DIR`` at ``<data_dir>/metrics``
(emptied at start) before any child starts, so each process's counters and
gauges live in its own memory-mapped files there.  The core serves
``/metrics`` and aggregates every file (prometheus_client's multiprocess
collector): one scrape shows the supervisor's restart counts, the core's
pool and URFA figures, and the workers' flow counters.

The same HTTP server answers ``/health`` (200 while the core process runs)
and ``/ready`` (200 only while the core can reach the database, else 503
with the reason): every billcore process needs the database, the edges
through the core, so this is the readiness of all of them.

Import this module only after ``PROMETHEUS_MULTIPROC_DIR`` is set
(``billcore.supervisor.prepare_metrics_dir``, inherited by children):
prometheus_client picks its storage when it is first imported.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

__all__ = ["serve", "mark_dead", "PROCESS_UP", "RESTARTS", "DB_POOL_SIZE", "DB_POOL_IDLE", "DB_UP"]

from prometheus_client import CollectorRegistry, Counter, Gauge, make_wsgi_app, multiprocess
from prometheus_client.exposition import ThreadingWSGIServer

ENV = "PROMETHEUS_MULTIPROC_DIR"

PROCESS_UP = Gauge("billcore_process_up", "1 for each live billcore process, by role", ["role"], multiprocess_mode="livesum")
RESTARTS = Counter("billcore_restarts", "Children restarted by the supervisor after they died", ["role"])
DB_POOL_SIZE = Gauge("billcore_db_pool_size", "Open connections in the core's pool", multiprocess_mode="livemax")
DB_POOL_IDLE = Gauge("billcore_db_pool_idle", "Idle connections in the core's pool", multiprocess_mode="livemax")
# Written by the core only; every other process that imports this module holds
# a 0, so "max" is the core's word, and 0 while no core runs.
DB_UP = Gauge("billcore_db_up", "1 while the core's probe query reaches the database", multiprocess_mode="livemax")

Readiness = Callable[[], tuple[bool, str]]


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes are not news
        pass


def _app(metrics_app: Any, ready: Readiness | None) -> Any:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in ("/health", "/ready"):
            ok, why = (True, "ok") if path == "/health" or ready is None else ready()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "text/plain; charset=utf-8")])
            return [f"{why}\n".encode()]
        result: Iterable[bytes] = metrics_app(environ, start_response)
        return result

    return app


def serve(host: str, port: int, ready: Readiness | None = None) -> None:
    """Serve /metrics for every process, /health and /ready (a daemon thread)."""
    registry = CollectorRegistry()
    if os.environ.get(ENV):
        multiprocess.MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY

        registry = REGISTRY

    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    httpd = make_server(host, port, _app(make_wsgi_app(registry), ready), Server, handler_class=_Quiet)
    threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True).start()


def mark_dead(pid: int) -> None:
    if os.environ.get(ENV):
        multiprocess.mark_process_dead(pid)
