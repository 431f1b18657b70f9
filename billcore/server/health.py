"""What the core can tell of every billcore process: the figures behind ``sys.health``.

Theory of operation
-------------------
The core has no line to the other processes but URFA, and they report
nothing over it; what they do write is their Prometheus metrics, one set of
memory-mapped files per process in ``PROMETHEUS_MULTIPROC_DIR`` (set by the
supervisor, ``billcore.server.metrics``).  Each file is named
``<type>_[<mode>_]<pid>.db`` and holds ``(metric, sample, labels, help)``
keys with their values; ``read_samples`` reads them per process, which the
aggregated ``/metrics`` endpoint no longer says.  From them:

* processes — every live process sets ``billcore_process_up{role}`` at start;
  its pid is the file's, its start time the kernel's (``/proc``), and the
  supervisor counts restarts per role in ``billcore_restarts``;
* NetFlow workers — packets journaled, drops by reason, journal bytes not yet
  committed by the core (``netflow_journal_lag_bytes``), whether the worker
  holds a session with the core;
* RADIUS — requests by kind and replies by code.  Counters only grow, so
  rates come from two readings: ``RateMeter`` keeps the previous one and
  answers per second since then (nothing on the first reading).

Without the directory (a core started without the supervisor, tests) only
the core itself is known.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prometheus_client.mmap_dict import MmapedDict

__all__ = ["Sample", "RateMeter", "metrics_dir", "netflow_workers", "process_started", "processes",
           "radius_counts", "read_samples", "total"]

MAX_FILES = 4096   # one set per process: far more than any machine runs


@dataclass(frozen=True, slots=True)
class Sample:
    """One value of one process's metrics file."""

    metric: str
    labels: Mapping[str, str]
    value: float
    pid: int


def metrics_dir() -> Path | None:
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return Path(path) if path else None


def read_samples(directory: Path) -> list[Sample]:
    """Every value of every process's metrics file (files that vanish meanwhile are skipped)."""
    samples = []
    for path in sorted(directory.glob("*.db"))[:MAX_FILES]:
        pid_text = path.stem.rsplit("_", 1)[-1]
        if not pid_text.isdigit():
            continue
        try:
            values = MmapedDict.read_all_values_from_file(str(path))  # type: ignore[no-untyped-call]
        except (FileNotFoundError, ValueError):   # a dead process's file removed, or one half written
            continue
        for key, value, _timestamp, _offset in values:
            metric, _sample, labels, _help = json.loads(key)
            samples.append(Sample(metric, labels, float(value), int(pid_text)))
    return samples


def total(samples: Iterable[Sample], metric: str, **labels: str) -> int:
    """Sum of a counter over every process (labels given must match)."""
    return int(sum(sample.value for sample in samples if sample.metric == metric
                   and all(sample.labels.get(name) == value for name, value in labels.items())))


def process_started(pid: int) -> datetime | None:
    """When the kernel started ``pid`` (Linux ``/proc``), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, IndexError, StopIteration, ValueError):
        return None
    ticks = int(fields[19])   # field 22 of stat: start time in clock ticks after boot
    return datetime.fromtimestamp(boot + ticks / os.sysconf("SC_CLK_TCK"), timezone.utc)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def processes(samples: list[Sample], core_pid: int) -> list[dict[str, Any]]:
    """``{role, pid, state, restarts, started_at}`` per process that reported itself up, the core always."""
    restarts: dict[str, int] = {}
    for sample in samples:
        if sample.metric == "billcore_restarts":
            role = sample.labels.get("role", "")
            restarts[role] = restarts.get(role, 0) + int(sample.value)
    found = {(sample.labels.get("role", ""), sample.pid) for sample in samples
             if sample.metric == "billcore_process_up" and sample.value > 0}
    if not any(pid == core_pid for _, pid in found):
        found.add(("core", core_pid))
    return [{"role": role, "pid": pid, "state": "running" if _alive(pid) else "gone",
             "restarts": restarts.get(role, 0), "started_at": process_started(pid)}
            for role, pid in sorted(found)]


def netflow_workers(samples: list[Sample]) -> dict[str, dict[str, Any]]:
    """Per worker name: packets, drops (all and by reason), journal lag, connected to the core."""
    workers: dict[str, dict[str, Any]] = {}
    for sample in samples:
        if not sample.metric.startswith("netflow_") or "worker" not in sample.labels:
            continue
        worker = workers.setdefault(sample.labels["worker"], {
            "packets": 0, "drops": 0, "drops_by_reason": {}, "journal_lag": None, "connected": False})
        if sample.metric == "netflow_packets_received":
            worker["packets"] += int(sample.value)
        elif sample.metric == "netflow_drops":
            reason = sample.labels.get("reason", "")
            worker["drops"] += int(sample.value)
            worker["drops_by_reason"][reason] = worker["drops_by_reason"].get(reason, 0) + int(sample.value)
        elif sample.metric == "netflow_journal_lag_bytes" and _alive(sample.pid):
            worker["journal_lag"] = max(worker["journal_lag"] or 0, int(sample.value))
        elif sample.metric == "netflow_core_connected" and _alive(sample.pid):
            worker["connected"] = worker["connected"] or sample.value > 0
    return workers


def radius_counts(samples: list[Sample]) -> dict[str, int]:
    """The radius process's counters: Access- and Accounting-Requests, Access-Rejects sent."""
    return {"access": total(samples, "billcore_radius_requests", kind="access"),
            "accounting": total(samples, "billcore_radius_requests", kind="accounting"),
            "rejects": total(samples, "billcore_radius_replies", code="access_reject")}


class RateMeter:
    """Per-second rates of growing counters between two readings (``clock``: monotonic seconds)."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._previous: tuple[float, dict[str, int]] | None = None

    def rates(self, counts: dict[str, int]) -> dict[str, float | None]:
        """Each count's growth per second since the previous reading (None on the first, or after a
        counter went back: a process restarted)."""
        now = self._clock()
        previous, self._previous = self._previous, (now, dict(counts))
        if previous is None or now <= previous[0]:
            return {name: None for name in counts}
        elapsed = now - previous[0]
        return {name: (round((value - previous[1].get(name, 0)) / elapsed, 2)
                       if value >= previous[1].get(name, 0) else None) for name, value in counts.items()}
