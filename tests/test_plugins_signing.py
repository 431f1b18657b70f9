"""A plugin is refused, with its reason, before any of its code runs."""

from __future__ import annotations

import datetime as dt
import io
import sys
import tarfile
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import nacl.signing
import pytest

from billcore.server.calls import CallRegistry
from billcore.plugins import errors
from billcore.plugins.bundle import LICENCE_FILE, read_bundle
from billcore.plugins.hooks import HookBus
from billcore.plugins.loader import PluginManager
from billcore.plugins.signing import Licence, files_digest

from .test_plugins_support import DevKey, marker_plugin, write_plugin

NOW = 1_800_000_000.0


@dataclass
class Env:
    tmp: Path
    keydir: Path
    key: DevKey
    registry: CallRegistry
    manager: PluginManager
    marker: Path

    def fresh_manager(self, **kw: object) -> PluginManager:
        args: dict[str, object] = {"api_version": 1, "installation_id": "inst-1"}
        args.update(kw)
        return PluginManager(self.registry, HookBus(), self.keydir, self.tmp / "state", **args)  # type: ignore[arg-type]


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    keydir = tmp_path / "keys"
    key = DevKey(keydir)
    registry = CallRegistry()
    manager = PluginManager(registry, HookBus(), keydir, tmp_path / "state", 1, "inst-1")
    e = Env(tmp_path, keydir, key, registry, manager, tmp_path / "marker")
    yield e
    await manager.close()


async def refused(env: Env, path: Path, error: type[errors.PluginError],
                  manager: PluginManager | None = None) -> errors.PluginError:
    with pytest.raises(error) as info:
        await (manager or env.manager).load(path, NOW)
    assert not env.marker.exists(), "plugin code ran before it was refused"
    assert env.registry.get("marked.ping") is None
    assert "billcore_plugin_marked" not in sys.modules
    return info.value


async def test_a_good_plugin_loads_and_its_code_runs(env: Env) -> None:
    d = marker_plugin(env.tmp, env.marker)
    env.key.sign(d)
    record = await env.manager.load(d, NOW)
    assert env.marker.read_text() == "plugin code ran"
    assert record["state"] == "loaded" and record["symbols"] == ["marked.ping"]
    assert record["signer"].startswith("ed25519:")
    assert await env.registry.get("marked.ping").spec.handler(None) == "pong"  # type: ignore[union-attr]


async def test_unsigned_plugin_is_refused(env: Env) -> None:
    d = marker_plugin(env.tmp, env.marker)
    err = await refused(env, d, errors.UnsignedPlugin)
    assert "not signed" in str(err)


@pytest.mark.parametrize("tamper", ["changed_byte", "added_file", "removed_file", "renamed_file"])
async def test_any_change_after_signing_is_refused(env: Env, tamper: str) -> None:
    d = marker_plugin(env.tmp, env.marker, files={"extra.py": "X = 1\n"})
    env.key.sign(d)
    if tamper == "changed_byte":
        src = (d / "__init__.py").read_bytes()
        (d / "__init__.py").write_bytes(src.replace(b"pong", b"pinG"))
    elif tamper == "added_file":
        (d / "sneaky.py").write_text("")
    elif tamper == "removed_file":
        (d / "extra.py").unlink()
    else:
        (d / "extra.py").rename(d / "extra2.py")
    err = await refused(env, d, errors.BadSignature)
    assert "differ" in str(err)


async def test_licence_terms_cannot_be_edited(env: Env) -> None:
    d = marker_plugin(env.tmp, env.marker)
    env.key.sign(d, not_after=int(NOW) - 10)
    lic = Licence.from_bytes((d / LICENCE_FILE).read_bytes())
    extended = Licence(**{**{f: getattr(lic, f) for f in Licence.__slots__}, "not_after": None})
    (d / LICENCE_FILE).write_bytes(extended.to_bytes())
    await refused(env, d, errors.BadSignature)


async def test_unknown_key_is_refused(env: Env) -> None:
    d = marker_plugin(env.tmp, env.marker)
    stranger = DevKey(env.tmp / "other-keys")  # its public key is not trusted
    stranger.sign(d)
    err = await refused(env, d, errors.UnknownKey)
    assert "not a trusted key" in str(err)


async def test_signature_by_another_key_under_a_trusted_key_id_is_refused(env: Env) -> None:
    d = marker_plugin(env.tmp, env.marker)
    env.key.sign(d)
    lic = Licence.from_bytes((d / LICENCE_FILE).read_bytes())
    forger = nacl.signing.SigningKey.generate()
    forged = Licence(**{**{f: getattr(lic, f) for f in Licence.__slots__},
                        "signature": forger.sign(lic.signed_message()).signature})
    (d / LICENCE_FILE).write_bytes(forged.to_bytes())
    await refused(env, d, errors.BadSignature)


async def test_expired_and_not_yet_valid_licences_are_refused(env: Env) -> None:
    d = marker_plugin(env.tmp, env.marker)
    env.key.sign(d, not_after=int(NOW))
    await refused(env, d, errors.LicenceExpired)
    env.key.sign(d, not_before=int(NOW) + 60)
    await refused(env, d, errors.LicenceNotYetValid)
    env.key.sign(d, not_before=int(NOW) - 60, not_after=int(NOW) + 60)
    expires = dt.datetime.fromtimestamp(int(NOW) + 60, dt.timezone.utc)      # a time on the wire, not seconds
    assert (await env.manager.load(d, NOW))["licence"]["not_after"] == expires


async def test_licence_for_another_installation_is_refused(env: Env) -> None:
    d = marker_plugin(env.tmp, env.marker)
    env.key.sign(d, installation_id="inst-2")
    await refused(env, d, errors.WrongInstallation)
    await refused(env, d, errors.WrongInstallation, env.fresh_manager(installation_id=None))


async def test_wrong_api_version_is_refused(env: Env) -> None:
    d = marker_plugin(env.tmp, env.marker, api=2)
    env.key.sign(d)
    err = await refused(env, d, errors.ApiVersionMismatch)
    assert "needs plugin API 2" in str(err)


async def test_rollback_is_refused_also_after_a_restart(env: Env) -> None:
    newer = write_plugin(env.tmp, "marked", version="1.10.0", calls=["marked.ping"],
                         init="async def ping(ctx):\n    return 'v1.10'\n"
                              "def setup(api):\n    api.register_call('marked.ping', ping)\n")
    env.key.sign(newer)
    await env.manager.load(newer, NOW)
    env.manager.unload("marked")
    older = marker_plugin(env.tmp, env.marker, version="1.9.0")
    env.key.sign(older)
    err = await refused(env, older, errors.RollbackRefused)
    assert "1.9.0 is older than 1.10.0" in str(err)
    # A restarted core reads the record from the state directory.
    restarted = env.fresh_manager()
    await refused(env, older, errors.RollbackRefused, restarted)
    # The same version again is not a rollback.
    assert (await restarted.load(newer, NOW))["version"] == "1.10.0"
    await restarted.close()


async def test_licence_for_another_plugin_is_refused(env: Env) -> None:
    d = marker_plugin(env.tmp, env.marker)
    other = write_plugin(env.tmp, "other")
    env.key.sign(other)
    (d / LICENCE_FILE).write_bytes((other / LICENCE_FILE).read_bytes())
    await refused(env, d, errors.BadSignature)


async def test_compiled_files_and_symlinks_are_refused(env: Env) -> None:
    d = marker_plugin(env.tmp, env.marker)
    (d / "__pycache__").mkdir()
    (d / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    await refused(env, d, errors.BundleError)
    (d / "__pycache__" / "x.cpython-311.pyc").unlink()
    (d / "__pycache__").rmdir()
    (d / "link.py").symlink_to(d / "__init__.py")
    await refused(env, d, errors.BundleError)


def _archive(d: Path, kind: str) -> bytes:
    buf = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for p in sorted(d.rglob("*")):
                if p.is_file():
                    zf.write(p, f"{d.name}/{p.relative_to(d)}")
    else:
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            tf.add(d, arcname=".")
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
async def test_archive_plugin_loads_from_memory(env: Env, kind: str) -> None:
    d = write_plugin(env.tmp, "packed", calls=["packed.where"], init="""\
        from .sub import where

        def setup(api):
            api.register_call("packed.where", where)
        """, files={"sub/__init__.py": "async def where(ctx):\n    return __name__\n"})
    env.key.sign(d)
    archive = env.tmp / f"packed.{kind}"
    archive.write_bytes(_archive(d, kind))
    assert read_bundle(archive).files.keys() == read_bundle(d).files.keys()
    record = await env.manager.load(archive, NOW)
    assert record["source"] == str(archive)
    handler = env.registry.get("packed.where").spec.handler  # type: ignore[union-attr]
    assert await handler(None) == "billcore_plugin_packed.sub"
    assert sys.modules["billcore_plugin_packed"].__spec__.origin.startswith("<plugin packed")
    assert not any(p.name == "__pycache__" for p in env.tmp.rglob("*"))


async def test_tampered_archive_is_refused(env: Env) -> None:
    d = marker_plugin(env.tmp, env.marker)
    env.key.sign(d)
    data = bytearray(_archive(d, "zip"))
    # Rebuild the zip with one byte of the source changed.
    files = read_bundle(d).files
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path, body in files.items():
            zf.writestr(path, body.replace(b"pong", b"PONG") if path == "__init__.py" else body)
    assert bytes(data) != buf.getvalue()
    archive = env.tmp / "marked.zip"
    archive.write_bytes(buf.getvalue())
    await refused(env, archive, errors.BadSignature)


async def test_source_changed_on_disk_after_loading_is_not_used(env: Env) -> None:
    d = write_plugin(env.tmp, "late", calls=["late.value"], init="""\
        async def value(ctx):
            from . import lazy  # imported only at call time
            return lazy.VALUE

        def setup(api):
            api.register_call("late.value", value)
        """, files={"lazy.py": "VALUE = 'signed'\n"})
    env.key.sign(d)
    await env.manager.load(d, NOW)
    (d / "lazy.py").write_text("VALUE = 'swapped on disk'\n")
    handler = env.registry.get("late.value").spec.handler  # type: ignore[union-attr]
    assert await handler(None) == "signed"


def test_files_digest_is_unambiguous() -> None:
    # Moving bytes between a path and a body, or between files, changes the digest.
    assert files_digest({"ab": b"c"}) != files_digest({"a": b"bc"})
    assert files_digest({"a": b"x", "b": b""}) != files_digest({"a": b"", "b": b"x"})
    assert files_digest({"a": b""}) != files_digest({})
