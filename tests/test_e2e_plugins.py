"""Signed plugins in a real ``billcore serve``: signed with the CLI, loaded at
run time over URFA, seen by new sessions only, refused when tampered with."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.running import BillcoreProcess
from tests.test_e2e_core import billcore_cli
from urfa.client import connect
from urfa.errors import CallFailed

ROOT = Path(__file__).resolve().parent.parent


def plugin_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "billcore.cli", "plugin", *args],
                          capture_output=True, text=True, timeout=60)


def copy_plugin(name: str, dest: Path) -> Path:
    target = dest / name
    shutil.copytree(ROOT / "plugins" / name, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


async def test_run_time_load_tampering_and_new_sessions(tmp_path: Path, db_dsn: str) -> None:
    keys, plugin_dir, trusted = tmp_path / "keys", tmp_path / "plugins", tmp_path / "trusted"
    trusted.mkdir()
    assert plugin_cli("keygen", "--out", str(keys), "--name", "dev").returncode == 0
    shutil.copy(keys / "dev.pub", trusted / "dev.pub")
    for name in ("vouchers", "lowbalance"):
        signed = plugin_cli("sign", str(copy_plugin(name, plugin_dir)), "--key", str(keys / "dev.key"))
        assert signed.returncode == 0, signed.stderr
    # one changed byte after signing: the licence no longer matches
    init = plugin_dir / "lowbalance" / "__init__.py"
    init.write_bytes(init.read_bytes() + b"\n")

    with BillcoreProcess(tmp_path, dsn=db_dsn, plugins={"dir": str(plugin_dir), "key_dir": str(trusted)}) as bc:
        bc.child_pid("core")
        made = billcore_cli(bc.config_path, "admin", "create", "root", "--password-env", "PW", env={"PW": "admin-password"})
        assert made.returncode == 0, made.stderr
        before = await connect("127.0.0.1", bc.urfa_port)
        await before.login("admin", "root", "admin-password")

        with pytest.raises(CallFailed) as refused:
            await before.call("plugins.load", {"path": "lowbalance"})
        assert refused.value.code == "plugin.bad_signature", refused.value
        loaded = await before.call("plugins.load", {"path": "vouchers"})
        assert loaded["state"] == "loaded" and loaded["permanent"] is True

        # the session opened before the load keeps its call table
        with pytest.raises(CallFailed) as err:
            await before.call("vouchers.generate", {"count": 1, "amount": 5_000_000})
        assert err.value.code == "not_in_table"

        after = await connect("127.0.0.1", bc.urfa_port)
        await after.login("admin", "root", "admin-password")
        cards = await after.call("vouchers.generate", {"count": 2, "amount": 5_000_000})
        user = await after.call("users.create", {"login": "erin", "password": "erin-password"})
        account = user["basic_account_id"]
        first = await after.call("vouchers.redeem", {"code": cards[0]["code"], "account_id": account})
        again = await after.call("vouchers.redeem", {"code": cards[0]["code"], "account_id": account})
        assert again["repeated"] is True and again["payment_id"] == first["payment_id"]
        other = await after.call("users.create", {"login": "fred", "password": "fred-password"})
        with pytest.raises(CallFailed) as stolen:
            await after.call("vouchers.redeem", {"code": cards[0]["code"], "account_id": other["basic_account_id"]})
        assert stolen.value.code == "plugin.refused"
        assert (await after.call("accounts.get", {"account_id": account}))["balance"] == 5_000_000

        with pytest.raises(CallFailed) as permanent:
            await after.call("plugins.unload", {"name": "vouchers"})
        assert permanent.value.code == "plugin.permanent"
        listed = {p["name"]: p for p in await after.call("plugins.list")}
        assert listed["vouchers"]["state"] == "loaded" and "lowbalance" not in listed
        for c in (before, after):
            await c.close()
