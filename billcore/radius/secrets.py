"""Recoverable secrets: NAS shared secrets and service passwords.

RADIUS needs the cleartext back (a PAP compare, a CHAP hash, the radius
process's shared secrets), so these are sealed with a key, not hashed: a
pynacl ``SecretBox`` whose 32-byte key lives in a 0600 file outside the
database (``core.secret_key_file``), so a database dump alone opens nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import nacl.exceptions
import nacl.secret
import nacl.utils

from billcore.common.config import Config

__all__ = ["SecretStore"]


class SecretStore:
    """Encrypts recoverable secrets with a key kept in a 0600 file."""

    def __init__(self, key: bytes) -> None:
        self._box = nacl.secret.SecretBox(key)

    @classmethod
    def from_config(cls, config: Config) -> SecretStore:
        return cls(cls.load_or_create_key(config.secret_key_path))

    @staticmethod
    def load_or_create_key(path: Path) -> bytes:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            key = path.read_bytes()
            if len(key) != nacl.secret.SecretBox.KEY_SIZE:
                raise ValueError(f"{path}: a secret key file holds exactly 32 bytes") from None
            return key
        key = nacl.utils.random(nacl.secret.SecretBox.KEY_SIZE)
        try:
            os.write(fd, key)
            os.fsync(fd)
        finally:
            os.close(fd)
        return key

    def seal(self, secret: bytes) -> bytes:
        return bytes(self._box.encrypt(secret))

    def open(self, sealed: bytes) -> bytes:
        try:
            return bytes(self._box.decrypt(bytes(sealed)))
        except nacl.exceptions.CryptoError as exc:
            raise ValueError("a stored secret does not open with this key (wrong core.secret_key_file?)") from exc
