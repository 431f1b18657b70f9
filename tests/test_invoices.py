"""Invoices, credit notes and statements against the real database (billcore.billing.invoices).

Histories are posted with the real key formats (``scheduler._periodic_key``,
``usage._usage_keys``, the once-off key) through ``post_charges`` and
payments through ``add_payment``; every test ends with ``verify`` finding
nothing.
"""

from __future__ import annotations

import asyncio
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
