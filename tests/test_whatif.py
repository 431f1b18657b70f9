"""``reports.whatif``: a closed month re-rated under another tariff with the live charging code.

The history is made the real way: tariffs and links through ``billcore.billing.tariffs``, usage through
``usage.commit_usage`` (the NetFlow/RADIUS commit path), fees through the scheduler's ``run_due``, the
month closed by its run.  The what-if of the tariff the accounts were on equals what the ledger booked for
the month, per account and in total; under a cheaper and a dearer candidate the figures are the ones
computed by hand below; a candidate that prices by time ranges the counters cannot separate says so per
account; nothing is written; bad input gets a clear code.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest

from billcore.api import whatif_calls
from billcore.billing import classification
from billcore.billing import tariffs as T
from billcore.billing.rating import SessionUsage, TrafficUsage
from billcore.billing.scheduler import run_due
from billcore.billing.usage import commit_usage
from billcore.billing.whatif import Selection, Totals, month_window, rerate
from billcore.common.config import Config
from billcore.server.context import CoreContext
from tests.test_tariffs_api import Ctx
from tests.test_usage_commit import make_accounts
from urfa.errors import CallFailed

UTC = timezone.utc
OCT, NOV, DEC = (datetime(2026, m, 1, tzinfo=UTC) for m in (10, 11, 12))
NOW = datetime(2026, 12, 7, 12, tzinfo=UTC)
MB = 1_000_000
HOUR = 3600
TABLES = ("ledger", "usage_counters", "usage_daily", "periodic_charges", "once_charges", "period_summaries")


async def service(conn: asyncpg.Connection, name: str, *, fee: int, inet: int, local: int,
                  inet_prepaid: int, inet_tiers: list[tuple[int, int]], per_hour: int) -> list[int]:
    """A fee (monthly, charged at the period's start), a traffic and a time service; their ids."""
    periodic = await T.create_service(conn, f"{name} fee", "periodic", fee=fee,
                                      period={"kind": "monthly", "anchor": OCT.date()}, charge_mode="start")
    traffic = await T.create_service(conn, f"{name} traffic", "traffic")
    await T.set_rate(conn, traffic, class_id=inet, range_id=None, prepaid=inet_prepaid, unit_size=MB,
                     tiers=inet_tiers)
    await T.set_rate(conn, traffic, class_id=local, range_id=None, prepaid=0, unit_size=MB, tiers=[(0, 0)])
    time = await T.create_service(conn, f"{name} time", "time")
    await T.set_rate(conn, time, class_id=None, range_id=None, prepaid=0, unit_size=HOUR, tiers=[(0, per_hour)])
    return [periodic, traffic, time]


async def history(pool: asyncpg.Pool) -> dict[str, Any]:
    """Home: 10.00 a month, inet 2 MB prepaid then 0.001/MB, local free, 0.06/hour.  a1 on it from
    Oct 15 (all November), a2 from Nov 10 (21 of 30 days), a3 on 'other' (1.00 a month) since Oct 1."""
    async with pool.acquire() as conn:
        a1, a2, a3 = await make_accounts(conn, 3)
        inet = await classification.create_class(conn, "inet")
        local = await classification.create_class(conn, "local", position=-1)
        home = await T.create_tariff(conn, "home", await service(
            conn, "home", fee=10_000_000, inet=inet, local=local, inet_prepaid=2 * MB, inet_tiers=[(0, 1000)],
            per_hour=60_000))
        cheap = await T.create_tariff(conn, "cheap", await service(
            conn, "cheap", fee=5_000_000, inet=inet, local=local, inet_prepaid=0, inet_tiers=[(0, 500)],
            per_hour=30_000))
        dear = await T.create_tariff(conn, "dear", await service(
            conn, "dear", fee=20_000_000, inet=inet, local=local, inet_prepaid=MB,
            inet_tiers=[(0, 2000), (5 * MB, 1000)], per_hour=120_000))
        other_fee = await T.create_service(conn, "other fee", "periodic", fee=1_000_000,
                                           period={"kind": "monthly", "anchor": OCT.date()}, charge_mode="start")
        other = await T.create_tariff(conn, "other", [other_fee])
        # a candidate that prices inet at night apart: home's counters hold inet of every hour in one
        night = await T.create_time_range(conn, "night", priority=1, windows=[{"days": "mon-sun", "time": "00:00-08:00"}])
        nightly_traffic = await T.create_service(conn, "nightly traffic", "traffic")
        for range_id, price in ((night, 100), (None, 1000)):
            await T.set_rate(conn, nightly_traffic, class_id=inet, range_id=range_id, prepaid=0, unit_size=MB,
                             tiers=[(0, price)])
        await T.set_rate(conn, nightly_traffic, class_id=local, range_id=None, prepaid=0, unit_size=MB, tiers=[(0, 0)])
        nightly = await T.create_tariff(conn, "nightly", [nightly_traffic])
        await T.link_tariff(conn, a3, other, now=OCT, tz=UTC, actor="t")
        await T.link_tariff(conn, a1, home, now=OCT + timedelta(days=14), tz=UTC, actor="t")
    await run_due(pool, OCT + timedelta(days=14, minutes=1))
    await run_due(pool, NOV + timedelta(minutes=1))
    async with pool.acquire() as conn:
        await T.link_tariff(conn, a2, home, now=NOV + timedelta(days=9), tz=UTC, actor="t")
    await run_due(pool, NOV + timedelta(days=9, minutes=1))
    async with pool.acquire() as conn:
        day = timedelta(days=1)
        batches: list[tuple[datetime, list[Any]]] = [
            (NOV + 4 * day, [TrafficUsage(a1, inet, NOV + 4 * day + timedelta(hours=10), 5 * MB),
                             TrafficUsage(a1, local, NOV + 4 * day + timedelta(hours=10), 100 * MB)]),
            (NOV + 11 * day, [SessionUsage(a1, NOV + 11 * day + timedelta(hours=9), 2 * HOUR)]),
            (NOV + 14 * day, [TrafficUsage(a2, inet, NOV + 14 * day + timedelta(hours=10), MB),
                              SessionUsage(a2, NOV + 14 * day + timedelta(hours=12), HOUR // 2)]),
            (NOV + 19 * day, [TrafficUsage(a1, inet, NOV + 19 * day + timedelta(hours=10), 3 * MB)]),
        ]
        for mark, (at, usage) in enumerate(batches, 1):
            result = await commit_usage(conn, "w1", mark, usage, at + timedelta(hours=20))
            assert not result.rejected
    await run_due(pool, DEC + timedelta(minutes=5))   # closes November, books December's fees
    return {"a1": a1, "a2": a2, "a3": a3, "home": home, "cheap": cheap, "dear": dear, "other": other,
            "nightly": nightly}


async def booked_in_november(conn: asyncpg.Connection, account_id: int) -> int:
    """What the ledger charged the account for November: every charge row booked in November (the
    December fees were booked on December 1), as a positive sum."""
    return -int(await conn.fetchval(
        "SELECT coalesce(sum(amount), 0) FROM ledger WHERE account_id = $1 AND amount < 0"
        " AND created_at >= $2 AND created_at < $3", account_id, NOV, DEC))


async def row_counts(conn: asyncpg.Connection) -> dict[str, int]:
    return {table: await conn.fetchval(f"SELECT count(*) FROM {table}") for table in TABLES}


def call(pool: asyncpg.Pool) -> Any:
    core = CoreContext(pool, Config(), now=lambda: NOW)
    (spec,) = whatif_calls.calls(core)
    assert spec.right == "reports.read" and spec.streaming

    async def run(**args: Any) -> tuple[dict[str, tuple[Any, ...]], dict[str, Any]]:
        ctx = Ctx("admin", 1)
        result = await spec.handler(ctx, **args)
        rows = [tuple(row) for chunk in ctx.chunks for row in chunk]
        return {row[0]: row[1:] for row in rows}, result
    return run


async def test_current_tariff_equals_the_posted_charges_and_candidates_are_exact(pool: asyncpg.Pool) -> None:
    h = await history(pool)
    a1, a2, a3 = h["a1"], h["a2"], h["a3"]
    async with pool.acquire() as conn:
        posted = {acc: await booked_in_november(conn, acc) for acc in (a1, a2, a3)}
        before = await row_counts(conn)
    # by hand: a1 = fee 10.00 + inet (8 − 2 prepaid) MB × 0.001 + local 0 + 2 h × 0.06
    #          a2 = fee for 21 of 30 days 7.00 + inet 1 MB within prepaid + 0.5 h × 0.06
    assert posted == {a1: 10_000_000 + 6_000 + 120_000, a2: 7_000_000 + 30_000, a3: 1_000_000}
    run = call(pool)

    rows, totals = await run(tariff_id=h["home"], month="2026-11", of_tariff=h["home"])
    assert rows == {a1: (posted[a1], posted[a1], 0, ""), a2: (posted[a2], posted[a2], 0, "")}
    assert (totals["accounts"], totals["rerated"], totals["cannot_rerate"]) == (2, 2, 0)
    assert totals["charged"] == totals["would_pay"] == posted[a1] + posted[a2] and totals["difference"] == 0

    # cheaper: 5.00 a month, inet 0.0005/MB from the first, 0.03/hour
    rows, totals = await run(tariff_id=h["cheap"], month="2026-11", of_tariff=h["home"])
    cheap = {a1: 5_000_000 + 8 * 500 + 2 * 30_000, a2: 3_500_000 + 500 + 15_000}
    assert rows == {acc: (posted[acc], cheap[acc], cheap[acc] - posted[acc], "") for acc in (a1, a2)}
    assert totals["difference"] == sum(cheap.values()) - posted[a1] - posted[a2] == -(5_062_000 + 3_514_500)

    # dearer: 20.00 a month, inet 1 MB prepaid, then 5 MB at 0.002 and the rest at 0.001, 0.12/hour
    rows, totals = await run(tariff_id=h["dear"], month="2026-11", all=True)
    dear = {a1: 20_000_000 + 5 * 2000 + 2 * 1000 + 2 * 120_000, a2: 14_000_000 + 0 + 60_000,
            a3: 20_000_000}   # a3 (no usage) would pay dear's fee instead of other's 1.00
    assert rows == {acc: (posted[acc], dear[acc], dear[acc] - posted[acc], "") for acc in (a1, a2, a3)}
    assert totals["would_pay"] == sum(dear.values()) and totals["charged"] == sum(posted.values())

    # a range of months: October (a1 from the 15th: 17 of 31 days of the fee) and November
    async with pool.acquire() as conn:
        two_months = -int(await conn.fetchval("SELECT sum(amount) FROM ledger WHERE account_id = $1 AND amount < 0"
                                              " AND created_at >= $2 AND created_at < $3", a1, OCT, DEC))
    assert two_months == posted[a1] + 10_000_000 - 10_000_000 * 14 // 31   # cum(end) − cum(Oct 15)
    rows, totals = await run(tariff_id=h["home"], month="2026-10", until_month="2026-11", account_id=a1)
    assert rows == {a1: (two_months, two_months, 0, "")}

    # one account, by an instant in its period
    rows, totals = await run(tariff_id=h["home"], period_start=NOV + timedelta(days=20), account_id=a2)
    assert rows == {a2: (posted[a2], posted[a2], 0, "")} and totals["accounts"] == 1

    # inet priced at night apart: the counters cannot say which bytes were at night
    rows, totals = await run(tariff_id=h["nightly"], month="2026-11", all=True)
    assert rows[a1][1] is None and rows[a1][3].startswith("cannot_rerate:") and "time range" in rows[a1][3]
    assert rows[a3] == (1_000_000, 0, -1_000_000, "")    # no usage, no fee on nightly
    assert (totals["rerated"], totals["cannot_rerate"], totals["charged_rerated"], totals["would_pay"]) \
        == (1, 2, 1_000_000, 0)

    async with pool.acquire() as conn:
        assert await row_counts(conn) == before           # nothing posted, nothing written


async def test_batches_of_accounts_give_the_same_rows(pool: asyncpg.Pool) -> None:
    """Batch size 1 (a batch per account) and one batch answer the same rows and totals."""
    h = await history(pool)
    window = month_window("2026-11", None, UTC)
    answers = []
    for batch_size in (1, 1000):
        totals, rows = Totals(), []
        async with pool.acquire() as conn, conn.transaction(readonly=True, isolation="repeatable_read"):
            async for batch in rerate(conn, h["cheap"], window, Selection(), now=NOW, tz=UTC,
                                      batch_size=batch_size):
                assert len(batch) <= batch_size
                rows.extend(batch)
                for row in batch:
                    totals.add(row)
        answers.append((rows, totals.as_dict()))
    assert answers[0] == answers[1] and len(answers[0][0]) == 3


async def test_bad_requests_get_a_clear_code(pool: asyncpg.Pool) -> None:
    h = await history(pool)
    run = call(pool)
    for args, words in [
        ({"tariff_id": 999_999, "month": "2026-11", "all": True}, "tariff 999999 does not exist"),
        ({"tariff_id": h["home"], "month": "2027-01", "all": True}, "future"),
        ({"tariff_id": h["home"], "month": "2026-12", "all": True}, "not ended"),
        ({"tariff_id": h["home"], "period_start": NOW + timedelta(days=3), "all": True}, "future"),
        ({"tariff_id": h["home"], "month": "11/2026", "all": True}, "YYYY-MM"),
        ({"tariff_id": h["home"], "month": "2026-11"}, "exactly one of"),
        ({"tariff_id": h["home"], "month": "2026-11", "account_id": h["a1"], "all": True}, "exactly one of"),
        ({"tariff_id": h["home"], "all": True}, "month"),
        ({"tariff_id": h["home"], "month": "2025-11", "until_month": "2026-11", "all": True}, "at most 12 months"),
        ({"tariff_id": h["home"], "month": "2026-11", "until_month": "2026-10", "all": True}, "before the first"),
        ({"tariff_id": h["home"], "month": "2026-11", "account_id": 999_999}, "account 999999 does not exist"),
        ({"tariff_id": h["home"], "month": "2026-11", "of_tariff": 999_999}, "tariff 999999 does not exist"),
    ]:
        with pytest.raises(CallFailed) as failed:
            await run(**args)
        expected = "whatif.unknown" if "does not exist" in words else "whatif.invalid"
        assert failed.value.code == expected, (args, failed.value)
        assert words in str(failed.value), (args, str(failed.value))


async def test_all_accounts_at_scale_in_bounded_batches(pool: asyncpg.Pool) -> None:
    """100 000 accounts on one tariff, their charge tables as rating and the scheduler leave them: the
    what-if of their own tariff over all of them differs by nothing, batch by batch."""
    import time

    n = 100_000
    async with pool.acquire() as conn:
        inet = await classification.create_class(conn, "inet")
        traffic = await T.create_service(conn, "traffic", "traffic")
        await T.set_rate(conn, traffic, class_id=inet, range_id=None, prepaid=0, unit_size=MB, tiers=[(0, 1000)])
        fee = await T.create_service(conn, "fee", "periodic", fee=1_000_000,
                                     period={"kind": "monthly", "anchor": OCT.date()}, charge_mode="start")
        home = await T.create_tariff(conn, "home", [traffic, fee])
        await conn.execute(
            "INSERT INTO users(id, login, scram_salt, scram_iterations, scram_stored_key, scram_server_key)"
            " SELECT i, 'u' || i, '\\x00', 4096, '\\x00', '\\x00' FROM generate_series(1, $1) i", n)
        await conn.execute("INSERT INTO accounts(id, user_id) SELECT i, i FROM generate_series(1, $1) i", n)
        await conn.execute(
            "INSERT INTO account_tariffs(account_id, tariff_id, valid_from, created_at, created_by)"
            " SELECT i, $2, $3, $3, 't' FROM generate_series(1, $1) i", n, home, OCT)
        # i kB at 0.001/MB charge i micro-units; the fee is booked whole
        await conn.execute(
            "INSERT INTO usage_counters(account_id, service_id, class_id, range_id, period_start, quantity,"
            " charged, updated_at) SELECT i, $2, $3, 0, $4, i * 1000, i, $5 FROM generate_series(1, $1) i",
            n, traffic, inet, NOV, DEC)
        await conn.execute(
            "INSERT INTO periodic_charges(account_id, service_id, period_start, period_end, charged, revision,"
            " updated_at) SELECT i, $2, $3, $4, 1000000, 1, $3 FROM generate_series(1, $1) i", n, fee, NOV, DEC)
        await conn.execute("ANALYZE")
    started = time.perf_counter()
    rows, totals = await call(pool)(tariff_id=home, month="2026-11", all=True)
    seconds = time.perf_counter() - started
    assert len(rows) == totals["accounts"] == totals["rerated"] == n
    assert rows[n] == (1_000_000 + n, 1_000_000 + n, 0, "")
    assert totals["charged"] == totals["would_pay"] == n * 1_000_000 + n * (n + 1) // 2 and totals["difference"] == 0
    print(f"reports.whatif over {n} accounts: {seconds:.1f} s")
    assert seconds < 60     # 3.3 s on a quiet machine; a scan per batch took 40 s


async def test_counters_by_time_range_map_onto_the_candidate(pool: asyncpg.Pool) -> None:
    """An account on 'nightly' (inet at night 0.0001/MB, else 0.001/MB): its night and other-hours counters
    re-rate exactly under its own tariff, and add up into one counter under a tariff without ranges."""
    h = await history(pool)
    async with pool.acquire() as conn:
        (a4,) = await make_accounts(conn, 1)
        inet = await conn.fetchval("SELECT id FROM traffic_classes WHERE name = 'inet'")
        await T.link_tariff(conn, a4, h["nightly"], now=OCT, tz=UTC, actor="t")
        night, noon = NOV + timedelta(days=2, hours=2), NOV + timedelta(days=2, hours=12)
        await commit_usage(conn, "w2", 1, [TrafficUsage(a4, inet, night, 4 * MB)], night + timedelta(hours=1))
        await commit_usage(conn, "w2", 2, [TrafficUsage(a4, inet, noon, 6 * MB)], noon + timedelta(hours=1))
        ranges = await conn.fetch("SELECT range_id, quantity, charged FROM usage_counters WHERE account_id = $1"
                                  " ORDER BY range_id", a4)
        posted = await booked_in_november(conn, a4)
    assert [(r["range_id"] != 0, r["quantity"], r["charged"]) for r in ranges] == [(False, 6 * MB, 6000),
                                                                                    (True, 4 * MB, 400)]
    assert posted == 6400
    run = call(pool)
    for tariff, would in ((h["nightly"], 6400), (h["home"], 10_000_000 + (10 - 2) * 1000),
                          (h["cheap"], 5_000_000 + 10 * 500)):
        rows, _ = await run(tariff_id=tariff, month="2026-11", account_id=a4)
        assert rows == {a4: (posted, would, would - posted, "")}, tariff
