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

The Microsoft attributes of MS-CHAPv2 (RFC 2548, vendor 311) are encoded from
their own table, not the dictionary: MS-CHAP2-Success and MS-CHAP-Error are
per-request octets (never cached); MS-MPPE-Send-Key and MS-MPPE-Recv-Key come
from the core in clear and are salt-encrypted here (RFC 2548 s.2.4.2: salt,
then the key-length octet, key and zero padding XORed with
MD5(secret + Request Authenticator + salt), MD5(secret + previous block), …)
with the NAS secret and the request's authenticator — so they need both, are
never cached, and are skipped (never sent in clear) when either is missing.

No I/O.  Names the dictionary does not know, and values that do not fit
their type, raise ``BadAttribute``; the caller skips that attribute.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import struct
from typing import Any

from pyrad import tools
from pyrad.dictionary import Dictionary

__all__ = ["BadAttribute", "ReplyEncoder", "finish_reply", "mppe_encrypt_key", "mppe_decrypt_key", "MICROSOFT"]

_MA_PLACEHOLDER = b"\x50\x12" + b"\x00" * 16
_MD5 = hashlib.md5

MICROSOFT = 311
# name → (vendor type, data type) of the Microsoft attributes billcore answers (RFC 2548)
_MICROSOFT_REPLIES = {
    "MS-CHAP-Error": (2, "octets"),
    "MS-MPPE-Encryption-Policy": (7, "integer"),
    "MS-MPPE-Encryption-Types": (8, "integer"),
    "MS-MPPE-Send-Key": (16, "key"),
    "MS-MPPE-Recv-Key": (17, "key"),
    "MS-CHAP2-Success": (26, "octets"),
}


def _salt_blocks(data: bytes, secret: bytes, first: bytes, encrypting: bool) -> bytes:
    """RFC 2548 s.2.4.2 blocks: c(1) = p(1) xor MD5(S + R + A), c(i) = p(i) xor MD5(S + c(i-1))."""
    out, prev = [], first
    for i in range(0, len(data), 16):
        chunk = data[i:i + 16]
        block = (int.from_bytes(chunk, "big") ^ int.from_bytes(_MD5(secret + prev).digest(), "big")).to_bytes(16, "big")
        out.append(block)
        prev = block if encrypting else chunk   # chained on the cipher text either way
    return b"".join(out)


def mppe_encrypt_key(key: bytes, secret: bytes, request_auth: bytes, salt: bytes) -> bytes:
    """An MS-MPPE-Send-Key/Recv-Key value: salt (2 octets, high bit set) + the
    encrypted key-length octet, key and zero padding to a multiple of 16."""
    if len(salt) != 2 or not salt[0] & 0x80:
        raise ValueError("an MPPE salt is 2 octets with the high bit set")
    if not 1 <= len(key) <= 239:
        raise ValueError("an MPPE key is 1..239 octets")
    plain = bytes([len(key)]) + key
    plain += b"\x00" * (-len(plain) % 16)
    return salt + _salt_blocks(plain, secret, request_auth + salt, encrypting=True)


def mppe_decrypt_key(value: bytes, secret: bytes, request_auth: bytes) -> bytes:
    """The key of an MS-MPPE-Send-Key/Recv-Key value (what a NAS does; the tests use it)."""
    salt, cipher = value[:2], value[2:]
    if len(salt) != 2 or not cipher or len(cipher) % 16:
        raise ValueError("an MPPE key value is a 2-octet salt and 16-octet blocks")
    plain = _salt_blocks(cipher, secret, request_auth + salt, encrypting=False)
    if plain[0] > len(plain) - 1:
        raise ValueError("an MPPE key length beyond its value")
    return plain[1:1 + plain[0]]


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


def _vsa(vendor: int, vtype: int, raw: bytes, name: str) -> bytes:
    """A Vendor-Specific attribute (RFC 2865 s.5.26) holding one sub-attribute."""
    if not raw or len(raw) > 253 - 8:
        raise BadAttribute(f"{name}: {len(raw)} octets does not fit one attribute")
    inner = bytes((vtype, len(raw) + 2)) + raw
    return bytes((26, len(inner) + 6)) + struct.pack("!I", vendor) + inner


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

    def attributes(self, pairs: Any, secret: bytes | None = None,
                   request_auth: bytes | None = None) -> tuple[bytes, list[tuple[str, BadAttribute]]]:
        """Concatenated attributes of ``(name, value)`` pairs, and the skipped
        ones.  ``secret`` and ``request_auth`` encrypt MPPE keys (without them
        a key is skipped)."""
        out = []
        skipped = []
        salt = 0   # the MPPE salts of one reply differ (RFC 2548 s.2.4.2: unique per packet)
        for name, value in pairs:
            try:
                if name in _MICROSOFT_REPLIES:
                    if _MICROSOFT_REPLIES[name][1] == "key":
                        salt = 0x8000 | ((salt + 1 if salt else secrets.randbits(15)) & 0x7FFF)
                        out.append(self._mppe_key(name, value, secret, request_auth, salt))
                    else:
                        out.append(self._microsoft(name, value))
                else:
                    out.append(self.attribute(name, value))
            except BadAttribute as exc:
                skipped.append((name, exc))
        return b"".join(out), skipped

    def _microsoft(self, name: str, value: Any) -> bytes:
        vtype, dtype = _MICROSOFT_REPLIES[name]
        if dtype == "integer":
            if type(value) is not int or not 0 <= value < 2**32:
                raise BadAttribute(f"{name}: {value!r} is not a 32-bit integer")
            data = self._cache.get((name, value))
            if data is None:
                data = _vsa(MICROSOFT, vtype, struct.pack("!I", value), name)
                if len(self._cache) >= self._max:
                    self._cache.clear()
                self._cache[(name, value)] = data
            return data
        if not isinstance(value, bytes):   # per-request octets: not cached
            raise BadAttribute(f"{name}: {value!r} is not octets")
        return _vsa(MICROSOFT, vtype, value, name)

    @staticmethod
    def _mppe_key(name: str, value: Any, secret: bytes | None, request_auth: bytes | None, salt: int) -> bytes:
        if secret is None or request_auth is None:
            raise BadAttribute(f"{name}: no NAS secret to encrypt it with; never sent in clear")
        if not isinstance(value, bytes) or not 1 <= len(value) <= 32:
            raise BadAttribute(f"{name}: a key is 1..32 octets")
        encrypted = mppe_encrypt_key(value, secret, request_auth, salt.to_bytes(2, "big"))
        return _vsa(MICROSOFT, _MICROSOFT_REPLIES[name][0], encrypted, name)

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
