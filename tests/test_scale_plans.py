"""Operator look-ups and checks stay index- and set-based (issue 24).

At a million subscribers a sequential scan per search, or a per-row
subplan in ``billcore verify``, is what turns milliseconds into timeouts.
These tests read the plans PostgreSQL picks (EXPLAIN) on a few thousand
rows, with ``enable_seqscan`` off for the look-ups: a missing or unusable
index then still shows as a Seq Scan, whatever the table's size.  What
the searches return is checked against the plain scan's answer.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator

import asyncpg
import pytest

from billcore.billing import accounts as A
from billcore.billing.verify import _BALANCE_AND_CHAIN, _PAYMENT, _REVERSAL, verify
from billcore.ops import checks

N = 3000
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


@pytest.fixture
async def subscribers(db_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """N users (logins sub000000…, names, phones, contracts), accounts, /32 bindings, RADIUS logins, a ledger."""
    conn = await asyncpg.connect(db_dsn)
    await conn.execute(
        "INSERT INTO users(login, full_name, email, phone, address, external_id,"
        " scram_salt, scram_iterations, scram_stored_key, scram_server_key)"
        " SELECT 'sub' || lpad(g::text, 6, '0'), (ARRAY['Ivan Petrov','Olga Smirnova','Anna Volkova'])[g % 3 + 1],"
        " 'sub' || g || '@example.net', '+7 912 ' || lpad(g::text, 7, '0'), 'Lenina st. ' || g,"
        " 'C-' || lpad(g::text, 7, '0'), '\\x00', 4096, '\\x00', '\\x00' FROM generate_series(0, $1 - 1) g", N)
    await conn.execute("INSERT INTO accounts(user_id, is_basic, balance) SELECT id, true, 990 FROM users ORDER BY id")
    await conn.execute(
        "INSERT INTO ledger(account_id, amount, balance_after, kind, idem_key, actor, created_at)"
        " SELECT id, 1000, 1000, 'correction', 'p:' || id, 'test', $1 FROM accounts", T0)
    # a traffic charge per account, and the usage counter that agrees with it
    service = await conn.fetchval("INSERT INTO services(name, kind) VALUES ('traffic', 'traffic') RETURNING id")
    await conn.execute(
        "INSERT INTO ledger(account_id, amount, balance_after, kind, idem_key, actor, created_at)"
        " SELECT id, -10, 990, 'traffic', 'usage:w0:' || id, 'test', $1 FROM accounts", T0)
    await conn.execute(
        "INSERT INTO usage_counters(account_id, service_id, class_id, range_id, period_start, quantity, charged,"
        " updated_at) SELECT id, $1, 1, 0, $2, 100, 10, $2 FROM accounts", service, T0)
    await conn.execute(
        "INSERT INTO ip_bindings(account_id, prefix, kind, source, valid_from)"
        " SELECT id, ('10.1.' || (id / 256) || '.' || (id % 256) || '/32')::cidr, 'static', 'static', $1"
        " FROM accounts", T0)
    await conn.execute(
        "INSERT INTO radius_links(account_id, login, password_enc)"
        " SELECT a.id, u.login, '\\x00' FROM accounts a JOIN users u ON u.id = a.user_id")
    await conn.execute("ANALYZE")
    try:
        yield conn
    finally:
        await conn.close()


async def plan(conn: asyncpg.Connection, sql: str, *args: object, seqscan: bool = False) -> str:
    async with conn.transaction():
        if not seqscan:
            await conn.execute("SET LOCAL enable_seqscan = off")
        rows = await conn.fetch(f"EXPLAIN {sql}", *args)
    return "\n".join(r[0] for r in rows)


def no_seq_scan(text: str, *tables: str) -> None:
    for table in tables:
        assert f"Seq Scan on {table}" not in text, text


async def test_search_by_part_of_anything_uses_the_trigram_index(subscribers: asyncpg.Connection) -> None:
    conn = subscribers
    # texts that match a few rows (one that matches most is rightly served by walking the primary key)
    for text in ("01234", "ub0012", "912 000123", "C-000271", "b271@example.ne", "lenina st. 2917"):
        where, args = A.search_query(text, False, None)
        shown = await plan(conn, f"SELECT id FROM users WHERE {where} ORDER BY id LIMIT 50", *args)
        assert "users_search_grams" in shown, shown
        no_seq_scan(shown, "users")


async def test_search_finds_what_the_plain_scan_finds(subscribers: asyncpg.Connection) -> None:
    conn = subscribers
    texts = ["01234", "SUB0001", "smirn", "OLGA", "912 000", "C-00027", "example.ne", "lenina st. 29",
             "sub", "no such text", "_", "%", "1", "12", "b000"]
    for text in texts:
        found = await A.search_users(conn, text, limit=200)
        pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        async with conn.transaction():
            await conn.execute("SET LOCAL enable_indexscan = off")
            await conn.execute("SET LOCAL enable_bitmapscan = off")
            expected = [r["id"] for r in await conn.fetch(
                "SELECT id FROM users WHERE login ILIKE $1 OR full_name ILIKE $1 OR email ILIKE $1"
                " OR phone ILIKE $1 OR address ILIKE $1 OR coalesce(external_id, '') ILIKE $1"
                " ORDER BY id", pattern)]
        assert found["total"] == len(expected), text
        assert found["total_capped"] is False
        assert [u["id"] for u in found["users"]] == expected[:200], text


async def test_search_by_ip_finds_the_subscriber_through_the_binding_index(subscribers: asyncpg.Connection) -> None:
    conn = subscribers
    user = await conn.fetchval("SELECT a.user_id FROM ip_bindings b JOIN accounts a ON a.id = b.account_id"
                               " WHERE b.prefix = '10.1.2.7/32'")
    found = await A.search_users(conn, "10.1.2.7")
    assert user in [u["id"] for u in found["users"]]
    shown = await plan(conn, "SELECT DISTINCT a.user_id FROM ip_bindings b JOIN accounts a ON a.id = b.account_id"
                             " WHERE b.prefix >>= $1::inet", "10.1.2.7")
    no_seq_scan(shown, "ip_bindings", "accounts")


async def test_search_total_is_capped_not_counted_to_a_million(subscribers: asyncpg.Connection,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(A, "MAX_COUNTED", 100)
    found = await A.search_users(subscribers, "sub", limit=10)
    assert (found["total"], found["total_capped"], len(found["users"])) == (100, True, 10)
    found = await A.search_users(subscribers, "sub00002", limit=10)
    assert (found["total"], found["total_capped"]) == (10, False)


@pytest.mark.parametrize("sql, arg", [
    ("SELECT * FROM users WHERE login = $1 AND deleted_at IS NULL", "sub000123"),        # URFA login
    ("SELECT id, account_id FROM radius_links WHERE login = $1", "sub000123"),           # RADIUS auth
    ("SELECT id FROM radius_links l WHERE l.login = ANY($1::text[])", ["sub000123"]),     # authorize_many
    ("SELECT id FROM radius_nas WHERE address = $1::inet", "127.0.0.1"),                 # NAS table
    ("SELECT account_id, valid_to FROM ip_bindings WHERE prefix >>= $1::inet", "10.1.2.7"),  # address → account
    ("SELECT * FROM ledger WHERE account_id = ANY($1::bigint[]) ORDER BY id DESC LIMIT 20", [17]),  # history
    ("SELECT * FROM users WHERE external_id = $1", "C-0000123"),                          # contract number
])
async def test_operator_lookups_are_indexed(subscribers: asyncpg.Connection, sql: str, arg: object) -> None:
    shown = await plan(subscribers, sql, arg)
    no_seq_scan(shown, "users", "radius_links", "radius_nas", "ip_bindings", "ledger", "accounts")


async def test_ip_overlap_check_sorts_instead_of_probing_per_binding(subscribers: asyncpg.Connection) -> None:
    # a pair-wise join, or an index probe per binding, did not finish on a
    # million bindings (over a minute for 100,000): sorts and hash joins only
    shown = await plan(subscribers, checks._IP_OVERLAP, 1000, seqscan=True)
    assert "Nested Loop" not in shown, shown


async def test_verify_queries_have_no_per_row_subplans(subscribers: asyncpg.Connection) -> None:
    # A subplan that scans runs once per outer row: the counters check that
    # timed out at 4 million ledger rows re-read its usage rows per ledger
    # row once they no longer fitted in work_mem (64kB here, so a few
    # thousand rows are enough to show it).  Subplans that probe an index
    # for the few rows reported are fine.
    for sql in (_BALANCE_AND_CHAIN, _PAYMENT, _REVERSAL, checks._COUNTERS, checks._IP_OVERLAP):
        async with subscribers.transaction():
            await subscribers.execute("SET LOCAL work_mem = '64kB'")
            shown = await plan(subscribers, sql, 1000, seqscan=True)
        lines = shown.splitlines()
        for i, line in enumerate(lines):
            if "SubPlan" in line and "hashed" not in line:
                depth = len(line) - len(line.lstrip())
                body = []
                for below in lines[i + 1:]:
                    if len(below) - len(below.lstrip()) <= depth:
                        break
                    body.append(below)
                assert not any("Seq Scan" in b or "Materialize" in b for b in body), shown
        # the whole ledger is read at most once per check
        assert shown.count("Seq Scan on ledger") <= 1, shown


async def test_verify_reports_progress_and_finds_a_changed_row(subscribers: asyncpg.Connection) -> None:
    conn = subscribers
    seen: list[str] = []
    assert await verify(conn, T0, progress=lambda check, s: seen.append(check)) == []
    assert seen == ["balance and chain", "trigger", "system_block", "payment", "reversal", "invoice", "invoice_lines",
                    "credit_note", "credit_excess", "numbering"]
    extra: list[str] = []
    assert await checks.extra_checks(conn, now=T0, progress=lambda check, s: extra.append(check)) == []
    assert extra == ["ip_overlap", "counters", "watermark"]
    await conn.execute("ALTER TABLE ledger DISABLE TRIGGER ledger_no_update_delete")
    await conn.execute("UPDATE ledger SET amount = 999 WHERE account_id = 5")
    problems = {(p.check, p.account_id) for p in await verify(conn, T0)}
    assert ("chain", 5) in problems and ("balance", 5) in problems and ("trigger", None) in problems


async def test_reports_read_only_the_asked_periods(subscribers: asyncpg.Connection) -> None:
    conn = subscribers
    await conn.execute(
        "INSERT INTO usage_daily(account_id, class_id, day, quantity, amount)"
        " SELECT a.id, 1, d::date, 100, 10 FROM generate_series('2025-01-01'::date, '2025-12-31', '1 day') d,"
        " (SELECT id FROM accounts LIMIT 100) a ORDER BY d, a.id")
    await conn.execute("ANALYZE usage_daily")
    day = dt.date(2025, 6, 1)
    shown = await plan(conn, "SELECT account_id, class_id, day, quantity, amount FROM usage_daily"
                             " WHERE day >= $1 AND day < $2 ORDER BY account_id, day, class_id",
                       day, day + dt.timedelta(days=1))
    assert "usage_daily_day" in shown, shown
    shown = await plan(conn, "SELECT service_id, sum(charged) FROM usage_counters"
                             " WHERE period_start >= $1 AND period_start < $2 GROUP BY 1", T0, T0)
    assert "usage_counters_period" in shown, shown
