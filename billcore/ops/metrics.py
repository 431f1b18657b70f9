"""Metrics the operations issue asks for that the core did not export yet:
URFA calls by function and error code with latency, and periodic-run
progress.  (RADIUS decision latency belongs in ``radius/server.py``: the
radius package must not import billcore; docs/operations.md names it.)

They live in the same multiprocess registry as ``billcore.metrics`` (import
this module after ``PROMETHEUS_MULTIPROC_DIR`` is set, as for that one), so
the core's one ``/metrics`` endpoint serves them with everything else.  The
owners of the measured code call the small functions below (see
docs/operations.md for the wiring and the alerts built on them).
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

from billcore.billing.scheduler import RunProgress, RunResult

__all__ = [
    "URFA_CALLS", "URFA_CALL_SECONDS",
    "PERIODIC_ACCOUNTS_DONE", "PERIODIC_ACCOUNTS_TOTAL", "PERIODIC_CHARGES", "PERIODIC_AMOUNT",
    "PERIODIC_RUNS", "PERIODIC_LAST_SUCCESS",
    "observe_call", "periodic_progress", "periodic_finished", "periodic_failed",
]

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
