"""A subscriber's day in IPv6, through the whole system (test_e2e_isp_day.py's twin).

One ``billcore serve`` with RADIUS and NetFlow on: the administrator sets up
a per-megabyte tariff for IPv6 traffic, a subscriber, a NAS and a RADIUS
login over URFA; the NAS (FreeRADIUS's radclient) authenticates the
subscriber and reports the session start with the prefixes it gave — a /64
on the link (Framed-IPv6-Prefix) and a /56 delegated to the home router
(Delegated-IPv6-Prefix) — which binds both to the account; the router
exports the subscriber's IPv6 traffic as NetFlow v9 and IPFIX (netflow/
exporter.py's IPv6 templates: there is no IPv6-capable replay tool in
Debian's softflowd/nfdump that the v4 test's peers would give); the core
charges the bytes to and from both prefixes exactly, and nothing of a
neighbour's prefix; the session stops and unbinds them; ``billcore verify``
finds the books consistent.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import time
from pathlib import Path

import asyncpg

from netflow.exporter import ExportClock, FlowSpec, build_ipfix, build_v9
from tests.conftest import free_port, need_peer
from tests.running import BillcoreProcess
from tests.test_e2e_core import billcore_cli
from tests.test_e2e_isp_day import SECRET, eventually, radclient
from urfa.client import connect

PAID = 50_000_000              # 50.00
PER_MB = 100_000               # 0.10 per MB (10^6 bytes)
REMOTE = "2606:4700:4700::1111"
WAN = "2001:db8:1::/64"        # Framed-IPv6-Prefix
LAN = "2001:db8:aa00::/56"     # Delegated-IPv6-Prefix
NEIGHBOUR = "2001:db8:bb00::20"


async def test_a_subscribers_day_in_ipv6(tmp_path: Path, db_dsn: str) -> None:
    need_peer(shutil.which("radclient") is not None, "radclient (Debian freeradius-utils) is not installed")
    auth_port, acct_port = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    flow_port = free_port(socket.SOCK_DGRAM)
    bc = BillcoreProcess(
        tmp_path, dsn=db_dsn,
        radius={"enabled": True, "host": "127.0.0.1", "auth_port": auth_port, "acct_port": acct_port},
        netflow={"enabled": True, "host": "127.0.0.1", "port": flow_port, "workers": 1,
                 "fsync_interval": 0.05, "ship_interval": 0.2},
    )
    with bc:
        bc.wait_for(r'role=radius .*msg="core connected"', timeout=60)
        bc.wait_for(r'role=netflow .*msg="netflow serving"', timeout=60)
        made = billcore_cli(bc.config_path, "admin", "create", "root", "--password-env", "PW", env={"PW": "admin-pw-1"})
        assert made.returncode == 0, made.stderr
        admin = await connect("127.0.0.1", bc.urfa_port)
        await admin.login("admin", "root", "admin-pw-1")

        # every IPv6 byte to or from the Internet, per megabyte
        internet = (await admin.call("classes.add", {"name": "internet6"}))["id"]
        await admin.call("classes.add_rule", {"class_id": internet, "remote_net": "::/0"})
        service = (await admin.call("services.add", {"name": "internet traffic", "kind": "traffic"}))["id"]
        await admin.call("services.set_rate", {"service_id": service, "class_id": internet,
                                               "unit_size": 1_000_000, "tiers": [[0, PER_MB]]})
        tariff = (await admin.call("tariffs.add", {"name": "home6", "service_ids": [service]}))["id"]
        user = await admin.call("users.create", {"login": "fox", "password": "fox-password"})
        account = user["basic_account_id"]
        await admin.call("payments.add", {"account_id": account, "amount": PAID, "method": "bank",
                                          "external_id": "bank-2026-0006"})
        await admin.call("tariffs.link", {"account_id": account, "tariff_id": tariff})
        await admin.call("radius.nas_add", {"name": "bras-6", "address": "127.0.0.1", "secret": SECRET,
                                            "require_message_authenticator": False})
        await admin.call("radius.link_add", {"account_id": account, "login": "fox", "password": "trustno1"})

        async def accepted() -> bool:
            out = await radclient(auth_port, "auth", 'User-Name = "fox", User-Password = "trustno1"')
            return "Access-Accept" in out

        assert await eventually(accepted)
        out = await radclient(acct_port, "acct", f'User-Name = "fox", Acct-Session-Id = "S6-1",'
                                                 f' Acct-Status-Type = Start, Framed-IPv6-Prefix = {WAN},'
                                                 f' Delegated-IPv6-Prefix = {LAN}')
        assert "Accounting-Response" in out, out
        conn = await asyncpg.connect(db_dsn)
        try:
            bound = await conn.fetch("SELECT prefix::text AS p, account_id FROM ip_bindings WHERE valid_to IS NULL"
                                     " ORDER BY prefix")
            assert [(r["p"], r["account_id"]) for r in bound] == [(WAN, account), (LAN, account)]

            # the flows begin after the session's start (the prefixes are bound from then on)
            await asyncio.sleep(1.0)
            now_ms = int(time.time() * 1000)
            wan_host, lan_host = "2001:db8:1::2", "2001:db8:aa00:5::10"
            up = [FlowSpec(host, REMOTE, 50000 + i, 443, 6, 1_000_000 + 37 * i, 900, now_ms - 300, now_ms)
                  for i, host in enumerate([wan_host, lan_host] * 15)]
            down = [FlowSpec(REMOTE, host, 443, 50000 + i, 6, 2_500_000 + 11 * i, 1800, now_ms - 300, now_ms)
                    for i, host in enumerate([lan_host, wan_host] * 15)]
            stranger = [FlowSpec(NEIGHBOUR, REMOTE, 40000, 443, 6, 9_999_999, 10, now_ms - 300, now_ms)]
            total = sum(f.bytes for f in up + down)
            expected = PAID - total * PER_MB // 1_000_000     # floor, on the cumulative counter
            v9 = build_v9(up + stranger, ExportClock(now_ms - 3_600_000, now_ms + 100), source_id=6)
            ipfix = build_ipfix(down, (now_ms + 100) // 1000, domain=6)

            async def balance_after_traffic() -> int | None:
                view = await admin.call("accounts.get", {"account_id": account})
                return view["balance"] if view["balance"] != PAID else None

            for packets in (v9, ipfix):   # two exporters (source ports): a v9 router and an IPFIX one
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.bind(("127.0.0.1", 0))
                    for p in packets:
                        s.sendto(p, ("127.0.0.1", flow_port))
            got = await eventually(balance_after_traffic, timeout=60)
            if got != expected:   # the two exports may land in two batches: wait for the second
                await eventually(lambda: _settled(admin, account, expected), timeout=30)
                got = (await admin.call("accounts.get", {"account_id": account}))["balance"]
            assert got == expected, "\n".join(line for line in bc.log().splitlines() if "netflow" in line)[-6000:]
            assert await conn.fetchval("SELECT coalesce(sum(quantity), 0) FROM usage_daily WHERE account_id = $1"
                                       " AND class_id = $2", account, internet) == total

            out = await radclient(acct_port, "acct", f'User-Name = "fox", Acct-Session-Id = "S6-1",'
                                                     f' Acct-Status-Type = Stop, Framed-IPv6-Prefix = {WAN},'
                                                     f' Delegated-IPv6-Prefix = {LAN}, Acct-Session-Time = 60')
            assert "Accounting-Response" in out
            assert await admin.call("radius.sessions", {"account_id": account}) == []
            # the Stop ended both bindings: the prefixes are no one's now
            assert await conn.fetchval("SELECT count(*) FROM ip_bindings WHERE valid_to IS NULL") == 0
            assert await conn.fetchval("SELECT count(*) FROM ip_bindings WHERE account_id = $1", account) == 2
        finally:
            await conn.close()
        await admin.close()
        verified = billcore_cli(bc.config_path, "verify")
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert "Traceback" not in bc.log()


async def _settled(admin, account: int, expected: int) -> bool:  # type: ignore[no-untyped-def]
    return bool((await admin.call("accounts.get", {"account_id": account}))["balance"] == expected)
