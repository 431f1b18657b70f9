"""Encode RADIUS replies straight to bytes: the hot path of the server.

Theory of operation
-------------------
pyrad builds a packet object per reply (a dict of attributes, dictionary
look-ups per value, then the encoding); at thousands of replies a second
that is most of the server's time.  Replies here are simple — a few
attributes the core chose, by dictionary name — so ``ReplyEncoder``:

* resolves a name once to (code, vendor id, vendor type, data type) from the
  pyrad dictionary and keeps it;
* encodes each (name, value) pair once to its attribute bytes (with the
  Vendor-Specific wrapper, RFC 2865 s.5.26, vendor format 1,1) and keeps
  the bytes in a bounded cache — Acct-Interim-Interval, a rate limit, a
  pool address recur from reply to reply;
* assembles the reply: Message-Authenticator first (BlastRADIUS), HMAC-MD5
  over the reply with the request's authenticator (RFC 3579 s.3.2), then
  Response Authenticator = MD5(Code+ID+Length+RequestAuth+Attributes+Secret)
  (RFC 2865 s.3).

No I/O.  Names the dictionary does not know, and values that do not fit
their type, raise ``BadAttribute``; the caller skips that attribute.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import struct
from typing import Any

from pyrad import tools
from pyrad.dictionary import Dictionary

__all__ = ["BadAttribute", "ReplyEncoder", "finish_reply"]

_MA_PLACEHOLDER = b"\x50\x12" + b"\x00" * 16
_MD5 = hashlib.md5


class BadAttribute(ValueError):
    """A reply attribute the dictionary does not know, or a value that does not fit it."""


def finish_reply(code: int, ident: int, request_auth: bytes, secret: bytes, attrs: bytes,
                 message_authenticator: bool = True) -> bytes:
    """A complete reply: header, optional Message-Authenticator first, attributes."""
    if message_authenticator:
        length = 38 + len(attrs)
        head = struct.pack("!BBH", code, ident, length)
        ma = hmac.digest(secret, head + request_auth + _MA_PLACEHOLDER + attrs, "md5")
        body = b"\x50\x12" + ma + attrs
    else:
        length = 20 + len(attrs)
        head = struct.pack("!BBH", code, ident, length)
        body = attrs
    if length > 4096:
        raise BadAttribute(f"reply of {length} octets is over the 4096 limit")
    return head + _MD5(head + request_auth + body + secret).digest() + body


class ReplyEncoder:
    def __init__(self, dictionary: Dictionary, max_cached: int = 65536) -> None:
        self._dict = dictionary
        self._kinds: dict[str, tuple[int, int, int, str, Any]] = {}
        self._cache: dict[tuple[str, Any], bytes] = {}
        self._max = max_cached

    def attribute(self, name: str, value: Any) -> bytes:
        """The wire bytes of one attribute (cached)."""
        key = (name, value)
        try:
            return self._cache[key]
        except KeyError:
            pass
        except TypeError:  # an unhashable value (a list from a confused caller)
            raise BadAttribute(f"{name}: value {value!r} is not a scalar") from None
        data = self._encode(name, value)
        if len(self._cache) >= self._max:
            self._cache.clear()
        self._cache[key] = data
        return data

    def attributes(self, pairs: Any) -> tuple[bytes, list[tuple[str, BadAttribute]]]:
        """Concatenated attributes of ``(name, value)`` pairs, and the skipped ones."""
        out = []
        skipped = []
        for name, value in pairs:
            try:
                out.append(self.attribute(name, value))
            except BadAttribute as exc:
                skipped.append((name, exc))
        return b"".join(out), skipped

    def _kind(self, name: str) -> tuple[int, int, int, str, Any]:
        kind = self._kinds.get(name)
        if kind is None:
            try:
                attr = self._dict.attributes[name]
            except KeyError:
                raise BadAttribute(f"no attribute {name!r} in the dictionary") from None
            if isinstance(attr.code, tuple):
                raise BadAttribute(f"{name}: extended attributes are not supported in replies")
            vendor = self._dict.vendors.GetForward(attr.vendor) if attr.vendor else 0
            kind = (26, int(vendor), int(attr.code), attr.type, attr.values) if vendor else (
                int(attr.code), 0, 0, attr.type, attr.values)
            self._kinds[name] = kind
        return kind

    def _encode(self, name: str, value: Any) -> bytes:
        code, vendor, vtype, dtype, values = self._kind(name)
        raw: bytes
        try:
            if values is not None and isinstance(value, str) and values.HasForward(value):
                raw = bytes(values.GetForward(value))
            elif dtype == "string":
                raw = value.encode() if isinstance(value, str) else bytes(value)
            elif dtype == "octets":
                raw = bytes(value) if not isinstance(value, str) else value.encode()
            elif dtype in ("integer", "date"):
                raw = struct.pack("!I", int(value))
            elif dtype == "ipaddr":
                raw = ipaddress.IPv4Address(value).packed
            else:
                raw = bytes(tools.EncodeAttr(dtype, value))
        except (ValueError, TypeError, struct.error, ipaddress.AddressValueError) as exc:
            raise BadAttribute(f"{name}: {value!r} is not a valid {dtype}: {exc}") from None
        if not raw or len(raw) > 253 - (6 + 2 if vendor else 0):
            raise BadAttribute(f"{name}: {len(raw)} octets does not fit one attribute")
        if vendor:
            inner = bytes((vtype, len(raw) + 2)) + raw
            return bytes((26, len(inner) + 6)) + struct.pack("!I", vendor) + inner
        return bytes((code, len(raw) + 2)) + raw
