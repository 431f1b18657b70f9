"""The no-rollback record in PostgreSQL: it travels with the database, not the machine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import asyncpg
import pytest

from billcore.server.calls import CallRegistry
from billcore.plugins import errors
from billcore.plugins.hooks import HookBus
from billcore.plugins.loader import PluginManager
from billcore.plugins.versions import STATE_FILE

from .test_plugins_support import DevKey, marker_plugin, write_plugin

NOW = 1_800_000_000.0


def versioned(root: Path, version: str) -> Path:
    return write_plugin(root, "marked", version=version, calls=["marked.ping"],
                        init="async def ping(ctx):\n    return 'pong'\n"
                             "def setup(api):\n    api.register_call('marked.ping', ping)\n")


def manager(statedir: Path, keydir: Path, pool: asyncpg.Pool | None) -> PluginManager:
    return PluginManager(CallRegistry(), HookBus(), keydir, statedir, 1, "inst-1", pool)


async def test_a_new_manager_on_the_same_database_refuses_the_older_version(
        tmp_path: Path, pool: asyncpg.Pool) -> None:
    key = DevKey(tmp_path / "keys")
    newer = versioned(tmp_path, "1.10.0")
    key.sign(newer)
    first = manager(tmp_path / "state-a", tmp_path / "keys", pool)
    await first.load(newer, NOW)
    await first.close()
    row = await pool.fetchrow("SELECT version, signer, loaded_at FROM plugin_versions WHERE name = 'marked'")
    assert row["version"] == "1.10.0" and row["signer"].startswith("ed25519:") and row["loaded_at"] is not None
    assert not (tmp_path / "state-a" / STATE_FILE).exists(), "with a database the record is not a file"

    # Another machine (a fresh state directory), the same (restored) database.
    marker = tmp_path / "marker"
    older = marker_plugin(tmp_path, marker, version="1.9.0")
    key.sign(older)
    second = manager(tmp_path / "state-b", tmp_path / "keys", pool)
    with pytest.raises(errors.RollbackRefused, match="1.9.0 is older than 1.10.0"):
        await second.load(older, NOW)
    assert not marker.exists() and "billcore_plugin_marked" not in sys.modules
    # The same version is not a rollback, and a newer one raises the record.
    assert (await second.load(newer, NOW))["version"] == "1.10.0"
    second.unload("marked")
    newest = versioned(tmp_path, "2.0.0")
    key.sign(newest)
    await second.load(newest, NOW)
    await second.close()
    assert await pool.fetchval("SELECT version FROM plugin_versions WHERE name = 'marked'") == "2.0.0"
    # Deleting the row is the operator's way to allow an old version again.
    await pool.execute("DELETE FROM plugin_versions WHERE name = 'marked'")
    third = manager(tmp_path / "state-c", tmp_path / "keys", pool)
    assert (await third.load(older, NOW))["version"] == "1.9.0"
    await third.close()


async def test_without_a_database_the_record_is_the_state_file(tmp_path: Path) -> None:
    key = DevKey(tmp_path / "keys")
    newer = versioned(tmp_path, "1.1.0")
    key.sign(newer)
    m = manager(tmp_path / "state", tmp_path / "keys", None)
    await m.load(newer, NOW)
    await m.close()
    assert json.loads((tmp_path / "state" / STATE_FILE).read_text()) == {"marked": "1.1.0"}
    older = versioned(tmp_path, "1.0.0")
    key.sign(older)
    with pytest.raises(errors.RollbackRefused):
        await manager(tmp_path / "state", tmp_path / "keys", None).load(older, NOW)


async def test_a_state_file_left_from_before_is_imported_into_the_database(
        tmp_path: Path, pool: asyncpg.Pool) -> None:
    key = DevKey(tmp_path / "keys")
    state = tmp_path / "state"
    state.mkdir()
    (state / STATE_FILE).write_text(json.dumps({"marked": "3.0.0", "other": "1.0"}))
    await pool.execute("INSERT INTO plugin_versions (name, version, signer) VALUES ('other', '1.2', 'k')")
    older = versioned(tmp_path, "2.5.0")
    key.sign(older)
    m = manager(state, tmp_path / "keys", pool)
    with pytest.raises(errors.RollbackRefused, match="older than 3.0.0"):
        await m.load(older, NOW)
    rows = dict(await pool.fetch("SELECT name, version FROM plugin_versions ORDER BY name"))
    assert rows == {"marked": "3.0.0", "other": "1.2"}  # the higher of file and table wins
    assert not (state / STATE_FILE).exists() and (state / (STATE_FILE + ".imported")).exists()


async def test_an_unreadable_record_refuses_the_load(tmp_path: Path, pool: asyncpg.Pool) -> None:
    key = DevKey(tmp_path / "keys")
    plugin = versioned(tmp_path, "1.0.0")
    key.sign(plugin)
    await pool.execute("DROP TABLE plugin_versions")
    with pytest.raises(errors.PluginError, match="plugin_versions"):
        await manager(tmp_path / "state", tmp_path / "keys", pool).load(plugin, NOW)
