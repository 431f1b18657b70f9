"""Structured log lines: ``ts=… level=… role=… pid=… msg="…" key=value``.

Every process calls ``setup_logging(role, level)`` once; the role and pid are
on every line so one stream from the supervisor and all its children can be
grepped per process.  ``kv(**fields)`` passes extra fields through
``logger.info("msg", extra=kv(account=1))``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

__all__ = ["setup_logging", "kv"]

_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def _quote(value: Any) -> str:
    text = str(value)
    if text and all(c.isalnum() or c in "-_.:/@+" for c in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class LogfmtFormatter(logging.Formatter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [
            f"ts={ts}.{int(record.msecs):03d}Z",
            f"level={record.levelname.lower()}",
            f"role={self.role}",
            f"pid={os.getpid()}",
            f"logger={record.name}",
            f"msg={_quote(record.getMessage())}",
        ]
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                parts.append(f"{key}={_quote(value)}")
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


class _ReasonNotTraceback(logging.Filter):
    """asyncpg's pool logs a full traceback each time it fails to reconnect
    while the database is down: an expected state, one line is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            record.reason = f"{type(exc).__name__}: {exc}"
            record.exc_info = None
            record.exc_text = None
        return True


def setup_logging(role: str, level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter(role))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    logging.getLogger("asyncpg").addFilter(_ReasonNotTraceback())
    logging.getLogger("asyncpg.pool").addFilter(_ReasonNotTraceback())
    # pgserver narrates every pg_ctl call at INFO; we log the outcome ourselves
    logging.getLogger("pgserver").setLevel(logging.WARNING)


def kv(**fields: Any) -> dict[str, Any]:
    return fields
