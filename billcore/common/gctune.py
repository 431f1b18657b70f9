"""Garbage collection tuned for a long-lived server process.

Theory of operation
-------------------
A request allocates a few dicts, tuples and futures, and a server keeps
large long-lived structures (caches, the duplicate cache, call tables).
With CPython's default thresholds (700, 10, 10) the collector runs every
few hundred allocations and its older generations re-scan those long-lived
objects again and again — about a tenth of the radius process's and of the
core's CPU under RADIUS load (py-spy).  ``tune`` freezes what exists after
start-up (never scanned again: it lives as long as the process) and
collects the young generation every ``young`` allocations.  Cycles are
still collected, later.  Only the standard library.
"""

from __future__ import annotations

import gc

__all__ = ["tune"]


def tune(young: int = 50_000, middle: int = 20, old: int = 100) -> None:
    gc.collect()
    gc.freeze()
    gc.set_threshold(young, middle, old)
