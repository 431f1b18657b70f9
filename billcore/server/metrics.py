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
(``billcore.server.supervisor.prepare_metrics_dir``, inherited by children):
prometheus_client picks its storage when it is first imported.

Every process's gauges come first (process up, restarts, the pool, the
database probe); then the core's call figures (URFA calls by function and
code, with latency) and the periodic run's progress, which the scheduler's
callbacks below feed.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app, multiprocess
from prometheus_client.exposition import ThreadingWSGIServer

if TYPE_CHECKING:
    from billcore.billing.scheduler import RunProgress, RunResult

__all__ = [
    "serve", "mark_dead", "PROCESS_UP", "RESTARTS", "DB_POOL_SIZE", "DB_POOL_IDLE", "DB_UP",
    "URFA_CALLS", "URFA_CALL_SECONDS",
    "PERIODIC_ACCOUNTS_DONE", "PERIODIC_ACCOUNTS_TOTAL", "PERIODIC_CHARGES", "PERIODIC_AMOUNT",
    "PERIODIC_RUNS", "PERIODIC_LAST_SUCCESS",
    "observe_call", "periodic_progress", "periodic_finished", "periodic_failed",
]

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


_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

URFA_CALLS = Counter("billcore_urfa_calls", "URFA calls answered, by function and result code ('ok' or the error code)",
                     ["fn", "code"])
URFA_CALL_SECONDS = Histogram("billcore_urfa_call_seconds", "Time from a URFA call's arrival to its answer, by function",
                              ["fn"], buckets=_LATENCY)

PERIODIC_ACCOUNTS_DONE = Gauge("billcore_periodic_accounts_done", "Accounts settled so far in the current periodic run",
                               multiprocess_mode="livemostrecent")
PERIODIC_ACCOUNTS_TOTAL = Gauge("billcore_periodic_accounts_total", "Accounts due in the current periodic run",
                                multiprocess_mode="livemostrecent")
PERIODIC_CHARGES = Counter("billcore_periodic_charges", "Periodic charges booked")
PERIODIC_AMOUNT = Gauge("billcore_periodic_run_amount_micro",
                        "Net micro-units booked so far by the current (or last) periodic run; refunds subtract",
                        multiprocess_mode="livemostrecent")
PERIODIC_RUNS = Counter("billcore_periodic_runs", "Periodic runs finished, by outcome", ["outcome"])
PERIODIC_LAST_SUCCESS = Gauge("billcore_periodic_last_success_timestamp_seconds",
                              "Unix time the last periodic run finished without error", multiprocess_mode="livemostrecent")

_run_state = {"charges": 0}   # charges counted so far in the current run


def observe_call(fn: str, code: str, seconds: float) -> None:
    URFA_CALLS.labels(fn, code).inc()
    URFA_CALL_SECONDS.labels(fn).observe(seconds)


def periodic_progress(p: RunProgress) -> None:
    """``run_due``'s progress callback: called after each committed batch."""
    PERIODIC_ACCOUNTS_TOTAL.set(p.accounts_total)
    PERIODIC_ACCOUNTS_DONE.set(p.accounts_done)
    # the callback reports totals of the run so far; the counters take the increments
    charges = p.charges - _run_state["charges"]
    if charges > 0:
        PERIODIC_CHARGES.inc(charges)
    PERIODIC_AMOUNT.set(p.amount)
    _run_state.update(charges=p.charges)


def periodic_finished(result: RunResult, wall: float | None = None) -> None:
    """After ``run_due`` returned: the run is complete."""
    PERIODIC_ACCOUNTS_TOTAL.set(result.accounts)
    PERIODIC_ACCOUNTS_DONE.set(result.accounts)
    PERIODIC_AMOUNT.set(result.amount)
    charges = result.charges - _run_state["charges"]
    if charges > 0:
        PERIODIC_CHARGES.inc(charges)
    PERIODIC_RUNS.labels("ok").inc()
    PERIODIC_LAST_SUCCESS.set(time.time() if wall is None else wall)
    _run_state.update(charges=0)


def periodic_failed() -> None:
    PERIODIC_RUNS.labels("error").inc()
    _run_state.update(charges=0)
