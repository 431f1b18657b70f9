"""The money calls through the real call layer: rights, argument checks,
audit rows, block events, and subscribers confined to their own data —
in-process with real CallContexts, then over the wire with URFAService and
the database auth backend."""

from __future__ import annotations

import datetime as dt
from typing import Any

import asyncpg
import pytest

from billcore.api import money_calls
from billcore.server.calls import CallRegistry, NotInTable
from billcore.common.config import Config
from billcore.server.context import CoreContext
from billcore.server.principals import DatabaseAuth, create_admin
from billcore.server.sessions import Principal, Session
from billcore.server.argcheck import check_args
from billcore.server.call_context import CallContext
from billcore.server.service import URFAConfig, URFAService
from urfa import client as uc
from urfa.errors import CallFailed

UNIT = 1_000_000
T0 = dt.datetime(2024, 7, 1, 9, 0, tzinfo=dt.timezone.utc)


class Harness:
    """A CoreContext on the test database, a registry with every money call,
    and real CallContexts for principals found by the real auth backend."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.core = CoreContext(pool, Config(), publish=lambda t, p: self.events.append((t, p)),
                                now=lambda: T0)
        self.registry = CallRegistry()
        self.registry.register_all(money_calls(self.core))
        self.auth = DatabaseAuth(pool)

    async def principal(self, kind: str, login: str) -> Principal:
        p = await self.auth.find_principal(kind, login)
        assert p is not None, (kind, login)
        return p

    def ctx(self, principal: Principal, ip: str = "192.0.2.7") -> CallContext:
        table = self.registry.snapshot(principal.kind, principal.rights)
        session = Session(b"\x01" * 16, principal, ip, table, 0.0, None, False)
        return CallContext(session, call_id=1)

    async def call(self, ctx: CallContext, name: str, **args: Any) -> Any:
        spec = ctx.session.table.lookup(name).spec       # NotInTable: no right or wrong kind
        problem = check_args(spec.args, args)
        if problem is not None:
            raise CallFailed("bad_args", problem)
        return await spec.handler(ctx, **args)


@pytest.fixture
async def h(pool: asyncpg.Pool) -> Harness:
    async with pool.acquire() as conn:
        await create_admin(conn, "root", "root-password", ["superusers"])
        await create_admin(conn, "cash", "cash-password", ["cashiers"])
    return Harness(pool)


async def counts(pool: asyncpg.Pool) -> tuple[int, ...]:
    return tuple([await pool.fetchval(f"SELECT count(*) FROM {t}")
                  for t in ("ledger", "payments", "blocks", "audit_log", "users", "accounts")])


async def test_admin_payment_flow_with_audit_and_block_events(h: Harness) -> None:
    root = h.ctx(await h.principal("admin", "root"), ip="198.51.100.4")
    user = await h.call(root, "users.create", login="alice", password="alice-password",
                        full_name="Alice A", email="a@example.org")
    acc = user["basic_account_id"]
    await h.call(root, "accounts.set_credit", account_id=acc, credit=5 * UNIT)
    first = await h.call(root, "payments.add", account_id=acc, amount=20 * UNIT, method="bank",
                         external_id="BANK-42")
    again = await h.call(root, "payments.add", account_id=acc, amount=20 * UNIT, method="bank",
                         external_id="BANK-42")
    assert first["created"] and not again["created"] and again["payment_id"] == first["payment_id"]
    with pytest.raises(CallFailed) as e:
        await h.call(root, "payments.add", account_id=acc, amount=21 * UNIT, method="bank",
                     external_id="BANK-42")
    assert e.value.code == "payments.conflict"
    cancel = await h.call(root, "payments.cancel", payment_id=first["payment_id"], reason="wrong account")
    assert cancel["balance"] == 0 and cancel["created"]
    # a charge from the rating side would put it in debt; here a negative correction does
    await h.call(root, "payments.add", account_id=acc, amount=-6 * UNIT, method="correction")
    view = await h.call(root, "accounts.get", account_id=acc)
    assert (view["balance"], view["credit"], view["blocks"]) == (-6 * UNIT, 5 * UNIT, ["system"])
    assert [(t, p["kind"], p["action"], p["account_id"]) for t, p in h.events] == [("blocks", "system", "set", acc)]
    # the first payment (not its repeat), its cancellation and the correction, then the block it
    # caused: each enqueued in the outbox by its own transaction
    rows = await h.pool.fetch("SELECT event, account_id FROM outbox_events ORDER BY id")
    assert [(r["event"], r["account_id"]) for r in rows] == [
        ("payment.added", acc), ("payment.cancelled", acc), ("account.blocked", acc), ("payment.added", acc)]
    history = await h.call(root, "accounts.history", account_id=acc)
    assert [r["amount"] for r in history] == [-6 * UNIT, -20 * UNIT, 20 * UNIT]
    assert [r["balance_after"] for r in history] == [-6 * UNIT, 0, 20 * UNIT]

    audit = await h.call(root, "audit.query", object=f"account:{acc}")
    assert [r["action"] for r in audit] == ["payments.add", "payments.add", "accounts.set_credit"]
    credit_row = next(r for r in audit if r["action"] == "accounts.set_credit")
    assert (credit_row["principal_kind"], credit_row["principal_login"], credit_row["ip"]) == \
        ("admin", "root", "198.51.100.4")
    assert (credit_row["before"]["credit"], credit_row["after"]["credit"]) == (0, 5 * UNIT)
    cancel_rows = await h.call(root, "audit.query", action="payments.cancel")
    assert cancel_rows[0]["after"]["reason"] == "wrong account"


async def test_rights_split_a_cashier_from_the_rest(h: Harness) -> None:
    root = h.ctx(await h.principal("admin", "root"))
    cashier = h.ctx(await h.principal("admin", "cash"))
    acc = (await h.call(root, "users.create", login="bob", password="bob-password"))["basic_account_id"]
    r = await h.call(cashier, "payments.add", account_id=acc, amount=UNIT, method="cash")
    assert r["balance"] == UNIT
    assert len(await h.call(cashier, "payments.list", account_id=acc)) == 1
    for name, args in (("blocks.set", {"account_id": acc}), ("accounts.set_credit", {"account_id": acc, "credit": 1}),
                       ("users.create", {"login": "x", "password": "12345678"}), ("audit.query", {}),
                       ("me.accounts", {})):
        with pytest.raises(NotInTable):
            await h.call(cashier, name, **args)


async def test_bad_input_gets_a_clear_code_and_changes_nothing(h: Harness) -> None:
    root = h.ctx(await h.principal("admin", "root"))
    acc = (await h.call(root, "users.create", login="carol", password="carol-password"))["basic_account_id"]
    before = await counts(h.pool)
    cases = [
        ("payments.add", {"account_id": acc, "amount": -5, "method": "cash"}, "billing.amount"),
        ("payments.add", {"account_id": acc, "amount": 0, "method": "cash"}, "billing.amount"),
        ("payments.add", {"account_id": acc, "amount": 10**17, "method": "cash"}, "billing.amount"),
        ("payments.add", {"account_id": acc, "amount": UNIT, "method": "gold"}, "billing.invalid"),
        ("payments.add", {"account_id": 987654, "amount": UNIT, "method": "cash"}, "accounts.unknown"),
        ("payments.add", {"account_id": acc, "amount": "5.00", "method": "cash"}, "bad_args"),
        ("payments.add", {"account_id": acc, "amount": 1.5, "method": "cash"}, "bad_args"),
        ("payments.add", {"account_id": -1, "amount": 1, "method": "cash"}, "billing.invalid"),
        ("payments.cancel", {"payment_id": 5555}, "payments.unknown"),
        ("accounts.set_credit", {"account_id": acc, "credit": -1}, "billing.amount"),
        ("accounts.edit", {"account_id": acc, "vat_bp": 10001}, "billing.invalid"),
        ("accounts.edit", {"account_id": acc}, "billing.invalid"),
        ("blocks.set", {"account_id": acc, "kind": "system"}, "blocks.refused"),
        ("blocks.lift", {"account_id": 987654}, "accounts.unknown"),
        ("users.create", {"login": "carol", "password": "another-password"}, "users.login_taken"),
        ("users.create", {"login": "bad login", "password": "another-password"}, "billing.invalid"),
        ("users.create", {"login": "dave", "password": "short"}, "billing.invalid"),
        ("users.edit", {"user_id": 1, "fields": {"login": "evil"}}, "billing.invalid"),
        ("users.get", {"user_id": 424242}, "users.unknown"),
        ("accounts.history", {"account_id": acc, "limit": 100000}, "billing.invalid"),
    ]
    for name, args, code in cases:
        with pytest.raises(CallFailed) as e:
            await h.call(root, name, **args)
        assert e.value.code == code, (name, args, e.value)
    assert await counts(h.pool) == before


async def test_users_create_is_idempotent_by_external_id(h: Harness) -> None:
    """A CRM's retried create answers the subscriber made the first time; a different one is refused."""
    root = h.ctx(await h.principal("admin", "root"))
    args = {"login": "erin", "password": "erin-password", "full_name": "Erin", "external_id": "crm-77"}
    first = await h.call(root, "users.create", **args)
    again = await h.call(root, "users.create", **args)
    assert first["created"] is True and again["created"] is False
    assert {k: v for k, v in again.items() if k != "created"} == {k: v for k, v in first.items() if k != "created"}
    before = await counts(h.pool)
    for changed in ({"password": "other-password"}, {"full_name": "Erin B"}, {"login": "erin2"}):
        with pytest.raises(CallFailed) as e:
            await h.call(root, "users.create", **{**args, **changed})
        assert e.value.code == "users.login_taken", changed
        assert "users_" not in e.value.message and "_key" not in e.value.message, e.value.message
    # the same login under another external id is not the same subscriber either
    with pytest.raises(CallFailed) as e:
        await h.call(root, "users.create", **{**args, "external_id": "crm-78"})
    assert e.value.code == "users.login_taken"
    assert await counts(h.pool) == before
    creates = await h.call(root, "audit.query", action="users.create")
    assert [row["object"] for row in creates].count(f"user:{first['id']}") == 1


async def test_me_calls_only_ever_touch_the_principals_own_accounts(h: Harness) -> None:
    root = h.ctx(await h.principal("admin", "root"))
    alice = await h.call(root, "users.create", login="alice", password="alice-password")
    bob = await h.call(root, "users.create", login="bob", password="bob-password")
    a_acc, b_acc = alice["basic_account_id"], bob["basic_account_id"]
    second = await h.call(root, "accounts.create", user_id=alice["id"])
    await h.call(root, "payments.add", account_id=a_acc, amount=7 * UNIT, method="cash")
    await h.call(root, "payments.add", account_id=b_acc, amount=3 * UNIT, method="cash")
    me_b = h.ctx(await h.principal("user", "bob"))
    me_a = h.ctx(await h.principal("user", "alice"))

    mine = await h.call(me_b, "me.accounts")
    assert [(a["id"], a["balance"]) for a in mine] == [(b_acc, 3 * UNIT)]
    assert {a["id"] for a in await h.call(me_a, "me.accounts")} == {a_acc, second["id"]}
    assert [r["account_id"] for r in await h.call(me_b, "me.history")] == [b_acc]
    assert [r["account_id"] for r in await h.call(me_b, "me.payments")] == [b_acc]

    before = await counts(h.pool)
    for name, args in (("me.history", {"account_id": a_acc}), ("me.payments", {"account_id": a_acc}),
                       ("me.blocks", {"account_id": a_acc}), ("me.block", {"on": True, "account_id": a_acc}),
                       ("me.promised", {"account_id": a_acc}), ("me.block", {"on": True, "account_id": 99999})):
        with pytest.raises(CallFailed) as e:
            await h.call(me_b, name, **args)
        assert e.value.code == "accounts.unknown", name
    assert await counts(h.pool) == before
    # admin calls are not in a subscriber's table at all, and me.* take no user id
    with pytest.raises(NotInTable):
        await h.call(me_b, "payments.list", account_id=a_acc)
    with pytest.raises(CallFailed) as e:
        await h.call(me_b, "me.accounts", user_id=alice["id"])
    assert e.value.code == "bad_args"

    # bob's own switch and promised payment act on bob's basic account only
    assert (await h.call(me_b, "me.block", on=True))["account_id"] == b_acc
    assert [b["kind"] for b in await h.call(me_b, "me.blocks", active_only=True)] == ["user"]
    assert (await h.call(me_b, "me.block", on=False))["changed"] is True
    promised = await h.call(me_b, "me.promised")
    assert promised["account_id"] == b_acc and promised["amount"] > 0
    with pytest.raises(CallFailed) as e:
        await h.call(me_b, "me.promised")
    assert e.value.code == "promised.refused"
    assert await h.pool.fetchval("SELECT count(*) FROM blocks WHERE account_id <> $1", b_acc) == 0
    rows = await h.call(root, "audit.query", login="bob")
    assert {r["action"] for r in rows} == {"me.block", "me.promised"}


async def test_me_password_needs_the_old_one(h: Harness) -> None:
    root = h.ctx(await h.principal("admin", "root"))
    await h.call(root, "users.create", login="erin", password="erin-password")
    me = h.ctx(await h.principal("user", "erin"))
    with pytest.raises(CallFailed) as e:
        await h.call(me, "me.password", old_password="guess-guess", new_password="new-password-1")
    assert e.value.code == "billing.invalid"
    assert await h.call(me, "me.password", old_password="erin-password", new_password="new-password-1")
    svc = URFAService(h.registry, h.auth, URFAConfig(secret=b"s" * 32, mock_iterations=4096))
    await svc.start(tcp=("127.0.0.1", 0))
    try:
        port = svc.sockets[0].getsockname()[1]
        c = await uc.connect("127.0.0.1", port)
        info = await c.login("user", "erin", "new-password-1")
        assert info.login == "erin"
        await c.close()
    finally:
        await svc.stop()


async def test_over_the_wire_a_subscriber_cannot_see_another(h: Harness) -> None:
    svc = URFAService(h.registry, h.auth, URFAConfig(secret=b"s" * 32, mock_iterations=4096))
    await svc.start(tcp=("127.0.0.1", 0))
    port = svc.sockets[0].getsockname()[1]
    clients = []
    try:
        admin = await uc.connect("127.0.0.1", port)
        clients.append(admin)
        await admin.login("admin", "root", "root-password")
        a = await admin.call("users.create", {"login": "alice", "password": "alice-password"})
        b = await admin.call("users.create", {"login": "bob", "password": "bob-password"})
        await admin.call("payments.add", {"account_id": a["basic_account_id"], "amount": 9 * UNIT,
                                          "method": "card", "external_id": "w1"})
        bob = await uc.connect("127.0.0.1", port)
        clients.append(bob)
        await bob.login("user", "bob", "bob-password")
        accounts = await bob.call("me.accounts")
        assert [x["id"] for x in accounts] == [b["basic_account_id"]] and accounts[0]["balance"] == 0
        for fn, args in (("me.history", {"account_id": a["basic_account_id"]}),
                         ("me.block", {"on": True, "account_id": a["basic_account_id"]})):
            with pytest.raises(CallFailed) as e:
                await bob.call(fn, args)
            assert e.value.code == "accounts.unknown"
        with pytest.raises(CallFailed) as e:
            await bob.call("accounts.get", {"account_id": a["basic_account_id"]})
        assert e.value.code == "not_in_table"
        with pytest.raises(CallFailed) as e:
            await bob.call("payments.add", {"account_id": b["basic_account_id"], "amount": UNIT, "method": "cash"})
        assert e.value.code == "not_in_table"
        assert await h.pool.fetchval("SELECT count(*) FROM blocks") == 0
        assert await h.pool.fetchval("SELECT balance FROM accounts WHERE id = $1", b["basic_account_id"]) == 0
    finally:
        for c in clients:
            await c.close()
        await svc.stop()
