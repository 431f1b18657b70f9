"""The webhook signature: one implementation for the core, the notify edge and receivers' tests.

``X-Billcore-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>``
with ``X-Billcore-Timestamp: <unix seconds>``.  A receiver recomputes it over
the exact body bytes, compares in constant time, and refuses a timestamp
more than ``TOLERANCE`` seconds from its own clock (a captured request
replayed later fails).
"""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["TOLERANCE", "sign", "verify"]

TOLERANCE = 300


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The ``X-Billcore-Signature`` value of ``body`` sent at ``timestamp`` (Unix seconds)."""
    return "v1=" + hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def verify(secret: bytes, timestamp: str, body: bytes, signature: str, now: float) -> bool:
    """What a receiver does: the timestamp within ``TOLERANCE`` and the signature equal (constant time)."""
    if not timestamp.isdigit() or abs(now - int(timestamp)) > TOLERANCE:
        return False
    return hmac.compare_digest(sign(secret, int(timestamp), body), signature)
