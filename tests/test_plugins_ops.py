"""What an operator reads about plugins: refused loads in the log with their reason, licence
times as dates (UTC), not Unix seconds."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from billcore.server.calls import CallRegistry
from billcore.plugins import errors
from billcore.plugins.cli import main
from billcore.plugins.hooks import HookBus
from billcore.plugins.loader import PluginManager

from .test_plugins_support import DevKey, write_plugin

NOW = 1_800_000_000.0          # 2027-01-15T08:00:00Z


async def test_refused_loads_are_logged_with_the_reason(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    key = DevKey(tmp_path / "keys")
    manager = PluginManager(CallRegistry(), HookBus(timeout=0.5), tmp_path / "keys", tmp_path / "state", 1, None)
    try:
        unsigned = write_plugin(tmp_path, "nosig")
        expired = write_plugin(tmp_path, "old")
        key.sign(expired, not_after=int(NOW) - 3600)
        caplog.set_level(logging.INFO, logger="billcore.plugins")
        with pytest.raises(errors.UnsignedPlugin):
            await manager.load(unsigned, NOW)
        with pytest.raises(errors.LicenceExpired) as err:
            await manager.load(expired, NOW)
        # the time a person reads, in the error as in the log
        assert "licence expired at 2027-01-15T07:00:00Z, now is 2027-01-15T08:00:00Z" in str(err.value)
        refused = [r for r in caplog.records if r.getMessage() == "plugin refused"]
        assert [(r.levelno, r.code, r.path) for r in refused] == [  # type: ignore[attr-defined]
            (logging.WARNING, errors.UnsignedPlugin.code, str(unsigned)),
            (logging.WARNING, errors.LicenceExpired.code, str(expired))]
        assert "not signed" in refused[0].reason                    # type: ignore[attr-defined]
        assert "2027-01-15T07:00:00Z" in refused[1].reason          # type: ignore[attr-defined]
        ok = write_plugin(tmp_path, "fine")
        key.sign(ok)
        caplog.clear()
        await manager.load(ok, NOW)
        assert not [r for r in caplog.records if r.getMessage() == "plugin refused"]
    finally:
        await manager.close()


def test_verify_prints_the_licence_window_as_dates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "keys"
    assert main(["plugin", "keygen", "--out", str(keys)]) == 0
    d = write_plugin(tmp_path, "acme")
    assert main(["plugin", "sign", str(d), "--key", str(keys / "plugin-signing.key"),
                 "--not-after", "2030-01-01"]) == 0
    capsys.readouterr()
    assert main(["plugin", "verify", str(d), "--keydir", str(keys), "--at", "2029-06-01"]) == 0
    out = capsys.readouterr().out
    assert "valid -..2030-01-01T00:00:00Z" in out, out


async def test_plugins_list_gives_licence_times_as_times(tmp_path: Path) -> None:
    import datetime as dt

    key = DevKey(tmp_path / "keys")
    manager = PluginManager(CallRegistry(), HookBus(timeout=0.5), tmp_path / "keys", tmp_path / "state", 1, None)
    try:
        d = write_plugin(tmp_path, "timed")
        key.sign(d, not_after=int(NOW) + 86_400)
        await manager.load(d, NOW)
        (entry,) = manager.list()
        # a time value on the wire (billctl shows 2027-01-16T08:00:00+00:00), not 1800086400
        assert entry["licence"]["not_after"] == dt.datetime(2027, 1, 16, 8, tzinfo=dt.timezone.utc)
        assert entry["licence"]["not_before"] is None
    finally:
        await manager.close()


async def test_a_plugin_declares_its_money_fields(tmp_path: Path) -> None:
    key = DevKey(tmp_path / "keys")
    registry = CallRegistry()
    manager = PluginManager(registry, HookBus(timeout=0.5), tmp_path / "keys", tmp_path / "state", 1, None)
    try:
        d = write_plugin(tmp_path, "till", calls=["till.float"], init='''\
            async def float_(ctx):
                return {"count": 3, "amount": 12_500_000}

            def setup(api):
                api.register_call("till.float", float_, result="map",
                                  fields={"count": "int", "amount": "money"})
            ''')
        key.sign(d)
        await manager.load(d, NOW)
        described = registry.snapshot("admin", frozenset({"*"})).describe()
        (till,) = [c for c in described if c["name"] == "till.float"]
        assert till["fields"] == {"count": "int", "amount": "money"}   # what billctl formats money from
    finally:
        await manager.close()
