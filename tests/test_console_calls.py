"""The console's card and system calls on a real database: accounts.audit, radius.history,
tariffs.quote and sys.health."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import pytest

from billcore.api import health, money_calls, radius_history, tariffs
from billcore.billing.rating import TrafficUsage
from billcore.billing.scheduler import run_due
from billcore.billing.usage import commit_usage
from billcore.common.config import Config
from billcore.server.context import CoreContext
from urfa.errors import CallFailed

UTC = dt.timezone.utc
NOW = dt.datetime(2026, 3, 15, 12, tzinfo=UTC)


class Ctx:
    def __init__(self, login: str = "admin1") -> None:
        self.principal = SimpleNamespace(kind="admin", id=1, login=login)
        self.ip = "192.0.2.10"
        self.chunks: list[Any] = []

    async def stream(self, chunk: Any) -> None:
        self.chunks.append(chunk)


@dataclass
class Core:
    pool: asyncpg.Pool
    fn: dict[str, Any]

    async def call(self, call_name: str, ctx: Ctx | None = None, /, **args: Any) -> Any:
        return await self.fn[call_name](ctx or Ctx(), **args)


@pytest.fixture
async def core(pool: asyncpg.Pool) -> Core:
    context = CoreContext(pool, Config(), publish=lambda t, p: None, now=lambda: NOW)
    specs = [*money_calls(context), *radius_history.calls(context), *tariffs.calls(context)]
    return Core(pool, {spec.name: spec.handler for spec in specs})


async def test_account_audit_is_the_account_and_its_user_newest_first(core: Core) -> None:
    alice = await core.call("users.create", login="alice", password="alice-password", full_name="Alice")
    bob = await core.call("users.create", login="bob", password="bob-password-1")
    account = alice["basic_account_id"]
    await core.call("payments.add", account_id=account, amount=5_000_000, method="cash", external_id="p1")
    await core.call("users.edit", Ctx("cashier7"), user_id=alice["id"], fields={"phone": "+7 900"})
    await core.call("blocks.set", account_id=account, reason="asked to")
    await core.call("payments.add", account_id=bob["basic_account_id"], amount=1_000_000, method="cash")
    await core.call("users.edit", user_id=bob["id"], fields={"phone": "+7 901"})
    second = await core.call("accounts.create", user_id=alice["id"])   # another account of alice: not this one's

    rows = await core.call("accounts.audit", account_id=account)
    assert [(row["action"], row["object"]) for row in rows] == [
        ("blocks.set", f"account:{account}"), ("users.edit", f"user:{alice['id']}"),
        ("payments.add", f"account:{account}"), ("users.create", f"user:{alice['id']}")]
    edit = rows[1]
    assert (edit["principal_kind"], edit["principal_login"], edit["ip"]) == ("admin", "cashier7", "192.0.2.10")
    assert edit["before"]["phone"] == "" and edit["after"]["phone"] == "+7 900"
    assert set(edit) == {"id", "at", "principal_kind", "principal_login", "ip", "action", "object", "before", "after"}
    assert [row["id"] for row in rows] == sorted((row["id"] for row in rows), reverse=True)
    # pages agree with the whole
    pages = [await core.call("accounts.audit", account_id=account, limit=1, offset=k) for k in range(5)]
    assert [page[0]["id"] for page in pages[:4]] == [row["id"] for row in rows] and pages[4] == []
    assert [row["action"] for row in await core.call("accounts.audit", account_id=second["id"])] == [
        "accounts.create", "users.edit", "users.create"]

    with pytest.raises(CallFailed) as unknown:
        await core.call("accounts.audit", account_id=10**9)
    assert unknown.value.code == "accounts.unknown"
    with pytest.raises(CallFailed) as too_many:
        await core.call("accounts.audit", account_id=account, limit=1001)
    assert too_many.value.code == "billing.invalid"


async def test_radius_history_lists_past_and_open_sessions_newest_first(core: Core) -> None:
    alice = await core.call("users.create", login="alice", password="alice-password")
    bob = await core.call("users.create", login="bob", password="bob-password-1")
    account, other = alice["basic_account_id"], bob["basic_account_id"]
    async with core.pool.acquire() as conn:
        nas = await conn.fetchval("INSERT INTO radius_nas(name, address, secret_enc)"
                                  " VALUES ('edge-1', '10.9.9.9', '\\x00') RETURNING id")
        links = {acc: await conn.fetchval("INSERT INTO radius_links(account_id, login, password_enc)"
                                          " VALUES ($1, $2, '\\x00') RETURNING id", acc, f"r{acc}")
                 for acc in (account, other)}
        for k, (acc, hours_ago, ended) in enumerate([(account, 30, "User-Request"), (account, 2, None),
                                                      (other, 1, None), (account, 50, "Lost-Carrier")]):
            started = NOW - dt.timedelta(hours=hours_ago)
            await conn.execute(
                "INSERT INTO radius_sessions(nas_id, session_id, account_id, link_id, login, framed_ip, started_at,"
                " updated_at, ended_at, end_reason, input_octets, output_octets)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $8, $9, $10, $11)",
                nas, f"s{k}", acc, links[acc], f"r{acc}", f"100.64.0.{k + 1}", started,
                None if ended is None else started + dt.timedelta(hours=1), ended, 1000 * k, 2000 * k)

    rows = await core.call("radius.history", account_id=account)
    assert [(row["framed_ip"], row["terminate_cause"]) for row in rows] == [
        ("100.64.0.2", None), ("100.64.0.1", "User-Request"), ("100.64.0.4", "Lost-Carrier")]
    assert rows[0]["stopped_at"] is None and rows[1]["stopped_at"] == NOW - dt.timedelta(hours=29)
    assert (rows[2]["octets_in"], rows[2]["octets_out"], rows[2]["nas"], rows[2]["login"]) == (
        3000, 6000, "edge-1", f"r{account}")
    assert set(rows[0]) == {"id", "login", "nas", "framed_ip", "started_at", "stopped_at", "octets_in",
                            "octets_out", "terminate_cause"}
    assert await core.call("radius.history", account_id=account, limit=1, offset=1) == [rows[1]]
    with pytest.raises(CallFailed) as unknown:
        await core.call("radius.history", account_id=10**9)
    assert unknown.value.code == "accounts.unknown"


FEB, MAR = dt.datetime(2026, 2, 1, tzinfo=UTC), dt.datetime(2026, 3, 1, tzinfo=UTC)


async def test_quote_is_what_charging_books_for_the_same_month(pool: asyncpg.Pool) -> None:
    """A real account on the services for February 2026: traffic committed day by day through
    commit_usage (the NetFlow path), fees by the scheduler's runs, the link closed at the month's end.
    The quote for the same services and traffic is what the ledger got, service by service."""
    clock = [FEB + dt.timedelta(days=3)]
    context = CoreContext(pool, Config(), publish=lambda t, p: None, now=lambda: clock[0])
    fn = {spec.name: spec.handler for spec in [*money_calls(context), *tariffs.calls(context)]}
    admin = Ctx()
    inet = (await fn["classes.add"](admin, name="inet"))["id"]
    local = (await fn["classes.add"](admin, name="local"))["id"]
    night = (await fn["timeranges.add"](admin, name="night", priority=1,
                                        windows=[{"days": "all", "time": "00:00-07:00"}]))["id"]
    traffic = (await fn["services.add"](admin, name="traffic", kind="traffic"))["id"]
    # inet: 2 GB prepaid, then 0.10/MB and from 5 GB beyond on 0.07/MB; at night half price; local: 0.01/MB
    await fn["services.set_rate"](admin, service_id=traffic, class_id=inet, unit_size=1_000_000,
                                  prepaid=2_000_000_000, tiers=[[0, 100_000], [5_000_000_000, 70_000]])
    await fn["services.set_rate"](admin, service_id=traffic, class_id=inet, range_id=night, unit_size=1_000_000,
                                  tiers=[[0, 50_000]])
    await fn["services.set_rate"](admin, service_id=traffic, class_id=local, unit_size=1_000_000, tiers=[[0, 10_000]])
    monthly = (await fn["services.add"](admin, name="monthly", kind="periodic", fee=25_990_000,
                                        period={"kind": "monthly", "anchor": "2020-01-01"}, charge_mode="start"))["id"]
    weekly = (await fn["services.add"](admin, name="weekly tv", kind="periodic", fee=3_333_333,
                                       period={"kind": "weekly", "anchor": "2024-01-03"}, charge_mode="start"))["id"]
    setup = (await fn["services.add"](admin, name="setup", kind="once", fee=7_000_000))["id"]
    services = [monthly, weekly, setup, traffic]
    tariff = (await fn["tariffs.add"](admin, name="home", service_ids=services))["id"]
    month_bytes = {inet: 12_345_678_901, local: 987_654_321}

    user = await fn["users.create"](admin, login="alice", password="alice-password")
    account = user["basic_account_id"]
    clock[0] = FEB
    await fn["tariffs.link"](admin, account_id=account, tariff_id=tariff)
    await run_due(pool, FEB + dt.timedelta(minutes=1))
    hours = [FEB + dt.timedelta(hours=k) for k in range((MAR - FEB) // dt.timedelta(hours=1))]
    async with pool.acquire() as conn:
        for day in range(len(hours) // 24):   # one commit a day, as a worker ships its batches
            batch = []
            for k in range(day * 24, day * 24 + 24):
                for klass, total in month_bytes.items():
                    share, extra = divmod(total, len(hours))
                    batch.append(TrafficUsage(account, klass, hours[k], share + (k < extra)))
            await commit_usage(conn, "w1", day + 1, batch, MAR)
    clock[0] = MAR
    await fn["tariffs.link"](admin, account_id=account, tariff_id=None)
    await run_due(pool, MAR + dt.timedelta(minutes=1))

    async with pool.acquire() as conn:
        booked = {row["service_id"]: int(row["amount"]) for row in await conn.fetch(
            "SELECT service_id, sum(charged) AS amount FROM (SELECT service_id, charged FROM periodic_charges"
            " WHERE account_id = $1 UNION ALL SELECT service_id, charged FROM usage_counters WHERE account_id = $1"
            " UNION ALL SELECT service_id, amount FROM once_charges WHERE account_id = $1) c GROUP BY service_id",
            account)}
        spent = -await conn.fetchval("SELECT sum(amount) FROM ledger WHERE account_id = $1", account)
    clock[0] = FEB + dt.timedelta(days=10)
    quoted = await fn["tariffs.quote"](admin, service_ids=services,
                                       traffic={str(klass): total for klass, total in month_bytes.items()})
    assert {line["service_id"]: line["amount"] for line in quoted["lines"]} == booked
    assert quoted["total"] == spent == sum(booked.values())
    assert booked[traffic] > 0 and booked[weekly] > 0 and booked[setup] == 7_000_000
    assert (quoted["start"], quoted["end"], quoted["unrated"]) == (FEB, MAR, [])
    assert [line["kind"] for line in quoted["lines"]] == ["periodic", "periodic", "once", "traffic"]


async def test_quote_for_part_of_a_month_and_what_it_cannot_rate(core: Core) -> None:
    admin = Ctx()
    fee = (await core.call("services.add", name="fee", kind="periodic", fee=28_000_000,
                           period={"kind": "monthly", "anchor": "2020-01-01"}, charge_mode="start"))["id"]
    inet = (await core.call("classes.add", name="inet"))["id"]
    traffic = (await core.call("services.add", name="traffic", kind="traffic"))["id"]
    await core.call("services.set_rate", service_id=traffic, class_id=inet, unit_size=1_000_000, tiers=[[0, 1000]])
    other = (await core.call("services.add", name="traffic 2", kind="traffic"))["id"]
    # NOW is in March (31 days): 10 days cost 10/31 of the fee, to the micro-unit as prorated
    part = await core.call("tariffs.quote", admin, service_ids=[fee], days=10)
    assert part["total"] == 28_000_000 * 10 // 31 and part["end"] == dt.datetime(2026, 3, 11, tzinfo=UTC)
    # a class without a rule is not charged, and says why, as rating says it
    alone = await core.call("tariffs.quote", service_ids=[traffic], traffic={str(inet): 5_000_000, "999": 7})
    assert alone["total"] == 5000 and alone["unrated"] == [{"class_id": 999, "bytes": 7, "reason": "no_rate"}]
    # two traffic services: charging would not know which to charge, and neither does the quote
    both = await core.call("tariffs.quote", service_ids=[traffic, other], traffic={str(inet): 5_000_000})
    assert both["total"] == 0 and both["unrated"][0]["reason"] == "ambiguous_service"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"service_ids": []}, "billing.invalid"), ({"service_ids": [fee, fee]}, "billing.invalid"),
        ({"service_ids": [10**9]}, "tariffs.unknown"), ({"service_ids": [fee], "days": 0}, "billing.invalid"),
        ({"service_ids": [fee], "days": 32}, "billing.invalid"),
        ({"service_ids": [fee], "traffic": {"inet": 1}}, "billing.invalid"),
        ({"service_ids": [fee], "traffic": {"1": -1}}, "billing.invalid")]
    for args, code in cases:
        with pytest.raises(CallFailed) as refused:
            await core.call("tariffs.quote", **args)
        assert refused.value.code == code, args


REPORTER = """
import sys
from billcore.server import metrics
from netflow import metrics as flow
from radius import server

role = sys.argv[1]
metrics.PROCESS_UP.labels(role).set(1)
if role == "supervisor":
    metrics.RESTARTS.labels("netflow").inc(2)
if role == "netflow":
    flow.RECEIVED.labels("w1").inc(100)
    flow.DROPS.labels("w1", "kernel").inc(3)
    flow.DROPS.labels("w1", "exporter").inc(1)
    flow.JOURNAL_LAG.labels("w1").set(4096)
    flow.CORE_CONNECTED.labels("w1").set(1)
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() == "requests":
        server.REQUESTS.labels("access").inc(50)
        server.REQUESTS.labels("accounting").inc(20)
        server.REPLIES.labels("access_reject").inc(5)
    print("done", flush=True)
"""


async def test_health_reads_every_process_from_its_metrics(core: Core, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics)}
    reporters = {role: subprocess.Popen([sys.executable, "-c", REPORTER, role], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env)
                 for role in ("supervisor", "netflow", "radius")}
    try:
        for reporter in reporters.values():
            assert reporter.stdout is not None and reporter.stdout.readline().strip() == "ready"
        async with core.pool.acquire() as conn:
            await conn.execute("INSERT INTO ingest_watermarks VALUES ('netflow:w1', 777, $1),"
                               " ('radius:1:x', 5, $1)", NOW)
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(metrics))
        context = CoreContext(core.pool, Config(), publish=lambda t, p: None, now=lambda: NOW)
        sys_health = health.calls(context)[0].handler
        first = await sys_health(Ctx())
        roles = {(row["role"], row["pid"]): row for row in first["processes"]}
        radius = roles[("radius", reporters["radius"].pid)]
        assert radius["state"] == "running" and radius["started_at"] is not None
        assert abs((radius["started_at"] - dt.datetime.now(UTC)).total_seconds()) < 120
        assert roles[("netflow", reporters["netflow"].pid)]["restarts"] == 2
        assert ("core", os.getpid()) in roles
        (worker,) = first["netflow"]
        assert (worker["worker"], worker["packets"], worker["drops"], worker["journal_lag"], worker["connected"],
                worker["watermark"], worker["watermark_at"]) == ("w1", 100, 4, 4096, True, 777, NOW)
        assert worker["drops_by_reason"] == {"kernel": 3, "exporter": 1} and worker["classifier_version"] >= 1
        assert first["radius"]["access_per_s"] is None and first["database"] == {"up": True}
        assert any("exporter" in line for line in first["missing"])

        radius_stdin, radius_stdout = reporters["radius"].stdin, reporters["radius"].stdout
        assert radius_stdin is not None and radius_stdout is not None
        radius_stdin.write("requests\n")
        radius_stdin.flush()
        assert radius_stdout.readline().strip() == "done"
        second = await sys_health(Ctx())
        assert (second["radius"]["access"], second["radius"]["accounting"], second["radius"]["rejects"]) == (50, 20, 5)
        assert second["radius"]["access_per_s"] > second["radius"]["rejects_per_s"] > 0

        reporters["radius"].kill()
        reporters["radius"].wait()
        third = await sys_health(Ctx())
        assert {(row["role"], row["state"]) for row in third["processes"]
                if row["pid"] == reporters["radius"].pid} == {("radius", "gone")}
    finally:
        for reporter in reporters.values():
            reporter.kill()
            reporter.wait()


async def test_health_without_the_supervisor_knows_the_core(core: Core, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    context = CoreContext(core.pool, Config(), publish=lambda t, p: None, now=lambda: NOW)
    answer = await health.calls(context)[0].handler(Ctx())
    assert [(row["role"], row["pid"], row["state"]) for row in answer["processes"]] == [("core", os.getpid(), "running")]
    assert answer["netflow"] == [] and answer["metrics"] is False and "supervisor" in answer["missing"][0]
