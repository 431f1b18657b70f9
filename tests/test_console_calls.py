"""The console's card and system calls on a real database: accounts.audit, radius.history,
tariffs.quote and sys.health."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import asyncpg
import pytest

from billcore.api import money_calls, radius_history
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

    async def call(self, name: str, ctx: Ctx | None = None, **args: Any) -> Any:
        return await self.fn[name](ctx or Ctx(), **args)


@pytest.fixture
async def core(pool: asyncpg.Pool) -> Core:
    context = CoreContext(pool, Config(), publish=lambda t, p: None, now=lambda: NOW)
    specs = [*money_calls(context), *radius_history.calls(context)]
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
