"""The outbox under ``kill -9``: a real ``billcore serve`` with a signed plugin
whose ``payment.added`` hook appends ``event_id payment_id`` to a file, a
stream of payments from URFA clients, and the core killed (SIGKILL) again and
again at random moments — between a payment's commit and its hook's
delivery, in the middle of a dispatch, a delivery or an acknowledgement.

Afterwards every committed payment's event was delivered at least once (by
its event id), and no delivery names a payment that did not commit.  Then
``billctl outbox stats|list`` shows it as an operator would."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg

from tests.running import BillcoreProcess, pid_alive
from tests.test_e2e_core import billcore_cli
from tests.test_plugins_support import DevKey, write_plugin
from urfa.client import Client, connect
from urfa.errors import URFAError

KILLS = 6
PAYERS = 4
PASSWORD = "kill-admin-pw"

RECORDER = """\
import asyncio
from pathlib import Path

OUT = Path({out!r})


async def on_payment(payload):
    await asyncio.sleep(0.01)   # a hook that takes a moment: kills land mid-delivery too
    with OUT.open("a") as f:
        f.write(f"{{payload['event_id']}} {{payload['payment_id']}}\\n")


def setup(api):
    api.on("payment.added", on_payment)
"""


async def _login(port: int) -> Client:
    client = await connect("127.0.0.1", port)
    await client.login("admin", "root", PASSWORD)
    return client


async def pay_until(port: int, account: int, who: int, stop: asyncio.Event, answered: list[str]) -> None:
    """Payments one after another; a payment whose answer was lost is sent again
    with the same external id (idempotent) once the core is back."""
    client: Client | None = None
    n = 0
    while not stop.is_set():
        external = f"kill-{who}-{n}"
        try:
            if client is None:
                client = await asyncio.wait_for(_login(port), 5)
            await asyncio.wait_for(client.call("payments.add", {
                "account_id": account, "amount": 1_000_000, "method": "cash", "external_id": external}), 5)
            answered.append(external)
            n += 1
        except (URFAError, OSError, asyncio.TimeoutError):
            if client is not None:
                await client.close()
            client = None
            await asyncio.sleep(0.1)
    if client is not None:
        await client.close()


def core_pid(bc: BillcoreProcess, after: int) -> int:
    return int(bc.wait_for(r'role=core pid=(\d+) .*msg="core serving"', timeout=60, after=after).group(1))


async def test_kill_the_core_repeatedly_and_every_committed_payment_is_heard(tmp_path: Path, db_dsn: str) -> None:
    out = tmp_path / "heard.txt"
    out.touch()
    plugin_dir, keys = tmp_path / "plugins", tmp_path / "keys"
    key = DevKey(keys)
    plugin = write_plugin(plugin_dir, "recorder", hooks=["payment.added"], init=RECORDER.format(out=str(out)))
    key.sign(plugin)
    rng = random.Random(18)
    with BillcoreProcess(tmp_path, dsn=db_dsn, plugins={"dir": str(plugin_dir), "key_dir": str(keys),
                                                        "load": [plugin.name]},
                         supervisor={"restart_backoff_max": 1.0},
                         outbox={"poll_interval": 1.0, "lease": 5.0, "backoff_base": 1.0}) as bc:
        pid = core_pid(bc, 0)
        assert billcore_cli(bc.config_path, "admin", "create", "root", "--password-env", "PW",
                            env={"PW": PASSWORD}).returncode == 0
        admin = await _login(bc.urfa_port)
        user = await admin.call("users.create", {"login": "payer", "password": "payer-portal-pw"})
        account = int(user["basic_account_id"])
        await admin.close()

        stop = asyncio.Event()
        answered: list[str] = []
        payers = [asyncio.create_task(pay_until(bc.urfa_port, account, i, stop, answered)) for i in range(PAYERS)]
        try:
            killed = []
            for _ in range(KILLS):
                await asyncio.sleep(rng.uniform(0.3, 1.5))
                mark = len(bc.log())
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                deadline = time.monotonic() + 10
                while pid_alive(pid) and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                pid = await asyncio.to_thread(core_pid, bc, mark)
            await asyncio.sleep(1.0)      # some payments after the last restart, too
        finally:
            stop.set()
            await asyncio.gather(*payers)
        assert len(set(killed)) == KILLS and pid not in killed
        assert len(answered) > 20, "the payments should keep flowing between kills"

        conn = await asyncpg.connect(db_dsn)
        try:
            async def settled() -> bool:
                return bool(await conn.fetchval(
                    "SELECT NOT EXISTS (SELECT 1 FROM outbox_events WHERE dispatched_at IS NULL)"
                    " AND NOT EXISTS (SELECT 1 FROM outbox_deliveries WHERE state <> 'delivered')"))

            deadline = time.monotonic() + 60
            while not await settled():
                assert time.monotonic() < deadline, "the outbox did not drain after the last restart"
                await asyncio.sleep(0.2)
            payments = {int(r["id"]): r["external_id"] for r in await conn.fetch("SELECT id, external_id FROM payments")}
            events = {int(r["payment_id"]): int(r["id"]) for r in await conn.fetch(
                "SELECT id, (payload->>'payment_id')::bigint AS payment_id FROM outbox_events"
                " WHERE event = 'payment.added'")}
            attempts = await conn.fetchval("SELECT max(attempts) FROM outbox_deliveries")
        finally:
            await conn.close()

        heard = [tuple(map(int, line.split())) for line in out.read_text().splitlines()]
        heard_events = {event for event, _ in heard}
        # every payment the core answered committed, and exactly one event was written with it
        assert set(answered) <= set(payments.values())
        assert set(events) == set(payments), "a committed payment without its event, or an event without one"
        # every committed payment's event was delivered to the hook, at least once, by its event id
        missing = {p for p, e in events.items() if e not in heard_events}
        assert not missing, f"{len(missing)} committed payments never reached the hook: {sorted(missing)[:10]}"
        # and nothing was heard of a payment that did not commit (or under another event's id)
        assert all(events.get(payment) == event for event, payment in heard), "a delivery of an unknown payment"
        print(f"{len(payments)} payments, {len(heard)} deliveries ({len(heard) - len(heard_events)} repeated"
              f" after kills), most tries of one delivery: {attempts}")

        # the metrics say so too (the gauges follow the dispatcher's poll)
        deadline = time.monotonic() + 10
        while bc.metric("billcore_outbox_delivered_total", channel="hook") == 0 or \
                bc.metric("billcore_outbox_pending", channel="hook") != 0:
            assert time.monotonic() < deadline, "outbox metrics did not show the drained hook channel"
            await asyncio.sleep(0.5)
        assert bc.metric("billcore_outbox_dispatch_lag_seconds") == 0

        # the operator's view of it
        env = {**os.environ, "BILLCTL_PASSWORD": PASSWORD, "BILLCTL_PORT": str(bc.urfa_port)}

        def billctl(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "billcore.clients.billctl", "--login", "root", "--json",
                                   *args], capture_output=True, text=True, env=env, timeout=60)

        stats = billctl("outbox", "stats")
        assert stats.returncode == 0, stats.stderr
        shown = json.loads(stats.stdout)
        assert shown["undispatched"] == 0
        assert {(c["channel"], c["state"], c["count"]) for c in shown["channels"]} == {
            ("hook", "delivered", len(payments))}
        listed = billctl("outbox", "list", "--channel", "hook", "--limit", "5")
        assert listed.returncode == 0, listed.stderr
        rows = json.loads(listed.stdout)
        assert len(rows) == 5 and {r["target"] for r in rows} == {"recorder"} and {r["state"] for r in rows} == {
            "delivered"}
        retry = billctl("outbox", "retry", str(rows[0]["id"]))     # not dead: nothing to retry
        assert retry.returncode == 0 and json.loads(retry.stdout) == {"retried": []}, retry.stderr
        bad = billctl("outbox", "list", "--state", "gone")
        assert bad.returncode != 0 and "invalid choice" in bad.stderr
