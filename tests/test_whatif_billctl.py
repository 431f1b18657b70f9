"""``billctl whatif`` against a running core (billcore serve): the rows of ``reports.whatif`` on stdout as a
table, CSV or JSON lines, the totals on stderr; a command line missing its period is a usage error."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from billcore.common.money import format_money
from tests.running import BillcoreProcess
from tests.test_ops_cli import ADMIN_PW, run_billcore, run_billctl
from tests.test_whatif import booked_in_november, history

assert ADMIN_PW


@pytest.fixture
def seeded(tmp_path: Path, db_dsn: str) -> Iterator[tuple[BillcoreProcess, dict[str, Any]]]:
    async def seed() -> dict[str, Any]:
        pool = await asyncpg.create_pool(db_dsn, min_size=1, max_size=2)
        try:
            h = await history(pool)
            async with pool.acquire() as conn:
                h["posted"] = {acc: await booked_in_november(conn, h[acc]) for acc in ("a1", "a2", "a3")}
            return h
        finally:
            await pool.close()

    h = asyncio.run(seed())
    with BillcoreProcess(tmp_path, dsn=db_dsn, periodic={"enabled": False}) as bc:
        bc.child_pid("core")
        made = run_billcore(bc, "admin", "create", "root", "--password-env", "PW", env={"PW": ADMIN_PW})
        assert made.returncode == 0, made.stderr
        yield bc, h


def test_billctl_whatif_table_csv_json(seeded: tuple[BillcoreProcess, dict[str, Any]]) -> None:
    bc, h = seeded
    posted = h["posted"]
    own = run_billctl(bc, "whatif", "--month", "2026-11", "--tariff", str(h["home"]), "--of-tariff", str(h["home"]))
    assert own.returncode == 0, own.stderr
    lines = own.stdout.splitlines()
    assert lines[0].split() == ["account_id", "charged", "would_pay", "difference", "note"]
    assert [line.split() for line in lines[2:]] == [
        [str(h[a]), format_money(posted[a]), format_money(posted[a]), format_money(0)] for a in ("a1", "a2")]
    assert re.search(r"difference\s+" + re.escape(format_money(0)), own.stderr), own.stderr

    as_csv = run_billctl(bc, "whatif", "--month", "2026-11", "--tariff", str(h["cheap"]), "--all", "--format", "csv")
    assert as_csv.returncode == 0, as_csv.stderr
    got = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [(int(r["account_id"]), r["charged"]) for r in got] == [(h[a], format_money(posted[a])) for a in ("a1", "a2", "a3")]
    assert got[0]["would_pay"] == format_money(5_064_000) and got[0]["note"] == ""

    as_json = run_billctl(bc, "whatif", "--period-start", "2026-11-20", "--tariff", str(h["nightly"]),
                          "--account", str(h["a1"]), "--format", "json")
    assert as_json.returncode == 0, as_json.stderr
    (row,) = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert row["account_id"] == h["a1"] and row["charged"] == posted["a1"] and row["would_pay"] is None
    assert row["note"].startswith("cannot_rerate:")
    totals = json.loads(as_json.stderr.strip().splitlines()[-1])
    assert (totals["accounts"], totals["cannot_rerate"], totals["charged"]) == (1, 1, posted["a1"])


def test_billctl_whatif_usage_and_refusals(seeded: tuple[BillcoreProcess, dict[str, Any]]) -> None:
    bc, h = seeded
    no_period = run_billctl(bc, "whatif", "--tariff", str(h["home"]), "--all")
    assert no_period.returncode != 0 and "--month" in no_period.stderr and not no_period.stdout
    nobody = run_billctl(bc, "whatif", "--month", "2026-11", "--tariff", str(h["home"]))
    assert nobody.returncode != 0 and "--all" in nobody.stderr
    unknown = run_billctl(bc, "whatif", "--month", "2026-11", "--tariff", "999999", "--all")
    assert unknown.returncode != 0 and "tariff 999999 does not exist" in unknown.stderr, unknown.stderr
