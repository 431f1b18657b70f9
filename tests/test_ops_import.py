"""``billcore import``: what an operator moving from another billing system sees."""

from __future__ import annotations

import io
from datetime import datetime, timezone
from pathlib import Path

import asyncpg
import pytest

from billcore.billing import classification
from billcore.billing import tariffs as T
from billcore.billing.verify import verify
from billcore.common.money import format_money
from billcore.ops.import_parse import ImportFailed, overlapping, parse_csv, parse_json
from billcore.ops.importer import ImportReport, Progress, import_file, import_text
from urfa.scram import client_keys, make_verifier

NOW = datetime(2024, 5, 1, 9, tzinfo=timezone.utc)
PREHASHED = make_verifier("from-the-old-system", iterations=4096).to_text()

GOOD_CSV = f"""login,password,full_name,email,phone,address,external_id,balance,credit,tariff,ips
alice,alice-secret,Alice A,alice@example.org,+100,Main st 1,utm-1,150.25,0,Home,10.0.0.1
bob,{PREHASHED},Bob B,,,,utm-2,-20.000001,10,Home,10.0.1.0/29 10.0.2.7
carol,,"Carol, the third",,,,utm-3,0,0,,
"""


async def make_home(conn: asyncpg.Connection) -> int:
    return await T.create_tariff(conn, "Home", [])


def csv_file(tmp_path: Path, text: str, name: str = "subscribers.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


async def state(conn: asyncpg.Connection) -> tuple[int, ...]:
    return tuple([await conn.fetchval(f"SELECT count(*) FROM {t}") for t in
                  ("users", "accounts", "ledger", "account_tariffs", "ip_bindings", "blocks")]
                 + [await conn.fetchval("SELECT coalesce(sum(balance), 0) FROM accounts")])


async def test_csv_import_books_balances_links_ips_and_blocks(db_dsn: str, tmp_path: Path) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        home = await make_home(conn)
        report = await import_file(conn, csv_file(tmp_path, GOOD_CSV), now=NOW)
        assert (report.subscribers, report.accounts, report.opening_entries) == (3, 3, 2)
        assert report.opening_total == 150_250_000 - 20_000_001
        assert (report.links, report.ips, report.blocked) == (2, 3, 1)

        rows = {r["login"]: r for r in await conn.fetch(
            "SELECT u.login, u.full_name, u.external_id, a.id, a.balance, a.credit, u.scram_salt,"
            " u.scram_iterations, u.scram_stored_key FROM users u JOIN accounts a ON a.user_id = u.id AND a.is_basic")}
        assert rows["alice"]["balance"] == 150_250_000 and rows["bob"]["balance"] == -20_000_001
        assert rows["bob"]["credit"] == 10_000_000 and rows["carol"]["full_name"] == "Carol, the third"
        # alice's cleartext became a verifier that her password matches; bob's was taken as given
        a = rows["alice"]
        assert client_keys("alice-secret", bytes(a["scram_salt"]), a["scram_iterations"]).stored_key \
            == bytes(a["scram_stored_key"])
        assert a["scram_iterations"] == 100_000
        assert bytes(rows["bob"]["scram_stored_key"]) == make_verifier.__globals__["Verifier"].from_text(
            PREHASHED).stored_key
        ledger = await conn.fetch("SELECT account_id, amount, kind, idem_key FROM ledger ORDER BY id")
        assert [(r["amount"], r["kind"], r["idem_key"]) for r in ledger] == [
            (150_250_000, "correction", "import:opening:alice:0"),
            (-20_000_001, "correction", "import:opening:bob:0")]
        # bob is 20.000001 in debt with 10 credit: blocked, exactly like the ledger would do it
        assert await conn.fetchval("SELECT account_id FROM blocks WHERE kind = 'system' AND lifted_at IS NULL") \
            == rows["bob"]["id"]
        links = await T.account_links(conn, rows["alice"]["id"], NOW)
        assert await conn.fetchval("SELECT tariff_id FROM account_tariffs WHERE account_id = $1",
                                   rows["alice"]["id"]) == home and links == []
        assert sorted(b["prefix"] for b in await classification.list_bindings(conn, rows["bob"]["id"])) == \
            ["10.0.1.0/29", "10.0.2.7/32"]
        assert await verify(conn) == []
        assert await conn.fetchval("SELECT count(*) FROM audit_log WHERE action = 'import'") == 1
    finally:
        await conn.close()


async def test_rerun_never_doubles_a_balance(db_dsn: str, tmp_path: Path) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        await make_home(conn)
        path = csv_file(tmp_path, GOOD_CSV)
        await import_file(conn, path, now=NOW)
        first = await state(conn)
        again = await import_file(conn, path, now=NOW)
        assert again.skipped == ["alice", "bob", "carol"] and again.subscribers == 0
        assert await state(conn) == first
        # and the ledger's unique key is the second line of defence
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(
                "INSERT INTO ledger(account_id, amount, balance_after, kind, idem_key, actor, created_at)"
                " SELECT id, 1, 1, 'correction', 'import:opening:alice:0', 'x', now() FROM accounts LIMIT 1")
    finally:
        await conn.close()


async def test_dry_run_reports_every_error_by_line_and_writes_nothing(db_dsn: str, tmp_path: Path) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        home = await make_home(conn)
        other = await conn.fetchval(
            "INSERT INTO users(login, scram_salt, scram_iterations, scram_stored_key, scram_server_key)"
            " VALUES ('old', '\\x00', 4096, '\\x00', '\\x00') RETURNING id")
        acc = await conn.fetchval("INSERT INTO accounts(user_id, is_basic) VALUES ($1, true) RETURNING id", other)
        await classification.add_binding(conn, acc, "192.168.5.0/24", valid_from=NOW)
        await T.link_tariff(conn, acc, home, now=NOW, tz=timezone.utc, actor="t")
        before = await state(conn)
        text = """login,balance,tariff,ips
good1,1.00,Home,10.1.0.1
bad money,1,,
m1,12,5,,
dup,1,,
dup,2,,
t1,0,Gold,
ip1,0,,10.1.0.300
ip2,0,,10.1.0.0/30
ip3,0,,192.168.5.77
"""
        with pytest.raises(ImportFailed) as failed:
            await import_file(conn, csv_file(tmp_path, text), dry_run=True, now=NOW)
        errors = failed.value.errors
        joined = "\n".join(errors)
        assert "line 3: login 'bad money'" in joined
        assert any(e.startswith("line 4: 5 fields, the header has 4") for e in errors)   # "12,5": a decimal comma
        assert "line 6: duplicate login 'dup' (first at line 5)" in joined
        assert any(e.startswith("line 8: ips: bad IP '10.1.0.300'") for e in errors)
        assert "line 2: IP 10.1.0.1/32 overlaps 10.1.0.0/30 (line 9)" in joined
        # docs/import.md: every error in one pass, the database's among the file's, in the file's order
        assert "line 7: unknown tariff 'Gold'" in errors
        assert f"line 10: IP 192.168.5.77/32 overlaps 192.168.5.0/24 bound to account {acc}" in errors
        lines = [int(e.split(":")[0].split()[1]) for e in errors]
        assert lines == sorted(lines) and len(errors) == 7
        # a real run with the same file refuses with the same list
        with pytest.raises(ImportFailed) as real:
            await import_file(conn, csv_file(tmp_path, text), now=NOW)
        assert real.value.errors == errors
        assert await state(conn) == before

        ok = await import_file(conn, csv_file(tmp_path, "login,balance,tariff\nz1,-5,Home\nz2,7,\n"),
                               dry_run=True, now=NOW)
        assert ok.dry_run and (ok.subscribers, ok.opening_entries, ok.blocked, ok.links) == (2, 2, 1, 1)
        assert "dry run, nothing written" in ok.summary()
        assert await state(conn) == before
    finally:
        await conn.close()


async def test_json_export_with_catalogue_and_several_accounts(db_dsn: str) -> None:
    doc = """{
  "format": "billcore-import/1",
  "services": [{"name": "Monthly fee", "kind": "periodic", "fee": 499.90,
                "period": {"kind": "monthly", "anchor": "2024-01-01"}, "charge_mode": "start"}],
  "tariffs": [{"name": "Fiber 100", "services": ["Monthly fee"]}],
  "subscribers": [
    {"login": "dave", "password": "dave-password", "full_name": "Dave",
     "accounts": [{"balance": 0.1, "tariff": "Fiber 100", "ips": ["2001:db8::/64"]},
                  {"balance": "-3", "credit": 5}]},
    {"login": "erin", "balance": 12, "ips": ["10.9.9.9"]}
  ]
}"""
    conn = await asyncpg.connect(db_dsn)
    try:
        report = await import_text(conn, doc, fmt="json", now=NOW)
        assert (report.subscribers, report.accounts, report.services_created, report.tariffs_created) == (2, 3, 1, 1)
        fee = await conn.fetchval("SELECT fee FROM services WHERE name = 'Monthly fee'")
        assert fee == 499_900_000          # the JSON float 499.90, exactly
        rows = await conn.fetch("SELECT a.balance, a.credit, a.is_basic FROM accounts a JOIN users u"
                                " ON u.id = a.user_id WHERE u.login = 'dave' ORDER BY a.id")
        assert [(r["balance"], r["credit"], r["is_basic"]) for r in rows] == [
            (100_000, 0, True), (-3_000_000, 5_000_000, False)]
        assert await conn.fetchval("SELECT count(*) FROM blocks") == 0     # -3 within credit 5
        assert await verify(conn) == []
        again = await import_text(conn, doc, fmt="json", now=NOW)
        assert again.skipped == ["dave", "erin"] and again.services_created == 0 and again.tariffs_created == 0
    finally:
        await conn.close()


def test_json_errors_name_the_element() -> None:
    parsed = parse_json('{"subscribers": [{"login": "x", "balance": "1,5"}, {"login": "y", "colour": 1}, 7]}')
    assert parsed.errors == [
        "subscribers[0] (x): balance: not a money string (digits, optional '-', at most 6 decimals,"
        " at most 12 integer digits): '1,5'",
        "subscribers[1] (y): unknown key(s) ['colour']",
        "subscribers[2]: an object"]
    assert parse_json('{"subscribers": [\n  {"login": "x",}\n]}').errors[0].startswith("line 2: not JSON")


def test_csv_header_is_checked() -> None:
    assert parse_csv("name,balance\nx,1\n").errors == [
        "line 1: unknown column(s) 'name'; known: login, password, full_name, email, phone, address,"
        " external_id, balance, credit, tariff, ips",
        "line 1: the login column is required"]
    assert parse_csv("login,password\nx,SCRAM-SHA-256$1:AA==$AA==:AA==\n").errors[0].startswith(
        "line 2: password: verifier iterations 1")


def test_overlap_sweep_finds_nested_and_skips_disjoint() -> None:
    import ipaddress as ip

    nets = [(ip.ip_network("10.0.0.0/8"), "a"), (ip.ip_network("10.2.0.0/16"), "b"),
            (ip.ip_network("11.0.0.0/8"), "c"), (ip.ip_network("10.3.0.1/32"), "d"),
            (ip.ip_network("::/0"), "e"), (ip.ip_network("0.0.0.0/32"), "f")]
    assert sorted(w for w, _ in overlapping(nets)) == ["b", "d"]


async def test_many_cleartext_passwords_use_the_process_pool(db_dsn: str) -> None:
    rows = "\n".join(f"p{i},pw-{i}-secret,1" for i in range(70))
    conn = await asyncpg.connect(db_dsn)
    try:
        stream = io.StringIO()
        report = await import_text(conn, "login,password,balance\n" + rows + "\n", fmt="csv", workers=2,
                                   progress_stream=stream, now=NOW)
        assert report.verifiers_computed == 70
        r = await conn.fetchrow("SELECT scram_salt, scram_iterations, scram_stored_key FROM users WHERE login = 'p69'")
        assert client_keys("pw-69-secret", bytes(r["scram_salt"]), r["scram_iterations"]).stored_key \
            == bytes(r["scram_stored_key"])
        out = stream.getvalue()
        assert "passwords 70/70 done in" in out and "writing" in out
    finally:
        await conn.close()


def test_progress_line_tty_and_plain() -> None:
    t = [0.0]
    plain = io.StringIO()
    p = Progress(plain, "writing", 1000, interval=5, clock=lambda: t[0])
    t[0] = 2.0
    p.advance(100)                  # not yet 5 s: nothing
    t[0] = 5.0
    p.advance(150)
    assert plain.getvalue() == "writing 250/1,000 (25%) 50/s ETA 0:15\n"

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    t[0] = 0.0
    p = Progress(tty, "passwords", 10, clock=lambda: t[0])
    t[0] = 1.0
    p.advance(5)
    assert tty.getvalue() == "\r\033[Kpasswords [############------------] 5/10 (50%) 5/s ETA 0:01"
    p.finish()
    assert tty.getvalue().endswith("passwords 5/10 done in 1.0 s\n")


SEQUENCES = ("users", "accounts", "ledger", "account_tariffs", "ip_bindings", "blocks", "audit_log",
             "services", "tariffs")


async def sequences(conn: asyncpg.Connection) -> dict[str, tuple[int, bool]]:
    out = {}
    for table in SEQUENCES:
        r = await conn.fetchrow(f"SELECT last_value, is_called FROM {table}_id_seq")
        out[table] = (r["last_value"], r["is_called"])
    return out


async def test_dry_run_takes_no_ids(db_dsn: str, tmp_path: Path) -> None:
    """A real import after a dry run gets the ids it would have got without it."""
    doc = """{"services": [{"name": "Fee", "kind": "periodic", "fee": "10",
                "period": {"kind": "monthly", "anchor": "2024-01-01"}, "charge_mode": "start"}],
  "tariffs": [{"name": "Gold", "services": ["Fee"]}],
  "subscribers": [{"login": "a1", "balance": "-5", "tariff": "Gold", "ips": ["10.7.0.1"]},
                  {"login": "a2", "balance": "3"}]}"""
    conn = await asyncpg.connect(db_dsn)
    try:
        await make_home(conn)
        before = await sequences(conn)
        for _ in range(3):
            report = await import_text(conn, doc, fmt="json", dry_run=True, now=NOW)
            assert (report.subscribers, report.blocked, report.services_created, report.tariffs_created) == (2, 1, 1, 1)
        assert await sequences(conn) == before
        await import_text(conn, doc, fmt="json", now=NOW)
        ids = [r["id"] for r in await conn.fetch("SELECT id FROM users ORDER BY id")]
        assert ids == [1, 2]
        assert await conn.fetchval("SELECT min(id) FROM accounts") == 1
        assert await conn.fetchval("SELECT id FROM services WHERE name = 'Fee'") == 1
        assert await conn.fetchval("SELECT id FROM tariffs WHERE name = 'Gold'") == 2   # Home is 1
        assert await conn.fetchval("SELECT min(id) FROM ledger") == 1
        assert await verify(conn) == []
    finally:
        await conn.close()


async def test_catalogue_errors_come_with_the_others(db_dsn: str) -> None:
    """A service the catalogue refuses is listed in the same pass as a bad row."""
    doc = """{"services": [{"name": "Fee", "kind": "monthly-ish", "fee": "10"}],
  "subscribers": [{"login": "a1", "balance": "1,5"}, {"login": "a2", "tariff": "Nope"}]}"""
    conn = await asyncpg.connect(db_dsn)
    try:
        before = await sequences(conn)
        with pytest.raises(ImportFailed) as failed:
            await import_text(conn, doc, fmt="json", dry_run=True, now=NOW)
        errors = failed.value.errors
        assert errors[0].startswith("services[0]: service kind must be one of")
        assert errors[1].startswith("subscribers[0] (a1): balance: not a money string")
        assert errors[2] == "subscribers[1] (a2): unknown tariff 'Nope'"
        assert len(errors) == 3
        assert await sequences(conn) == before
        assert await conn.fetchval("SELECT count(*) FROM services") == 0
    finally:
        await conn.close()


BIG = "999999999999.999999"   # the largest balance an account can hold


async def test_opening_balances_past_the_formatters_range(db_dsn: str, tmp_path: Path) -> None:
    """Three maximal balances add up to more than one amount may be; the summary still says so exactly."""
    text = f"login,balance\nr1,{BIG}\nr2,{BIG}\nr3,{BIG}\nr4,-0.000001\n"
    conn = await asyncpg.connect(db_dsn)
    try:
        dry = await import_file(conn, csv_file(tmp_path, text), dry_run=True, now=NOW)
        assert "totalling 2999999999999.999996," in dry.summary()
        report = await import_file(conn, csv_file(tmp_path, text), now=NOW)
        assert report.opening_total == 3 * (10**18 - 1) - 1
        assert "imported 4 subscriber(s), 4 account(s), 4 opening balance(s) totalling 2999999999999.999996," \
            in report.summary()
        assert await verify(conn) == []
    finally:
        await conn.close()


def test_summary_totals_spell_any_sum() -> None:
    assert [format_money(x) for x in (0, 1, -1, 12_340_000, -5_000_000, 3 * 10**18 + 500_000)] == [
        "0.00", "0.000001", "-0.000001", "12.34", "-5.00", "3000000000000.50"]
    assert format_money(-(10**30)) == "-" + "1" + "0" * 24 + ".00"
    assert ImportReport(dry_run=False, opening_total=-(4 * 10**18)).summary().count("totalling -4000000000000.00,") == 1
