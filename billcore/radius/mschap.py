"""MS-CHAPv2 (RFC 2759) and its MPPE keys (RFC 3079), as pure functions.

Theory of operation
-------------------
A peer proves it knows the password by answering the authenticator's
16-octet challenge (MS-CHAP-Challenge) with an NT-Response: the 8-octet
``challenge_hash`` of (peer challenge, authenticator challenge, user name)
DES-encrypted under three 7-octet slices of ``nt_password_hash`` (MD4 of the
UTF-16LE password, zero-padded to 21 octets).  The core, which keeps the
cleartext encrypted at rest, recomputes the NT-Response and compares
(``hmac.compare_digest``).  On success it proves *itself* back with the
authenticator response (``"S=" + 40 hex``), and derives the MPPE keys the NAS
encrypts the link with: the master key from the password hash hash and the
NT-Response, then the two 128-bit start keys (RFC 3079 s.3.3/3.4), send and
receive from the server's (the NAS's) side, as RFC 2548 MS-MPPE-Send-Key and
MS-MPPE-Recv-Key mean them.

MD4 and DES come from pycryptodome (hashlib's MD4 is absent where OpenSSL 3
disabled its legacy provider); SHA-1 from hashlib.  No I/O, no state.

The user name that enters the challenge hash is the name the peer typed,
without a Windows domain: "DOMAIN\\user" hashes as "user" (RFC 2759 s.8.2).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from dataclasses import dataclass
from typing import Any, Final

from Crypto.Cipher import DES
from Crypto.Hash import MD4

__all__ = [
    "RESPONSE_LENGTH", "CHALLENGE_LENGTH", "MschapResponse", "parse_response", "nt_password_hash",
    "hash_nt_password_hash", "challenge_hash", "challenge_response", "generate_nt_response",
    "generate_authenticator_response", "check_nt_response", "master_key", "asymmetric_start_key",
    "server_mppe_keys", "hash_user_name", "PasswordKey", "password_key",
]

CHALLENGE_LENGTH: Final = 16   # MS-CHAP-Challenge (RFC 2548 s.2.3.2)
KEY_CACHE: Final = 16384  # passwords whose MS-CHAPv2 keys are kept (LRU)
RESPONSE_LENGTH: Final = 50    # MS-CHAP2-Response: Ident Flags Peer-Challenge(16) Reserved(8) NT-Response(24)

# RFC 2759 s.8.7
_MAGIC1: Final = b"Magic server to client signing constant"
_MAGIC2: Final = b"Pad to make it do more than one iteration"
# RFC 3079 s.3.3 / s.3.4
_MASTER_MAGIC: Final = b"This is the MPPE Master Key"
_CLIENT_SEND_MAGIC: Final = (b"On the client side, this is the send key; "
                             b"on the server side, it is the receive key.")
_SERVER_SEND_MAGIC: Final = (b"On the client side, this is the receive key; "
                             b"on the server side, it is the send key.")
_SHS_PAD1: Final = b"\x00" * 40
_SHS_PAD2: Final = b"\xf2" * 40


@dataclass(frozen=True, slots=True)
class MschapResponse:
    """An MS-CHAP2-Response value split into its fields (RFC 2548 s.2.3.2)."""

    ident: int
    flags: int
    peer_challenge: bytes   # 16 octets
    nt_response: bytes      # 24 octets


def parse_response(value: bytes) -> MschapResponse:
    """Split a 50-octet MS-CHAP2-Response; ``ValueError`` for another length."""
    if len(value) != RESPONSE_LENGTH:
        raise ValueError(f"MS-CHAP2-Response of {len(value)} octets is not {RESPONSE_LENGTH}")
    return MschapResponse(value[0], value[1], value[2:18], value[26:50])


def hash_user_name(user_name: bytes) -> bytes:
    """The part of a user name that enters the challenge hash: after the last backslash."""
    return user_name.rsplit(b"\\", 1)[-1]


def nt_password_hash(password: bytes) -> bytes:
    """NtPasswordHash (RFC 2759 s.8.3): MD4 of the password as UTF-16LE.
    ``password`` is UTF-8 (as billcore stores it); an invalid sequence is
    hashed as its replacement characters, never refused here."""
    return MD4.new(password.decode("utf-8", "replace").encode("utf-16-le")).digest()


def hash_nt_password_hash(password_hash: bytes) -> bytes:
    """HashNtPasswordHash (RFC 2759 s.8.4)."""
    return MD4.new(password_hash).digest()


def challenge_hash(peer_challenge: bytes, authenticator_challenge: bytes, user_name: bytes) -> bytes:
    """ChallengeHash (RFC 2759 s.8.2): the first 8 octets of SHA-1."""
    return hashlib.sha1(peer_challenge + authenticator_challenge + hash_user_name(user_name)).digest()[:8]


def _des_key(seven: bytes) -> bytes:
    """56 key bits spread over 8 octets, 7 bits each (the low bit, parity, is ignored by DES)."""
    bits = int.from_bytes(seven, "big")
    return bytes(((bits >> (49 - 7 * i)) & 0x7F) << 1 for i in range(8))


def challenge_response(challenge: bytes, password_hash: bytes) -> bytes:
    """ChallengeResponse (RFC 2759 s.8.5): the 8-octet challenge DES-encrypted
    under each 7-octet third of the zero-padded 21-octet password hash."""
    return _encrypt_thrice(_des_ciphers(password_hash), challenge)


def _des_ciphers(password_hash: bytes) -> tuple[Any, Any, Any]:
    padded = password_hash.ljust(21, b"\x00")
    first, second, third = (DES.new(_des_key(padded[i:i + 7]), DES.MODE_ECB) for i in (0, 7, 14))
    return first, second, third


def _encrypt_thrice(ciphers: tuple[Any, Any, Any], challenge: bytes) -> bytes:
    return b"".join(cipher.encrypt(challenge) for cipher in ciphers)


@dataclass(frozen=True, slots=True)
class PasswordKey:
    """What one password contributes to every MS-CHAPv2 exchange: its hash, the
    hash of that, and the three DES keys (ECB objects keep no state between blocks)."""

    hash_hash: bytes
    ciphers: tuple[Any, Any, Any]


@functools.lru_cache(maxsize=KEY_CACHE)
def password_key(password: bytes) -> PasswordKey:
    """The password's ``PasswordKey``, kept for the next request of the same login.
    Creating the DES objects and the MD4s is most of an exchange's cost (~40 of
    ~65 µs); the core already keeps opened passwords (``OpenedSecrets``), so this
    keeps nothing the process does not hold anyway."""
    password_hash = nt_password_hash(password)
    return PasswordKey(hash_nt_password_hash(password_hash), _des_ciphers(password_hash))


def generate_nt_response(authenticator_challenge: bytes, peer_challenge: bytes, user_name: bytes,
                         password: bytes) -> bytes:
    """GenerateNTResponse (RFC 2759 s.8.1): the 24-octet NT-Response."""
    return _encrypt_thrice(password_key(password).ciphers,
                           challenge_hash(peer_challenge, authenticator_challenge, user_name))


def generate_authenticator_response(password: bytes, nt_response: bytes, peer_challenge: bytes,
                                    authenticator_challenge: bytes, user_name: bytes) -> bytes:
    """GenerateAuthenticatorResponse (RFC 2759 s.8.7): b"S=" + 40 upper-case hex digits."""
    digest = hashlib.sha1(password_key(password).hash_hash + nt_response + _MAGIC1).digest()
    challenge = challenge_hash(peer_challenge, authenticator_challenge, user_name)
    return b"S=" + hashlib.sha1(digest + challenge + _MAGIC2).hexdigest().upper().encode()


def check_nt_response(authenticator_challenge: bytes, response: MschapResponse, user_name: bytes,
                      password: bytes) -> bool:
    """Does the peer's NT-Response prove ``password``?  Constant-time comparison."""
    expected = generate_nt_response(authenticator_challenge, response.peer_challenge, user_name, password)
    return hmac.compare_digest(expected, response.nt_response)


def master_key(password_hash_hash: bytes, nt_response: bytes) -> bytes:
    """GetMasterKey (RFC 3079 s.3.4): 16 octets."""
    return hashlib.sha1(password_hash_hash + nt_response + _MASTER_MAGIC).digest()[:16]


def asymmetric_start_key(master: bytes, length: int, is_send: bool, is_server: bool) -> bytes:
    """GetAsymmetricStartKey (RFC 3079 s.3.4): ``length`` octets (8 or 16)."""
    if not 1 <= length <= 20:
        raise ValueError("a start key is 1..20 octets")
    magic = _SERVER_SEND_MAGIC if is_send == is_server else _CLIENT_SEND_MAGIC
    return hashlib.sha1(master + _SHS_PAD1 + magic + _SHS_PAD2).digest()[:length]


def server_mppe_keys(password: bytes, nt_response: bytes) -> tuple[bytes, bytes]:
    """The 128-bit (send, receive) MPPE master keys of the server side: what
    RFC 2548 MS-MPPE-Send-Key (NAS → peer) and MS-MPPE-Recv-Key (peer → NAS) carry."""
    master = master_key(password_key(password).hash_hash, nt_response)
    return (asymmetric_start_key(master, 16, is_send=True, is_server=True),
            asymmetric_start_key(master, 16, is_send=False, is_server=True))
