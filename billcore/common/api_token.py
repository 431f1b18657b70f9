"""What an API token looks like, for the core that stores it and the HTTP edge that receives it.

A token is ``bct_`` + 43 characters of urlsafe base64 (no padding) of 32
random bytes.  Only its SHA-256 is ever kept, by the core (the
``api_tokens`` table) and by the edge (its session cache): 256 random bits
need no salt nor a slow hash.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets

__all__ = ["PREFIX", "TOKEN_CHARS", "hash_token", "new_token", "well_formed"]

PREFIX = "bct_"
SECRET_BYTES = 32
TOKEN_CHARS = len(PREFIX) + 43          # 32 bytes in urlsafe base64 without padding
_SHAPE = re.compile(r"bct_[A-Za-z0-9_-]{43}")


def new_token() -> tuple[str, bytes]:
    """A fresh token and the hash to store."""
    token = PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(SECRET_BYTES)).rstrip(b"=").decode()
    assert len(token) == TOKEN_CHARS
    return token, hash_token(token)


def well_formed(text: object) -> bool:
    """Whether ``text`` could be a token at all (checked before any look-up)."""
    return type(text) is str and _SHAPE.fullmatch(text) is not None


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()
