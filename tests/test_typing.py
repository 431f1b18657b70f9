"""``mypy --strict`` on the pure modules: the protocol codecs, the money and
rating code, the decoders, the plugin loader (STYLE.md asks for it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STRICT = [
    "urfa/framing.py", "urfa/messages.py", "urfa/scram.py", "urfa/connection.py", "urfa/errors.py",
    "billcore/server/sessions.py", "billcore/server/calls.py", "billcore/common/config.py", "billcore/server/topics.py",
    "billcore/common/money.py", "billcore/billing/rating.py", "billcore/billing/periods.py",
    "billcore/billing/timeranges.py", "billcore/common/errors.py",
    "netflow/flows.py", "netflow/v5.py", "netflow/v9.py", "netflow/ipfix.py", "netflow/templates.py",
    "netflow/decode.py", "netflow/classifier.py", "netflow/snapshot.py", "netflow/journal.py", "netflow/errors.py",
    "radius/dedup.py", "radius/auth.py", "radius/notices.py", "billcore/server/argcheck.py", "billcore/plugins", "portal",
]


@pytest.mark.timeout(300)
def test_pure_modules_pass_mypy_strict() -> None:
    pytest.importorskip("mypy")
    done = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-error-summary", *STRICT],
                          cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]
