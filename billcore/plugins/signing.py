"""Plugin licences: detached Ed25519 signatures over every byte of a plugin.

Theory of operation
-------------------
The *files digest* is SHA-256 over a domain tag and a canonical listing of
every file but the licence, sorted by path, each as
``len(path) ‖ path ‖ len(body) ‖ body`` (lengths as 8-byte big-endian), so no
two different file sets share a listing: any changed, added, removed or
renamed byte changes the digest.

The *licence* (``licence.msgpack``) binds that digest to its terms — plugin
name and version, optional ``not_before``/``not_after`` (unix seconds) and an
optional installation id — and the signer's key id.  The Ed25519 signature
covers a second domain tag and the msgpack encoding of all of those, so the
terms cannot be edited (an expiry pushed back) without the private key.

Trust is a directory of public keys, one ``*.pub`` file per key, each
holding the 64-hex-digit key (``#`` comments allowed).  A key's id is derived from the
key itself (``ed25519:`` + 16 hex digits of its SHA-256), never taken from a
file name.  ``verify_bundle`` checks, in this order, and refuses with its own
error class: licence present, key known, signature valid, files unchanged,
licence in its validity window, installation id.  No plugin code runs here.
"""

from __future__ import annotations

import hashlib
import datetime as dt
import hmac
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack  # type: ignore[import-untyped]
import nacl.exceptions
import nacl.signing

from billcore.plugins.bundle import LICENCE_FILE, PluginBundle
from billcore.plugins.errors import (
    BadSignature,
    LicenceExpired,
    LicenceNotYetValid,
    PluginError,
    UnknownKey,
    UnsignedPlugin,
    WrongInstallation,
)

__all__ = [
    "Licence",
    "Keyring",
    "files_digest",
    "key_id_of",
    "sign_files",
    "utc_text",
    "verify_bundle",
    "generate_keypair",
    "load_signing_key",
]

FILES_DOMAIN = b"billcore-plugin-v1\0files\0"
LICENCE_DOMAIN = b"billcore-plugin-v1\0licence\0"
LICENCE_FORMAT = 1
MAX_LICENCE_BYTES = 4096
MAX_KEYS = 1000


def files_digest(files: Mapping[str, bytes]) -> bytes:
    h = hashlib.sha256(FILES_DOMAIN)
    h.update(struct.pack(">Q", len(files)))
    for path in sorted(files):
        name = path.encode("utf-8")
        body = files[path]
        h.update(struct.pack(">Q", len(name)))
        h.update(name)
        h.update(struct.pack(">Q", len(body)))
        h.update(body)
    return h.digest()


def key_id_of(verify_key: nacl.signing.VerifyKey) -> str:
    return "ed25519:" + hashlib.sha256(bytes(verify_key)).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Licence:
    plugin: str
    version: str
    key_id: str
    digest: bytes
    not_before: int | None = None
    not_after: int | None = None
    installation_id: str | None = None
    signature: bytes = b""

    def signed_message(self) -> bytes:
        terms = [LICENCE_FORMAT, self.plugin, self.version, self.key_id, self.digest,
                 self.not_before, self.not_after, self.installation_id]
        return LICENCE_DOMAIN + bytes(msgpack.packb(terms, use_bin_type=True))

    def to_bytes(self) -> bytes:
        return bytes(msgpack.packb({
            "format": LICENCE_FORMAT, "plugin": self.plugin, "version": self.version,
            "key_id": self.key_id, "digest": self.digest, "not_before": self.not_before,
            "not_after": self.not_after, "installation_id": self.installation_id,
            "signature": self.signature,
        }, use_bin_type=True))

    @classmethod
    def from_bytes(cls, data: bytes) -> Licence:
        if len(data) > MAX_LICENCE_BYTES:
            raise BadSignature("licence file is too large")
        try:
            doc = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=256,
                                  max_str_len=1024, max_array_len=16, max_map_len=16)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
            raise BadSignature(f"licence file is not valid msgpack: {e}") from e
        if not isinstance(doc, dict) or doc.get("format") != LICENCE_FORMAT:
            raise BadSignature("licence file has an unknown format")

        def field(key: str, kind: type | tuple[type, ...], optional: bool = False) -> Any:
            value = doc.get(key)
            if value is None and optional:
                return None
            if not isinstance(value, kind) or isinstance(value, bool):
                raise BadSignature(f"licence field {key!r} is missing or of the wrong type")
            return value

        return cls(
            plugin=field("plugin", str), version=field("version", str),
            key_id=field("key_id", str), digest=field("digest", bytes),
            not_before=field("not_before", int, True), not_after=field("not_after", int, True),
            installation_id=field("installation_id", str, True),
            signature=field("signature", bytes),
        )

    def validity(self) -> dict[str, Any]:
        return {"not_before": self.not_before, "not_after": self.not_after,
                "installation_id": self.installation_id}


def sign_files(files: Mapping[str, bytes], key: nacl.signing.SigningKey, *, plugin: str,
               version: str, not_before: int | None = None, not_after: int | None = None,
               installation_id: str | None = None) -> Licence:
    """Sign a plugin's files (the licence file itself excluded by the caller)."""
    if LICENCE_FILE in files:
        raise PluginError("the licence file cannot sign itself")
    unsigned = Licence(plugin, version, key_id_of(key.verify_key), files_digest(files),
                       not_before, not_after, installation_id)
    signature = key.sign(unsigned.signed_message()).signature
    return Licence(**{**_as_dict(unsigned), "signature": signature})


def _as_dict(lic: Licence) -> dict[str, Any]:
    return {f: getattr(lic, f) for f in Licence.__slots__}


class Keyring:
    """The trusted public keys: key id → verify key."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Mapping[str, nacl.signing.VerifyKey]) -> None:
        self._keys = dict(keys)

    @classmethod
    def from_dir(cls, keydir: str | os.PathLike[str]) -> Keyring:
        keys: dict[str, nacl.signing.VerifyKey] = {}
        root = Path(keydir)
        if not root.is_dir():
            raise PluginError(f"plugin key directory {root} does not exist")
        for path in sorted(root.iterdir()):
            if not path.is_file() or path.name.startswith(".") or path.suffix != ".pub":
                continue
            if len(keys) >= MAX_KEYS:
                raise PluginError(f"more than {MAX_KEYS} keys in {root}")
            key = parse_public_key(path.read_bytes(), str(path))
            keys[key_id_of(key)] = key
        return cls(keys)

    def get(self, key_id: str) -> nacl.signing.VerifyKey | None:
        return self._keys.get(key_id)

    def ids(self) -> list[str]:
        return sorted(self._keys)


def _key_bytes(data: bytes) -> bytes:
    """The 32 bytes of a key file: one line of 64 hex digits (``#`` comments
    and blank lines allowed); ``b""`` when the file is not that."""
    words = [w for w in (ln.split(b"#", 1)[0].strip() for ln in data.splitlines()) if w]
    try:
        raw = bytes.fromhex(words[0].decode("ascii")) if len(words) == 1 else b""
    except (ValueError, UnicodeDecodeError):
        return b""
    return raw if len(raw) == 32 else b""


def parse_public_key(data: bytes, where: str = "public key") -> nacl.signing.VerifyKey:
    raw = _key_bytes(data)
    if not raw:
        raise PluginError(f"{where}: expected one line of 64 hex digits (an Ed25519 public key)")
    return nacl.signing.VerifyKey(raw)


def utc_text(seconds: float | None) -> str:
    """Unix seconds as a person reads them: ``2027-01-01T00:00:00Z`` ("-" for none)."""
    if seconds is None:
        return "-"
    try:
        return dt.datetime.fromtimestamp(int(seconds), dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):   # beyond year 9999: still say something true
        return f"{int(seconds)} (unix seconds)"


def verify_bundle(bundle: PluginBundle, keyring: Keyring, now: float,
                  installation_id: str | None) -> Licence:
    """Check the licence of ``bundle``; return it, or raise why it is refused."""
    raw = bundle.licence
    if raw is None:
        raise UnsignedPlugin(f"{bundle.source}: no {LICENCE_FILE}; the plugin is not signed")
    lic = Licence.from_bytes(raw)
    key = keyring.get(lic.key_id)
    if key is None:
        raise UnknownKey(f"{bundle.source}: signed by {lic.key_id}, which is not a trusted key")
    try:
        key.verify(lic.signed_message(), lic.signature)
    except (nacl.exceptions.BadSignatureError, ValueError, TypeError) as e:
        raise BadSignature(f"{bundle.source}: the licence signature does not verify") from e
    if not hmac.compare_digest(files_digest(bundle.signed_files()), lic.digest):
        raise BadSignature(f"{bundle.source}: files differ from what {lic.key_id} signed")
    if lic.not_before is not None and now < lic.not_before:
        raise LicenceNotYetValid(f"{bundle.source}: licence valid from {utc_text(lic.not_before)},"
                                 f" now is {utc_text(now)}")
    if lic.not_after is not None and now >= lic.not_after:
        raise LicenceExpired(f"{bundle.source}: licence expired at {utc_text(lic.not_after)},"
                             f" now is {utc_text(now)}")
    if lic.installation_id is not None and (
        installation_id is None
        or not hmac.compare_digest(lic.installation_id.encode(), installation_id.encode())
    ):
        raise WrongInstallation(f"{bundle.source}: licence is for another installation")
    return lic


def generate_keypair(private_path: str | os.PathLike[str], public_path: str | os.PathLike[str]) -> str:
    """Write a new private key (mode 0600, never overwritten) and its public key; return the key id."""
    key = nacl.signing.SigningKey.generate()
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# billcore plugin signing key: keep it secret\n" + bytes(key).hex() + "\n")
    kid = key_id_of(key.verify_key)
    fd = os.open(public_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(f"# billcore plugin public key {kid}\n" + bytes(key.verify_key).hex() + "\n")
    return kid


def load_signing_key(path: str | os.PathLike[str]) -> nacl.signing.SigningKey:
    raw = _key_bytes(Path(path).read_bytes())
    if not raw:
        raise PluginError(f"{path}: not a billcore plugin signing key")
    return nacl.signing.SigningKey(raw)
