"""``billcore serve`` with the notify role: a payment and a low balance reach a real SMTP server and a webhook
receiver through the outbox, the core's dispatcher and the notify edge over URFA; a killed edge loses nothing."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import time
from pathlib import Path
from typing import Any

from tests.notify_peers import start_mail_sink, start_webhook_sink
from tests.running import BillcoreProcess
from tests.test_e2e_core import billcore_cli
from urfa.client import connect

UNIT = 1_000_000


async def until(check: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_payment_and_low_balance_emails_and_webhooks(tmp_path: Path, db_dsn: str) -> None:
    mail = await start_mail_sink()
    hook = await start_webhook_sink()
    bc = BillcoreProcess(tmp_path, dsn=db_dsn, notify={
        "enabled": True, "smtp_host": "127.0.0.1", "smtp_port": mail.port, "mail_from": "billing@isp.test",
        "low_balance": "10.00", "poll_interval": 0.5,
        # the edge's lease is a whole batch at its worst: these make it the 60 s floor
        "smtp_timeout": 5, "webhook_timeout": 5, "batch": 16, "concurrency": 16},
        outbox={"poll_interval": 0.5})
    try:
        with bc:
            bc.wait_for(r'role=notify .*msg="notify serving"', timeout=90)
            bc.wait_for(r'role=core .*msg="core serving"', timeout=90)
            made = billcore_cli(bc.config_path, "admin", "create", "root", "--password-env", "PW",
                                env={"PW": "admin-password"})
            assert made.returncode == 0, made.stderr
            admin = await connect("127.0.0.1", bc.urfa_port)
            await admin.login("admin", "root", "admin-password")
            try:
                added = await admin.call("webhooks.add", {"name": "crm", "url": f"http://127.0.0.1:{hook.port}/hook",
                                                          "events": ["payment.added", "balance.low"]})
                hook.secret = added["secret"].encode()
                user = await admin.call("users.create", {"login": "ivan", "password": "ivan-password",
                                                         "full_name": "Ivan", "email": "ivan@example.test"})
                acc = user["basic_account_id"]
                await admin.call("payments.add", {"account_id": acc, "amount": 5 * UNIT, "method": "cash",
                                                  "external_id": "e2e-1"})
                second = await admin.call("payments.add", {"account_id": acc, "amount": 20 * UNIT, "method": "cash",
                                                           "external_id": "e2e-2"})
                await until(lambda: any(m["Subject"].startswith("Payment received") for m in mail.messages))
                # the edge dies; what is enqueued meanwhile waits in the outbox, then goes out
                pid = bc.child_pid("notify")
                os.kill(pid, signal.SIGKILL)
                # the second payment cancelled: 25.00 → 5.00, below the threshold of 10.00
                await admin.call("payments.cancel", {"payment_id": second["payment_id"], "reason": "test"})
                await until(lambda: any(m["Subject"].startswith("Your balance is low") for m in mail.messages), 60)
                low = next(m for m in mail.messages if m["Subject"].startswith("Your balance is low"))
                assert low["Subject"] == "Your balance is low: 5.00 RUB" and low["To"] == "ivan@example.test"
                assert "below 10.00 RUB" in low.get_content()
                # a webhook the killed edge had claimed goes again when its lease (60 s) runs out
                await until(lambda: len(hook.seen) == 3, 100)
                assert sorted(b["event"] for b in hook.seen.values()) == ["balance.low", "payment.added",
                                                                          "payment.added"]
                assert hook.rejected == 0
                # None is dead.  One still pending was claimed by the edge that was killed (sent or not,
                # unacknowledged): its lease still runs, then it goes again and a receiver that saw it
                # de-duplicates by event id; or its outbox.done is on its way.  Nothing is lost.
                assert not await admin.call("outbox.list", {"state": "dead"})
                received = {m["X-Billcore-Event"] for m in mail.messages} | set(hook.seen)
                now = dt.datetime.now(dt.timezone.utc)
                for row in await admin.call("outbox.list", {"state": "pending"}):
                    if row["channel"] in ("email", "webhook"):
                        leased = row["claimed_until"] is not None and row["claimed_until"] > now
                        assert leased or str(row["event_id"]) in received, row
            finally:
                await admin.close()
    finally:
        mail.close()
        await hook.close()
