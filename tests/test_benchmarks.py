"""Every benchmark runs once at a tiny size, so none of them rots.

Figures come from full runs (``python benchmarks/NAME.py``), committed in
benchmarks/results/; the tiny runs here only prove the scripts still work,
and leave the committed results as they were.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if not p.name.startswith("_"))


@pytest.fixture
def keep_results() -> Iterator[None]:
    before = {p: p.read_bytes() for p in RESULTS.rglob("*") if p.is_file()} if RESULTS.exists() else {}
    try:
        yield
    finally:
        for p in list(RESULTS.rglob("*")) if RESULTS.exists() else []:
            if p.is_file() and p not in before:
                p.unlink()
        for p, data in before.items():
            if not p.exists() or p.read_bytes() != data:
                p.write_bytes(data)


def test_there_are_benchmarks() -> None:
    assert SCRIPTS, "benchmarks/ has no scripts"


# scale.py's tiny run is 50,000 subscribers (past the ~38,000-binding cliff
# the issue found) and fails on any step's timeout; it takes minutes, not seconds
SLOW = {"scale": 900}


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
@pytest.mark.timeout(1000)
def test_benchmark_runs_tiny(script: Path, keep_results: None) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, str(script), "--tiny"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=SLOW.get(script.stem, 280),
    )
    assert done.returncode == 0, f"{script.name} --tiny failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert done.stdout.strip(), f"{script.name} printed no figure"
