"""A database that goes away under a running core: calls answer with a clear
code and change nothing; when it comes back, the core serves again without a
restart, and the money is exactly where it was."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from billcore.db.embedded import EmbeddedPostgres
from tests.running import BillcoreProcess
from tests.test_e2e_core import billcore_cli
from urfa.client import connect
from urfa.errors import CallFailed


async def test_calls_fail_cleanly_while_the_database_is_down(tmp_path: Path) -> None:
    db = EmbeddedPostgres(tmp_path / "db")
    dsn = db.start()
    try:
        with BillcoreProcess(tmp_path, dsn=dsn) as bc:
            bc.child_pid("core")
            assert billcore_cli(bc.config_path, "admin", "create", "root", "--password-env", "PW",
                                env={"PW": "admin-password"}).returncode == 0
            admin = await connect("127.0.0.1", bc.urfa_port)
            await admin.login("admin", "root", "admin-password")
            user = await admin.call("users.create", {"login": "gina", "password": "gina-password"})
            account = user["basic_account_id"]
            await admin.call("payments.add", {"account_id": account, "amount": 7_000_000, "method": "cash",
                                              "external_id": "before"})

            await asyncio.to_thread(db.stop)
            with pytest.raises(CallFailed) as err:
                await admin.call("payments.add", {"account_id": account, "amount": 1_000_000, "method": "cash",
                                                  "external_id": "during"}, timeout=30)
            assert err.value.code == "core.db_unavailable"
            assert "nothing was changed" in err.value.message
            assert "Traceback" not in bc.log()

            await asyncio.to_thread(db.start)
            for _ in range(50):  # the pool replaces its dead connections on the next calls
                try:
                    view = await admin.call("accounts.get", {"account_id": account}, timeout=10)
                    break
                except CallFailed as again:
                    assert again.code == "core.db_unavailable"
                    await asyncio.sleep(0.2)
            assert view["balance"] == 7_000_000, "the failed payment must not have been booked"
            retried = await admin.call("payments.add", {"account_id": account, "amount": 1_000_000,
                                                        "method": "cash", "external_id": "during"})
            assert retried["created"] and retried["balance"] == 8_000_000
            await admin.close()
            assert 'msg="child died' not in bc.log(), "a database outage must not crash the core"
    finally:
        db.stop()
