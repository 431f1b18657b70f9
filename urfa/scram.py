"""SCRAM-SHA-256 login math (RFC 5802 / RFC 7677), pure functions.

Theory of operation
-------------------
The password never crosses the wire and the server never stores it.  The
server keeps a ``Verifier``: salt, iteration count, StoredKey and ServerKey.

    SaltedPassword  = PBKDF2-HMAC-SHA256(password, salt, iterations)
    ClientKey       = HMAC(SaltedPassword, "Client Key")
    StoredKey       = SHA256(ClientKey)
    ServerKey       = HMAC(SaltedPassword, "Server Key")
    AuthMessage     = client-first-bare "," server-first "," client-final-without-proof
    ClientSignature = HMAC(StoredKey, AuthMessage)
    ClientProof     = ClientKey XOR ClientSignature
    ServerSignature = HMAC(ServerKey, AuthMessage)

URFA carries the SCRAM fields inside msgpack frames but builds AuthMessage
exactly as RFC 5802 text, so the math can be checked against RFC 7677's test
vector.  The SCRAM username is ``kind ":" login`` (escaped as a saslname),
which binds the login kind into the proof; nonces are 16 random bytes each,
written in AuthMessage as standard base64.  There is no channel binding
(``c=biws``); TLS protects the channel.

A verified proof gives the server the ClientKey, from which both sides
derive a *resume key* for system sessions; a stolen verifier (StoredKey)
cannot derive it.  Unknown logins get a deterministic *fake* verifier from
a server secret so the exchange looks the same as for real ones.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import unicodedata
from dataclasses import dataclass

__all__ = [
    "DEFAULT_ITERATIONS",
    "MIN_ITERATIONS",
    "MAX_ITERATIONS",
    "NONCE_BYTES",
    "ClientKeys",
    "Verifier",
    "make_verifier",
    "fake_verifier",
    "salted_password",
    "client_keys",
    "scram_username",
    "auth_message",
    "auth_message_text",
    "client_proof",
    "server_signature",
    "recover_client_key",
    "resume_key",
    "resume_proof",
    "resume_signature",
]

DEFAULT_ITERATIONS = 100_000
MIN_ITERATIONS = 4096          # RFC 7677's floor
MAX_ITERATIONS = 10_000_000    # a client refuses to burn more CPU than this
NONCE_BYTES = 16
SALT_BYTES = 16


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def normalize_password(password: str) -> bytes:
    """NFKC + UTF-8: the part of SASLprep that matters for real passwords."""
    return unicodedata.normalize("NFKC", password).encode("utf-8")


@dataclass(frozen=True, slots=True)
class Verifier:
    """What the server stores for a login: nothing that logs in by itself."""

    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes

    def to_text(self) -> str:
        """``SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`` (base64),
        the same layout PostgreSQL uses for its SCRAM secrets."""
        return (
            f"SCRAM-SHA-256${self.iterations}:{_b64(self.salt)}"
            f"${_b64(self.stored_key)}:{_b64(self.server_key)}"
        )

    @classmethod
    def from_text(cls, text: str) -> Verifier:
        try:
            scheme, iter_salt, keys = text.split("$")
            iterations, salt = iter_salt.split(":")
            stored, server = keys.split(":")
            if scheme != "SCRAM-SHA-256":
                raise ValueError(scheme)
            return cls(
                base64.b64decode(salt, validate=True),
                int(iterations),
                base64.b64decode(stored, validate=True),
                base64.b64decode(server, validate=True),
            )
        except ValueError as exc:
            raise ValueError(f"not a SCRAM-SHA-256 verifier: {exc}") from None


@dataclass(frozen=True, slots=True)
class ClientKeys:
    """What a client derives from the password (and may cache instead of it)."""

    client_key: bytes
    stored_key: bytes
    server_key: bytes


def salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", normalize_password(password), salt, iterations)


def client_keys(password: str, salt: bytes, iterations: int) -> ClientKeys:
    sp = salted_password(password, salt, iterations)
    ck = _hmac(sp, b"Client Key")
    return ClientKeys(ck, hashlib.sha256(ck).digest(), _hmac(sp, b"Server Key"))


def make_verifier(password: str, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS) -> Verifier:
    """The record the core stores for a login."""
    if iterations < 1:
        raise ValueError("iterations must be positive")
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    keys = client_keys(password, salt, iterations)
    return Verifier(salt, iterations, keys.stored_key, keys.server_key)


def fake_verifier(secret: bytes, username: str, iterations: int = DEFAULT_ITERATIONS) -> Verifier:
    """A stable verifier for a login that does not exist.

    Derived from a server secret so repeated attempts see the same salt, as
    they would for a real login; no password matches it (its keys are not
    related through SHA-256 as real ones are).
    """
    user = username.encode("utf-8")
    return Verifier(
        _hmac(secret, b"urfa fake salt\x00" + user)[:SALT_BYTES],
        iterations,
        _hmac(secret, b"urfa fake stored\x00" + user),
        _hmac(secret, b"urfa fake server\x00" + user),
    )


def scram_username(kind: str, login: str) -> str:
    """``kind:login`` escaped as an RFC 5802 saslname."""
    return f"{kind}:{login}".replace("=", "=3D").replace(",", "=2C")


def auth_message_text(username: str, client_nonce: str, nonce: str, salt: bytes, iterations: int) -> bytes:
    """RFC 5802 AuthMessage from its textual parts (``nonce`` = combined)."""
    return (
        f"n={username},r={client_nonce},"
        f"r={nonce},s={_b64(salt)},i={iterations},"
        f"c=biws,r={nonce}"
    ).encode("utf-8")


def auth_message(kind: str, login: str, cnonce: bytes, snonce: bytes, salt: bytes, iterations: int) -> bytes:
    """URFA's AuthMessage: binary nonces written as base64."""
    c = _b64(cnonce)
    return auth_message_text(scram_username(kind, login), c, c + _b64(snonce), salt, iterations)


def client_proof(keys: ClientKeys, auth_msg: bytes) -> bytes:
    return _xor(keys.client_key, _hmac(keys.stored_key, auth_msg))


def server_signature(server_key: bytes, auth_msg: bytes) -> bytes:
    return _hmac(server_key, auth_msg)


def recover_client_key(verifier: Verifier, auth_msg: bytes, proof: bytes) -> bytes | None:
    """The ClientKey if ``proof`` is right for ``verifier``, else ``None``.

    Always does the same work, whatever the outcome.
    """
    signature = _hmac(verifier.stored_key, auth_msg)
    if len(proof) != len(signature):
        proof = bytes(len(signature))
    ck = _xor(proof, signature)
    ok = hmac.compare_digest(hashlib.sha256(ck).digest(), verifier.stored_key)
    return ck if ok else None


def resume_key(client_key: bytes, auth_msg: bytes) -> bytes:
    """Per-session secret both ends know after a login; only system sessions keep it."""
    return _hmac(client_key, b"URFA resume key\x00" + auth_msg)


def resume_proof(rkey: bytes, snonce: bytes, cnonce: bytes, sid: bytes) -> bytes:
    return _hmac(rkey, b"URFA resume client\x00" + snonce + cnonce + sid)


def resume_signature(rkey: bytes, snonce: bytes, cnonce: bytes, sid: bytes) -> bytes:
    return _hmac(rkey, b"URFA resume server\x00" + snonce + cnonce + sid)
