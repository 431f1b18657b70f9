"""Bank statement import end to end: ``billctl payments import-statement`` (a real subprocess, a URFA
client) against a real ``billcore serve`` on a real PostgreSQL, and the reader's pure rules.

What an operator would notice: a dry run shows which line goes to which account and books nothing;
the real run books each matched line once (two equal payments on one day stay two); running it again
books nothing; unmatched, ambiguous, unreadable and debit lines are reported and never booked; a
cp1251 export with ``;`` and decimal commas reads the same as a UTF-8 one with ``,``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from billcore.common.statement import StatementError, candidates, match_line, parse_amount, read_statement
from tests.running import BillcoreProcess, serving_with_root
from urfa.client import Client

ROOT_PW = "root-statement-pw-1"
UNIT = 1_000_000


@dataclass
class World:
    bc: BillcoreProcess
    admin: Client
    alice: int
    bob: int          # contract C-1042


@pytest.fixture
async def world(db_dsn: str) -> AsyncIterator[World]:
    async with serving_with_root("stmt", "core", ROOT_PW, db_dsn) as (bc, admin):
        alice = await admin.call("users.create", {"login": "alice", "password": "alice-password-1"})
        bob = await admin.call("users.create", {"login": "bob", "password": "bob-password-1", "external_id": "C-1042"})
        yield World(bc, admin, int(alice["basic_account_id"]), int(bob["basic_account_id"]))


def billctl(bc: BillcoreProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BILLCTL_PASSWORD": ROOT_PW, "BILLCTL_PORT": str(bc.urfa_port)}
    return subprocess.run([sys.executable, "-m", "billcore.clients.billctl", "--login", "root", *args],
                          capture_output=True, text=True, env=env, timeout=300)


async def bank_payments(admin: Client, *accounts: int) -> list[tuple[int, int, str]]:
    out = []
    for account in accounts:
        for row in await admin.call("payments.list", {"account_id": account}):
            if row["method"] == "bank":
                out.append((account, row["amount"], row["external_id"]))
    return sorted(out)


def russian_export(alice: int) -> bytes:
    """A Russian bank's export: cp1251, ';', decimal commas, grouped thousands."""
    lines = [
        "Дата;Сумма;Номер документа;Плательщик;Назначение платежа",
        "01.12.2026;1 500,00;101;Иванов И.И.;Оплата по договору C-1042 за декабрь",
        f"01.12.2026;300,50;102;Петрова А.;Оплата интернета л/с {alice}",
        "02.12.2026;250,00;103;Сидоров;Оплата услуг 777777",
        f"02.12.2026;99,00;104;Кто-то;договор C-1042, л/с {alice}",
        "02.12.2026;-100,00;105;Банк;Комиссия банка",
        f"03.12.2026;12,345;106;Ошибка;л/с {alice}",
        f"03.12.2026;50,00;;Петрова А.;Оплата л/с {alice}",
        f"03.12.2026;50,00;;Петрова А.;Оплата л/с {alice}",
    ]
    return ("\r\n".join(lines) + "\r\n").encode("cp1251")


async def test_dry_run_then_import_then_again(world: World, tmp_path: Path) -> None:
    path = tmp_path / "december.csv"
    path.write_bytes(russian_export(world.alice))

    dry = billctl(world.bc, "--json", "payments", "import-statement", str(path), "--bank", "sber", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    table = {row["line"]: row for row in json.loads(dry.stdout)}
    assert {n: (r["status"], r["account_id"]) for n, r in table.items()} == {
        2: ("matched", world.bob), 3: ("matched", world.alice), 4: ("unmatched", None),
        5: ("ambiguous", None), 6: ("skipped", None), 7: ("invalid", None),
        8: ("matched", world.alice), 9: ("matched", world.alice)}
    assert sorted(table[5]["candidates"]) == sorted([world.alice, world.bob])
    assert "dry run: nothing booked" in dry.stderr and "1\u202f" not in dry.stderr
    assert await bank_payments(world.admin, world.alice, world.bob) == []

    real = billctl(world.bc, "payments", "import-statement", str(path), "--bank", "sber")
    assert real.returncode == 0, real.stderr
    assert "4 booked" in real.stderr and "1 unmatched" in real.stderr and "1 ambiguous" in real.stderr, real.stderr
    assert "; 1900.50 booked" in real.stderr, real.stderr
    booked = await bank_payments(world.admin, world.alice, world.bob)
    assert [(acc, amount) for acc, amount, _ in booked] == sorted([
        (world.bob, 1500 * UNIT), (world.alice, 300_500_000), (world.alice, 50 * UNIT), (world.alice, 50 * UNIT)])
    ids = {ext for _, _, ext in booked}
    assert {"stmt:sber:101", "stmt:sber:102"} <= ids and len(ids) == 4     # the two equal lines: two hashes
    # the human table names every line's fate
    assert "unmatched" in real.stdout and "ambiguous" in real.stdout and "booked" in real.stdout

    again = billctl(world.bc, "--json", "payments", "import-statement", str(path), "--bank", "sber")
    assert again.returncode == 0, again.stderr
    statuses = [row["status"] for row in json.loads(again.stdout)]
    assert statuses.count("already") == 4 and "booked" not in statuses
    assert await bank_payments(world.admin, world.alice, world.bob) == booked
    account = await world.admin.call("accounts.get", {"account_id": world.alice})
    assert account["balance"] == 400_500_000


async def test_utf8_comma_export_with_contract_column(world: World, tmp_path: Path) -> None:
    path = tmp_path / "statement.csv"
    path.write_text("Date,Amount,Reference,Payer,Purpose,Contract\n"
                    '2026-12-01,"1,234.56",TX-9,ACME Ltd,"Invoice 5, thanks",C-1042\n'
                    "2026-12-01,10.00,TX-10,Nobody,no reference to anyone,\n", encoding="utf-8-sig")
    run = billctl(world.bc, "--json", "payments", "import-statement", str(path), "--bank", "acme-bank")
    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout)
    assert [(r["status"], r["account_id"]) for r in rows] == [("booked", world.bob), ("unmatched", None)]
    assert await bank_payments(world.admin, world.bob) == [(world.bob, 1_234_560_000, "stmt:acme-bank:TX-9")]


async def test_a_long_statement_shows_progress_and_books_once(world: World, tmp_path: Path) -> None:
    lines = ["date;amount;purpose"] + [f"01.12.2026;1,00;договор C-1042 платёж {k}" for k in range(1200)]
    path = tmp_path / "long.csv"
    path.write_text("\n".join(lines), encoding="utf-8")
    run = billctl(world.bc, "--json", "payments", "import-statement", str(path), "--bank", "big")
    assert run.returncode == 0, run.stderr
    assert "statement: 500/1200 lines" in run.stderr and "statement: 1000/1200 lines" in run.stderr, run.stderr
    assert "1200 booked" in run.stderr
    again = billctl(world.bc, "payments", "import-statement", str(path), "--bank", "big")
    assert "1200 already" in again.stderr and " booked," not in again.stderr, again.stderr
    account = await world.admin.call("accounts.get", {"account_id": world.bob})
    assert account["balance"] == 1200 * UNIT


async def test_a_file_that_cannot_be_read_is_a_usage_error(world: World, tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("when;who\n1;2\n")
    run = billctl(world.bc, "payments", "import-statement", str(path), "--bank", "sber")
    assert run.returncode != 0 and "no amount column" in run.stderr
    bad_bank = billctl(world.bc, "payments", "import-statement", str(path), "--bank", "no spaces")
    assert bad_bank.returncode != 0 and "bank name" in bad_bank.stderr


def test_amounts_are_exact() -> None:
    assert parse_amount("1 234,56", 2) == 1_234_560_000
    assert parse_amount("1\u00a0234,5", 2) == 1_234_500_000
    assert parse_amount("1,234.56", 2) == 1_234_560_000
    assert parse_amount("1.234,56", 2) == 1_234_560_000
    assert parse_amount("-100,00", 2) == -100_000_000
    assert parse_amount("0,10", 2) == 100_000
    assert parse_amount("100", 0) == 100_000_000
    for bad in ("12,345", "1e3", "abc", "", "1.2.3", "0,001"):
        with pytest.raises(ValueError):
            parse_amount(bad, 2)


def test_matching_rules() -> None:
    statement = read_statement("amount;purpose\n1;Оплата л/с 42 по договору A-7\n2;ЛС:43\n3;account #44\n"
                               "4;лицевой счёт 45\n5;nothing here\n".encode(), "b")
    words, ids = candidates(statement.lines[0])
    assert "A-7" in words and ids == [42]
    assert [candidates(line)[1] for line in statement.lines[1:4]] == [[43], [44], [45]]
    assert match_line(statement.lines[0], {"A-7": 42}, {42}) == ("matched", 42, [42])
    assert match_line(statement.lines[0], {"A-7": 9}, {42}) == ("ambiguous", None, [9, 42])
    assert match_line(statement.lines[4], {}, set()) == ("unmatched", None, [])
    with pytest.raises(StatementError):
        read_statement(b"", "b")

