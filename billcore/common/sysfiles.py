"""Where a system login's password lives on one machine: ``<data_dir>/system/<role>.password``.

The core writes the file (mode 0600) and sets the login's verifier from it;
the edge started beside it (radius, netflow, portal) reads the same file.
This is the one convention both sides share, so it lives here, where edges
may import it without pulling in the core's database code.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ["read_or_make_password", "service_password_file"]


def service_password_file(data_dir: Path, role: str) -> Path:
    return data_dir / "system" / f"{role}.password"


def read_or_make_password(path: Path) -> str:
    """The password in ``path``; a new random one (file mode 0600) if absent."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    password = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    return password
