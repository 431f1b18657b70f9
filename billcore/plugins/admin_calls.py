"""URFA calls that manage plugins: ``plugins.list``, ``plugins.load``, ``plugins.unload``.

The core registers ``plugin_calls(manager)`` like any built-in module.
``plugins.load`` takes a path on the core's machine; when ``plugin_dir`` is
given it takes only a plain file or folder name inside that directory, so an
administrator's session cannot point the core at arbitrary paths.  The
licence check still applies either way.

``audit`` (the core passes one) records each load and unload in the audit
log, and each refused load with its error code: a forged signature tried
by an operator's session is worth finding later.  It runs after the
change, which is not a database change; a database that is away costs the
audit row (logged), not the plugin change already made.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from urfa.errors import BAD_ARGS, CallFailed

from billcore.server.call_context import CallContext
from billcore.server.calls import CallSpec
from billcore.plugins.errors import PluginError, wire_errors
from billcore.plugins.loader import PluginManager

__all__ = ["Audit", "plugin_calls"]

# (ctx, action, object, after): records one audit row
Audit = Callable[[CallContext, str, str, dict[str, Any]], Awaitable[None]]

ADMIN_KINDS = frozenset({"admin", "system"})
PAGE = 100  # plugins per plugins.list page (each carries its symbols)


def plugin_calls(manager: PluginManager, *, plugin_dir: str | os.PathLike[str] | None = None,
                 clock: Callable[[], float] = time.time, audit: Audit | None = None) -> list[CallSpec]:
    async def record(ctx: CallContext, action: str, obj: str, after: dict[str, Any]) -> None:
        if audit is not None:
            await audit(ctx, action, obj, after)

    async def plugins_list(ctx: CallContext, limit: int = PAGE, offset: int = 0) -> list[dict[str, Any]]:
        """The plugins this core knows, by name (paged): version, state, signer, licence, symbols."""
        if type(limit) is not int or not 1 <= limit <= PAGE or type(offset) is not int or offset < 0:
            raise CallFailed(BAD_ARGS, f"limit must be 1..{PAGE}, offset >= 0")
        return sorted(manager.list(), key=lambda plugin: str(plugin.get("name")))[offset:offset + limit]

    async def plugins_load(ctx: CallContext, path: str) -> dict[str, Any]:
        """Verify and load a signed plugin (directory or archive) at run time."""
        target: Path = Path(path)
        if plugin_dir is not None:
            if not path or "/" in path or os.sep in path or path in (".", ".."):
                raise PluginError("plugins.load takes a plain name inside the plugin directory")
            target = Path(plugin_dir) / path
        try:
            loaded = await manager.load(target, clock())
        except PluginError as exc:
            await record(ctx, "plugins.load_refused", f"plugin-path:{path[:200]}", {"code": exc.code, "error": str(exc)})
            raise
        await record(ctx, "plugins.load", f"plugin:{loaded.get('name')}",
                     {key: loaded.get(key) for key in ("name", "version", "state", "signer", "permanent")})
        return loaded

    async def plugins_unload(ctx: CallContext, name: str) -> dict[str, Any]:
        """Delete a plugin's functions now; it is torn down when no session uses them."""
        deleted = manager.unload(name)
        result = {"name": name, "deleted": deleted, "state": (manager.get(name) or {}).get("state")}
        await record(ctx, "plugins.unload", f"plugin:{name}", result)
        return result

    plugins_load = wire_errors(plugins_load)
    plugins_unload = wire_errors(plugins_unload)
    licence = {"licence": "map", "licence.not_before": "time", "licence.not_after": "time"}
    return [
        CallSpec("plugins.list", plugins_list, right="plugins.read", kinds=ADMIN_KINDS,
                 args={"limit": "int?", "offset": "int?"}, result="list", doc=plugins_list.__doc__ or "",
                 bound=f"page:{PAGE}", fields=licence),
        CallSpec("plugins.load", plugins_load, right="plugins.manage", kinds=ADMIN_KINDS,
                 args={"path": "str"}, result="map", doc=plugins_load.__doc__ or "", bound="fixed", fields=licence),
        CallSpec("plugins.unload", plugins_unload, right="plugins.manage", kinds=ADMIN_KINDS,
                 args={"name": "str"}, result="map", doc=plugins_unload.__doc__ or "", bound="fixed"),
    ]
