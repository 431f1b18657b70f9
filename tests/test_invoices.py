"""Invoices, credit notes and statements against the real database (billcore.billing.invoices).

Histories are posted with the real key formats (``scheduler._periodic_key``,
``usage._usage_keys``, the once-off key) through ``post_charges`` and
payments through ``add_payment``; every test ends with ``verify`` finding
nothing.
"""

from __future__ import annotations

import datetime as dt
import itertools
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billcore.billing import accounts, invoices, payments
from billcore.billing.invoices import CreditRefused, NothingToInvoice, vat_of
from billcore.billing.ledger import Entry, post_charges
from billcore.billing.scheduler import _periodic_key
from billcore.billing.statements import statement_rows
from billcore.billing.usage import _usage_keys
from billcore.billing.verify import verify
from urfa.scram import make_verifier

UTC = dt.timezone.utc
TZ = ZoneInfo("Europe/Moscow")
VERIFIER = make_verifier("pw", iterations=4096)
_seq = itertools.count()
# a month in Moscow: [Mar 1 00:00 MSK, Apr 1 00:00 MSK)
MARCH = dt.datetime(2026, 3, 1, tzinfo=TZ).astimezone(UTC)
APRIL = dt.datetime(2026, 4, 1, tzinfo=TZ).astimezone(UTC)
GRACE = dt.timedelta(hours=1)


async def new_account(conn: asyncpg.Connection, vat_bp: int = 2000) -> int:
    user = await accounts.create_user(conn, f"inv{next(_seq)}", VERIFIER, full_name="Иван Иванов",
                                      address="Москва, ул. Ленина 1", email="i@example.org")
    acc = int(user["basic_account_id"])
    await conn.execute("UPDATE accounts SET vat_bp = $2 WHERE id = $1", acc, vat_bp)
    return acc


async def services(conn: asyncpg.Connection) -> dict[str, int]:
    out = {}
    for name, kind in (("Monthly fee", "periodic"), ("Internet", "traffic"), ("Dial-up", "time"),
                       ("Installation", "once")):
        out[name] = await conn.fetchval(
            "INSERT INTO services(name, kind, period_kind, period_anchor, charge_mode)"
            " SELECT $1, $2, p, CASE WHEN p IS NULL THEN NULL ELSE '2000-01-01'::date END,"
            " CASE WHEN p IS NULL THEN NULL ELSE 'start' END"
            " FROM (SELECT CASE WHEN $2 = 'periodic' THEN 'monthly' END AS p) x"
            " ON CONFLICT (name) DO UPDATE SET comment = '' RETURNING id", name, kind)
    out["class"] = await conn.fetchval(
        "INSERT INTO traffic_classes(name) VALUES ('World') ON CONFLICT (name) DO UPDATE SET position = 0"
        " RETURNING id")
    return out


def keyed(kind: str, acc: int, svc: dict[str, int], n: int) -> tuple[str, str]:
    """(ledger kind, idempotency key) of a charge of ``kind`` in the real key formats."""
    epoch = int(MARCH.timestamp())
    if kind == "periodic":
        return "periodic", _periodic_key(acc, svc["Monthly fee"], epoch, n)
    if kind == "traffic":
        return "traffic", _usage_keys("nf1", n, [(acc, svc["Internet"], svc["class"], 0, MARCH)])[0]
    if kind == "time":
        return "charge", _usage_keys("radius", n, [(acc, svc["Dial-up"], -1, 0, MARCH)])[0]
    if kind == "once":
        return "charge", f"once:{acc}:{svc['Installation']}:{n}"
    return "charge", f"manual:{acc}:{n}"


async def charge(conn: asyncpg.Connection, acc: int, kind: str, amount: int, at: dt.datetime,
                 svc: dict[str, int]) -> None:
    ledger_kind, key = keyed(kind, acc, svc, next(_seq))
    async with conn.transaction():
        await post_charges(conn, [Entry(acc, -amount, ledger_kind, key, reference=kind)], actor="test", now=at)


async def ledger_charges(conn: asyncpg.Connection, acc: int, since: dt.datetime, until: dt.datetime) -> int:
    return int(await conn.fetchval(
        "SELECT coalesce(sum(amount), 0)::bigint FROM ledger WHERE account_id = $1 AND created_at >= $2"
        " AND created_at < $3 AND kind IN ('periodic', 'traffic', 'charge', 'charge_reversal')"
        " AND idem_key NOT LIKE 'credit_note:%'", acc, since, until))


def test_vat_rounding_rule() -> None:
    assert vat_of(12_000_000, 2000) == 2_000_000
    assert vat_of(100, 2000) == 17                 # 16.67 → 17
    assert vat_of(3, 2000) == 1                    # 0.5 → 1 (half away from zero)
    assert vat_of(-3, 2000) == -1
    assert vat_of(-100, 2000) == -17
    assert vat_of(5, 0) == 0
    for total in range(-500, 500):
        for bp in (0, 1000, 1800, 2000, 10000):
            assert vat_of(-total, bp) == -vat_of(total, bp)


async def test_vat_sql_matches_python(db_dsn: str) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        cases = [(t, bp) for t in (*range(-300, 300, 7), 10**18 - 1, -(10**18 - 1), 123456789012345)
                 for bp in (0, 1, 999, 1000, 1800, 2000, 9999, 10000)]
        got = await conn.fetch(
            f"SELECT {invoices._VAT_SQL.format(t='t', bp='b')} AS v FROM unnest($1::bigint[], $2::int[])"
            " WITH ORDINALITY AS u(t, b, n) ORDER BY n", [c[0] for c in cases], [c[1] for c in cases])
        assert [r["v"] for r in got] == [vat_of(t, bp) for t, bp in cases]
    finally:
        await conn.close()


async def test_key_formats_pinned(db_dsn: str) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        svc = {"Monthly fee": 11, "Internet": 12, "Dial-up": 13, "Installation": 14, "class": 5}
        expect = {"periodic": ("periodic", 11, None), "traffic": ("traffic", 12, 5), "time": ("time", 13, None),
                  "once": ("once", 14, None), "manual": ("other", None, None)}
        for kind, (line_kind, service, klass) in expect.items():
            ledger_kind, key = keyed(kind, 77, svc, 3)
            row = await conn.fetchrow("SELECT ledger_charge_kind($1, $2) k, ledger_charge_service($1, $2) s,"
                                      " ledger_charge_class($1, $2) c", ledger_kind, key)
            assert (row["k"], row["s"], row["c"]) == (line_kind, service, klass), (kind, key)
        # a usage key too long for the index is hashed: an "other charges" line
        long_key = _usage_keys("x" * 250, 1, [(77, 12, 5, 0, MARCH)])[0]
        assert long_key.startswith("usage:sha256:")
        assert await conn.fetchval("SELECT ledger_charge_service('traffic', $1)", long_key) is None
    finally:
        await conn.close()


# ---------------------------------------------------------------- the run against the ledger

CHARGE_KINDS = ("periodic", "traffic", "time", "once", "manual")
when = st.integers(min_value=-2 * 86400, max_value=33 * 86400)        # seconds after MARCH
history = st.lists(st.one_of(
    st.tuples(st.sampled_from(CHARGE_KINDS), st.integers(0, 2), st.integers(1, 900_000_000), when),
    st.tuples(st.just("refund"), st.integers(0, 2), st.integers(1, 50_000_000), when),
    st.tuples(st.just("pay"), st.integers(0, 2), st.integers(1, 900_000_000), when),
    st.tuples(st.just("issue"), st.integers(0, 2), st.just(0), when),
), min_size=1, max_size=30)
SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@given(ops=history, vat=st.sampled_from([0, 1000, 1800, 2000]))
@SETTINGS
async def test_invoice_totals_equal_the_ledger_over_random_histories(pool: asyncpg.Pool, ops: list[tuple],
                                                                       vat: int) -> None:
    async with pool.acquire() as conn:
        svc = await services(conn)
        accs = [await new_account(conn, vat) for _ in range(3)]
        issued_on_demand: list[int] = []
        for op, i, amount, at_s in sorted(ops, key=lambda o: o[3]):
            acc, at = accs[i], MARCH + dt.timedelta(seconds=at_s)
            if op == "pay":
                await payments.add_payment(conn, account_id=acc, amount=amount, method="cash", actor="t", now=at)
            elif op == "refund":       # a periodic fee lowered: a credit on the periodic line
                async with conn.transaction():
                    await post_charges(conn, [Entry(acc, amount, *keyed("periodic", acc, svc, next(_seq)))],
                                       actor="t", now=at)
            elif op == "issue":         # an operator invoices on demand in the middle of the month
                try:
                    issued_on_demand.append(await invoices.issue(conn, acc, None, at, actor="t", now=at,
                                                                 series="INV", tz=TZ))
                except (NothingToInvoice, invoices.RangeRefused):
                    pass
            else:
                await charge(conn, acc, op, amount, at, svc)
        now = APRIL + dt.timedelta(hours=3)
        await invoices.run_batch(conn, accs, now, GRACE, series="INV", tz=TZ)
        again = await invoices.run_batch(conn, accs, now, GRACE, series="INV", tz=TZ)
        assert again.issued == 0 and again.accounts == 0           # idempotent
        for acc in accs:
            docs = await conn.fetch("SELECT id, period_start, period_end, total FROM invoices WHERE account_id = $1"
                                    " ORDER BY period_start", acc)
            # the chain: no overlap, each starts where the last ended, the last ends at the period end
            for a, b in zip(docs, docs[1:]):
                assert a["period_end"] <= b["period_start"]
            charged = await ledger_charges(conn, acc, docs[0]["period_start"] if docs else MARCH, APRIL)
            assert sum(d["total"] for d in docs) == -charged
            if docs:
                assert await conn.fetchval("SELECT invoiced_until FROM invoicing WHERE account_id = $1", acc) == APRIL
        assert await verify(conn, now) == []


async def test_a_late_ledger_row_in_an_invoiced_range_is_found_by_verify(db_dsn: str) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        svc = await services(conn)
        acc = await new_account(conn)
        await charge(conn, acc, "periodic", 300_000_000, MARCH + dt.timedelta(days=1), svc)
        now = APRIL + dt.timedelta(hours=2)
        # inside the grace nothing is invoiced yet; after it, the month is
        early = await invoices.run_batch(conn, [acc], APRIL + dt.timedelta(minutes=30), GRACE, series="INV", tz=TZ)
        assert early.issued == 0
        assert (await invoices.run_batch(conn, [acc], now, GRACE, series="INV", tz=TZ)).issued == 1
        assert await verify(conn, now) == []
        await charge(conn, acc, "once", 1_000_000, APRIL - dt.timedelta(seconds=1), svc)   # stamped in the range
        problems = await verify(conn, now)
        assert [p.check for p in problems] == ["invoice"] and problems[0].account_id == acc
    finally:
        await conn.close()


async def test_an_account_without_charges_gets_no_invoice_but_its_chain_moves(db_dsn: str) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        svc = await services(conn)
        quiet, busy = await new_account(conn), await new_account(conn)
        await payments.add_payment(conn, account_id=quiet, amount=5_000_000, method="cash", actor="t",
                                   now=MARCH + dt.timedelta(days=2))
        await charge(conn, busy, "traffic", 42_000_000, MARCH + dt.timedelta(days=2), svc)
        result = await invoices.run_batch(conn, [quiet, busy], APRIL + dt.timedelta(hours=2), GRACE,
                                          series="INV", tz=TZ)
        assert (result.accounts, result.issued, result.total) == (2, 1, 42_000_000)
        assert await conn.fetchval("SELECT count(*) FROM invoices WHERE account_id = $1", quiet) == 0
        assert await conn.fetchval("SELECT invoiced_until FROM invoicing WHERE account_id = $1", quiet) == APRIL
        with pytest.raises(NothingToInvoice):
            await invoices.issue(conn, quiet, None, APRIL + dt.timedelta(days=3), actor="t",
                                 now=APRIL + dt.timedelta(days=3), series="INV", tz=TZ)
        doc = await invoices.document(conn, await conn.fetchval("SELECT id FROM invoices"))
        assert doc["number"] == "INV-2026-000001" and doc["customer"]["full_name"] == "Иван Иванов"
        assert [(line["description"], line["total"], line["vat"]) for line in doc["lines"]] == [
            ("Internet — World", 42_000_000, 7_000_000)]
        # the outbox has the event, in the issuing transaction
        event = await conn.fetchrow("SELECT event, payload FROM outbox_events WHERE event = 'invoice.issued'")
        assert event is not None and '"INV-2026-000001"' in event["payload"]
    finally:
        await conn.close()


async def test_a_run_after_missed_month_ends_issues_one_invoice_per_missed_period(db_dsn: str) -> None:
    """The core was down at three month-ends: the next run issues April's, May's and June's invoices, each
    with its own month's charges, numbered in that order — as if every run had happened."""
    conn = await asyncpg.connect(db_dsn)
    try:
        svc = await services(conn)
        acc, steady = await new_account(conn), await new_account(conn)
        await charge(conn, acc, "periodic", 10_000_000, MARCH + dt.timedelta(days=1), svc)
        await invoices.run_batch(conn, [acc], APRIL + dt.timedelta(hours=2), GRACE, series="INV", tz=TZ)
        months = [dt.datetime(2026, m, 1, tzinfo=TZ).astimezone(UTC) for m in (4, 5, 6, 7)]
        for k, start in enumerate(months[:3]):
            await charge(conn, acc, "periodic", (k + 1) * 1_000_000, start + dt.timedelta(days=3), svc)
            await charge(conn, acc, "traffic", 500_000, start + dt.timedelta(days=9), svc)
        await charge(conn, steady, "traffic", 7_000_000, months[2] + dt.timedelta(days=2), svc)
        result = await invoices.run_batch(conn, [acc, steady], months[3] + dt.timedelta(hours=2), GRACE,
                                          series="INV", tz=TZ)
        assert (result.accounts, result.issued) == (2, 4)
        rows = await conn.fetch("SELECT number, period_start, period_end, total FROM invoices"
                                " WHERE account_id = $1 ORDER BY number", acc)
        assert [(r["period_start"], r["period_end"]) for r in rows] == [
            (MARCH, APRIL), (months[0], months[1]), (months[1], months[2]), (months[2], months[3])]
        assert [r["number"] for r in rows][1:] == sorted(r["number"] for r in rows)[1:]
        assert [r["total"] for r in rows] == [10_000_000, 1_500_000, 2_500_000, 3_500_000]
        for r in rows:
            assert r["total"] == -await ledger_charges(conn, acc, r["period_start"], r["period_end"])
        # the account that was not behind has its one invoice, since the previous period's start
        assert await conn.fetchval("SELECT total FROM invoices WHERE account_id = $1", steady) == 7_000_000
        assert await conn.fetchval("SELECT last_no FROM invoice_series") == 5
        assert await verify(conn, months[3] + dt.timedelta(hours=3)) == []
    finally:
        await conn.close()


# ---------------------------------------------------------------- credit notes

async def test_a_full_credit_note_reverses_exactly_and_a_partial_one_cannot_over_credit(db_dsn: str) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        svc = await services(conn)
        a, b = await new_account(conn), await new_account(conn)
        for acc in (a, b):
            for kind, amount in (("periodic", 500_000_003), ("traffic", 12_345_678), ("time", 3), ("once", 7)):
                await charge(conn, acc, kind, amount, MARCH + dt.timedelta(days=5), svc)
        now = APRIL + dt.timedelta(hours=2)
        await invoices.run_batch(conn, [a, b], now, GRACE, series="INV", tz=TZ)
        inv_a, inv_b = [r["id"] for r in await conn.fetch("SELECT id FROM invoices ORDER BY account_id")]
        balance = await conn.fetchval("SELECT balance FROM accounts WHERE id = $1", a)

        full = await invoices.document(conn, await invoices.credit(conn, inv_a, "wrong tariff", None, actor="t",
                                                                  now=now, series="CN", tz=TZ))
        original = await invoices.document(conn, inv_a)
        assert full["number"] == "CN-2026-000001" and full["credits"]["id"] == inv_a
        for key in ("net", "vat", "total"):
            assert full[key] == -original[key]
            assert [line[key] for line in full["lines"]] == [-line[key] for line in original["lines"]]
        assert [line["line_no"] for line in full["lines"]] == [line["line_no"] for line in original["lines"]]
        assert await conn.fetchval("SELECT balance FROM accounts WHERE id = $1", a) == balance - full["total"]
        with pytest.raises(CreditRefused):                       # nothing is left
            await invoices.credit(conn, inv_a, "again", None, actor="t", now=now, series="CN", tz=TZ)

        # partial: line 3 (traffic) in two parts, the second one cent too many is refused whole
        await invoices.credit(conn, inv_b, "outage", [{"line_no": 3, "total": 10_000_000}], actor="t", now=now,
                              series="CN", tz=TZ)
        with pytest.raises(CreditRefused):
            await invoices.credit(conn, inv_b, "outage", [{"line_no": 3, "total": 2_345_679}], actor="t", now=now,
                                  series="CN", tz=TZ)
        with pytest.raises(CreditRefused):
            await invoices.credit(conn, inv_b, "no such line", [{"line_no": 9, "total": 1}], actor="t", now=now,
                                  series="CN", tz=TZ)
        last = await invoices.document(conn, await invoices.credit(
            conn, inv_b, "outage", [{"line_no": 3, "total": 2_345_678}], actor="t", now=now, series="CN", tz=TZ))
        assert last["number"] == "CN-2026-000003" and last["total"] == -2_345_678
        assert len((await invoices.document(conn, inv_b))["credited_by"]) == 2
        with pytest.raises(invoices.InvoiceError):
            await invoices.credit(conn, last["id"], "a credit of a credit", None, actor="t", now=now,
                                  series="CN", tz=TZ)
        # documents are immutable
        with pytest.raises(asyncpg.RestrictViolationError):
            await conn.execute("UPDATE invoices SET total = 0 WHERE id = $1", inv_b)
        assert await verify(conn, now) == []
    finally:
        await conn.close()


# ---------------------------------------------------------------- statements

async def test_a_statement_opens_and_closes_with_the_ledger(db_dsn: str) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        svc = await services(conn)
        acc = await new_account(conn)
        await payments.add_payment(conn, account_id=acc, amount=1_000_000_000, method="cash", actor="t",
                                   now=MARCH - dt.timedelta(days=3))
        for day in range(1, 26):
            await charge(conn, acc, "traffic", 1_000_000 * day, MARCH + dt.timedelta(days=day), svc)
        await payments.add_payment(conn, account_id=acc, amount=7_000_000, method="cash", actor="t",
                                   now=MARCH + dt.timedelta(days=10, hours=5))
        async with conn.transaction(isolation="repeatable_read"):
            st = await statement_rows(conn, acc, MARCH + dt.timedelta(days=5), APRIL)
            st.chunk = 7
            chunks = [chunk async for chunk in st.rows()]
            await st.check()
        rows = [row for chunk in chunks for row in chunk]
        assert [len(c) for c in chunks] == [7, 7, 7, 1]
        assert st.opening == 1_000_000_000 - sum(1_000_000 * d for d in range(1, 5))
        # the payment was posted after the charges but stamped among them: the closing balance is the
        # ledger's at until, not the balance_after of the last row in time order
        assert st.closing == st.opening + sum(row[3] for row in rows)
        assert st.closing == await conn.fetchval("SELECT balance FROM accounts WHERE id = $1", acc)
        assert [row[1] for row in rows] == sorted(row[1] for row in rows)
    finally:
        await conn.close()


async def test_accounts_with_periods_of_their_own_are_invoiced_by_their_periods(db_dsn: str) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        svc = await services(conn)
        calendar, mid, weekly = await new_account(conn), await new_account(conn), await new_account(conn)
        await conn.execute("INSERT INTO account_periods(account_id, period_kind, period_anchor) VALUES"
                           " ($1, 'monthly', '2026-01-15'), ($2, 'weekly', '2026-03-02')", mid, weekly)
        for acc in (calendar, mid, weekly):
            for day in (1, 10, 16, 20, 29):
                await charge(conn, acc, "traffic", 1_000_000 * day, MARCH + dt.timedelta(days=day - 1, hours=12), svc)
        now = dt.datetime(2026, 4, 1, 3, tzinfo=TZ)
        result = await invoices.run_batch(conn, [calendar, mid, weekly], now, GRACE, series="INV", tz=TZ)
        assert result.issued == 3
        got = {r["account_id"]: (r["period_start"], r["period_end"], r["total"]) for r in await conn.fetch(
            "SELECT account_id, period_start, period_end, total FROM invoices")}
        local = lambda *a: dt.datetime(*a, tzinfo=TZ).astimezone(UTC)  # noqa: E731
        assert got[calendar] == (MARCH, APRIL, 1_000_000 * (1 + 10 + 16 + 20 + 29))
        assert got[mid] == (local(2026, 2, 15), local(2026, 3, 15), 1_000_000 * (1 + 10))
        assert got[weekly] == (local(2026, 3, 23), local(2026, 3, 30), 1_000_000 * 29)
        # the next run takes each chain on from where it ended
        later = dt.datetime(2026, 4, 20, 3, tzinfo=TZ)
        await invoices.run_batch(conn, [calendar, mid, weekly], later, GRACE, series="INV", tz=TZ)
        assert await conn.fetchval("SELECT count(*) FROM invoices WHERE account_id = $1", calendar) == 1
        assert [r["period_start"] for r in await conn.fetch(
            "SELECT period_start FROM invoices WHERE account_id = $1 ORDER BY period_start", mid)] == [
            local(2026, 2, 15), local(2026, 3, 15)]
        assert await conn.fetchval("SELECT invoiced_until FROM invoicing WHERE account_id = $1", weekly) == \
            local(2026, 4, 20)
        assert await verify(conn, later) == []
    finally:
        await conn.close()


async def test_the_schedulers_own_periodic_and_once_rows_make_their_lines(pool: asyncpg.Pool) -> None:
    """Keys as the scheduler really writes them (not hand-made): a monthly fee charged at the period's
    start by run_due, and a once-off fee, land on their services' lines."""
    from datetime import date

    from billcore.billing import tariffs as T
    from billcore.billing.scheduler import run_due

    async with pool.acquire() as conn:
        fee = await T.create_service(conn, "Home 100", "periodic", fee=30_000_000,
                                     period={"kind": "monthly", "anchor": date(2026, 1, 1)}, charge_mode="start")
        setup = await T.create_service(conn, "Setup", "once", fee=5_000_000)
        tariff = await T.create_tariff(conn, "Home", [fee, setup])
        acc = await new_account(conn)
        await T.link_tariff(conn, acc, tariff, now=MARCH, tz=TZ, actor="t")
    await run_due(pool, MARCH + dt.timedelta(minutes=5), tz=TZ)
    async with pool.acquire() as conn:
        keys = [r["idem_key"] for r in await conn.fetch("SELECT idem_key FROM ledger WHERE account_id = $1", acc)]
        assert any(k.startswith("periodic:") for k in keys) and any(k.startswith("once:") for k in keys), keys
        await invoices.run_batch(conn, [acc], APRIL + dt.timedelta(hours=2), GRACE, series="INV", tz=TZ)
        doc = await invoices.document(conn, await conn.fetchval("SELECT id FROM invoices WHERE account_id = $1", acc))
        assert [(line["line_kind"], line["service_id"], line["description"], line["total"]) for line in doc["lines"]] \
            == [("periodic", fee, "Home 100", 30_000_000), ("once", setup, "Setup", 5_000_000)]
        assert doc["total"] == -await ledger_charges(conn, acc, MARCH, APRIL)
