"""Time-based one-time passwords (RFC 6238 over RFC 4226's HOTP), stdlib only.

An operator's second factor: the core and the operator's authenticator app
share a random secret (20 bytes, shown to the person as base32 and as an
``otpauth://`` URI for a QR code); a code is HOTP-SHA-1 of the number of
30-second steps since the Unix epoch, truncated to 6 digits.

``match_step`` is what a verifier uses: it accepts the step of ``t`` and one
step either side (clocks drift, people type slowly) but only a step *after*
the last one accepted, so a code seen over a shoulder or replayed from a log
is worth nothing once used.  The caller stores the step it returns.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import struct
from urllib.parse import quote, urlencode

__all__ = [
    "DIGITS", "SECRET_BYTES", "STEP", "WINDOW",
    "b32_secret", "hotp", "match_step", "new_secret", "otpauth_uri", "parse_b32", "totp", "time_step",
]

DIGITS = 6
STEP = 30
WINDOW = 1           # steps accepted either side of now
SECRET_BYTES = 20    # RFC 4226 recommends 160 bits (SHA-1's output size)


def hotp(secret: bytes, counter: int, digits: int = DIGITS) -> str:
    """RFC 4226: the ``digits``-digit code of ``counter`` (dynamic truncation of HMAC-SHA-1)."""
    mac = hmac.new(secret, struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = mac[-1] & 0x0F
    value = struct.unpack(">I", mac[offset:offset + 4])[0] & 0x7FFF_FFFF
    return str(value % 10 ** digits).zfill(digits)


def time_step(t: float, step: int = STEP) -> int:
    """The RFC 6238 counter T of Unix time ``t``: whole steps since the epoch."""
    return int(t) // step


def totp(secret: bytes, t: float, digits: int = DIGITS, step: int = STEP) -> str:
    """RFC 6238: the code valid at Unix time ``t``."""
    return hotp(secret, time_step(t, step), digits)


def match_step(secret: bytes, code: str, t: float, last_step: int, *, window: int = WINDOW,
               digits: int = DIGITS, step: int = STEP) -> int | None:
    """The step (within ``window`` of ``t``'s, and later than ``last_step``)
    whose code ``code`` is; ``None`` when there is none.  Spaces in ``code``
    are ignored (apps show "123 456")."""
    code = "".join(code.split())
    if len(code) != digits or not code.isascii() or not code.isdigit():
        return None
    now = time_step(t, step)
    found = None
    # every candidate is compared, in constant time, whichever matches
    for candidate in range(now - window, now + window + 1):
        if hmac.compare_digest(hotp(secret, candidate, digits), code) and candidate > last_step and found is None:
            found = candidate
    return found


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def b32_secret(secret: bytes) -> str:
    """The secret as authenticator apps take it: base32, no padding."""
    return base64.b32encode(secret).decode("ascii").rstrip("=")


def parse_b32(text: str) -> bytes:
    """A base32 secret as people type it (any case, spaces, no padding); ``ValueError`` if not base32."""
    cleaned = "".join(text.split()).upper().rstrip("=")
    try:
        return base64.b32decode(cleaned + "=" * (-len(cleaned) % 8))
    except binascii.Error as exc:
        raise ValueError(f"not a base32 secret: {exc}") from None


def otpauth_uri(secret: bytes, login: str, issuer: str = "billcore") -> str:
    """The ``otpauth://totp/ISSUER:LOGIN?secret=…&issuer=ISSUER`` URI a QR code carries."""
    label = quote(f"{issuer}:{login}", safe=":@")
    return f"otpauth://totp/{label}?" + urlencode({"secret": b32_secret(secret), "issuer": issuer})
