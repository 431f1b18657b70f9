"""URFA messages: one frozen dataclass per wire message type.

Theory of operation
-------------------
Every frame holds one msgpack map whose key ``"t"`` names the message type;
the other keys are that type's fields (short names, listed in
docs/protocol.md §4).  ``parse`` turns a decoded map into a message after
checking each field's type and bounds, ignoring keys it does not know, and
raises ``RemoteProtocolError`` for anything else.  ``to_wire`` is the
inverse.  Byte fields (nonces, proofs, SIDs) have fixed sizes; strings and
call ids are bounded so nothing a peer sends can grow without limit here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from .errors import RemoteProtocolError

__all__ = [
    "PROTO_VERSIONS", "Message", "Hello", "Login", "Challenge", "Proof", "Otp", "OtpCode", "Resume",
    "Welcome", "Call", "Cancel", "Ping", "Pong", "Result", "Chunk", "Error",
    "Event", "Bye", "parse", "parse_call", "to_wire", "MAX_CALL_ID",
]

PROTO_VERSIONS: tuple[int, ...] = (1,)
MAX_CALL_ID = (1 << 63) - 1
MAX_NAME = 256        # logins, kinds, function names, topics, codes
MAX_TEXT = 4096       # human messages
MAX_CODE = 64         # a one-time code: 6 digits, or a recovery code
_SID = 16
_NONCE = 16
_MAC = 32


@dataclass(frozen=True, slots=True)
class Hello:
    nonce: bytes
    proto: tuple[int, ...] = PROTO_VERSIONS
    server: str = "billcore"
    max_frame: int = 1 << 20


@dataclass(frozen=True, slots=True)
class Login:
    kind: str
    login: str
    cnonce: bytes
    proto: int = 1


@dataclass(frozen=True, slots=True)
class Challenge:
    salt: bytes
    iterations: int


@dataclass(frozen=True, slots=True)
class Proof:
    proof: bytes


@dataclass(frozen=True, slots=True)
class Otp:
    """The proof was right, and this login has a second factor: the server
    proves itself (the ServerSignature ``welcome`` would carry) and asks for a code."""

    signature: bytes


@dataclass(frozen=True, slots=True)
class OtpCode:
    """The client's answer to ``otp``: a TOTP code or a recovery code."""

    code: str


@dataclass(frozen=True, slots=True)
class Resume:
    sid: bytes
    cnonce: bytes
    proof: bytes
    proto: int = 1


@dataclass(frozen=True, slots=True)
class Welcome:
    sid: bytes
    signature: bytes
    kind: str
    login: str
    timeout: int
    proto: int = 1


# The messages of an open connection (calls, their replies, events) are
# typed named tuples rather than dataclasses: one is built for every call and
# every reply, and a tuple costs half as much to make.  They compare equal
# only to the same message type (see ``_strict_eq`` below), never to a tuple.
class Call(NamedTuple):
    id: int
    fn: str
    args: dict[str, Any] = {}   # never mutated: parse and callers pass their own
    as_sid: bytes | None = None
    as_ip: str | None = None


class Cancel(NamedTuple):
    id: int


class Ping(NamedTuple):
    id: int


class Pong(NamedTuple):
    id: int


class Result(NamedTuple):
    id: int
    value: Any


class Chunk(NamedTuple):
    id: int
    data: Any


class Error(NamedTuple):
    """A call ended with an error; the connection stays open."""

    id: int
    code: str
    message: str = ""


class Event(NamedTuple):
    topic: str
    payload: Any
    dropped: int = 0


_tuple_eq: Callable[[Any, object], bool] = tuple.__eq__
_tuple_hash: Callable[[Any], int] = tuple.__hash__


def _strict_eq(self: Any, other: object) -> bool:
    return type(self) is type(other) and _tuple_eq(self, other)


def _strict_ne(self: Any, other: object) -> bool:
    return not _strict_eq(self, other)


def _strict_hash(self: Any) -> int:
    return hash((type(self).__name__, _tuple_hash(self)))


for _cls in (Call, Cancel, Ping, Pong, Result, Chunk, Error, Event):
    _cls.__eq__ = _strict_eq  # type: ignore[method-assign]
    _cls.__ne__ = _strict_ne  # type: ignore[method-assign]
    _cls.__hash__ = _strict_hash  # type: ignore[method-assign]
del _cls


@dataclass(frozen=True, slots=True)
class Bye:
    """The sender closes the connection, saying why."""

    code: str
    message: str = ""


Message = (
    Hello | Login | Challenge | Proof | Otp | OtpCode | Resume | Welcome | Call | Cancel | Ping
    | Pong | Result | Chunk | Error | Event | Bye
)


# -- field checkers -----------------------------------------------------
_new_tuple = tuple.__new__   # builds a named tuple without its keyword-handling __new__


def _bad(what: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"bad or missing field {what}")


def _str(raw: dict[str, Any], key: str, limit: int = MAX_NAME, optional: bool = False) -> Any:
    v = raw.get(key)
    if v is None and optional:
        return None
    if type(v) is not str or len(v) > limit:
        raise _bad(key)
    return v


def _login_name(raw: dict[str, Any]) -> Any:
    """A login name: ≤ MAX_NAME characters and no NUL (no database text can
    hold one), refused here, before any lookup."""
    v = _str(raw, "login")
    if "\0" in v:
        raise _bad("login")
    return v


def _bin(raw: dict[str, Any], key: str, size: int, optional: bool = False) -> Any:
    v = raw.get(key)
    if v is None and optional:
        return None
    if type(v) is not bytes or len(v) != size:
        raise _bad(key)
    return v


def _int(raw: dict[str, Any], key: str, lo: int = 0, hi: int = MAX_CALL_ID, default: int | None = None) -> int:
    v = raw.get(key, default)
    if type(v) is not int or not lo <= v <= hi:
        raise _bad(key)
    return v


def parse_call(raw: dict[str, Any]) -> Call:
    """``parse`` for a map whose ``t`` is ``"call"``: the server's hot path, checks inline."""
    call_id = raw.get("id")
    fn = raw.get("fn")
    args = raw.get("args", {})
    if type(call_id) is not int or not 0 <= call_id <= MAX_CALL_ID:
        raise _bad("id")
    if type(fn) is not str or len(fn) > MAX_NAME:
        raise _bad("fn")
    if type(args) is not dict:
        raise _bad("args")
    if "as" in raw or "ip" in raw:
        return Call(call_id, fn, args, _bin(raw, "as", _SID, True), _str(raw, "ip", 64, True))
    return _new_tuple(Call, (call_id, fn, args, None, None))


def _parse_hello(raw: dict[str, Any]) -> Hello:
    proto = raw.get("proto")
    if type(proto) is not list or not 0 < len(proto) <= 16 or any(type(p) is not int for p in proto):
        raise _bad("proto")
    return Hello(_bin(raw, "nonce", _NONCE), tuple(proto), _str(raw, "server"), _int(raw, "max_frame", 1024, 1 << 31))


def _parse_challenge(raw: dict[str, Any]) -> Challenge:
    salt = raw.get("salt")
    if type(salt) is not bytes or not 8 <= len(salt) <= 64:
        raise _bad("salt")
    return Challenge(salt, _int(raw, "iter", 1, 1 << 31))


_PARSERS: dict[str, Any] = {
    "call": parse_call,
    "result": lambda raw: Result(_int(raw, "id"), raw.get("value")),
    "error": lambda raw: Error(_int(raw, "id"), _str(raw, "code"), _str(raw, "msg", MAX_TEXT, True) or ""),
    "chunk": lambda raw: Chunk(_int(raw, "id"), raw.get("data")),
    "cancel": lambda raw: Cancel(_int(raw, "id")),
    "ping": lambda raw: Ping(_int(raw, "id")),
    "pong": lambda raw: Pong(_int(raw, "id")),
    "event": lambda raw: Event(_str(raw, "topic"), raw.get("payload"), _int(raw, "dropped", default=0)),
    "hello": _parse_hello,
    "login": lambda raw: Login(_str(raw, "kind"), _login_name(raw), _bin(raw, "cnonce", _NONCE),
                               _int(raw, "proto", 0, 1 << 16)),
    "challenge": _parse_challenge,
    "proof": lambda raw: Proof(_bin(raw, "proof", _MAC)),
    "otp": lambda raw: Otp(_bin(raw, "sig", _MAC)),
    "otp_code": lambda raw: OtpCode(_str(raw, "code", MAX_CODE)),
    "resume": lambda raw: Resume(_bin(raw, "sid", _SID), _bin(raw, "cnonce", _NONCE), _bin(raw, "proof", _MAC),
                                 _int(raw, "proto", 0, 1 << 16)),
    "welcome": lambda raw: Welcome(
        _bin(raw, "sid", _SID), _bin(raw, "sig", _MAC), _str(raw, "kind"), _str(raw, "login"),
        _int(raw, "timeout"), _int(raw, "proto", 0, 1 << 16),
    ),
    "bye": lambda raw: Bye(_str(raw, "code"), _str(raw, "msg", MAX_TEXT, True) or ""),
}


def parse(raw: dict[str, Any]) -> Message:
    """A decoded frame map → a message; ``RemoteProtocolError`` if malformed."""
    parser = _PARSERS.get(raw.get("t"))  # type: ignore[arg-type]
    if parser is None:
        raise RemoteProtocolError(f"unknown message type {str(raw.get('t'))[:40]!r}")
    return parser(raw)  # type: ignore[no-any-return]


def to_wire(msg: Message) -> dict[str, Any]:
    """A message → the map that goes in a frame."""
    match msg:
        case Result(id, value):
            return {"t": "result", "id": id, "value": value}
        case Call(id, fn, args, as_sid, as_ip):
            raw: dict[str, Any] = {"t": "call", "id": id, "fn": fn, "args": args}
            if as_sid is not None:
                raw["as"] = as_sid
                raw["ip"] = as_ip
            return raw
        case Error(id, code, message):
            return {"t": "error", "id": id, "code": code, "msg": message}
        case Chunk(id, data):
            return {"t": "chunk", "id": id, "data": data}
        case Event(topic, payload, dropped):
            return {"t": "event", "topic": topic, "payload": payload, "dropped": dropped}
        case Cancel(id):
            return {"t": "cancel", "id": id}
        case Ping(id):
            return {"t": "ping", "id": id}
        case Pong(id):
            return {"t": "pong", "id": id}
        case Hello(nonce, proto, server, max_frame):
            return {"t": "hello", "proto": list(proto), "nonce": nonce, "server": server, "max_frame": max_frame}
        case Login(kind, login, cnonce, proto):
            return {"t": "login", "proto": proto, "kind": kind, "login": login, "cnonce": cnonce}
        case Challenge(salt, iterations):
            return {"t": "challenge", "salt": salt, "iter": iterations}
        case Proof(proof):
            return {"t": "proof", "proof": proof}
        case Otp(signature):
            return {"t": "otp", "sig": signature}
        case OtpCode(code):
            return {"t": "otp_code", "code": code}
        case Resume(sid, cnonce, proof, proto):
            return {"t": "resume", "proto": proto, "sid": sid, "cnonce": cnonce, "proof": proof}
        case Welcome(sid, signature, kind, login, timeout, proto):
            return {
                "t": "welcome", "proto": proto, "sid": sid, "sig": signature,
                "kind": kind, "login": login, "timeout": timeout,
            }
        case Bye(code, message):
            return {"t": "bye", "code": code, "msg": message}
    raise TypeError(f"not a URFA message: {msg!r}")
