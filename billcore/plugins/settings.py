"""A plugin's settings: the manifest's ``[config]`` defaults, the operator's file over them.

Theory of operation
-------------------
The plugin author declares every setting, with its default, in
``plugin.toml``'s ``[config]`` table; the defaults' types are the schema.
The operator overrides some of them in ``<config_dir>/<name>.toml`` (a flat
TOML file: ``threshold = 500000``).  ``settings_for`` reads that file, if
there is one, and refuses — before any plugin code runs — a key the plugin
did not declare (naming it and the file, so a typo does not silently keep
the default) and a value whose type differs from its default's.  An int is
accepted where the default is a float; a bool never passes for an int.
Nested tables are checked the same way, key by key; a list's items are
checked against the type of the default list's first item.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from billcore.plugins.errors import PluginConfigError

__all__ = ["settings_for", "overlay", "MAX_CONFIG_BYTES"]

MAX_CONFIG_BYTES = 1 << 20


def _type_ok(default: Any, value: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return type(default) is type(value)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return type(value) is type(default)


def overlay(defaults: Mapping[str, Any], overrides: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``defaults`` with ``overrides`` on top; unknown keys and wrong types raise ``PluginConfigError``."""
    merged = dict(defaults)
    for key, value in overrides.items():
        if key not in defaults:
            known = ", ".join(sorted(defaults)) or "none"
            raise PluginConfigError(f"{where}: unknown setting {key!r} (known: {known})")
        default = defaults[key]
        if not _type_ok(default, value):
            raise PluginConfigError(f"{where}: setting {key!r} must be {type(default).__name__}, "
                                    f"not {type(value).__name__}")
        if isinstance(default, dict):
            value = overlay(default, value, f"{where} [{key}]")
        elif isinstance(default, list) and default:
            bad = [v for v in value if not _type_ok(default[0], v)]
            if bad:
                raise PluginConfigError(f"{where}: setting {key!r} holds {type(default[0]).__name__} "
                                        f"items, not {type(bad[0]).__name__}")
        elif isinstance(default, float):
            value = float(value)
        merged[key] = value
    return merged


def settings_for(name: str, defaults: Mapping[str, Any], config_dir: Path | None,
                 explicit: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The settings plugin ``name`` sees as ``api.config``.

    ``explicit`` (given to ``PluginManager.load``) replaces the operator's
    file; otherwise ``<config_dir>/<name>.toml`` is read when present.
    """
    if explicit is not None:
        return overlay(defaults, explicit, f"settings of {name}")
    if config_dir is None:
        return dict(defaults)
    path = config_dir / f"{name}.toml"
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        return dict(defaults)
    except OSError as e:
        raise PluginConfigError(f"{path}: cannot read: {e}") from e
    if len(raw) > MAX_CONFIG_BYTES:
        raise PluginConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise PluginConfigError(f"{path}: not valid TOML: {e}") from e
    return overlay(defaults, data, str(path))
