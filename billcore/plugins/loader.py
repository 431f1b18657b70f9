"""PluginManager: verify, load, list and unload plugins.

Theory of operation
-------------------
``load(path, now)`` reads the plugin into memory once (bundle.py), and
refuses it — before a single line of its code runs — unless: the licence
verifies against a trusted key over exactly those bytes, is valid at ``now``
and for this installation; the manifest agrees with the licence; the API
version is the one this core serves; the version is not older than the
highest version of that plugin ever loaded here (no rollback: versions.py,
in the ``plugin_versions`` table when the manager has a database, else in
``<statedir>/plugin-versions.json``); its calls do not clash; the operator's
settings (``<config_dir>/<name>.toml``) name only keys the manifest's
``[config]`` declares, with the defaults' types (settings.py).  Only then is
the version recorded, its migrations run, its package imported from memory
(importer.py) and ``setup(api)`` called.  What setup declared takes effect
together afterwards, so a failing setup leaves nothing behind.

``unload(name)`` refuses a permanent plugin.  Otherwise the plugin's symbols
are marked deleted at once (``registry.delete_module``): new sessions no
longer see them and old sessions get ``SymbolDeleted``.  The plugin is torn
down — hooks removed, scheduled tasks cancelled, ``teardown()`` called,
modules dropped — when the registry reports the module idle, i.e. after the
last call in flight and the last call table that refers to it are done.

States: loaded → pending-unload → unloaded (→ loaded again on a new load).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib
import inspect
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import asyncpg

from billcore.server.calls import CallRegistry
from billcore.plugins.api import BillingFacade, PluginAPI, run_every
from billcore.plugins.bundle import MANIFEST_FILE, PluginBundle, read_bundle
from billcore.plugins.db import PluginDB, run_migrations, schema_of
from billcore.plugins.errors import (
    ApiVersionMismatch,
    ManifestError,
    PermanentPlugin,
    PluginDatabaseError,
    PluginError,
    PluginSetupError,
    PluginStateError,
)
from billcore.plugins.hooks import HookBus
from billcore.plugins.importer import SourceImporter
from billcore.plugins.manifest import Manifest, parse_manifest
from billcore.plugins.settings import settings_for
from billcore.plugins.signing import Keyring, Licence, verify_bundle
from billcore.plugins.versions import STATE_FILE, DatabaseVersions, FileVersions, VersionRecord, refuse_rollback

__all__ = ["PluginManager", "LOADED", "PENDING_UNLOAD", "UNLOADED", "STATE_FILE"]

LOADED = "loaded"
PENDING_UNLOAD = "pending-unload"
UNLOADED = "unloaded"


@dataclass(slots=True)
class _Plugin:
    manifest: Manifest
    licence: Licence
    source: str
    importer: SourceImporter | None
    module: ModuleType | None
    db: PluginDB | None
    symbols: tuple[str, ...]
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    state: str = LOADED


def _validity(licence: Licence) -> dict[str, Any]:
    """The licence terms as the wire shows them: times are ``time`` values (UTC), not Unix seconds."""
    out = licence.validity()
    for key in ("not_before", "not_after"):
        if out[key] is not None:
            out[key] = dt.datetime.fromtimestamp(out[key], dt.timezone.utc)
    return out


def _migrations(bundle: PluginBundle) -> list[tuple[str, bytes]]:
    return [(p.split("/", 1)[1], b) for p, b in bundle.files.items()
            if p.startswith("migrations/") and p.endswith(".sql") and p.count("/") == 1]


class PluginManager:
    def __init__(self, registry: CallRegistry, bus: HookBus, keydir: str | os.PathLike[str],
                 statedir: str | os.PathLike[str], api_version: int, installation_id: str | None,
                 db_pool: asyncpg.Pool | None = None, *, billing: BillingFacade | None = None,
                 config_dir: str | os.PathLike[str] | None = None,
                 clock: Callable[[], float] = time.time,
                 setup_timeout: float = 30.0, log: logging.Logger | None = None) -> None:
        self.registry = registry
        self.bus = bus
        self.keydir = Path(keydir)
        self.statedir = Path(statedir)
        self.api_version = api_version
        self.installation_id = installation_id
        self.db_pool = db_pool
        self.billing = billing
        self.config_dir = Path(config_dir) if config_dir is not None else None
        self.clock = clock
        self.versions: VersionRecord = (DatabaseVersions(db_pool, self.statedir) if db_pool is not None
                                        else FileVersions(self.statedir))
        self.setup_timeout = setup_timeout
        self.log = log or logging.getLogger("billcore.plugins")
        self._plugins: dict[str, _Plugin] = {}
        self._finishing: set[asyncio.Future[Any]] = set()
        self._loading: set[str] = set()
        self._chained: Callable[[str], None] | None = registry.on_module_idle
        registry.on_module_idle = self._on_module_idle

    # -- load ------------------------------------------------------------------
    def _verify(self, bundle: PluginBundle, now: float) -> tuple[Manifest, Licence]:
        licence = verify_bundle(bundle, Keyring.from_dir(self.keydir), now, self.installation_id)
        manifest = parse_manifest(bundle.files[MANIFEST_FILE])
        if (licence.plugin, licence.version) != (manifest.name, manifest.version):
            raise ManifestError(f"{bundle.source}: licence is for {licence.plugin} {licence.version}, "
                                f"manifest says {manifest.name} {manifest.version}")
        if manifest.api != self.api_version:
            raise ApiVersionMismatch(f"{manifest.name} {manifest.version} needs plugin API "
                                     f"{manifest.api}; this core serves {self.api_version}")
        self._check_free(manifest)
        if _migrations(bundle) and self.db_pool is None:
            raise PluginDatabaseError(f"{manifest.name} has migrations but the core gave it no database")
        return manifest, licence

    def _check_free(self, manifest: Manifest) -> None:
        current = self._plugins.get(manifest.name)
        if current is not None and current.state != UNLOADED:
            raise PluginStateError(f"{manifest.name} is {current.state}; unload it first")
        if self.registry.is_pending(manifest.name):
            raise PluginStateError(f"{manifest.name} is still being unloaded")
        for call in manifest.calls:
            registered = self.registry.get(call)
            if registered is not None:
                raise PluginStateError(f"{call} is already registered by {registered.spec.module}")

    async def load(self, path: str | os.PathLike[str], now: float, *,
                   config: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Verify and start the plugin at ``path`` (directory or archive); return its ``list()`` record.

        A refusal is logged with its reason and code (a warning), whoever
        asked — config at start or ``plugins.load`` — then raised."""
        try:
            return await self._load(path, now, config)
        except Exception as exc:
            self.log.warning("plugin refused", extra={
                "path": str(path), "code": getattr(exc, "code", "plugin.error"),
                "reason": str(exc) or type(exc).__name__})
            raise

    async def _load(self, path: str | os.PathLike[str], now: float,
                    config: Mapping[str, Any] | None) -> dict[str, Any]:
        bundle = await asyncio.to_thread(read_bundle, path)
        manifest, licence = self._verify(bundle, now)
        name = manifest.name
        if name in self._loading:
            raise PluginStateError(f"{name} is being loaded already")
        self._loading.add(name)
        try:
            refuse_rollback(name, manifest.version, await self.versions.get(name))
            settings = settings_for(name, manifest.config, self.config_dir, config)
            return await self._load_verified(bundle, manifest, licence, settings)
        finally:
            self._loading.discard(name)

    async def _load_verified(self, bundle: PluginBundle, manifest: Manifest, licence: Licence,
                             settings: Mapping[str, Any]) -> dict[str, Any]:
        name = manifest.name
        # Recorded before any plugin code runs: a version that crashes the
        # core during setup still cannot be rolled back to an older one.
        await self.versions.record(name, manifest.version, licence.key_id)
        db = None
        if self.db_pool is not None:
            await run_migrations(self.db_pool, schema_of(name), _migrations(bundle))
            db = PluginDB(self.db_pool, schema_of(name))
        log = logging.getLogger(f"billcore.plugin.{name}")
        api = PluginAPI(manifest, bundle, settings, db, self.billing, log, self.clock)
        importer = SourceImporter(manifest.module_name, bundle.files, f"{name} {manifest.version}")
        try:
            importer.install()
            try:
                module = importlib.import_module(manifest.module_name)
                setup = getattr(module, "setup", None)
                if not callable(setup):
                    raise PluginSetupError(f"{name}: the package defines no setup(api)")
                async with asyncio.timeout(self.setup_timeout):
                    result = setup(api)
                    if inspect.isawaitable(result):
                        await result
            except PluginError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure of plugin code refuses the plugin
                raise PluginSetupError(f"{name}: setup failed: {e!r}") from e
            api._sealed = True
            missing = set(manifest.calls) - {call.name for call in api._calls}
            if missing:
                raise PluginSetupError(f"{name}: declared calls not registered: {sorted(missing)}")
            for channel, _ in api._channels:
                owner = self.bus.channel_owner(channel)
                if owner is not None and owner != name:
                    raise PluginSetupError(f"{name}: notification channel {channel!r} is served by {owner!r}")
            self._check_free(manifest)  # again: other loads may have run while we awaited
        except BaseException:
            importer.uninstall()
            if db is not None:
                db.close()
            raise
        # Commit: nothing below awaits, so nothing can interleave.
        self.registry.register_all(api._calls)
        for event, handler in api._hooks:
            self.bus.subscribe(event, handler, owner=name)
        for channel, send in api._channels:
            self.bus.add_channel(channel, send, owner=name)
        tasks = [asyncio.create_task(run_every(task, log), name=f"plugin:{name}:{task.name}") for task in api._tasks]
        self._plugins[name] = _Plugin(manifest, licence, bundle.source, importer, module, db,
                                      tuple(call.name for call in api._calls), tasks)
        self.log.info("plugin loaded", extra={"plugin": name, "version": manifest.version,
                                              "signer": licence.key_id})
        return self._describe(self._plugins[name])

    # -- unload ------------------------------------------------------------------
    def unload(self, name: str) -> list[str]:
        """Delete the plugin's symbols now; tear it down once nothing uses it.

        Returns the names of the symbols marked deleted.
        """
        plugin = self._plugins.get(name)
        if plugin is None or plugin.state != LOADED:
            state = "not loaded" if plugin is None else plugin.state
            raise PluginStateError(f"{name} is {state}")
        if plugin.manifest.permanent:
            raise PermanentPlugin(f"{name} is permanent: it is unloaded only when the core stops")
        plugin.state = PENDING_UNLOAD
        self.log.info("plugin unloading", extra={"plugin": name})
        return self.registry.delete_module(name)  # may tear down at once

    def _on_module_idle(self, module: str) -> None:
        if self._chained is not None:
            self._chained(module)
        plugin = self._plugins.get(module)
        if plugin is not None and plugin.state == PENDING_UNLOAD:
            self._teardown(plugin)

    def _teardown(self, plugin: _Plugin) -> None:
        name = plugin.manifest.name
        self.bus.unsubscribe_owner(name)
        for task in plugin.tasks:
            task.cancel()
        pending: list[Any] = list(plugin.tasks)
        teardown = getattr(plugin.module, "teardown", None)
        if callable(teardown):
            try:
                result = teardown()
                if inspect.isawaitable(result):
                    pending.append(result)
            except Exception:  # noqa: BLE001 - a failing teardown must not stop the unload
                self.log.exception("plugin teardown failed", extra={"plugin": name})
        if plugin.importer is not None:
            plugin.importer.uninstall()
        plugin.importer = None
        plugin.module = None
        plugin.state = UNLOADED
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # torn down outside the core's loop: nothing async can finish
            for item in pending:
                if inspect.iscoroutine(item):
                    item.close()
            pending = []
        if pending:
            finishing = asyncio.ensure_future(self._finish(name, pending, plugin.db))
            self._finishing.add(finishing)
            finishing.add_done_callback(self._finishing.discard)
        elif plugin.db is not None:
            plugin.db.close()
        self.log.info("plugin unloaded", extra={"plugin": name})

    async def _finish(self, name: str, pending: list[Any], db: PluginDB | None) -> None:
        results = await asyncio.gather(*pending, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                self.log.error("plugin teardown failed", exc_info=result, extra={"plugin": name})
        if db is not None:
            db.close()

    async def drain(self) -> None:
        """Wait until every started teardown (async ``teardown()``, cancelled tasks) is finished."""
        while self._finishing:
            await asyncio.gather(*list(self._finishing), return_exceptions=True)

    async def close(self) -> None:
        """Core shutdown: tear down every plugin, permanent ones included."""
        for plugin in list(self._plugins.values()):
            if plugin.state == UNLOADED:
                continue
            if plugin.state == LOADED:
                plugin.state = PENDING_UNLOAD
                self.registry.delete_module(plugin.manifest.name)
            if plugin.state == PENDING_UNLOAD:
                self._teardown(plugin)
        await self.drain()

    # -- introspection ---------------------------------------------------------
    def _describe(self, plugin: _Plugin) -> dict[str, Any]:
        manifest = plugin.manifest
        return {
            "name": manifest.name, "version": manifest.version, "permanent": manifest.permanent,
            "state": plugin.state,
            "description": manifest.description, "api": manifest.api, "source": plugin.source,
            "signer": plugin.licence.key_id, "licence": _validity(plugin.licence),
            "symbols": list(plugin.symbols), "hooks": list(manifest.hooks),
        }

    def list(self) -> list[dict[str, Any]]:
        return [self._describe(p) for _, p in sorted(self._plugins.items())]

    def get(self, name: str) -> dict[str, Any] | None:
        plugin = self._plugins.get(name)
        return None if plugin is None else self._describe(plugin)
