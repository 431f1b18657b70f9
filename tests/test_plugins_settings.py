"""Operators' plugin settings: <config_dir>/<name>.toml over the manifest's [config]."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from billcore.server.calls import CallRegistry
from billcore.plugins import errors
from billcore.plugins.hooks import HookBus
from billcore.plugins.loader import PluginManager
from billcore.plugins.settings import overlay

from .test_plugins_support import DevKey, write_plugin

NOW = 1_800_000_000.0

DEFAULTS = """
[config]
greeting = "hello"
repeat = 1
ratio = 0.5
loud = false
tags = ["a"]

[config.mail]
host = "localhost"
port = 25
"""


def configured_plugin(root: Path, marker: Path) -> Path:
    init = f"""\
        from pathlib import Path
        Path({str(marker)!r}).write_text("plugin code ran")
        SEEN = {{}}

        async def show(ctx):
            return SEEN

        def setup(api):
            SEEN.update(api.config)
            api.register_call("conf.show", show)
        """
    d = write_plugin(root, "conf", calls=["conf.show"], init=init)
    (d / "plugin.toml").write_text((d / "plugin.toml").read_text() + textwrap.dedent(DEFAULTS))
    return d


@pytest.fixture
def setup_env(tmp_path: Path) -> tuple[DevKey, Path, Path, Path]:
    key = DevKey(tmp_path / "keys")
    marker = tmp_path / "marker"
    plugin = configured_plugin(tmp_path, marker)
    key.sign(plugin)
    config_dir = tmp_path / "plugin-config"
    config_dir.mkdir()
    return key, plugin, config_dir, marker


def manager(tmp_path: Path, config_dir: Path) -> PluginManager:
    return PluginManager(CallRegistry(), HookBus(), tmp_path / "keys", tmp_path / "state", 1, "inst-1",
                         config_dir=config_dir)


async def shown(m: PluginManager) -> dict[str, object]:
    table = m.registry.snapshot("admin", frozenset({"*"}))
    try:
        return dict(await table.lookup("conf.show").spec.handler(None))
    finally:
        table.close()


async def test_operator_file_overrides_the_defaults(tmp_path: Path, setup_env: tuple[DevKey, Path, Path, Path]) -> None:
    _, plugin, config_dir, _ = setup_env
    (config_dir / "conf.toml").write_text('greeting = "salut"\nratio = 2\ntags = ["x", "y"]\n'
                                          '[mail]\nport = 587\n')
    m = manager(tmp_path, config_dir)
    await m.load(plugin, NOW)
    try:
        seen = await shown(m)
    finally:
        await m.close()
    assert seen == {"greeting": "salut", "repeat": 1, "ratio": 2.0, "loud": False, "tags": ["x", "y"],
                    "mail": {"host": "localhost", "port": 587}}
    assert type(seen["ratio"]) is float


async def test_without_a_file_the_plugin_sees_its_defaults(tmp_path: Path, setup_env: tuple[DevKey, Path, Path, Path]) -> None:
    _, plugin, config_dir, _ = setup_env
    m = manager(tmp_path, config_dir)
    await m.load(plugin, NOW)
    try:
        assert (await shown(m))["greeting"] == "hello"
    finally:
        await m.close()


@pytest.mark.parametrize("text, message", [
    ('greting = "typo"\n', r"unknown setting 'greting' \(known: greeting, loud, mail, ratio, repeat, tags\)"),
    ('[mail]\nhots = "x"\n', r"\[mail\]: unknown setting 'hots'"),
    ('repeat = "3"\n', "setting 'repeat' must be int, not str"),
    ("repeat = true\n", "setting 'repeat' must be int, not bool"),
    ("loud = 1\n", "setting 'loud' must be bool, not int"),
    ('ratio = "0.1"\n', "setting 'ratio' must be float, not str"),
    ("tags = [1]\n", "setting 'tags' holds str items, not int"),
    ("mail = 3\n", "setting 'mail' must be dict, not int"),
    ("greeting = \n", "not valid TOML"),
])
async def test_bad_operator_settings_are_refused_before_plugin_code_runs(
        tmp_path: Path, setup_env: tuple[DevKey, Path, Path, Path], text: str, message: str) -> None:
    _, plugin, config_dir, marker = setup_env
    (config_dir / "conf.toml").write_text(text)
    m = manager(tmp_path, config_dir)
    with pytest.raises(errors.PluginConfigError, match=message) as info:
        await m.load(plugin, NOW)
    assert str(config_dir / "conf.toml") in str(info.value)
    assert info.value.code == "plugin.config"
    assert not marker.exists() and "billcore_plugin_conf" not in sys.modules
    assert m.list() == []


async def test_settings_given_to_load_are_checked_too(tmp_path: Path, setup_env: tuple[DevKey, Path, Path, Path]) -> None:
    _, plugin, config_dir, marker = setup_env
    (config_dir / "conf.toml").write_text('greeting = "from the file"\n')
    m = manager(tmp_path, config_dir)
    with pytest.raises(errors.PluginConfigError, match="unknown setting 'colour'"):
        await m.load(plugin, NOW, config={"colour": "red"})
    assert not marker.exists()
    await m.load(plugin, NOW, config={"repeat": 3})
    try:
        seen = await shown(m)
    finally:
        await m.close()
    assert (seen["greeting"], seen["repeat"]) == ("hello", 3)  # explicit settings replace the file


def test_overlay_keeps_defaults_unchanged() -> None:
    defaults = {"mail": {"port": 25}, "n": 1}
    merged = overlay(defaults, {"mail": {"port": 587}}, "x")
    assert merged == {"mail": {"port": 587}, "n": 1}
    assert defaults == {"mail": {"port": 25}, "n": 1}
