"""Voucher codes: 16 symbols of a 31-letter alphabet (~79 bits), printed in groups of four.

The alphabet has no 0/O or 1/I/L, so a code read off a card survives being
typed; ``normalize`` accepts lower case, spaces and dashes.  Only a hash of
the code is stored.
"""

from __future__ import annotations

import hashlib
import secrets

ALPHABET = "23456789ABCDEFGHJKMNPQRSTUVWXYZ"
LENGTH = 16


def new_code() -> str:
    raw = "".join(secrets.choice(ALPHABET) for _ in range(LENGTH))
    return "-".join(raw[i:i + 4] for i in range(0, LENGTH, 4))


def normalize(code: str) -> str | None:
    """The canonical form of a typed code, or None if it cannot be a code."""
    raw = "".join(code.split()).replace("-", "").upper()
    if len(raw) != LENGTH or any(c not in ALPHABET for c in raw):
        return None
    return raw


def code_hash(normalized: str) -> bytes:
    return hashlib.sha256(b"billcore-voucher\0" + normalized.encode("ascii")).digest()
