"""The plugin subsystem's errors: one root, one class per refusal reason.

Every refusal that happens before plugin code runs (bad signature, expired
licence, rollback, …) has its own class and a stable ``code`` so the URFA
layer and the CLI can report *why* a plugin was refused, not just that it
was.  Errors raised by plugin code itself during ``setup`` are wrapped in
``PluginSetupError`` with the original exception chained.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "wire_errors",
    "PluginError",
    "BundleError",
    "ManifestError",
    "UnsignedPlugin",
    "BadSignature",
    "UnknownKey",
    "LicenceExpired",
    "LicenceNotYetValid",
    "WrongInstallation",
    "ApiVersionMismatch",
    "RollbackRefused",
    "PluginStateError",
    "PermanentPlugin",
    "PluginSetupError",
    "PluginDatabaseError",
    "PluginConfigError",
    "Refused",
]


class PluginError(Exception):
    """Root of the plugin subsystem's errors."""

    code = "plugin.error"


class BundleError(PluginError):
    """The plugin directory or archive cannot be read as a plugin."""

    code = "plugin.bundle"


class ManifestError(PluginError):
    """``plugin.toml`` is missing, malformed, or disagrees with the licence."""

    code = "plugin.manifest"


class UnsignedPlugin(PluginError):
    """The plugin carries no licence file."""

    code = "plugin.unsigned"


class BadSignature(PluginError):
    """The signature does not verify, or the files differ from what was signed."""

    code = "plugin.bad_signature"


class UnknownKey(PluginError):
    """The licence was signed by a key that is not in the trusted key directory."""

    code = "plugin.unknown_key"


class LicenceExpired(PluginError):
    code = "plugin.licence_expired"


class LicenceNotYetValid(PluginError):
    code = "plugin.licence_not_yet_valid"


class WrongInstallation(PluginError):
    """The licence is bound to another installation id."""

    code = "plugin.wrong_installation"


class ApiVersionMismatch(PluginError):
    """The plugin needs a plugin-API version this core does not serve."""

    code = "plugin.api_version"


class RollbackRefused(PluginError):
    """The plugin is older than a version already loaded here."""

    code = "plugin.rollback"


class PluginStateError(PluginError):
    """The operation does not fit the plugin's state (already loaded, not loaded, …)."""

    code = "plugin.state"


class PermanentPlugin(PluginStateError):
    """A permanent plugin cannot be unloaded at run time."""

    code = "plugin.permanent"


class PluginSetupError(PluginError):
    """The plugin's own code failed while being imported or set up."""

    code = "plugin.setup"


class PluginDatabaseError(PluginError):
    """The plugin's database facade or migrations failed."""

    code = "plugin.database"


class PluginConfigError(PluginError):
    """The operator's settings for a plugin name an unknown key or have a wrong type."""

    code = "plugin.config"


class Refused(PluginError):
    """Raised by plugin handlers to refuse a call with a message meant for the caller."""

    code = "plugin.refused"


def wire_errors(handler: Any) -> Any:
    """Wrap a URFA handler so a ``PluginError`` answers with its own stable
    code (``plugin.refused``, ``plugin.bad_signature``…) instead of the
    generic internal error; anything else propagates unchanged."""
    import functools

    from urfa.errors import CallFailed

    @functools.wraps(handler)
    async def wrapped(ctx: Any, **args: Any) -> Any:
        try:
            return await handler(ctx, **args)
        except PluginError as exc:
            raise CallFailed(exc.code, str(exc)) from exc

    return wrapped
