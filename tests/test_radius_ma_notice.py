"""A NAS that sends no Message-Authenticator while it is required (the safe
default, BlastRADIUS) gets no answer; the operator must be told so, not left
with a billing server that looks dead.

* end to end: ``billctl call radius.nas_add`` on a real ``billcore serve``
  says that such requests will be dropped; real ``radclient`` requests
  without Message-Authenticator then produce one log line naming the NAS
  (not one per request);
* in process, with a driven clock: the next line comes only after the
  interval, and says how many requests were dropped meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest

from radius.notices import MAX_KEYS, DropNotices
from radius.server import Nas, NasTable, RadiusServer
from tests.conftest import TEMPLATE, _create_db, _drop_db, free_port, need_peer, with_database
from tests.running import BillcoreProcess
from tests.test_radius_server import TableDecider
from tests.waiting import eventually

RADCLIENT = shutil.which("radclient")
SECRET = "ma-notice-secret"
ADMIN_PASSWORD = "admin-password-ma"


async def radclient(port: int, attrs: str) -> tuple[int, str]:
    """One Access-Request without Message-Authenticator (radclient 3.2 adds none unless asked)."""
    need_peer(RADCLIENT is not None, "radclient (Debian freeradius-utils) is not installed")
    assert RADCLIENT is not None
    proc = await asyncio.create_subprocess_exec(
        RADCLIENT, "-x", "-t", "0.3", "-r", "1", f"127.0.0.1:{port}", "auth", SECRET,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(attrs.encode()), 30)
    return proc.returncode or 0, out.decode()


def notices(log: str) -> list[str]:
    return [line for line in log.splitlines()
            if "role=radius" in line and "Message-Authenticator" in line and "level=warning" in line]


async def test_billctl_warns_and_the_radius_log_names_the_nas(tmp_path_factory: pytest.TempPathFactory,
                                                              pg_server_dsn: str, template_dsn: str) -> None:
    need_peer(RADCLIENT is not None, "radclient (Debian freeradius-utils) is not installed")
    db = await _create_db(pg_server_dsn, TEMPLATE)
    workdir = tmp_path_factory.mktemp("ma-notice")
    auth_port, acct_port = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    bc = BillcoreProcess(workdir, dsn=with_database(pg_server_dsn, db), radius={
        "enabled": True, "host": "127.0.0.1", "auth_port": auth_port, "acct_port": acct_port})
    bc.start()
    env = dict(os.environ, PW=ADMIN_PASSWORD, BILLCTL_PASSWORD=ADMIN_PASSWORD)
    try:
        bc.wait_for(r'role=radius .*msg="core connected"', timeout=90)
        made = subprocess.run([sys.executable, "-m", "billcore.cli", "-c", str(bc.config_path), "admin", "create",
                               "root", "--password-env", "PW"], env=env, capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        mark = len(bc.log())
        added = subprocess.run(
            [sys.executable, "-m", "billcore.clients.billctl", "--port", str(bc.urfa_port), "--login", "root", "call",
             "radius.nas_add", "name=bras-7", "address=127.0.0.1", f"secret={SECRET}"],
            env=env, capture_output=True, text=True, timeout=60)
        assert added.returncode == 0, added.stderr
        assert re.search(r"^id\s+\d+$", added.stdout, re.M), added.stdout
        assert "notice: require_message_authenticator is on" in added.stderr, added.stderr
        assert "without a Message-Authenticator attribute are dropped" in added.stderr
        bc.wait_for(r'role=radius .*msg="NAS table loaded" nas=1', after=mark, timeout=30)

        for _ in range(4):
            rc, out = await radclient(auth_port, 'User-Name = "alice", User-Password = "wonderland"')
            assert "Access-Accept" not in out and "Access-Reject" not in out, out   # dropped: no answer
        found = bc.wait_for(r"role=radius .*Access-Request without Message-Authenticator dropped.*", after=mark)
        line = found.group(0)
        assert "nas=bras-7" in line and "address=127.0.0.1" in line and "dropped=1" in line, line
        assert "radius.nas_edit" in line                                              # says what to do
        # all four drops were handled (radclient -r 1: one datagram each) before counting the lines
        await eventually(lambda: bc.metric("billcore_radius_dropped_total",
                                           reason="missing_message_authenticator") >= 4, what="four drops counted")
        assert len(notices(bc.log()[mark:])) == 1, notices(bc.log()[mark:])          # 4 drops, 1 line
    finally:
        bc.__exit__(None, None, None)
        await _drop_db(pg_server_dsn, db)


async def test_the_notice_is_rate_limited_and_counts_what_it_held_back(caplog: pytest.LogCaptureFixture) -> None:
    now = [1000.0]
    server = RadiusServer(decider=TableDecider({"alice": b"wonderland"}),
                          nas_table=NasTable([Nas("127.0.0.1", SECRET.encode(), name="bras-9",
                                                  require_message_authenticator=True)]),
                          clock=lambda: now[0])
    auth_port, _ = await server.listen("127.0.0.1", 0, 0)
    caplog.set_level(logging.WARNING, logger="radius.server")
    try:
        def lines() -> list[logging.LogRecord]:
            return [r for r in caplog.records if "without Message-Authenticator" in r.getMessage()]

        for _ in range(3):
            rc, out = await radclient(auth_port, 'User-Name = "alice", User-Password = "wonderland"')
            assert "Access-Accept" not in out, out
        assert [(r.nas, r.address, r.dropped) for r in lines()] == [("bras-9", "127.0.0.1", 1)]  # type: ignore[attr-defined]
        assert server.decider.authorized == []            # nothing reached the core's decision
        now[0] += 59.0
        await radclient(auth_port, 'User-Name = "alice", User-Password = "wonderland"')
        assert len(lines()) == 1                          # still inside the minute
        now[0] += 2.0
        await radclient(auth_port, 'User-Name = "alice", User-Password = "wonderland"')
        assert [r.dropped for r in lines()] == [1, 4]  # type: ignore[attr-defined]  # 3 held back, and this one
    finally:
        await server.close()


async def test_a_request_from_an_address_that_is_no_nas_is_logged_too(caplog: pytest.LogCaptureFixture) -> None:
    server = RadiusServer(decider=TableDecider({}), nas_table=NasTable([]))     # loaded, and empty
    auth_port, _ = await server.listen("127.0.0.1", 0, 0)
    caplog.set_level(logging.WARNING, logger="radius.server")
    try:
        for _ in range(2):
            await radclient(auth_port, 'User-Name = "alice", User-Password = "wonderland"')
        found = [r for r in caplog.records if "no NAS" in r.getMessage()]
        assert [(r.address, r.reason) for r in found] == [("127.0.0.1", "unknown_nas")]  # type: ignore[attr-defined]
        assert "radius.nas_add" in found[0].getMessage()
    finally:
        await server.close()


def test_spoofed_addresses_cannot_grow_the_notice_table() -> None:
    notices = DropNotices(interval=60.0)
    logged = sum(notices.note(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", "", "unknown_nas", 0.0) is not None
                 for i in range(3 * MAX_KEYS))
    assert logged == MAX_KEYS and len(notices._last) == MAX_KEYS and len(notices._since) <= MAX_KEYS
    assert notices.note("192.0.2.9", "", "unknown_nas", 61.0) is not None      # old entries expire
    assert len(notices._last) <= MAX_KEYS
