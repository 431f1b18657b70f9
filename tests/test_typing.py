"""``mypy`` over every source package, with the project's ``[tool.mypy]``
(``--strict``; pyproject says what is left out and why).  Any error fails."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import need_peer

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(600)
def test_source_tree_passes_mypy_strict() -> None:
    need_peer(importlib.util.find_spec("mypy") is not None, "mypy is not installed (the [test] extra)")
    # No paths: mypy reads `files` and `strict` from pyproject, so the test and
    # a developer's plain `mypy` check the same thing.
    done = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=580)
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-2000:]
