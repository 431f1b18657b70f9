"""Hostile plugin bundles: what an archive or folder can try before any
signature is checked (``billcore.plugins.bundle`` reads everything into
memory first, so these are the first bytes from outside a plugin reaches).

Each must be refused with a ``BundleError``/``ManifestError`` that names the
problem, quickly and within bounded memory: path traversal (``../x.py``,
absolute, backslash, NUL), symlinks and hard links, zip bombs (honest and
lying sizes), too many files, duplicates, and a manifest reaching into
another plugin's or the core's call names.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from billcore.plugins.bundle import MAX_FILE_BYTES, MAX_FILES, read_bundle
from billcore.plugins.errors import BundleError, ManifestError
from billcore.plugins.manifest import parse_manifest

MANIFEST = b'name = "evil"\nversion = "1.0.0"\napi = 1\ncalls = ["evil.x"]\n'


def write_zip(path: Path, entries: list[tuple[str | zipfile.ZipInfo, bytes]],
              compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return path


def refused(path: Path, *words: str) -> str:
    started = time.monotonic()
    with pytest.raises(BundleError) as err:
        read_bundle(path)
    assert time.monotonic() - started < 5, "refused quickly"
    text = str(err.value)
    for w in words:
        assert w in text, text
    return text


@pytest.mark.parametrize("name", ["../x.py", "evil/../../x.py", "/etc/x.py", "a/./b.py", "a//b.py",
                                  "a\\..\\x.py", "__pycache__/x.cpython-311.pyc", "x.so"])
def test_zip_entry_names_cannot_leave_the_plugin(tmp_path: Path, name: str) -> None:
    path = write_zip(tmp_path / "p.zip", [("plugin.toml", MANIFEST), ("__init__.py", b""), (name, b"boom")])
    refused(path)


def test_tar_entry_names_links_and_devices_are_refused(tmp_path: Path) -> None:
    def tar(members: list[tarfile.TarInfo], data: dict[str, bytes]) -> Path:
        path = tmp_path / f"p{len(list(tmp_path.iterdir()))}.tar.gz"
        with tarfile.open(path, "w:gz") as tf:
            base = tarfile.TarInfo("plugin.toml")
            base.size = len(MANIFEST)
            tf.addfile(base, io.BytesIO(MANIFEST))
            for m in members:
                tf.addfile(m, io.BytesIO(data.get(m.name, b"")) if m.isfile() else None)
        return path

    up = tarfile.TarInfo("../x.py")
    up.size = 4
    refused(tar([up], {"../x.py": b"boom"}), "bad file name")
    absolute = tarfile.TarInfo("/tmp/x.py")
    absolute.size = 4
    refused(tar([absolute], {"/tmp/x.py": b"boom"}), "bad file name")
    link = tarfile.TarInfo("x.py")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    refused(tar([link], {}), "only regular files")
    hard = tarfile.TarInfo("y.py")
    hard.type, hard.linkname = tarfile.LNKTYPE, "plugin.toml"
    refused(tar([hard], {}), "only regular files")
    dev = tarfile.TarInfo("z")
    dev.type = tarfile.CHRTYPE
    refused(tar([dev], {}), "only regular files")


def test_symlinks_are_refused_in_zips_and_folders(tmp_path: Path) -> None:
    info = zipfile.ZipInfo("greeting.py")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    refused(write_zip(tmp_path / "p.zip", [("plugin.toml", MANIFEST), (info, b"/etc/passwd")]), "only regular files")

    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "plugin.toml").write_bytes(MANIFEST)
    (folder / "greeting.py").symlink_to("/etc/passwd")
    refused(folder, "symlinks are not allowed")
    (folder / "greeting.py").unlink()
    (folder / "sub").symlink_to("/etc", target_is_directory=True)
    refused(folder, "symlinks are not allowed")
    (folder / "sub").unlink()
    (folder / "plugin.toml").unlink()
    (folder / "plugin.toml").symlink_to(tmp_path / "elsewhere.toml")
    (tmp_path / "elsewhere.toml").write_bytes(MANIFEST)
    refused(folder, "symlinks are not allowed")


def test_zip_bombs_are_cut_at_the_per_file_cap(tmp_path: Path) -> None:
    # an honest bomb: 64 MiB of zeros in a few tens of KiB, refused by its declared size
    zeros = b"\0" * (64 << 20)
    honest = write_zip(tmp_path / "honest.zip", [("plugin.toml", MANIFEST), ("big.py", zeros)])
    assert honest.stat().st_size < 1 << 20
    refused(honest, "larger than")

    # a lying one: the central directory says 10 bytes, the stream inflates to 64 MiB;
    # reading stops at the cap + 1 instead of inflating it all (or trusting the header)
    data = bytearray(honest.read_bytes())
    for sig, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        start = 0
        while (i := data.find(sig, start)) >= 0:
            name_len = struct.unpack_from("<H", data, i + (26 if sig == b"PK\x03\x04" else 28))[0]
            name_at = i + (30 if sig == b"PK\x03\x04" else 46)
            if bytes(data[name_at:name_at + name_len]) == b"big.py":
                struct.pack_into("<I", data, i + offset, 10)
            start = i + 4
    liar = tmp_path / "liar.zip"
    liar.write_bytes(bytes(data))
    text = refused(liar)
    assert "larger than" in text or "not a plugin" in text, text

    # a tar.gz bomb
    bomb = tmp_path / "bomb.tar.gz"
    with tarfile.open(bomb, "w:gz") as tf:
        for name, body in (("plugin.toml", MANIFEST), ("big.py", zeros)):
            ti = tarfile.TarInfo(name)
            ti.size = len(body)
            tf.addfile(ti, io.BytesIO(body))
    refused(bomb, "larger than")
    assert MAX_FILE_BYTES < len(zeros)


def test_many_small_files_and_duplicates_are_refused(tmp_path: Path) -> None:
    many = write_zip(tmp_path / "many.zip", [("plugin.toml", MANIFEST)]
                     + [(f"m{i}.py", b"") for i in range(MAX_FILES + 1)], zipfile.ZIP_STORED)
    refused(many, "more than")
    dup = tmp_path / "dup.zip"
    with zipfile.ZipFile(dup, "w") as zf:
        zf.writestr("plugin.toml", MANIFEST)
        with pytest.warns(UserWarning):
            zf.writestr("plugin.toml", b'name = "other"\nversion = "9.0.0"\napi = 1\n')
    refused(dup, "duplicate")
    # one name spelled two ways inside a single top folder: still one file
    dup2 = write_zip(tmp_path / "dup2.zip", [("top/plugin.toml", MANIFEST), ("top/./plugin.toml", MANIFEST)])
    refused(dup2)


def test_a_bundle_that_is_not_an_archive_is_a_clear_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.zip"
    junk.write_bytes(os.urandom(4096))
    refused(junk, "not a plugin directory, zip or tar archive")
    truncated = write_zip(tmp_path / "t.zip", [("plugin.toml", MANIFEST), ("a.py", b"x" * 10000)])
    truncated.write_bytes(truncated.read_bytes()[:200])
    refused(truncated)


@pytest.mark.parametrize("calls", [["vouchers.redeem"], ["payments.add"], ["evil.x", "lowbalance.check"],
                                   ["sys.ping"], ["evil"], ["evil."], ["evil.x y"]])
def test_a_manifest_cannot_claim_another_namespace(calls: list[str]) -> None:
    doc = 'name = "evil"\nversion = "1.0.0"\napi = 1\ncalls = [%s]\n' % ", ".join(f'"{c}"' for c in calls)
    with pytest.raises(ManifestError):
        parse_manifest(doc.encode())


@pytest.mark.parametrize("name", ["accounts", "payments", "sys", "plugins", "radius", "users", "builtin"])
def test_core_namespaces_are_reserved(name: str) -> None:
    doc = f'name = "{name}"\nversion = "1.0.0"\napi = 1\ncalls = ["{name}.x"]\n'
    with pytest.raises(ManifestError, match="reserved"):
        parse_manifest(doc.encode())


@pytest.mark.parametrize("name", ["me", "session", "events", "blocks", "audit", "reports", "classes"])
def test_every_core_call_namespace_is_reserved(name: str) -> None:
    # a plugin named "me" would add "me.*" calls that subscribers see
    doc = f'name = "{name}"\nversion = "1.0.0"\napi = 1\ncalls = ["{name}.x"]\n'
    with pytest.raises(ManifestError, match="reserved"):
        parse_manifest(doc.encode())


def test_the_reserved_names_cover_every_namespace_the_core_registers(tmp_path: Path) -> None:
    import dataclasses

    from billcore.common.config import Config, CoreSection
    from billcore.server.context import CoreContext
    from billcore.server.core import build_calls
    from billcore.plugins.admin_calls import plugin_calls
    from billcore.plugins.manifest import RESERVED_NAMES
    from billcore.server.builtin_calls import builtin_specs
    from tests.test_portal_harness import all_calls

    core = CoreContext(None, dataclasses.replace(Config(), core=CoreSection(data_dir=str(tmp_path))))  # type: ignore[arg-type]
    specs = [*build_calls(core), *all_calls(core), *builtin_specs(None, None), *plugin_calls(None)]  # type: ignore[arg-type]
    prefixes = {spec.name.split(".")[0] for spec in specs}
    assert {"me", "session", "sys", "users", "radius", "netflow", "plugins"} <= prefixes
    assert prefixes <= RESERVED_NAMES, sorted(prefixes - RESERVED_NAMES)
