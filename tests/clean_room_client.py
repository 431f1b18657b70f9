"""A minimal URFA client written from docs/protocol.md alone.

Clean room: it imports nothing from ``urfa`` or ``billcore`` (only the
standard library and ``msgpack``), and was written without reading the
reference implementation.  ``tests/test_protocol_doc.py`` runs it against a
real core to prove that the document is enough to write a client.

Blocking sockets, one connection, one call at a time from the caller's point
of view (but replies are matched by id, events are queued aside).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import socket
import struct
import unicodedata
from dataclasses import dataclass, field
from typing import Any

import msgpack

PROTO = 1
MAX_ITER = 10_000_000  # §6.1: a client should refuse more
DEFAULT_MAX_FRAME = 1_048_576


class UrfaError(Exception):
    """An ``error`` reply to a call (§4, §10): the connection stays open."""

    def __init__(self, code: str, msg: str) -> None:
        super().__init__(f"{code}: {msg}")
        self.code = code
        self.msg = msg


class Bye(Exception):
    """The peer sent ``bye`` (or just closed): the connection is over."""

    def __init__(self, code: str, msg: str) -> None:
        super().__init__(f"bye {code}: {msg}")
        self.code = code
        self.msg = msg


class ServerNotAuthentic(Exception):
    """``welcome.sig`` did not match our ServerSignature (§6.1)."""


# --- SCRAM-SHA-256 (§6.1), pure functions ---------------------------------

def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def scram_user(kind: str, login: str) -> str:
    return f"{kind}:{login}".replace("=", "=3D").replace(",", "=2C")


def salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    pw = unicodedata.normalize("NFKC", password).encode("utf-8")
    return hashlib.pbkdf2_hmac("sha256", pw, salt, iterations)


def hmac256(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def auth_message(kind: str, login: str, cnonce: bytes, snonce: bytes,
                 salt: bytes, iterations: int) -> bytes:
    c = b64(cnonce)
    r = c + b64(snonce)
    text = (f"n={scram_user(kind, login)},r={c},"
            f"r={r},s={b64(salt)},i={iterations},"
            f"c=biws,r={r}")
    return text.encode("utf-8")


@dataclass
class Scram:
    """Everything a client derives for one login attempt."""

    salted: bytes
    client_key: bytes
    stored_key: bytes
    server_key: bytes
    auth_message: bytes
    proof: bytes
    server_signature: bytes

    @property
    def resume_key(self) -> bytes:  # §6.3
        return hmac256(self.client_key, b"URFA resume key\0" + self.auth_message)


def scram(kind: str, login: str, password: str, cnonce: bytes, snonce: bytes,
          salt: bytes, iterations: int) -> Scram:
    am = auth_message(kind, login, cnonce, snonce, salt, iterations)
    return scram_for(password, salt, iterations, am)


def scram_for(password: str, salt: bytes, iterations: int, am: bytes) -> Scram:
    """The SCRAM computations for a given AuthMessage (also RFC 7677's)."""
    salted = salted_password(password, salt, iterations)
    client_key = hmac256(salted, b"Client Key")
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac256(salted, b"Server Key")
    client_sig = hmac256(stored_key, am)
    proof = bytes(a ^ b for a, b in zip(client_key, client_sig))
    return Scram(salted, client_key, stored_key, server_key, am, proof,
                 hmac256(server_key, am))


def resume_proof(resume_key: bytes, snonce: bytes, cnonce: bytes, sid: bytes) -> bytes:
    return hmac256(resume_key, b"URFA resume client\0" + snonce + cnonce + sid)


def resume_signature(resume_key: bytes, snonce: bytes, cnonce: bytes, sid: bytes) -> bytes:
    return hmac256(resume_key, b"URFA resume server\0" + snonce + cnonce + sid)


def totp(secret: bytes, unix_time: int) -> str:  # §6.5: RFC 6238, SHA-1, 6 digits, 30 s
    mac = hmac.new(secret, struct.pack(">Q", unix_time // 30), hashlib.sha1).digest()
    offset = mac[-1] & 0x0F
    return "%06d" % ((struct.unpack(">I", mac[offset:offset + 4])[0] & 0x7FFFFFFF) % 1_000_000)


# --- frames (§2) -----------------------------------------------------------

def encode(msg: dict[str, Any]) -> bytes:
    body: bytes = msgpack.packb(msg, use_bin_type=True, datetime=True)
    return struct.pack(">I", len(body)) + body


def decode(body: bytes) -> dict[str, Any]:
    # timestamp=3: Timestamp ext (-1) -> aware UTC datetime (§3)
    msg = msgpack.unpackb(body, raw=False, timestamp=3, strict_map_key=True)
    if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
        raise ValueError("frame is not a map with a string 't'")
    return msg


# --- the connection --------------------------------------------------------

@dataclass
class Stream:
    chunks: list[Any] = field(default_factory=list)
    result: Any = None


class Client:
    def __init__(self, host: str = "127.0.0.1", port: int = 11758,
                 timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""
        self.closed = False
        self.next_id = 1
        self.events: list[dict[str, Any]] = []
        self.pending: dict[int, dict[str, Any]] = {}  # replies not yet asked for
        self.hello = self.recv()
        if self.hello["t"] != "hello":
            raise ValueError(f"expected hello, got {self.hello['t']}")
        self.max_frame = int(self.hello.get("max_frame", DEFAULT_MAX_FRAME))
        self.welcome: dict[str, Any] | None = None
        self.scram: Scram | None = None

    # raw I/O
    def send(self, msg: dict[str, Any]) -> None:
        self.sock.sendall(encode(msg))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = self.sock.recv(65536)
            if not data:
                self.closed = True
                raise Bye("closed", "connection closed without bye")
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv(self) -> dict[str, Any]:
        """Next frame; a ``bye`` is raised as :class:`Bye`."""
        (n,) = struct.unpack(">I", self._read_exact(4))
        if n > DEFAULT_MAX_FRAME * 64:
            raise ValueError(f"absurd frame length {n}")
        msg = decode(self._read_exact(n))
        if msg["t"] == "bye":
            self.closed = True
            raise Bye(str(msg.get("code")), str(msg.get("msg", "")))
        return msg

    def close(self) -> None:
        try:
            self.sock.close()
        finally:
            self.closed = True

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # login (§6.1)
    def login(self, kind: str, login: str, password: str,
              cnonce: bytes | None = None, otp: str | None = None) -> dict[str, Any]:
        if PROTO not in self.hello.get("proto", []):
            raise ValueError(f"server speaks {self.hello.get('proto')}, we speak {PROTO}")
        cnonce = cnonce if cnonce is not None else os.urandom(16)
        self.send({"t": "login", "proto": PROTO, "kind": kind, "login": login,
                   "cnonce": cnonce})
        ch = self.recv()
        if ch["t"] != "challenge":
            raise ValueError(f"expected challenge, got {ch['t']}")
        salt, iterations = ch["salt"], ch["iter"]
        if not (isinstance(iterations, int) and 1 <= iterations <= MAX_ITER):
            self.close()
            raise ValueError(f"refusing iteration count {iterations!r}")
        s = scram(kind, login, password, cnonce, self.hello["nonce"], salt, iterations)
        self.send({"t": "proof", "proof": s.proof})
        welcome = self.recv()
        if welcome["t"] == "otp":   # §6.5: the server proves itself before the code goes out
            if not hmac.compare_digest(welcome["sig"], s.server_signature):
                self.close()
                raise ServerNotAuthentic("server signature mismatch")
            if otp is None:
                self.close()
                raise ValueError("this login needs a one-time code")
            self.send({"t": "otp_code", "code": otp})
            welcome = self.recv()
        if welcome["t"] != "welcome":
            raise ValueError(f"expected welcome, got {welcome['t']}")
        if not hmac.compare_digest(welcome["sig"], s.server_signature):
            self.close()
            raise ServerNotAuthentic("server signature mismatch")
        self.welcome, self.scram = welcome, s
        return welcome

    # resume a system session on this (new) connection (§6.3)
    def resume(self, sid: bytes, resume_key: bytes,
               cnonce: bytes | None = None) -> dict[str, Any]:
        cnonce = cnonce if cnonce is not None else os.urandom(16)
        snonce = self.hello["nonce"]
        self.send({"t": "resume", "proto": PROTO, "sid": sid, "cnonce": cnonce,
                   "proof": resume_proof(resume_key, snonce, cnonce, sid)})
        welcome = self.recv()
        if welcome["t"] != "welcome":
            raise ValueError(f"expected welcome, got {welcome['t']}")
        if not hmac.compare_digest(welcome["sig"],
                                   resume_signature(resume_key, snonce, cnonce, sid)):
            self.close()
            raise ServerNotAuthentic("server resume signature mismatch")
        self.welcome = welcome
        return welcome

    # calls (§8)
    def _new_id(self) -> int:
        i = self.next_id
        self.next_id += 1
        return i

    def _reply(self, want: int) -> dict[str, Any]:
        if want in self.pending:
            return self.pending.pop(want)
        while True:
            msg = self.recv()
            if msg["t"] == "event":
                self.events.append(msg)
                continue
            if msg.get("id") == want:
                return msg
            self.pending[msg["id"]] = msg  # a reply to an earlier call

    def start_call(self, fn: str, args: dict[str, Any] | None = None) -> int:
        i = self._new_id()
        self.send({"t": "call", "id": i, "fn": fn, "args": args or {}})
        return i

    def call(self, fn: str, args: dict[str, Any] | None = None) -> Any:
        st = self.stream(fn, args)
        if st.chunks:
            raise ValueError(f"{fn} streamed {len(st.chunks)} chunks; use stream()")
        return st.result

    def stream(self, fn: str, args: dict[str, Any] | None = None) -> Stream:
        i = self.start_call(fn, args)
        out = Stream()
        while True:
            msg = self._reply(i)
            if msg["t"] == "chunk":
                out.chunks.append(msg.get("data"))
            elif msg["t"] == "result":
                out.result = msg.get("value")
                return out
            elif msg["t"] == "error":
                raise UrfaError(str(msg.get("code")), str(msg.get("msg", "")))
            else:
                raise ValueError(f"unexpected {msg['t']} for call {i}")

    def ping(self) -> None:
        i = self._new_id()
        self.send({"t": "ping", "id": i})
        msg = self._reply(i)
        if msg["t"] != "pong":
            raise ValueError(f"expected pong, got {msg['t']}")

    def logout(self) -> str:
        """Call ``session.logout``; returns the code of the bye that follows."""
        assert self.call("session.logout") is True
        try:
            while True:
                msg = self.recv()
                if msg["t"] == "event":
                    continue
        except Bye as bye:
            return bye.code
