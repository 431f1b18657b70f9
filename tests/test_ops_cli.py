"""The operator commands through ``billcore`` itself: exit codes and what
they print, as cron and an operator see them."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import asyncpg
import pytest

from billcore import cli
from billcore.billing import tariffs as T
from billcore.common.money import format_money, parse_money
from billcore.billing.rating import TrafficUsage
from billcore.billing.usage import commit_usage
from tests.running import BillcoreProcess
from tests.test_netflow_worker_support import setup_accounts


@pytest.fixture
def ops_commands() -> Iterator[None]:
    """The ops commands are part of the billcore CLI; keep logging as it was."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        # main() points logging at the (captured) stderr of this test: put it back
        root.handlers[:] = handlers
        root.setLevel(level)


def config_for(tmp_path: Path, dsn: str) -> Path:
    path = tmp_path / "billcore.toml"
    path.write_text(f'[core]\ndata_dir = "{tmp_path / "var"}"\n[database]\ndsn = "{dsn}"\n')
    return path


def test_import_backup_restore_round(ops_commands: None, db_dsn: str, empty_db_dsn: str, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    src = config_for(tmp_path, db_dsn)
    data = tmp_path / "subs.csv"
    data.write_text("login,balance,ips\nann,12.5,10.3.0.1\nann,1,\nben,x,\n")
    assert cli.main(["-c", str(src), "import", str(data), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "line 3: duplicate login 'ann' (first at line 2)" in err
    assert "line 4: balance: not a money string" in err
    assert "import refused: 2 error(s), nothing was imported" in err

    data.write_text("login,balance,ips\nann,12.5,10.3.0.1\nben,-1,\n")
    assert cli.main(["-c", str(src), "import", str(data), "--dry-run"]) == 0
    assert "dry run, nothing written: would import 2 subscriber(s)" in capsys.readouterr().out
    assert cli.main(["-c", str(src), "import", str(data)]) == 0
    out = capsys.readouterr()
    assert "imported 2 subscriber(s), 2 account(s), 2 opening balance(s) totalling 11.50" in out.out
    assert "1 account(s) blocked for debt" in out.out
    assert "writing 7/7 done in" in out.err           # plain progress lines: stderr is not a tty

    backup = tmp_path / "b.tar"
    assert cli.main(["-c", str(src), "backup", "--out", str(backup)]) == 0
    assert f"backup written to {backup}" in capsys.readouterr().out

    dst = tmp_path / "dst"
    dst.mkdir()
    target = config_for(dst, empty_db_dsn)
    assert cli.main(["-c", str(target), "restore", str(backup)]) == 0
    assert "next: `billcore migrate`" in capsys.readouterr().out
    # the second time the database is not empty
    assert cli.main(["-c", str(target), "restore", str(backup)]) == 1
    assert "restore refused: the database is not empty" in capsys.readouterr().err
    assert cli.main(["-c", str(target), "restore", str(backup), "--force"]) == 0
    capsys.readouterr()
    assert cli.main(["-c", str(target), "verify"]) == 0
    assert "verify: ok" in capsys.readouterr().out


# -- billctl and `billcore periodic run-now` against a real core ------------------------------------
# The books are made by the billing code itself (commit_usage, tariffs) on the test database, then a
# real `billcore serve` answers billctl over URFA, as an operator's shell would see it.

UTC = timezone.utc
ADMIN_PW = "admin-password"
MANY_USERS = 1_000


async def seed_books(dsn: str) -> dict[str, object]:
    """Three accounts on a 1-micro-unit-per-byte tariff with traffic on three days, one account on a
    monthly 300.00 fee that no run has charged yet, and 1,000 more subscribers."""
    ids = list((await setup_accounts(dsn, ["10.9.0.1", "10.9.0.2", "10.9.0.3"])).values())
    conn = await asyncpg.connect(dsn)
    try:
        inet = await conn.fetchval("SELECT id FROM traffic_classes WHERE name = 'inet'")
        now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        usage = [TrafficUsage(a, inet, now - timedelta(days=d), 1_234_567 * (i + 1) + d)
                 for i, a in enumerate(ids) for d in (3, 2, 1)]
        result = await commit_usage(conn, "netflow:seed", 1, usage, now)
        assert result.charged == sum(u.bytes for u in usage)
        monthly = await T.create_service(conn, "monthly", "periodic", fee=parse_money("300"),
                                         period={"kind": "monthly", "anchor": date(2020, 1, 1)},
                                         charge_mode="start")
        tariff = await T.create_tariff(conn, "Flat 300", [monthly])
        user = await conn.fetchval(
            "INSERT INTO users(login, scram_salt, scram_iterations, scram_stored_key, scram_server_key)"
            " VALUES ('flat', '\\x00', 4096, '\\x00', '\\x00') RETURNING id")
        flat = await conn.fetchval("INSERT INTO accounts(user_id, credit) VALUES ($1, 10^12) RETURNING id", user)
        await T.link_tariff(conn, flat, tariff, now=datetime(2020, 1, 1, tzinfo=UTC), tz=UTC, actor="test")
        await conn.execute(
            "INSERT INTO users(login, scram_salt, scram_iterations, scram_stored_key, scram_server_key)"
            " SELECT 'many' || g, '\\x00', 4096, '\\x00', '\\x00' FROM generate_series(1, $1) g", MANY_USERS)
        users = await conn.fetchval("SELECT count(*) FROM users")
        return {"traffic": ids, "flat": flat, "users": users, "since": (now - timedelta(days=10)).date(),
                "until": (now + timedelta(days=2)).date()}
    finally:
        await conn.close()


def run_billctl(bc: BillcoreProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BILLCTL_PASSWORD": ADMIN_PW, "BILLCTL_PORT": str(bc.urfa_port)}
    return subprocess.run([sys.executable, "-m", "billcore.clients.billctl", "--login", "root", *args],
                          capture_output=True, text=True, env=env, timeout=120)


def run_billcore(bc: BillcoreProcess, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "billcore.cli", "-c", str(bc.config_path), *args],
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=120)


@pytest.fixture
def books(tmp_path: Path, db_dsn: str) -> Iterator[tuple[BillcoreProcess, dict[str, object]]]:
    seeded = asyncio.run(seed_books(db_dsn))
    # the scheduler stays off: the periodic test runs it by hand
    with BillcoreProcess(tmp_path, dsn=db_dsn, periodic={"enabled": False}) as bc:
        bc.child_pid("core")
        made = run_billcore(bc, "admin", "create", "root", "--password-env", "PW", env={"PW": ADMIN_PW})
        assert made.returncode == 0, made.stderr
        yield bc, seeded


def db_rows(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    async def fetch() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()

    return asyncio.run(fetch())


def test_billctl_prints_every_streamed_row(books: tuple[BillcoreProcess, dict[str, object]], db_dsn: str) -> None:
    bc, seeded = books
    window = [f"since={seeded['since']}", f"until={seeded['until']}"]
    daily = db_rows(db_dsn, "SELECT account_id, class_id, day, quantity, amount FROM usage_daily"
                            " ORDER BY account_id, day, class_id")
    assert len(daily) == 9

    table = run_billctl(bc, "call", "reports.traffic", *window)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["account_id", "class_id", "day", "quantity", "amount"]
    body = [line.split() for line in lines[2:]]
    assert body == [[str(r["account_id"]), str(r["class_id"]), r["day"].isoformat(), str(r["quantity"]),
                     format_money(r["amount"])] for r in daily]
    top = max(r["amount"] for r in daily)                 # bytes at 1 micro-unit each: sub-cent money, exact
    assert top % 10_000 and format_money(top) in table.stdout
    assert re.search(r"rows\s+9\b", table.stderr), table.stderr   # the summary, off the data stream

    as_json = run_billctl(bc, "--json", "call", "reports.traffic", *window)
    assert as_json.returncode == 0, as_json.stderr
    rows = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert rows == [{"account_id": r["account_id"], "class_id": r["class_id"], "day": r["day"].isoformat(),
                     "quantity": r["quantity"], "amount": r["amount"]} for r in daily]  # micro-units for scripts

    as_csv = run_billctl(bc, "--csv", "call", "reports.traffic", *window, f"account_id={seeded['traffic'][1]}")
    assert as_csv.returncode == 0, as_csv.stderr
    got = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [(int(r["account_id"]), r["amount"]) for r in got] == [
        (r["account_id"], format_money(r["amount"])) for r in daily if r["account_id"] == seeded["traffic"][1]]

    charges = db_rows(db_dsn, "SELECT service_id, sum(charged)::bigint AS amount FROM usage_counters"
                              " GROUP BY service_id, period_start ORDER BY period_start, service_id")
    since, until = f"since={seeded['since']}T00:00:00+00:00", f"until={seeded['until']}T00:00:00+00:00"
    by_csv = run_billctl(bc, "--csv", "call", "reports.charges", since, until)
    assert by_csv.returncode == 0, by_csv.stderr
    got = list(csv.DictReader(io.StringIO(by_csv.stdout)))
    assert [(int(r["service_id"]), r["amount"]) for r in got] == [
        (r["service_id"], format_money(r["amount"])) for r in charges]
    assert len(got) >= 1
    by_json = run_billctl(bc, "--json", "call", "reports.charges", since, until)
    assert [json.loads(line)["amount"] for line in by_json.stdout.splitlines()] == [r["amount"] for r in charges]


def test_billctl_money_comes_from_the_declared_result(books: tuple[BillcoreProcess, dict[str, object]],
                                                      db_dsn: str) -> None:
    bc, seeded = books
    found = run_billctl(bc, "users", "--limit", "3")
    assert found.returncode == 0, found.stderr
    total = re.search(r"^total\s+(\S+)$", found.stdout, re.M)
    assert total and total.group(1) == str(seeded["users"]), found.stdout  # a count, not "0.001004"

    account = seeded["traffic"][0]
    shown = run_billctl(bc, "account", str(account))
    balance = db_rows(db_dsn, "SELECT balance FROM accounts WHERE id = $1", account)[0]["balance"]
    assert re.search(rf"^balance\s+{re.escape(format_money(balance))}$", shown.stdout, re.M), shown.stdout
    described = json.loads(run_billctl(bc, "--json", "call", "sys.calls").stdout)
    fields = {c["name"]: c["fields"] for c in described}
    assert fields["users.search"]["total"] == "int"
    assert fields["accounts.get"]["balance"] == "money"
    assert list(fields["reports.traffic"]) == ["account_id", "class_id", "day", "quantity", "amount"]

    # errors speak money, not micro-units
    too_much = run_billctl(bc, "pay", str(account), "99999999")
    assert too_much.returncode == 1
    assert "at most 10000000.00, got 99999999.00" in too_much.stderr, too_much.stderr
    assert "10000000000000" not in too_much.stderr


def test_billctl_account_state_and_promised_grant(books: tuple[BillcoreProcess, dict[str, object]],
                                                   db_dsn: str) -> None:
    bc, seeded = books
    account = str(seeded["traffic"][2])
    assert run_billctl(bc, "block", account, "--reason", "fraud check").returncode == 0
    shown = run_billctl(bc, "account", account)
    status = re.search(r"^status\s+(.+)$", shown.stdout, re.M)
    assert status and status.group(1) == "active, internet blocked (admin)", shown.stdout
    assert run_billctl(bc, "unblock", account).returncode == 0
    status = re.search(r"^status\s+(.+)$", run_billctl(bc, "account", account).stdout, re.M)
    assert status and status.group(1) == "active, internet on"

    granted = run_billctl(bc, "promised", account, "--amount", "50", "--days", "3", "--reason", "phoned in")
    assert granted.returncode == 0, granted.stderr
    assert re.search(r"^amount\s+50\.00$", granted.stdout, re.M), granted.stdout
    again = run_billctl(bc, "promised", account)
    assert again.returncode == 1 and "already taken this month" in again.stderr
    shown = run_billctl(bc, "account", account)
    assert re.search(r"^promised\s+50\.00$", shown.stdout, re.M), shown.stdout
    assert re.search(r"^promised_taken\s+True$", shown.stdout, re.M), shown.stdout
    audit = db_rows(db_dsn, "SELECT principal_login, after FROM audit_log WHERE action = 'payments.promised'")
    assert [(a["principal_login"], json.loads(a["after"])["reason"]) for a in audit] == [("root", "phoned in")]
    assert run_billctl(bc, "promised", "999999").returncode == 1


def test_periodic_run_now_is_the_scheduler_and_idempotent(books: tuple[BillcoreProcess, dict[str, object]],
                                                           db_dsn: str) -> None:
    bc, seeded = books
    fee = "SELECT coalesce(sum(-amount), 0)::bigint AS s, count(*) AS n FROM ledger WHERE kind = 'periodic'"
    assert db_rows(db_dsn, fee)[0]["n"] == 0
    first = run_billcore(bc, "periodic", "run-now")
    assert first.returncode == 0, first.stderr
    assert "1 charge(s), 300.00 booked" in first.stdout, first.stdout
    assert re.search(r"periodic: (\d+)/\1 accounts \(100%\), 1 charge\(s\), 300\.00 booked", first.stderr), first.stderr
    again = run_billcore(bc, "periodic", "run-now")
    assert again.returncode == 0 and "0 charge(s), 0.00 booked" in again.stdout and "nothing was due" in again.stdout
    through_core = run_billctl(bc, "periodic-run")
    assert through_core.returncode == 0, through_core.stderr
    assert re.search(r"^charges\s+0$", through_core.stdout, re.M), through_core.stdout
    assert re.search(r"periodic: (\d+)/\1 accounts \(100%\), 0 charge\(s\), 0\.00 booked", through_core.stderr)
    booked = db_rows(db_dsn, fee)[0]
    assert (booked["n"], booked["s"]) == (1, parse_money("300"))
    audit = db_rows(db_dsn, "SELECT principal_kind, principal_login, after FROM audit_log"
                            " WHERE action = 'periodic.run' ORDER BY id")
    assert [(a["principal_kind"], json.loads(a["after"])["charges"]) for a in audit] == [
        ("cli", 1), ("cli", 0), ("admin", 0)]
    assert audit[2]["principal_login"] == "root"


def test_billctl_prints_every_raw_flow(books: tuple[BillcoreProcess, dict[str, object]]) -> None:
    from billcore.billing.rawflows import read_account
    from billcore.common.rawflows import HOUR_MS
    from netflow.rawstore import RawWriter
    from tests.test_netflow_rawstore_speed import HOUR0, make_flows, make_legs

    bc, _ = books
    raw = bc.workdir / "var" / "netflow" / "raw"          # [netflow] raw_dir's default under data_dir
    flows = make_flows(4000, seed=5, hours=(0, 1))
    legs = make_legs(flows, 6)
    legs.account[::3] = 77                                # one busy account: a third of the legs
    writer = RawWriter(raw, "1")
    writer.add_legs(flows, legs, 0, 9)
    writer.flush()
    account = 77
    truth = [row for chunk in read_account(raw, account, HOUR0, HOUR0 + 2 * HOUR_MS) for row in chunk]
    assert len(truth) > 1000                              # more than one chunk of 1 000 rows

    def iso(ms: int) -> str:
        return datetime.fromtimestamp(ms // 1000, UTC).isoformat()

    window = [f"account_id={account}", f"since={iso(HOUR0)}", f"until={iso(HOUR0 + 2 * HOUR_MS)}"]
    lines = run_billctl(bc, "--json", "call", "netflow.raw", *window)
    assert lines.returncode == 0, lines.stderr
    got = [json.loads(line) for line in lines.stdout.splitlines()]
    assert [list(r.values()) for r in got] == truth
    assert list(got[0]) == ["first_ms", "last_ms", "direction", "class_id", "src", "dst", "src_port", "dst_port",
                            "proto", "bytes", "packets", "sampling", "exporter"]
    table = run_billctl(bc, "call", "netflow.raw", *window)
    assert table.returncode == 0 and len(table.stdout.splitlines()) == len(truth) + 2
    assert re.search(rf"rows\s+{len(truth)}\b", table.stderr)


def test_client_call_refuses_to_drop_streamed_rows(books: tuple[BillcoreProcess, dict[str, object]]) -> None:
    # the cause of billctl's "rows 9" and nothing else: Client.call read a streaming function and
    # threw its chunks away.  Now it fails loudly, and the connection stays usable.
    from urfa.client import connect
    from urfa.errors import LocalProtocolError

    bc, seeded = books

    async def go() -> None:
        client = await connect("127.0.0.1", bc.urfa_port)
        try:
            await client.login("admin", "root", ADMIN_PW)
            window = {"since": str(seeded["since"]), "until": str(seeded["until"])}
            with pytest.raises(LocalProtocolError, match="reports.traffic streams its rows"):
                await client.call("reports.traffic", window, timeout=30)
            assert await client.call("sys.ping", timeout=10) == "pong"
            stream = client.stream("reports.traffic", window)
            rows = [row async for chunk in stream for row in chunk]
            assert len(rows) == 9 and stream.result["rows"] == 9
        finally:
            await client.close()

    asyncio.run(go())


def test_a_pool_too_small_for_a_periodic_run_is_refused_at_start(tmp_path: Path) -> None:
    # the scheduler, periodic.run and run-now hold three connections at once; a pool of two
    # would wait for ever instead of charging
    from billcore.common.config import ConfigError, load_config

    path = tmp_path / "billcore.toml"
    path.write_text("[database]\npool_min = 1\npool_max = 2\n")
    with pytest.raises(ConfigError, match="database.pool_max: at least 3"):
        load_config(str(path))


def test_import_of_huge_opening_balances_exits_0(ops_commands: None, db_dsn: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Balances whose sum passes one amount's range: committed, summarised, exit 0 (was a traceback, exit 1)."""
    src = config_for(tmp_path, db_dsn)
    data = tmp_path / "rich.csv"
    data.write_text("login,balance\nr1,999999999999.5\nr2,999999999999.5\n")
    assert cli.main(["-c", str(src), "import", str(data), "--dry-run"]) == 0
    assert "totalling 1999999999999.00," in capsys.readouterr().out
    assert cli.main(["-c", str(src), "import", str(data)]) == 0
    out = capsys.readouterr()
    assert "imported 2 subscriber(s), 2 account(s), 2 opening balance(s) totalling 1999999999999.00," in out.out
    assert "Traceback" not in out.err
