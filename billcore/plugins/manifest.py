"""``plugin.toml``: what a plugin is and what it declares it will register.

The manifest is parsed only after the licence verified, so its bytes are the
vendor's.  Unknown keys are refused (a typo must not pass silently).  The
declared ``calls`` and ``hooks`` are enforced at setup: a plugin registers
exactly the calls it declares and subscribes only to declared events, so the
manifest an operator reviews is the truth.

    name = "vouchers"             # [a-z][a-z0-9_]*, the namespace of its calls
    version = "1.2.0"             # dotted integers, compared numerically
    api = 1                       # plugin-API version it needs
    permanent = false             # true: cannot be unloaded at run time
    description = "…"
    calls = ["vouchers.redeem"]   # each prefixed with "<name>."
    hooks = ["payment.added"]     # event names from billcore.plugins.hooks
    channels = ["sms"]            # notification channels it serves (api.notification_channel)
    [config]                      # defaults for api.config (operator overrides)
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from billcore.plugins.errors import ManifestError
from billcore.plugins.hooks import CHANNEL_NAME, EVENTS

__all__ = ["Manifest", "parse_manifest", "parse_version", "check_name", "RESERVED_NAMES"]

NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
VERSION_RE = re.compile(r"^\d{1,9}(\.\d{1,9}){0,3}$")
CALL_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")

# Namespaces of the core's own calls, modules and roles: a plugin may not
# take them (a plugin named "me" would add "me.*" calls subscribers see).
# Every prefix the core registers must be here; tests/test_security_plugins.py
# checks that against build_calls, builtin_specs and plugin_calls.
RESERVED_NAMES = frozenset({
    # call prefixes of the core
    "sys", "session", "events", "me", "users", "accounts", "payments", "blocks",
    "audit", "reports", "tariffs", "services", "timeranges", "classes",
    "bindings", "radius", "netflow", "plugins",
    "operators", "self", "subscribers", "bulk", "tokens",
    "outbox", "notify", "webhooks",
    "fup", "dunning",
    "invoices", "statements",
    # modules, roles and words a reader would take for the core's
    "builtin", "plugin", "core", "sessions", "admins", "urfa", "ledger", "billing",
    "periodic", "portal", "console", "httpapi", "supervisor", "metrics",
    "paygate",
})

_KEYS = {"name", "version", "api", "permanent", "description", "calls", "hooks", "channels", "config"}


@dataclass(frozen=True, slots=True)
class Manifest:
    name: str
    version: str
    api: int
    permanent: bool
    description: str
    calls: tuple[str, ...]
    hooks: tuple[str, ...]
    config: Mapping[str, Any]
    channels: tuple[str, ...] = ()

    @property
    def version_key(self) -> tuple[int, ...]:
        return parse_version(self.version)

    @property
    def module_name(self) -> str:
        """The Python package name the plugin is imported as."""
        return f"billcore_plugin_{self.name}"


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ManifestError(f"plugin name {name!r} must match {NAME_RE.pattern}")
    if name in RESERVED_NAMES:
        raise ManifestError(f"plugin name {name!r} is reserved for the core")
    return name


def parse_version(version: object) -> tuple[int, ...]:
    if not isinstance(version, str) or not VERSION_RE.match(version):
        raise ManifestError(f"version {version!r} must be dotted integers like 1.2.0")
    parts = [int(p) for p in version.split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()  # 1.2 == 1.2.0
    return tuple(parts)


def _str_list(doc: dict[str, Any], key: str) -> tuple[str, ...]:
    value = doc.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ManifestError(f"{key}: expected a list of strings")
    if len(set(value)) != len(value):
        raise ManifestError(f"{key}: duplicate entries")
    return tuple(value)


def parse_manifest(data: bytes) -> Manifest:
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ManifestError(f"plugin.toml: {e}") from e
    unknown = set(doc) - _KEYS
    if unknown:
        raise ManifestError(f"plugin.toml: unknown keys {sorted(unknown)}")
    for key in ("name", "version", "api"):
        if key not in doc:
            raise ManifestError(f"plugin.toml: {key} is required")
    name = check_name(doc["name"])
    version = doc["version"]
    parse_version(version)
    api = doc["api"]
    if not isinstance(api, int) or isinstance(api, bool) or api < 1:
        raise ManifestError("api: expected a positive integer")
    permanent = doc.get("permanent", False)
    if not isinstance(permanent, bool):
        raise ManifestError("permanent: expected true or false")
    description = doc.get("description", "")
    if not isinstance(description, str):
        raise ManifestError("description: expected a string")
    calls = _str_list(doc, "calls")
    for call in calls:
        if not CALL_RE.match(call) or not call.startswith(name + "."):
            raise ManifestError(f"call {call!r} must be named '{name}.<something>'")
    hooks = _str_list(doc, "hooks")
    for hook in hooks:
        if hook not in EVENTS:
            raise ManifestError(f"hook {hook!r} is not an event; known: {', '.join(sorted(EVENTS))}")
    channels = _str_list(doc, "channels")
    for channel in channels:
        if not CHANNEL_NAME.match(channel) or channel in ("email", "webhook", "hook", "radius", "text"):
            raise ManifestError(f"channel {channel!r}: [a-z][a-z0-9_]{{0,31}}, not one of billcore's own")
    config = doc.get("config", {})
    if not isinstance(config, dict):
        raise ManifestError("config: expected a table")
    return Manifest(name, version, api, permanent, description, calls, hooks, MappingProxyType(config),
                    channels)
