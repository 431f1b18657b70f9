"""What every benchmark records about the machine it ran on.

Benchmarks run as scripts (``python benchmarks/NAME.py``), so this module is
imported as ``_machine`` from the benchmarks directory.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine() -> dict[str, Any]:
    """Platform, CPU, cores, Python, the load average now (a shared machine
    skews absolute figures; ratios measured in one run are steadier) and the date."""
    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def tree_commit() -> str:
    """The commit the measured code is at (``+`` when the tree has changes beside it)."""
    try:
        return subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty=+"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except OSError:
        return ""


def publish(report: dict[str, Any], text: str, out: Path, tiny: bool) -> None:
    """Print the results' text; a full run (not ``tiny``) also writes ``out``.json and ``out``.md."""
    print(text)
    if not tiny:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        out.with_suffix(".md").write_text(text)


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a local process (a backend of a local server; 0 when not visible)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def backends_cpu(conn: Any) -> dict[int, float]:
    """CPU so far of every client backend of ``conn``'s database (an asyncpg connection).  Wall time on a
    shared box moves with the neighbours' load; CPU seconds move much less."""
    pids = await conn.fetchval(
        "SELECT array_agg(pid) FROM pg_stat_activity WHERE datname = current_database()"
        " AND backend_type = 'client backend'")
    return {pid: process_cpu(pid) for pid in pids or []}


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds between two ``backends_cpu`` readings (backends gone since are not counted)."""
    return sum(after.values()) - sum(v for pid, v in before.items() if pid in after)
