"""Tariff, report and snapshot calls, driven through their handlers on a real database."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import asyncpg
import pytest

from billcore.api import netflow_calls, reports, tariffs
from billcore.billing.periods import Period, prorate
from billcore.billing.rating import TrafficUsage
from billcore.billing.usage import commit_usage
from billcore.common.config import Config
from billcore.server.context import CoreContext
from netflow.classifier import BindingColumns
from netflow.snapshot import SnapshotLoader
from tests.test_usage_commit import make_accounts
from tests.waiting import eventually
from urfa.errors import CallFailed

NOW = datetime(2024, 4, 10, 12, tzinfo=timezone.utc)


class Ctx:
    def __init__(self, kind: str, pid: int) -> None:
        self.principal = SimpleNamespace(kind=kind, id=pid, login=f"{kind}{pid}")
        self.ip = "127.0.0.1"
        self.chunks: list[Any] = []

    async def stream(self, chunk: Any) -> None:
        self.chunks.append(chunk)


async def test_crud_snapshot_reports_and_me(pool: asyncpg.Pool) -> None:
    events: list[tuple[str, Any]] = []
    core = CoreContext(pool, Config(), publish=lambda t, p: events.append((t, p)), now=lambda: NOW)
    fn = {s.name: s.handler for s in [*tariffs.calls(core), *reports.calls(core), *netflow_calls.calls(core)]}
    admin = Ctx("admin", 1)
    async with pool.acquire() as conn:
        (account,) = await make_accounts(conn, 1)
        user_id = await conn.fetchval("SELECT user_id FROM accounts WHERE id = $1", account)
    inet = (await fn["classes.add"](admin, name="inet"))["id"]
    await fn["classes.add_rule"](admin, class_id=inet, remote_net="0.0.0.0/0", protocol=6,
                                 remote_ports=[80, 443])
    await fn["classes.add_rule"](admin, class_id=inet, remote_net="10.0.0.0/8", skip=True, position=-1)
    svc = (await fn["services.add"](admin, name="traffic", kind="traffic"))["id"]
    await fn["services.set_rate"](admin, service_id=svc, class_id=inet, unit_size=1_000_000,
                                  prepaid=1_000_000, tiers=[[0, 100]])
    fee = (await fn["services.add"](admin, name="fee", kind="periodic", fee=10_000_000,
                                    period={"kind": "monthly", "anchor": "2024-01-01"},
                                    charge_mode="start"))["id"]
    tariff = (await fn["tariffs.add"](admin, name="home", service_ids=[svc, fee]))["id"]
    await fn["tariffs.link"](admin, account_id=account, tariff_id=tariff)
    assert [h["tariff_id"] for h in await fn["tariffs.history"](admin, account_id=account)] == [tariff]
    async with pool.acquire() as conn:  # every catalogue change is in the audit log, reads are not
        logged = await conn.fetch("SELECT action, principal_login, after FROM audit_log ORDER BY id")
    assert [r["action"] for r in logged] == ["classes.add", "classes.add_rule", "classes.add_rule",
                                             "services.add", "services.set_rate", "services.add",
                                             "tariffs.add", "tariffs.link"]
    assert all(r["principal_login"] == "admin1" for r in logged)
    assert '"name": "home"' in [r["after"] for r in logged if r["action"] == "tariffs.add"][0]

    heard: list[str] = []
    listener = await pool.acquire()
    def hear(*args: Any) -> None:
        heard.append(args[-1])

    await listener.add_listener("billcore_classifier", hear)
    await fn["bindings.add"](admin, account_id=account, prefix="192.0.2.0/28")
    with pytest.raises(CallFailed) as overlap:
        await fn["bindings.add"](admin, account_id=account, prefix="192.0.2.8/29")
    assert overlap.value.code == "tariffs.conflict"
    worker = Ctx("system", 1)
    snap = await fn["netflow.snapshot"](worker)
    loader = SnapshotLoader()
    for chunk in worker.chunks:
        loader.feed(chunk)
    loaded, version = loader.finish(snap)
    bindings = loaded.bindings
    assert isinstance(bindings, BindingColumns) and version == snap["version"]
    assert [(bindings.prefix(0), int(bindings.account[0]), int(bindings.valid_from_ms[0]))] == [
        ("192.0.2.0/28", account, int(NOW.timestamp() * 1000))]
    rules = [r for c in worker.chunks if c["kind"] == "rules" for r in c["rules"]]
    assert [r["skip"] for r in rules] == [True, False] and rules[1]["remote_ports"] == [80, 443]
    # the change was announced at commit with the version the snapshot carries
    await eventually(lambda: heard, what="the classifier NOTIFY")
    assert int(heard[-1]) == snap["version"]
    await listener.remove_listener("billcore_classifier", hear)
    await pool.release(listener)

    async with pool.acquire() as conn:
        await commit_usage(conn, "w", 1, [TrafficUsage(account, inet, NOW - timedelta(hours=2), 3_000_000)], NOW)
    preview = await fn["reports.preview"](admin, account_id=account)
    apr, may = datetime(2024, 4, 1, tzinfo=timezone.utc), datetime(2024, 5, 1, tzinfo=timezone.utc)
    fee_part = prorate(10_000_000, Period(apr, may, 0), [(NOW, may)])   # linked on Apr 10, 12:00
    assert preview["total"] == 200 + fee_part and 0 < fee_part < 10_000_000
    me = Ctx("user", user_id)
    (mine,) = await fn["me.tariff"](me)
    assert mine["tariff"] == "home" and mine["prepaid"][0]["prepaid_left"] == 0
    traffic = await fn["me.traffic"](me, since="2024-04-01", until="2024-05-01")
    assert [(t["day"], t["quantity"], t["amount"]) for t in traffic] == [("2024-04-10", 3_000_000, 200)]
    with pytest.raises(CallFailed):
        await fn["me.traffic"](Ctx("user", user_id + 999), since="2024-04-01", until="2024-05-01",
                               account_id=account)
    result = await fn["reports.traffic"](admin, since="2024-04-01", until="2024-05-01")
    assert result["rows"] == 1 and admin.chunks == [[[account, inet, "2024-04-10", 3_000_000, 200]]]


@pytest.mark.parametrize("service_ids", [[[""], "", [""]], ["1"], [True], [0], "12", [2**63]])
async def test_a_tariff_s_services_must_be_ids(pool: asyncpg.Pool, service_ids: Any) -> None:
    """A list that holds anything but service ids is the caller's error (billing.tariff), not a TypeError
    from sorting it (the error-boundary fuzzer found ``[[""], "", [""]]`` answering ``internal``)."""
    from billcore.billing.tariffs import create_tariff
    from billcore.common.errors import TariffError
    async with pool.acquire() as conn:
        with pytest.raises(TariffError, match="service"):
            await create_tariff(conn, "bad ids", service_ids)
        assert await conn.fetchval("SELECT count(*) FROM tariffs WHERE name = 'bad ids'") == 0
