"""The ``[portal]`` config section and how the portal finds the core.

``PortalSection`` is written in the style of ``billcore.config`` (frozen
dataclass, every field a default and a one-line doc) so that the integrator
can move it there as is.  ``PortalSettings.from_config`` reads
``config.portal`` when the loaded config has that section, else the
defaults, and adds what comes from the rest of the config: where the core
listens and where the portal's system password file is.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["PortalSection", "PortalSettings", "read_or_make_secret"]


def _f(default: Any, doc: str) -> Any:
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True, slots=True)
class PortalSection:
    enabled: bool = _f(False, "Run the subscribers' web office (a URFA client of the core, no database access).")
    host: str = _f("127.0.0.1", "Address the web office binds (0.0.0.0 or :: to face a network).")
    port: int = _f(8080, "HTTP(S) port of the web office.")
    tls_cert: str = _f("", "PEM certificate; with tls_key the office speaks HTTPS.")
    tls_key: str = _f("", "PEM private key of the office's certificate.")
    language: str = _f("en", "Language when the browser asks for none we have: en or ru.")
    cookie_secure: bool = _f(True, "Send the session cookie only over HTTPS (turn off only for plain-HTTP tests).")
    trust_forwarded: bool = _f(False, "Take the browser's address from X-Forwarded-For (only behind your own reverse proxy).")
    login_failures_per_minute: int = _f(5, "Failed logins allowed per browser address each minute; more get HTTP 429.")
    max_body: int = _f(16384, "Largest request body, in bytes; a larger one gets HTTP 413.")
    request_timeout: float = _f(15.0, "Seconds one request may take, core calls included; then HTTP 503.")
    core_timeout: float = _f(5.0, "Seconds to wait for the core to answer one call or to connect.")
    secret_file: str = _f("", "File with the key that signs CSRF tokens (empty: <data_dir>/system/portal.secret, created on first start).")


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
        section = getattr(config, "portal", None)
        if not isinstance(section, PortalSection):
            # the integrator's copy of the section lives in billcore.config: take its fields
            values = {f.name: getattr(section, f.name) for f in fields(PortalSection) if hasattr(section, f.name)}
            section = PortalSection(**values)
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
