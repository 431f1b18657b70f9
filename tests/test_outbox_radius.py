"""A block's Disconnect is an outbox delivery: it reaches the NAS even when the
radius process was down when the block committed, a NAS that does not answer
is tried again after the backoff, and a delivered Disconnect is sent no more.

A real ``billcore serve`` (core only) on the test database, a real radius
process started by hand afterwards (``python -m billcore.server.proc radius``,
as the supervisor starts it) and the NAS simulator (radius/nas_sim.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import asyncpg

from billcore.common.sysfiles import service_password_file
from billcore.server.principals import ensure_service_login
from radius.nas_sim import NasSimulator
from radius.server import load_dictionary
from tests.conftest import free_port
from tests.running import BillcoreProcess
from tests.test_e2e_core import billcore_cli
from urfa.client import connect

SECRET = "nas-secret-outbox"


async def until(check, timeout: float = 20.0, every: float = 0.1) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(every)
    raise AssertionError(f"not true within {timeout}s")


def radius_config(bc: BillcoreProcess, auth: int, acct: int) -> Path:
    """The core's config with the radius role switched on (the core was started without it)."""
    text = bc.config_path.read_text().replace(
        "[radius]\nenabled = false\n",
        f'[radius]\nenabled = true\nhost = "127.0.0.1"\nauth_port = {auth}\nacct_port = {acct}\n'
        "coa_timeout = 0.3\ncoa_retries = 0\nstale_check = 3600.0\n")
    assert "enabled = true" in text
    path = bc.workdir / "radius.toml"
    path.write_text(text)
    return path


async def test_a_block_made_while_radius_was_down_disconnects_once_it_is_up(tmp_path: Path, db_dsn: str) -> None:
    sim = NasSimulator(SECRET.encode(), load_dictionary())
    nas_port = await sim.start("127.0.0.1", 0)
    radius: subprocess.Popen[bytes] | None = None
    with BillcoreProcess(tmp_path, dsn=db_dsn, outbox={"backoff_base": 1.0, "poll_interval": 1.0}) as bc:
        try:
            bc.child_pid("core")
            assert billcore_cli(bc.config_path, "admin", "create", "root", "--password-env", "PW",
                                env={"PW": "admin-pw"}).returncode == 0
            data_dir = bc.workdir / "var"
            conn = await asyncpg.connect(db_dsn)
            try:   # what the core does at start for an enabled radius role
                await ensure_service_login(conn, data_dir, "radius")
            finally:
                await conn.close()
            admin = await connect("127.0.0.1", bc.urfa_port)
            await admin.login("admin", "root", "admin-pw")
            await admin.call("radius.nas_add", {"name": "sim", "address": "127.0.0.1", "secret": SECRET,
                                                "coa_port": nas_port, "require_message_authenticator": False})
            user = await admin.call("users.create", {"login": "alice", "password": "alice-portal-pw"})
            acc = int(user["basic_account_id"])
            await admin.call("radius.link_add", {"account_id": acc, "login": "alice", "password": "wonderland"})
            # the session as the radius process reports it (it is down: we speak for it)
            nas_side = await connect("127.0.0.1", bc.urfa_port)
            await nas_side.login("system", "radius", service_password_file(data_dir, "radius").read_text().strip())
            await nas_side.call("radius.accounting", {"record": {
                "nas": "127.0.0.1", "status": "start", "session_id": "S-DOWN", "login": "alice",
                "event_time": time.time()}})
            await nas_side.close()
            sim.sessions["S-DOWN"] = "alice"
            sim.answer = False            # the NAS times out at first

            await admin.call("blocks.set", {"account_id": acc, "reason": "outbox"})
            await asyncio.sleep(2.0)
            assert sim.received == []     # nobody to send it
            [pending] = await admin.call("outbox.list", {"channel": "radius"})
            assert (pending["event"], pending["state"], pending["attempts"]) == ("account.blocked", "pending", 0)

            auth, acct = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
            env = {**os.environ, "BILLCORE_CONFIG": str(radius_config(bc, auth, acct))}
            with open(bc.workdir / "radius.log", "wb") as log:
                radius = subprocess.Popen([sys.executable, "-m", "billcore.server.proc", "radius"],
                                          stdout=log, stderr=subprocess.STDOUT, env=env, cwd=bc.workdir)

            async def tried_and_failed() -> bool:
                [row] = await admin.call("outbox.list", {"channel": "radius"})
                return bool(row["attempts"] >= 1 and row["last_error"] and row["state"] == "pending")

            await until(tried_and_failed)
            assert sim.received and all(code == 40 for code, _ in sim.received)   # Disconnect-Requests
            sim.answer = True             # the NAS is back: the retry after the backoff gets through

            async def delivered() -> bool:
                [row] = await admin.call("outbox.list", {"channel": "radius"})
                return bool(row["state"] == "delivered")

            await until(delivered)
            assert "S-DOWN" not in sim.sessions
            [row] = await admin.call("outbox.list", {"channel": "radius"})
            assert row["attempts"] >= 2 and row["event_id"] == pending["event_id"]
            sent = len(sim.received)
            await asyncio.sleep(3.0)      # a few polls later: a delivered Disconnect is not sent again
            assert len(sim.received) == sent
            code, attrs = sim.received[-1]
            assert code == 40 and attrs[44] == [b"S-DOWN"] and attrs[1] == [b"alice"]
            stats = await admin.call("outbox.stats", {})
            assert {"channel": "radius", "state": "delivered", "count": 1, "oldest_age": None} in stats["channels"]
            await admin.close()
        finally:
            if radius is not None:
                radius.send_signal(signal.SIGTERM)
                try:
                    radius.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    radius.kill()
                    radius.wait()
            sim.close()
