"""The ``[portal]`` config section and how the portal finds the core.

``PortalSection`` lives with every other section in ``billcore.common.config``
(plain configuration, no database code).  ``PortalSettings.from_config``
adds what comes from the rest of the config: where the core listens and
where the portal's system password file is.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from billcore.common.config import PortalSection

__all__ = ["PortalSection", "PortalSettings", "read_or_make_secret"]


@dataclass(frozen=True, slots=True)
class PortalSettings:
    section: PortalSection
    core_host: str
    core_port: int
    core_unix: str | None
    password_file: Path
    secret_file: Path
    login: str = "portal"

    @classmethod
    def from_config(cls, config: Any) -> PortalSettings:
        section: PortalSection = config.portal
        data_dir = Path(config.data_dir)
        sock = config.urfa_socket
        return cls(
            section=section,
            core_host=config.urfa.host if config.urfa.host not in ("0.0.0.0", "::") else "127.0.0.1",
            core_port=config.urfa.port,
            core_unix=str(sock) if sock is not None else None,
            password_file=data_dir / "system" / "portal.password",
            secret_file=Path(section.secret_file) if section.secret_file else data_dir / "system" / "portal.secret",
        )


def read_or_make_secret(path: Path) -> bytes:
    """32 random bytes kept in ``path`` (mode 0600), so CSRF tokens outlive a restart."""
    try:
        data = bytes.fromhex(path.read_text().strip())
        if len(data) >= 32:
            return data
    except (FileNotFoundError, ValueError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = secrets.token_bytes(32)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    os.replace(tmp, path)
    return key
