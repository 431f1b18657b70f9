"""Where a web edge finds the core and its own files, from billcore's config.

The edges' sections (``[portal]``, ``[console]``) live with every other
section in ``billcore.common.config`` (plain configuration, no database
code).  ``EdgeSettings.of`` adds what comes from the rest of the config:
where the core listens, where the edge's system password file is (the core
provisions it under the role's name) and the key that signs CSRF tokens.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from billcore.common.sysfiles import service_password_file

__all__ = ["EdgeSection", "EdgeSettings", "core_address", "read_gateway_secret", "read_or_make_secret"]


class EdgeSection(Protocol):
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def tls_cert(self) -> str: ...
    @property
    def tls_key(self) -> str: ...
    @property
    def secret_file(self) -> str: ...
    @property
    def core_timeout(self) -> float: ...


Section = TypeVar("Section", bound=EdgeSection)


def core_address(config: Any) -> tuple[str, int, str | None]:
    """Where an edge beside the core reaches it: host (loopback when the core binds every address),
    port, and its Unix socket if it has one."""
    sock = config.urfa_socket
    host = config.urfa.host if config.urfa.host not in ("0.0.0.0", "::") else "127.0.0.1"
    return host, config.urfa.port, str(sock) if sock is not None else None


@dataclass(frozen=True, slots=True)
class EdgeSettings(Generic[Section]):
    section: Section
    core_host: str
    core_port: int
    core_unix: str | None
    password_file: Path
    secret_file: Path
    login: str

    @classmethod
    def of(cls, config: Any, role: str, section: Section) -> EdgeSettings[Section]:
        """The settings of the edge ``role`` (also its system login's name)."""
        data_dir = Path(config.data_dir)
        host, port, unix = core_address(config)
        return cls(
            section=section,
            core_host=host,
            core_port=port,
            core_unix=unix,
            password_file=service_password_file(data_dir, role),
            secret_file=Path(section.secret_file) if section.secret_file else data_dir / "system" / f"{role}.secret",
            login=role,
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


MIN_GATEWAY_SECRET = 16


def read_gateway_secret(path: Path) -> bytes:
    """A payment gateway's shared secret: the file's text, stripped (at least 16 bytes), as bytes.

    ``ValueError`` naming the file (never the secret) when it is missing or too short."""
    try:
        secret = path.read_text(encoding="utf-8").strip().encode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the gateway secret: {type(exc).__name__}") from None
    if len(secret) < MIN_GATEWAY_SECRET:
        raise ValueError(f"{path}: a gateway secret has at least {MIN_GATEWAY_SECRET} bytes")
    return secret
