"""Logins while the database is down (issue 23): a real core whose
PostgreSQL is stopped under it answers a login at once with
``core.db_unavailable`` instead of leaving the client to a 10 s
``bye timeout``, and nothing in the URFA server's paths dies as an
unretrieved task or future exception."""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path

import pytest

from billcore.db.embedded import EmbeddedPostgres
from tests.running import BillcoreProcess
from tests.test_e2e_core import billcore_cli
from tests.test_security_urfa import Raw, code
from urfa.client import connect
from urfa.errors import CallFailed, LoginFailed

UNRETRIEVED = ("Task exception was never retrieved", "Future exception was never retrieved")


async def test_logins_during_an_outage_get_a_prompt_db_unavailable(tmp_path: Path) -> None:
    db = EmbeddedPostgres(tmp_path / "db")
    dsn = db.start()
    try:
        with BillcoreProcess(tmp_path, dsn=dsn) as bc:
            bc.child_pid("core")
            assert billcore_cli(bc.config_path, "admin", "create", "root", "--password-env", "PW",
                                env={"PW": "admin-password"}).returncode == 0
            assert billcore_cli(bc.config_path, "system", "create", "office", "--rights", "session.proxy",
                                "--password-env", "PW", env={"PW": "office-password"}).returncode == 0
            admin = await Raw.open(bc.urfa_port, "127.0.0.1")
            await admin.login("admin", "root", "admin-password")
            office = await connect("127.0.0.1", bc.urfa_port)
            await office.login("system", "office", "office-password")

            await asyncio.to_thread(db.stop)
            for attempt in range(12):       # more than the login limit: an outage is not a failed guess
                c = await Raw.open(bc.urfa_port, "127.0.0.1")
                started = time.monotonic()
                c.send({"t": "login", "proto": 1, "kind": "admin", "login": "root",
                        "cnonce": secrets.token_bytes(16)})
                got = await c.read(timeout=5.0)
                took = time.monotonic() - started
                assert got["t"] == "bye" and got["code"] == "core.db_unavailable", (attempt, got)
                assert took < 1.0, f"login answered after {took:.2f}s"
                await c.close()
            # the client library says so too
            client = await connect("127.0.0.1", bc.urfa_port)
            with pytest.raises(LoginFailed) as refused:
                await client.login("admin", "root", "admin-password")
            assert refused.value.code == "core.db_unavailable"
            await client.close()
            # the office's proxied logins: the same code, as a call error, promptly
            started = time.monotonic()
            with pytest.raises(CallFailed) as failed:
                await office.proxy_login("alice", "alice-password", "192.0.2.1")
            assert failed.value.code == "core.db_unavailable" and time.monotonic() - started < 1.0
            await office.close()
            # a session that was open before: calls fail cleanly, the connection stays
            assert code(await admin.call("users.search", {})) == "core.db_unavailable"
            assert code(await admin.call("sys.ping")) == "ok"

            await admin.close()
            # a window for a late "never retrieved" error: nothing to wait for when none comes
            await asyncio.sleep(0.5)
            log = bc.log()
            for text in UNRETRIEVED:
                assert text not in log, log
            assert "Traceback" not in log, log
    finally:
        db.stop()
