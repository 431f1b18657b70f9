"""A subscriber's day through the whole system, as an ISP runs it.

One ``billcore serve`` with every edge on: the administrator sets up a
per-megabyte tariff, a subscriber, a NAS and a RADIUS login over URFA; the
NAS (FreeRADIUS's radclient) authenticates the subscriber and reports the
session start, which binds the address it was given; the router exports
NetFlow v5 for that address; the core charges the bytes exactly; the
subscriber sees balance and traffic in the web office; the session stops;
``billcore verify`` finds the books consistent.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import aiohttp

from netflow.exporter import ExportClock, FlowSpec, build_v5
from tests.conftest import free_port, need_peer
from tests.running import BillcoreProcess
from tests.test_e2e_core import billcore_cli
from urfa.client import connect

SECRET = "nas-secret"
PAID = 50_000_000              # 50.00
PER_MB = 100_000               # 0.10 per MB (10^6 bytes)
REMOTE = "198.51.100.7"


async def radclient(port: int, command: str, attrs: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "radclient", "-x", "-t", "2", "-r", "3", f"127.0.0.1:{port}", command, SECRET,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(attrs.encode()), 60)
    return out.decode()


async def eventually(check, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.2)


async def test_a_subscribers_day(tmp_path: Path, db_dsn: str) -> None:
    need_peer(shutil.which("radclient") is not None, "radclient (Debian freeradius-utils) is not installed")
    auth_port, acct_port = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    flow_port, web_port = free_port(socket.SOCK_DGRAM), free_port()
    bc = BillcoreProcess(
        tmp_path, dsn=db_dsn,
        radius={"enabled": True, "host": "127.0.0.1", "auth_port": auth_port, "acct_port": acct_port},
        netflow={"enabled": True, "host": "127.0.0.1", "port": flow_port, "workers": 1,
                 "fsync_interval": 0.05, "ship_interval": 0.2},
        portal={"enabled": True, "host": "127.0.0.1", "port": web_port, "cookie_secure": False},
    )
    with bc:
        for role in ("radius", "portal"):
            bc.wait_for(rf'role={role} .*msg="(core connected|portal serving)"', timeout=60)
        bc.wait_for(r'role=netflow .*msg="netflow serving"', timeout=60)
        made = billcore_cli(bc.config_path, "admin", "create", "root", "--password-env", "PW", env={"PW": "admin-pw-1"})
        assert made.returncode == 0, made.stderr
        admin = await connect("127.0.0.1", bc.urfa_port)
        await admin.login("admin", "root", "admin-pw-1")

        # the operator's catalogue: every byte to or from the Internet, per megabyte
        internet = (await admin.call("classes.add", {"name": "internet"}))["id"]
        await admin.call("classes.add_rule", {"class_id": internet, "remote_net": "0.0.0.0/0"})
        service = (await admin.call("services.add", {"name": "internet traffic", "kind": "traffic"}))["id"]
        await admin.call("services.set_rate", {"service_id": service, "class_id": internet,
                                               "unit_size": 1_000_000, "tiers": [[0, PER_MB]]})
        tariff = (await admin.call("tariffs.add", {"name": "home", "service_ids": [service]}))["id"]

        user = await admin.call("users.create", {"login": "dana", "password": "dana-password",
                                                 "full_name": "Dana Scully"})
        account = user["basic_account_id"]
        await admin.call("payments.add", {"account_id": account, "amount": PAID, "method": "bank",
                                          "external_id": "bank-2026-0001"})
        await admin.call("tariffs.link", {"account_id": account, "tariff_id": tariff})
        await admin.call("radius.nas_add", {"name": "bras-1", "address": "127.0.0.1", "secret": SECRET,
                                            "require_message_authenticator": False})
        await admin.call("radius.pool_add", {"name": "home", "first": "100.64.0.10", "last": "100.64.0.20"})
        await admin.call("radius.link_add", {"account_id": account, "login": "dana", "password": "trustno1",
                                             "pool": "home"})

        # the NAS asks; the core answers with an address from the pool
        async def accepted() -> str | None:
            out = await radclient(auth_port, "auth", 'User-Name = "dana", User-Password = "trustno1"')
            m = re.search(r"Framed-IP-Address = (\S+)", out)
            return m.group(1) if "Access-Accept" in out and m else None

        ip = await eventually(accepted)
        assert ip and ip.startswith("100.64.0."), ip
        rejected = await radclient(auth_port, "auth", 'User-Name = "dana", User-Password = "wrong"')
        assert "Access-Reject" in rejected
        out = await radclient(acct_port, "acct", f'User-Name = "dana", Acct-Session-Id = "S-1",'
                                                 f' Acct-Status-Type = Start, Framed-IP-Address = {ip}')
        assert "Accounting-Response" in out, out

        # the router exports the subscriber's traffic; the address is bound to the account
        # from the session's start on, so the flows begin after it (part of the scenario:
        # the flows' wall-clock timestamps must be later than the session's start)
        await asyncio.sleep(1.0)
        now_ms = int(time.time() * 1000)
        flows = [FlowSpec(ip, REMOTE, 50000 + i, 443, 6, 1_000_000 + 37 * i, 900, now_ms - 300, now_ms)
                 for i in range(40)]
        flows += [FlowSpec(REMOTE, ip, 443, 50000 + i, 6, 2_500_000 + 11 * i, 1800, now_ms - 300, now_ms)
                  for i in range(40)]
        total = sum(f.bytes for f in flows)
        expected = PAID - total * PER_MB // 1_000_000     # floor, on the cumulative counter
        packets = build_v5(flows, ExportClock(now_ms - 3_600_000, now_ms + 100))

        async def balance_after_traffic() -> int | None:
            view = await admin.call("accounts.get", {"account_id": account})
            return view["balance"] if view["balance"] != PAID else None

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            for p in packets:
                s.sendto(p, ("127.0.0.1", flow_port))
        # the worker classifies with the snapshot the core publishes on every binding change
        got = await eventually(balance_after_traffic, timeout=60)
        assert got == expected, "\n".join(line for line in bc.log().splitlines() if "netflow" in line)[-6000:]

        # the subscriber's own view over URFA
        dana = await connect("127.0.0.1", bc.urfa_port)
        await dana.login("user", "dana", "dana-password")
        [mine] = await dana.call("me.accounts")
        assert mine["balance"] == expected
        today = datetime.now(timezone.utc).date()
        traffic = await dana.call("me.traffic", {"since": today.isoformat(),
                                                 "until": (today + timedelta(days=1)).isoformat()})
        assert sum(row["quantity"] for row in traffic) == total, traffic

        # and in the web office, logged in with the same password
        # unsafe=True: aiohttp keeps no cookies of bare IP addresses otherwise
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{web_port}", cookie_jar=jar) as web:
            page = await (await web.get("/login")).text()
            csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)  # type: ignore[union-attr]
            home = await web.post("/login", data={"csrf": csrf, "login": "dana", "password": "dana-password"})
            body = await home.text()
            assert home.status == 200, body[:500]
            whole, frac = divmod(expected, 1_000_000)
            assert f"{whole}.{frac // 10_000:02d}" in body.replace("\u202f", "").replace(",", ""), body[:2000]

        out = await radclient(acct_port, "acct", f'User-Name = "dana", Acct-Session-Id = "S-1",'
                                                 f' Acct-Status-Type = Stop, Framed-IP-Address = {ip},'
                                                 f' Acct-Session-Time = 60')
        assert "Accounting-Response" in out
        assert await admin.call("radius.sessions", {"account_id": account}) == []
        for c in (admin, dana):
            await c.close()
        verified = billcore_cli(bc.config_path, "verify")
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert "Traceback" not in bc.log()

