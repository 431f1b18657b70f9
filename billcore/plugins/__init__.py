"""Signed plugin modules: see docs/plugins.md and loader.py's theory of operation."""

from .admin_calls import plugin_calls
from .api import PLUGIN_API_VERSION, BillingFacade, PluginAPI
from .errors import PluginError
from .hooks import EVENTS, FireResult, HookBus
from .loader import PluginManager

__all__ = ["PLUGIN_API_VERSION", "BillingFacade", "EVENTS", "FireResult", "HookBus",
           "PluginAPI", "PluginError", "PluginManager", "plugin_calls"]
