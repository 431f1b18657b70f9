"""The tray tool against the real core: in-process (``LiveCore``, with the
tariff calls, a restart mid-watch) and as ``billcore serve`` in a subprocess
driven through the command line."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from billcore.clients.tray import Tray, build_parser, render_status
from tests.running import BillcoreProcess
from tests.waiting import eventually
from tests.test_portal_harness import (  # noqa: F401  (live_core is a fixture)
    UNIT, LiveCore, live_core, seed_subscriber, seed_tariff, seed_usage,
)
from urfa.client import connect


def args(*argv: str, port: int) -> argparse.Namespace:
    return build_parser().parse_args([*argv, "--port", str(port), "--timeout", "5"])


async def test_tray_shows_balance_prepaid_and_switches_internet(live_core: LiveCore) -> None:  # noqa: F811
    admin = await live_core.admin()
    acc = await seed_subscriber(admin, "alice", "alice-password", balance=42_500_000, credit=5 * UNIT)
    classes = await seed_tariff(admin, live_core.pool, acc, prepaid=1 << 30)
    used = await seed_usage(live_core.pool, acc, classes, world_now=300 << 20)
    out: list[str] = []

    await Tray(args("alice", port=live_core.port), "alice-password", out.append).run()
    text = out[-1]
    assert "balance   42.50  (credit 5.00, available 47.50)" in text
    assert "internet  on" in text
    assert "tariff    Home 100" in text
    left = (1 << 30) - used
    assert f"Internet: {left * 10 // (1 << 20) // 10}.{left * 10 // (1 << 20) % 10} MiB left of 1.0 GiB" in text

    await Tray(args("alice", "--off", port=live_core.port), "alice-password", out.append).run()
    assert out[-2] == f"internet switched off on account {acc}"
    assert "internet  off (switched off by you)" in out[-1]
    assert (await admin.call("accounts.get", {"account_id": acc}))["blocks"] == ["user"]
    await Tray(args("alice", "--off", port=live_core.port), "alice-password", out.append).run()
    assert out[-2].endswith("(it was off already)")
    await Tray(args("alice", "--on", port=live_core.port), "alice-password", out.append).run()
    assert (await admin.call("accounts.get", {"account_id": acc}))["blocks"] == []
    await admin.close()


async def test_tray_watch_follows_payments_across_a_core_restart(live_core: LiveCore) -> None:  # noqa: F811
    admin = await live_core.admin()
    acc = await seed_subscriber(admin, "bob", "bob-password", balance=10 * UNIT)
    await admin.close()
    out: list[str] = []
    tray = Tray(args("bob", "--watch", "1", "--count", "3", "--json", port=live_core.port), "bob-password", out.append)
    task = asyncio.create_task(tray.run())
    await eventually(lambda: out, what="the tray's first line")
    assert json.loads(out[0])["accounts"][0]["balance"] == 10 * UNIT
    await live_core.restart()                          # bob's session is gone with the core's memory
    admin = await live_core.admin()
    await admin.call("payments.add", {"account_id": acc, "amount": 7 * UNIT, "method": "cash"})
    await admin.close()
    await asyncio.wait_for(task, 15)
    balances = [json.loads(line)["accounts"][0]["balance"] for line in out]
    assert len(balances) == 3 and balances[-1] == 17 * UNIT


def test_render_without_tariff_calls_and_with_blocks() -> None:
    accounts = [{"id": 3, "balance": -1_500_000, "credit": 0, "promised": 2 * UNIT, "blocks": ["system"]}]
    text = render_status("carol", accounts, None, dt.datetime(2024, 7, 1, 12, tzinfo=dt.timezone.utc))
    assert text.splitlines() == [
        "carol · 2024-07-01 12:00:00 UTC",
        "account 3",
        "  balance   -1.50  (credit 0.00, available 0.50)",
        "  internet  blocked (system)",
        "  prepaid   (this core does not tell)",
    ]


def tray_cli(port: int, *argv: str, password: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BILLCORE_TRAY_PASSWORD": password}
    return subprocess.run([sys.executable, "-m", "billcore.clients.tray", *argv, "--port", str(port)],
                          capture_output=True, text=True, env=env, timeout=60)


async def test_tray_command_against_billcore_serve(tmp_path: Path, db_dsn: str) -> None:
    with BillcoreProcess(tmp_path, dsn=db_dsn) as bc:
        bc.child_pid("core")
        done = subprocess.run(
            [sys.executable, "-m", "billcore.cli", "-c", str(bc.config_path), "admin", "create", "root",
             "--password-env", "PW"], capture_output=True, text=True, env={**os.environ, "PW": "admin-password"},
            timeout=60)
        assert done.returncode == 0, done.stderr
        admin = await connect("127.0.0.1", bc.urfa_port)
        await admin.login("admin", "root", "admin-password")
        acc = await seed_subscriber(admin, "dave", "dave-password", balance=3 * UNIT)

        run = await asyncio.to_thread(tray_cli, bc.urfa_port, "dave", "--off", password="dave-password")
        assert run.returncode == 0, run.stderr
        assert f"internet switched off on account {acc}" in run.stdout
        assert "balance   3.00" in run.stdout and "internet  off (switched off by you)" in run.stdout
        blocks = await admin.call("blocks.list", {"account_id": acc, "active_only": True})
        assert [b["kind"] for b in blocks] == ["user"]

        run = await asyncio.to_thread(tray_cli, bc.urfa_port, "dave", "--on", "--json", password="dave-password")
        assert run.returncode == 0, run.stderr
        status: dict[str, Any] = json.loads(run.stdout.splitlines()[-1])
        assert status["accounts"][0]["blocks"] == [] and status["accounts"][0]["balance"] == 3 * UNIT

        run = await asyncio.to_thread(tray_cli, bc.urfa_port, "dave", password="wrong-password")
        assert run.returncode == 3 and "login refused" in run.stderr
        await admin.close()
    run = await asyncio.to_thread(tray_cli, bc.urfa_port, "dave", password="dave-password")
    assert run.returncode == 4 and "cannot talk to the core" in run.stderr


def test_watch_must_be_sane() -> None:
    from billcore.clients.tray import main

    assert main(["x", "--watch", "0.2"]) == 2
    with pytest.raises(SystemExit):
        main(["x", "--off", "--on"])


def test_render_shows_a_sum_past_the_amount_range() -> None:
    # balance, credit and promised credit are each in range; their sum need not be, and a
    # display must show it rather than fail (one money formatter: billcore.common.money)
    from billcore.common.money import MAX_AMOUNT

    accounts = [{"id": 4, "balance": MAX_AMOUNT, "credit": MAX_AMOUNT, "promised": MAX_AMOUNT, "blocks": []}]
    text = render_status("erin", accounts, [], dt.datetime(2024, 7, 1, 12, tzinfo=dt.timezone.utc))
    assert ("  balance   999999999999.999999  (credit 999999999999.999999, available 2999999999999.999997)"
            in text.splitlines())
