"""No call answers with something that grows with the data in one frame.

Walks the real call registry (every built-in module the core registers, the
``sys.*``/``session.*``/``events.*`` built-ins and the plugin admin calls) and
holds each call to its declared ``CallSpec.bound`` (docs/protocol.md,
"Results that grow"):

* an undeclared call fails, and a ``fixed`` call that answers a list must say
  here why that list cannot grow with subscribers, bindings, sessions, NAS,
  plugins or history;
* every ``page:N`` call is driven past N (refused with a stable code, never
  ``internal``) and at N over a database holding more rows than N: it answers
  at most N, within the 1 MB frame;
* the read-only ``fixed`` calls and the streams' chunks, on that database,
  encode within the frame.

Before: ``netflow.snapshot`` answered 27 MB at a million bindings (one
frame, over the cap), and ``bindings.list``, ``radius.sessions``,
``radius.link_list``, ``radius.nas_list``, ``me.accounts``, ``plugins.list``
and ``sys.calls`` had no page at all.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import pytest

from billcore.server.calls import CallRegistry, CallSpec
from billcore.common.config import Config
from billcore.server.context import CoreContext, utcnow
from billcore.server.core import build_calls
from billcore.plugins import HookBus, PluginManager
from billcore.plugins.admin_calls import plugin_calls
from billcore.plugins.errors import PluginError
from billcore.radius.secrets import SecretStore
from billcore.server.builtin_calls import builtin_specs
from tests.test_netflow_snapshot_scale import bind_many
from tests.test_plugins_lifecycle import Env, env  # noqa: F401 - the fixture
from urfa.errors import CallFailed
from urfa.framing import DEFAULT_MAX_FRAME, FrameEncoder
from urfa.messages import Chunk, Result, to_wire

BOUND = re.compile(r"fixed|stream|page:[1-9][0-9]*")
ROWS = 1500  # more than any page's N (1 000 at most)

# fixed calls that answer a list, and why it cannot grow with the data
FIXED_LISTS = {
    "radius.authorize_many": "one decision per request given, at most MAX_BATCH (1 024)",
    "radius.accounting_many": "one answer per record given, at most MAX_BATCH (1 024)",
    "events.subscribe": "the topics of one session, at most MAX_TOPICS (64)",
    "events.unsubscribe": "the topics of one session, at most MAX_TOPICS (64)",
    "me.classes": "the names of traffic classes (a catalogue), at most 1 000",
    "me.tariff": "one record per account of one subscriber",
    "me.traffic": "one subscriber's days (at most 366) x classes",
    "operators.roles": "the admin groups (role templates), at most MAX_ROLES (1 000)",
    "outbox.claim": "the deliveries the caller leases, at most its limit (1..MAX_CLAIM, 1 000)",
    "fup.profiles_list": "the rate profiles (a catalogue), at most MAX_CATALOGUE (1 000)",
    "fup.quotas_list": "the quotas (a catalogue), at most MAX_CATALOGUE (1 000)",
    "radius.rate_state": "the open sessions of one account, at most MAX_RATE_SESSIONS (100)",
    "notify.templates_list": "the shipped events x channels x languages (48), a constant of the code",
    "notify.webhook_secrets": "one secret per id given, at most 1 000",
}

# read-only fixed calls run on the big database (the rest write and answer one record)
FIXED_READS: dict[str, dict[str, Any]] = {
    "users.get": {"user_id": "USER"},
    "accounts.get": {"account_id": "ACCOUNT"},
    "reports.preview": {"account_id": "ACCOUNT"},
    "me.tariff": {},
    "me.traffic": {"since": "2024-01-01", "until": "2024-12-31"},
    "me.classes": {},
    "netflow.watermark": {"worker": "w1"},
    "sys.whoami": {},
    "sys.ping": {},
    "sys.time": {},
}

# the required arguments of page calls
PAGE_ARGS: dict[str, dict[str, Any]] = {
    "accounts.history": {"account_id": "ACCOUNT"},
    "blocks.list": {"account_id": "ACCOUNT"},
    "payments.list": {"account_id": "ACCOUNT"},
    "tariffs.history": {"account_id": "ACCOUNT"},
    "reports.revenue": {"since": "SINCE", "until": "UNTIL"},
    "accounts.audit": {"account_id": "ACCOUNT"},
    "radius.history": {"account_id": "ACCOUNT"},
}


class Ctx:
    """What a handler sees of its session (principal, address, call table, streamed chunks)."""

    def __init__(self, kind: str, pid: int, table: Any = None) -> None:
        self.principal = SimpleNamespace(kind=kind, id=pid, login=f"{kind}{pid}", rights=frozenset({"*"}))
        self.ip = "127.0.0.1"
        self.sid = b"s" * 16
        self.session = SimpleNamespace(table=table, proxied=False, principal=self.principal)
        self.chunks: list[Any] = []

    async def stream(self, chunk: Any) -> None:
        self.chunks.append(chunk)


def frame_size(message: Any) -> int:
    """Bytes of the frame carrying ``message``; raises past the 1 MB cap like the server would."""
    return len(FrameEncoder(DEFAULT_MAX_FRAME).encode(to_wire(message)))


def registry_specs(tmp_path: Path, pool: Any = None) -> list[CallSpec]:
    core = CoreContext(pool=pool, config=Config(), publish=lambda t, p: None, now=utcnow)
    core.extras["secret_store"] = SecretStore(b"k" * 32)
    manager = PluginManager(CallRegistry(), HookBus(), tmp_path / "keys", tmp_path / "state", 1, None)
    return [*build_calls(core), *builtin_specs(None, None), *plugin_calls(manager)]  # type: ignore[arg-type]


def test_every_call_declares_how_its_result_is_bounded(tmp_path: Path) -> None:
    specs = registry_specs(tmp_path)
    assert len(specs) > 80
    undeclared = sorted(s.name for s in specs if not BOUND.fullmatch(s.bound))
    assert not undeclared, f"calls without a declared bound: {undeclared}"
    for s in specs:
        assert s.streaming == (s.bound == "stream"), s.name
        if s.page_max is not None:
            assert {"limit", "offset"} <= set(s.args), f"{s.name} is paged but takes no limit/offset"
            assert s.page_max <= 1000, s.name
        elif s.bound == "fixed" and s.result == "list":
            assert s.name in FIXED_LISTS, f"{s.name} answers a list but declares no page or stream"
    assert "bound" in specs[0].describe()


async def build_big_database(pool: asyncpg.Pool) -> dict[str, Any]:
    """ROWS users, accounts and bindings; NAS, RADIUS logins and sessions, audit rows, a user with
    ROWS accounts and an account with ROWS tariff links, all set-based."""
    store = SecretStore(b"k" * 32)
    async with pool.acquire() as conn:
        first = await bind_many(conn, ROWS, base="10.80.0.0")
        user = await conn.fetchval("SELECT user_id FROM accounts WHERE id = $1", first)
        # one subscriber with ROWS accounts (me.accounts, users.get)
        await conn.execute("INSERT INTO accounts(user_id, credit) SELECT $1, 0 FROM generate_series(1, $2)",
                           user, ROWS)
        await conn.execute(
            "INSERT INTO radius_nas(name, address, secret_enc) SELECT 'nas' || g, '10.250.0.0'::inet + g, $1"
            " FROM generate_series(1, $2) g", store.seal(b"secret"), ROWS)
        await conn.execute(
            "INSERT INTO radius_links(account_id, login, password_enc) SELECT id, 'login' || id, $2"
            " FROM accounts WHERE id >= $1 AND id < $1 + $3", first, store.seal(b"password"), ROWS)
        await conn.execute(
            "INSERT INTO radius_sessions(nas_id, session_id, account_id, link_id, login, started_at, updated_at)"
            " SELECT (SELECT min(id) FROM radius_nas), 'session' || l.id, l.account_id, l.id, l.login, now(), now()"
            " FROM radius_links l")
        await conn.execute(
            "INSERT INTO audit_log(at, principal_kind, principal_id, principal_login, ip, action, object, after)"
            " SELECT now(), 'admin', 1, 'admin1', '127.0.0.1', 'users.edit', 'user:' || g,"
            " jsonb_build_object('note', repeat('x', 600)) FROM generate_series(1, $1) g", ROWS)
        await conn.execute("INSERT INTO services(name, kind) SELECT 'svc' || g, 'traffic' FROM generate_series(1, $1) g",
                           ROWS)
        await conn.execute("INSERT INTO tariffs(name) SELECT 'tariff' || g FROM generate_series(1, $1) g", ROWS)
        await conn.execute("INSERT INTO traffic_classes(name, position) SELECT 'class' || g, g"
                           " FROM generate_series(1, $1) g", ROWS)
        tariff = await conn.fetchval("SELECT min(id) FROM tariffs")
        await conn.execute(
            "INSERT INTO account_tariffs(account_id, tariff_id, valid_from, valid_to, created_at, created_by)"
            " SELECT $1, $2, '2020-01-01'::timestamptz + g * interval '1 day',"
            " '2020-01-01'::timestamptz + (g + 1) * interval '1 day', now(), 'test' FROM generate_series(0, $3 - 1) g",
            first, tariff, ROWS)
    return {"USER": user, "ACCOUNT": first, "SINCE": None, "UNTIL": None}


def resolve(args: dict[str, Any], ids: dict[str, Any]) -> dict[str, Any]:
    from datetime import datetime, timezone

    times = {"SINCE": datetime(2019, 1, 1, tzinfo=timezone.utc), "UNTIL": datetime(2030, 1, 1, tzinfo=timezone.utc)}
    return {k: times.get(v, ids.get(v, v)) if isinstance(v, str) else v for k, v in args.items()}


async def test_paged_calls_cap_at_their_max_and_fixed_ones_fit_the_frame(tmp_path: Path, pool: asyncpg.Pool) -> None:
    ids = await build_big_database(pool)
    specs = {s.name: s for s in registry_specs(tmp_path, pool)}
    registry = CallRegistry()
    registry.register_all(specs.values())
    admin_table = registry.snapshot("admin", frozenset({"*"}))

    def ctx_for(spec: CallSpec) -> Ctx:
        if spec.kinds == frozenset({"user"}):
            return Ctx("user", ids["USER"])
        kind = "admin" if "admin" in spec.kinds else "system"
        return Ctx(kind, 1, admin_table)

    paged = [s for s in specs.values() if s.page_max is not None]
    assert len(paged) >= 20
    full = []
    for spec in paged:
        n = spec.page_max
        assert n is not None
        args = resolve(PAGE_ARGS.get(spec.name, {}), ids)
        with pytest.raises(CallFailed) as refused:
            await spec.handler(ctx_for(spec), **args, limit=n + 1)
        assert refused.value.code != "internal", spec.name
        rows = await spec.handler(ctx_for(spec), **args, limit=n)
        if isinstance(rows, dict):  # users.search: {total, users}; subscribers.search: {total, rows}
            rows = rows["users"] if "users" in rows else rows["invoices"] if "invoices" in rows else rows["rows"]
        assert len(rows) <= n, spec.name
        assert frame_size(Result(1, rows)) <= DEFAULT_MAX_FRAME, spec.name
        if len(rows) == n:
            full.append(spec.name)
    # the database really held more than a page of each kind of row
    for name in ("users.search", "bindings.list", "radius.nas_show", "radius.nas_list", "radius.link_list",
                 "radius.sessions", "audit.query", "me.accounts", "services.list", "tariffs.list",
                 "tariffs.history", "classes.list"):
        assert name in full, f"{name} answered less than a full page"

    for name, args in FIXED_READS.items():
        spec = specs[name]
        assert spec.bound == "fixed", name
        value = await spec.handler(ctx_for(spec), **resolve(args, ids))
        assert frame_size(Result(1, value)) <= DEFAULT_MAX_FRAME, name
    user = await specs["users.get"].handler(Ctx("admin", 1), user_id=ids["USER"])
    assert len(user["accounts"]) == 100 and user["accounts_total"] == ROWS + 1

    # streams: every chunk fits a frame
    worker = Ctx("system", 1)
    answer = await specs["netflow.snapshot"].handler(worker)
    assert answer["bindings"] == ROWS and worker.chunks
    for chunk in worker.chunks:
        assert frame_size(Chunk(1, chunk)) <= DEFAULT_MAX_FRAME // 2 + 4096


async def test_a_plugin_declares_its_bound_and_a_wrong_one_is_refused(env: Env) -> None:
    """A plugin's call may declare its bound; one that claims a page without limit/offset is refused."""
    good = env.plugin("pages", calls=["pages.list"], init="""\
        async def listing(ctx, limit=10, offset=0):
            return list(range(offset, offset + limit))
        def setup(api):
            api.register_call("pages.list", listing, args={"limit": "int?", "offset": "int?"}, bound="page:10")
        """)
    await env.manager.load(good, 0.0)
    table = env.registry.snapshot("admin", frozenset({"*"}))
    assert table.lookup("pages.list").spec.page_max == 10
    assert [c["bound"] for c in table.describe() if c["name"] == "pages.list"] == ["page:10"]
    table.close()
    bad = env.plugin("nopage", calls=["nopage.list"], init="""\
        async def listing(ctx):
            return []
        def setup(api):
            api.register_call("nopage.list", listing, bound="page:10")
        """)
    with pytest.raises(PluginError, match="bound of nopage.list"):
        await env.manager.load(bad, 0.0)
