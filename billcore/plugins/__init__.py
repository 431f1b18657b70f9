"""Signed plugin modules: see docs/plugins.md and loader.py's theory of operation."""

from billcore.plugins.admin_calls import plugin_calls
from billcore.plugins.api import PLUGIN_API_VERSION, BillingFacade, PluginAPI
from billcore.plugins.errors import PluginError
from billcore.plugins.hooks import EVENTS, FireResult, HookBus
from billcore.plugins.loader import PluginManager

__all__ = ["PLUGIN_API_VERSION", "BillingFacade", "EVENTS", "FireResult", "HookBus",
           "PluginAPI", "PluginError", "PluginManager", "plugin_calls"]
