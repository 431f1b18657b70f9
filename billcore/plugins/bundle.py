"""Read a plugin — a directory or one archive file — into memory, once.

Theory of operation
-------------------
Everything the loader later verifies, imports or runs comes from the bytes
this module returns: each file is opened once, read once, and never looked
at again on disk.  So a file swapped after verification (TOCTOU) changes
nothing: the signature was checked over exactly the bytes that are executed.

An archive (zip or tar, optionally compressed) is read whole into memory and
unpacked from there; it is never handed to ``zipimport`` by path.  A single
top-level folder inside the archive (``vouchers/plugin.toml``) is stripped.

Outside input is bounded: file count, per-file and total size.  Symlinks,
devices, absolute paths and ``..`` are refused, and so are compiled files
(``.pyc``, ``.so``, …): the loader only ever compiles source it verified.
"""

from __future__ import annotations

import io
import os
import posixpath
import stat
import tarfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from billcore.plugins.errors import BundleError

__all__ = ["PluginBundle", "read_bundle", "bundle_from_files", "LICENCE_FILE", "MANIFEST_FILE"]

LICENCE_FILE = "licence.msgpack"
MANIFEST_FILE = "plugin.toml"

MAX_FILES = 2_000
MAX_FILE_BYTES = 8 * 1024 * 1024
MAX_TOTAL_BYTES = 64 * 1024 * 1024
COMPILED_SUFFIXES = (".pyc", ".pyo", ".so", ".pyd", ".dll", ".dylib")


@dataclass(frozen=True, slots=True)
class PluginBundle:
    """A plugin's files (relative POSIX path → bytes) and where they came from."""

    source: str
    files: Mapping[str, bytes]

    @property
    def licence(self) -> bytes | None:
        return self.files.get(LICENCE_FILE)

    def signed_files(self) -> dict[str, bytes]:
        """Every file the signature covers: all of them but the licence."""
        return {p: b for p, b in self.files.items() if p != LICENCE_FILE}


def _check_path(path: str) -> str:
    if not path or path.startswith("/") or "\\" in path or "\0" in path:
        raise BundleError(f"bad file name in plugin: {path!r}")
    norm = posixpath.normpath(path)
    if norm != path or norm == "." or any(part in ("", ".", "..") for part in norm.split("/")):
        raise BundleError(f"bad file name in plugin: {path!r}")
    if norm.endswith(COMPILED_SUFFIXES) or "__pycache__" in norm.split("/"):
        raise BundleError(
            f"compiled file {norm!r} in plugin: only source is loaded and the "
            "signature covers every file; delete it"
        )
    return norm


def bundle_from_files(source: str, files: Mapping[str, bytes]) -> PluginBundle:
    """Validate names and bounds of an in-memory file map."""
    if len(files) > MAX_FILES:
        raise BundleError(f"plugin has more than {MAX_FILES} files")
    total = 0
    checked: dict[str, bytes] = {}
    for path, data in files.items():
        norm = _check_path(path)
        if norm in checked:
            raise BundleError(f"duplicate file in plugin: {norm!r}")
        if len(data) > MAX_FILE_BYTES:
            raise BundleError(f"{norm}: larger than {MAX_FILE_BYTES} bytes")
        total += len(data)
        if total > MAX_TOTAL_BYTES:
            raise BundleError(f"plugin is larger than {MAX_TOTAL_BYTES} bytes")
        checked[norm] = bytes(data)
    if MANIFEST_FILE not in checked:
        raise BundleError(f"{source}: no {MANIFEST_FILE} at the plugin's root")
    return PluginBundle(source, MappingProxyType(dict(sorted(checked.items()))))


def _read_regular(path: str, limit: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{path}: not a regular file")
        if st.st_size > limit:
            raise BundleError(f"{path}: larger than {limit} bytes")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise BundleError(f"{path}: {e.strerror}") from e
    finally:
        os.close(fd)
    if len(data) > limit:
        raise BundleError(f"{path}: larger than {limit} bytes")
    return data


def _read_directory(root: Path) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for d in dirnames:
            if os.path.islink(os.path.join(dirpath, d)):
                raise BundleError(f"{os.path.join(dirpath, d)}: symlinks are not allowed in a plugin")
        for name in filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if os.path.islink(full):
                raise BundleError(f"{full}: symlinks are not allowed in a plugin")
            if len(files) >= MAX_FILES:
                raise BundleError(f"plugin has more than {MAX_FILES} files")
            files[rel] = _read_regular(full, MAX_FILE_BYTES)
    return files


def _strip_top_folder(files: dict[str, bytes]) -> dict[str, bytes]:
    if MANIFEST_FILE in files or not files:
        return files
    tops = {p.split("/", 1)[0] for p in files}
    if len(tops) == 1 and all("/" in p for p in files):
        top = tops.pop()
        return {p[len(top) + 1:]: b for p, b in files.items()}
    return files


def _read_zip(data: bytes) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    total = 0
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = zf.infolist()
        if len(infos) > MAX_FILES:
            raise BundleError(f"plugin has more than {MAX_FILES} files")
        for info in infos:
            if info.is_dir():
                continue
            mode = info.external_attr >> 16
            if stat.S_IFMT(mode) and not stat.S_ISREG(mode):  # type bits absent: a plain file
                raise BundleError(f"{info.filename}: only regular files are allowed in a plugin")
            if info.file_size > MAX_FILE_BYTES:
                raise BundleError(f"{info.filename}: larger than {MAX_FILE_BYTES} bytes")
            if info.filename in files:
                raise BundleError(f"duplicate file in plugin: {info.filename!r}")
            with zf.open(info) as member:
                body = member.read(MAX_FILE_BYTES + 1)
            if len(body) > MAX_FILE_BYTES:
                raise BundleError(f"{info.filename}: larger than {MAX_FILE_BYTES} bytes")
            total += len(body)
            if total > MAX_TOTAL_BYTES:
                raise BundleError(f"plugin is larger than {MAX_TOTAL_BYTES} bytes")
            files[info.filename] = body
    return files


def _read_tar(data: bytes) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    total = 0
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tf:
        for count, member in enumerate(tf):
            if count >= MAX_FILES:
                raise BundleError(f"plugin has more than {MAX_FILES} files")
            if member.isdir():
                continue
            if not member.isfile():
                raise BundleError(f"{member.name}: only regular files are allowed in a plugin")
            if member.size > MAX_FILE_BYTES:
                raise BundleError(f"{member.name}: larger than {MAX_FILE_BYTES} bytes")
            name = member.name[2:] if member.name.startswith("./") else member.name
            if name in files:
                raise BundleError(f"duplicate file in plugin: {name!r}")
            total += member.size
            if total > MAX_TOTAL_BYTES:
                raise BundleError(f"plugin is larger than {MAX_TOTAL_BYTES} bytes")
            extracted = tf.extractfile(member)
            assert extracted is not None
            files[name] = extracted.read(MAX_FILE_BYTES + 1)
    return files


def read_bundle(path: str | os.PathLike[str]) -> PluginBundle:
    """Read a plugin directory or archive file into memory."""
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as e:
        raise BundleError(f"{p}: {e.strerror}") from e
    if stat.S_ISDIR(st.st_mode):
        return bundle_from_files(str(p), _read_directory(p))
    data = _read_regular(str(p), MAX_TOTAL_BYTES)
    try:
        if zipfile.is_zipfile(io.BytesIO(data)):
            files = _read_zip(data)
        else:
            files = _read_tar(data)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
        raise BundleError(f"{p}: not a plugin directory, zip or tar archive ({e})") from e
    return bundle_from_files(str(p), _strip_top_folder(files))
