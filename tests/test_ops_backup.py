"""Backup and restore: a database filled through the real API comes back
row for row, with its sequences, watermarks and config."""

from __future__ import annotations

import json
import tarfile
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import asyncpg
import pytest

from billcore.billing import accounts as A
from billcore.billing import classification
from billcore.billing import tariffs as T
from billcore.common.money import parse_money
from billcore.billing.payments import add_payment, cancel_payment
from billcore.billing.rating import TrafficUsage
from billcore.billing.usage import commit_usage
from billcore.ops.backup import BackupError, backup, read_manifest, restore, user_tables
from tests.test_usage_commit import setup_traffic
from urfa.scram import make_verifier

NOW = datetime(2024, 4, 10, 12, tzinfo=timezone.utc)


async def fill(conn: asyncpg.Connection) -> None:
    v = make_verifier("secret-password", iterations=4096)
    users = [await A.create_user(conn, f"user{i}", v, full_name=f"Иван {i}", email=f"u{i}@example.org")
             for i in range(3)]
    extra = await A.create_account(conn, users[0]["id"], credit=parse_money("100"))
    p = await add_payment(conn, account_id=users[0]["basic_account_id"], amount=parse_money("250.50"),
                          method="cash", actor="admin:root#1", external_id="bank-1", now=NOW)
    await add_payment(conn, account_id=extra["id"], amount=parse_money("10"), method="card",
                      actor="admin:root#1", now=NOW)
    await cancel_payment(conn, p.payment_id, actor="admin:root#1", reason="typo", now=NOW + timedelta(minutes=1))
    monthly = await T.create_service(conn, "monthly", "periodic", fee=parse_money("300"),
                                     period={"kind": "monthly", "anchor": date(2024, 1, 1)}, charge_mode="start")
    tariff = await T.create_tariff(conn, "Home", [monthly])
    await T.link_tariff(conn, users[1]["basic_account_id"], tariff, now=NOW, tz=timezone.utc, actor="admin:root#1")
    await classification.add_binding(conn, users[1]["basic_account_id"], "10.0.0.0/30", valid_from=NOW)
    s = await setup_traffic(conn)
    await commit_usage(conn, "netflow-0", 4242, [TrafficUsage(s["accounts"][0], s["inet"], NOW, 5_000_000)], NOW)
    await commit_usage(conn, "netflow-1", 17, [TrafficUsage(s["accounts"][0], s["inet"], NOW, 1_000)], NOW)


async def snapshot(dsn: str) -> dict[str, list[str]]:
    """Every table's rows (as text, sorted) and every sequence's position."""
    conn = await asyncpg.connect(dsn)
    try:
        out: dict[str, list[str]] = {}
        for name in await conn.fetch(
                "SELECT c.relname, c.relkind::text AS relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = 'public' AND c.relkind IN ('r', 'S') ORDER BY 1"):
            if name["relkind"] == "S":
                row = await conn.fetchrow(f'SELECT last_value, is_called FROM "{name["relname"]}"')
                out[name["relname"]] = [f"{row['last_value']}/{row['is_called']}"]
            else:
                rows = await conn.fetch(f'SELECT t::text AS r FROM "{name["relname"]}" t')
                out[name["relname"]] = sorted(r["r"] for r in rows)
        return out
    finally:
        await conn.close()


async def test_round_trip_compares_every_table(db_dsn: str, empty_db_dsn: str, tmp_path: Path) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        await fill(conn)
    finally:
        await conn.close()
    config = tmp_path / "billcore.toml"
    config.write_text('[core]\ntimezone = "Europe/Moscow"\n')
    out = tmp_path / "b" / "backup.tar"
    manifest = await backup(db_dsn, out, config_file=config, now=NOW)

    assert manifest.schema_version >= 3
    assert [(w["source"], w["watermark"]) for w in manifest.watermarks] == [("netflow-0", 4242), ("netflow-1", 17)]
    with tarfile.open(out) as tar:
        assert sorted(tar.getnames()) == ["billcore.toml", "database.dump", "manifest.json"]
        assert tar.extractfile("billcore.toml").read() == config.read_bytes()  # type: ignore[union-attr]
        assert json.loads(tar.extractfile("manifest.json").read())["created_at"] == NOW.isoformat()  # type: ignore[union-attr]
    assert out.stat().st_mode & 0o077 == 0
    assert read_manifest(out) == manifest

    await restore(empty_db_dsn, out)
    before, after = await snapshot(db_dsn), await snapshot(empty_db_dsn)
    assert set(before) == set(after)
    for table in before:
        assert after[table] == before[table], table
    # tables that matter were really filled, so the comparison compared something
    for table in ("users", "accounts", "ledger", "payments", "tariffs", "account_tariffs", "ip_bindings",
                  "usage_counters", "ingest_watermarks", "schema_migrations"):
        assert before[table], table
    # the append-only trigger came back too
    conn = await asyncpg.connect(empty_db_dsn)
    try:
        with pytest.raises(asyncpg.RestrictViolationError):
            await conn.execute("UPDATE ledger SET amount = amount + 1")
    finally:
        await conn.close()


async def test_restore_refuses_non_empty_without_force(db_dsn: str, empty_db_dsn: str, tmp_path: Path) -> None:
    conn = await asyncpg.connect(empty_db_dsn)
    try:
        await conn.execute("CREATE TABLE scratch (x int)")
        await conn.execute("INSERT INTO scratch VALUES (1)")
    finally:
        await conn.close()
    src = await asyncpg.connect(db_dsn)
    try:
        v = make_verifier("pw-pw-pw-pw", iterations=4096)
        user = await A.create_user(src, "alice", v)
        await add_payment(src, account_id=user["basic_account_id"], amount=parse_money("5"), method="cash",
                          actor="t", now=NOW)
    finally:
        await src.close()
    out = tmp_path / "backup.tar"
    await backup(db_dsn, out, now=NOW)

    with pytest.raises(BackupError, match="not empty.*--force"):
        await restore(empty_db_dsn, out)
    conn = await asyncpg.connect(empty_db_dsn)
    try:
        assert await conn.fetchval("SELECT x FROM scratch") == 1  # untouched
    finally:
        await conn.close()

    await restore(empty_db_dsn, out, force=True)
    conn = await asyncpg.connect(empty_db_dsn)
    try:
        assert "scratch" not in await user_tables(conn)
        assert await conn.fetchval("SELECT balance FROM accounts a JOIN users u ON u.id = a.user_id"
                                   " WHERE u.login = 'alice'") == 5_000_000
    finally:
        await conn.close()


async def test_not_a_backup(tmp_path: Path, empty_db_dsn: str) -> None:
    bogus = tmp_path / "x.tar"
    with tarfile.open(bogus, "w") as tar:
        tar.add(__file__, arcname="something.txt")
    with pytest.raises(BackupError, match="not a billcore backup"):
        await restore(empty_db_dsn, bogus)
