"""Loading at run time, unloading (permanent, idle, in flight), hooks and tasks."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from urfa.errors import CallFailed

from billcore.server.calls import CallRegistry, NotInTable, SymbolDeleted
from billcore.plugins import errors, plugin_calls
from billcore.plugins.hooks import PAYMENT_ADDED, HookBus
from billcore.plugins.loader import PluginManager

from .test_plugins_support import DevKey, write_plugin
from .waiting import eventually

NOW = 1_800_000_000.0
ALL = frozenset({"*"})


@dataclass
class Env:
    tmp: Path
    key: DevKey
    registry: CallRegistry
    bus: HookBus
    manager: PluginManager

    def plugin(self, name: str, **kw: object) -> Path:
        d = write_plugin(self.tmp, name, **kw)  # type: ignore[arg-type]
        self.key.sign(d)
        return d


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    key = DevKey(tmp_path / "keys")
    registry, bus = CallRegistry(), HookBus(timeout=0.5)
    manager = PluginManager(registry, bus, tmp_path / "keys", tmp_path / "state", 1, None)
    yield Env(tmp_path, key, registry, bus, manager)
    await manager.close()


LIFECYCLE_PLUGIN = """\
    import asyncio
    from pathlib import Path
    from billcore.plugins.api import PAYMENT_ADDED

    LOG = Path({log!r})
    ticks = []

    def note(line):
        with LOG.open("a") as f:
            f.write(line + "\\n")

    async def slow(ctx):
        await asyncio.sleep(0.05)
        return "done"

    async def on_payment(payment):
        note("payment " + str(payment["amount"]))

    async def tick():
        ticks.append(1)
        if len(ticks) == 2:
            raise RuntimeError("a failing run does not end the schedule")

    def setup(api):
        api.register_call("gone.slow", slow, right="gone.use")
        api.on(PAYMENT_ADDED, on_payment)
        api.schedule(0.01, tick)

    def teardown():
        note("teardown")
    """


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def test_load_at_run_time_is_seen_by_new_sessions_only(env: Env) -> None:
    before = env.registry.snapshot("admin", ALL)
    d = env.plugin("late", calls=["late.hi"], init="""\
        async def hi(ctx):
            return "hi"
        def setup(api):
            api.register_call("late.hi", hi, right="late.use", kinds=frozenset({"admin"}))
        """)
    await env.manager.load(d, NOW)
    after = env.registry.snapshot("admin", ALL)
    with pytest.raises(NotInTable):
        before.lookup("late.hi")
    assert await after.lookup("late.hi").spec.handler(None) == "hi"
    assert "late.hi" not in env.registry.snapshot("user", ALL).names()
    assert "late.hi" not in env.registry.snapshot("admin", frozenset({"other.use"})).names()
    before.close()
    after.close()


async def test_permanent_plugin_refuses_unload_and_keeps_working(env: Env) -> None:
    d = env.plugin("keep", permanent=True, calls=["keep.ok"], init="""\
        async def ok(ctx):
            return 42
        def setup(api):
            api.register_call("keep.ok", ok)
        """)
    await env.manager.load(d, NOW)
    table = env.registry.snapshot("admin", ALL)
    with pytest.raises(errors.PermanentPlugin):
        env.manager.unload("keep")
    assert env.manager.get("keep")["state"] == "loaded"  # type: ignore[index]
    assert await table.lookup("keep.ok").spec.handler(None) == 42
    assert await env.registry.snapshot("admin", ALL).lookup("keep.ok").spec.handler(None) == 42
    table.close()


async def test_unload_in_flight_tears_down_once_after_the_last_table(env: Env) -> None:
    log = env.tmp / "gone.log"
    d = env.plugin("gone", calls=["gone.slow"], hooks=[PAYMENT_ADDED], init=LIFECYCLE_PLUGIN.format(log=str(log)))
    await env.manager.load(d, NOW)
    module = sys.modules["billcore_plugin_gone"]
    await env.bus.fire(PAYMENT_ADDED, {"account_id": 1, "amount": 5, "balance": 5})
    # the second run fails; a third proves the schedule survived it
    await eventually(lambda: len(module.ticks) >= 3, what="a run after the failing one")
    [task] = env.manager._plugins["gone"].tasks

    first, second = env.registry.snapshot("admin", ALL), env.registry.snapshot("admin", ALL)
    symbol = first.lookup("gone.slow")
    with env.registry.in_flight(symbol):
        call = asyncio.create_task(symbol.spec.handler(None))
        await asyncio.sleep(0)
        assert env.manager.unload("gone") == ["gone.slow"]
        assert env.manager.get("gone")["state"] == "pending-unload"  # type: ignore[index]
        with pytest.raises(SymbolDeleted):
            first.lookup("gone.slow")
        fresh = env.registry.snapshot("admin", ALL)
        with pytest.raises(NotInTable):
            fresh.lookup("gone.slow")
        fresh.close()
        assert await call == "done"  # the call in flight completes
    assert lines(log) == ["payment 5"]  # tables still open: not torn down yet
    first.close()
    assert "teardown" not in lines(log)
    second.close()
    assert lines(log) == ["payment 5", "teardown"]
    second.close()
    assert lines(log).count("teardown") == 1
    await env.manager.drain()
    assert task.cancelled()
    assert env.manager.get("gone")["state"] == "unloaded"  # type: ignore[index]
    assert "billcore_plugin_gone" not in sys.modules
    assert env.bus.owners(PAYMENT_ADDED) == []
    await env.bus.fire(PAYMENT_ADDED, {"account_id": 1, "amount": 6, "balance": 11})
    assert "payment 6" not in lines(log)


async def test_unused_plugin_is_torn_down_at_once_and_can_be_upgraded(env: Env) -> None:
    code = """\
        VERSION = "{v}"
        async def which(ctx):
            return VERSION
        def setup(api):
            api.register_call("up.which", which)
        async def teardown():
            import asyncio
            await asyncio.sleep(0)
        """
    v1 = env.plugin("up", calls=["up.which"], init=code.format(v="1"))
    await env.manager.load(v1, NOW)
    with pytest.raises(errors.PluginStateError):
        await env.manager.load(v1, NOW)  # already loaded
    env.manager.unload("up")
    assert env.manager.get("up")["state"] == "unloaded"  # type: ignore[index]
    await env.manager.drain()
    with pytest.raises(errors.PluginStateError):
        env.manager.unload("up")
    v2 = env.plugin("up", version="1.1", calls=["up.which"], init=code.format(v="2"))
    record = await env.manager.load(v2, NOW)
    assert record["version"] == "1.1"
    assert await env.registry.get("up.which").spec.handler(None) == "2"  # type: ignore[union-attr]


async def test_a_failing_hook_is_contained(env: Env) -> None:
    seen = env.tmp / "seen"
    bad = env.plugin("bad", hooks=[PAYMENT_ADDED], init="""\
        from billcore.plugins.api import PAYMENT_ADDED
        async def boom(payment):
            raise ValueError("hook bug")
        async def hang(payment):
            import asyncio
            await asyncio.sleep(60)
        def setup(api):
            api.on(PAYMENT_ADDED, boom)
            api.on(PAYMENT_ADDED, hang)
        """)
    good = env.plugin("good", hooks=[PAYMENT_ADDED], init=f"""\
        from pathlib import Path
        from billcore.plugins.api import PAYMENT_ADDED
        async def record(payment):
            Path({str(seen)!r}).write_text(str(payment["account_id"]))
        def setup(api):
            api.on(PAYMENT_ADDED, record)
        """)
    await env.manager.load(bad, NOW)
    await env.manager.load(good, NOW)
    result = await env.bus.fire(PAYMENT_ADDED, {"account_id": 7, "amount": 1, "balance": 1})
    assert result.delivered == 3 and result.failed == ("bad", "bad")
    assert seen.read_text() == "7"


async def test_failing_setup_leaves_nothing_behind(env: Env) -> None:
    d = env.plugin("half", calls=["half.a"], hooks=[PAYMENT_ADDED], init="""\
        from billcore.plugins.api import PAYMENT_ADDED
        async def a(ctx):
            return 1
        async def on_payment(p):
            pass
        def setup(api):
            api.register_call("half.a", a)
            api.on(PAYMENT_ADDED, on_payment)
            raise KeyError("missing config")
        """)
    with pytest.raises(errors.PluginSetupError, match="missing config"):
        await env.manager.load(d, NOW)
    assert env.registry.get("half.a") is None
    assert env.bus.owners(PAYMENT_ADDED) == []
    assert "billcore_plugin_half" not in sys.modules
    assert env.manager.get("half") is None


@pytest.mark.parametrize("init, message", [
    ("async def x(ctx): pass\ndef setup(api):\n    api.register_call('undeclared.x', x)\n",
     "not declared"),
    ("def setup(api):\n    pass\n", "declared calls not registered"),
    ("def x(ctx): pass\ndef setup(api):\n    api.register_call('strict.x', x)\n", "async"),
    ("from billcore.plugins.api import PAYMENT_ADDED\nasync def h(p): pass\n"
     "def setup(api):\n    api.on(PAYMENT_ADDED, h)\n    api.register_call('strict.x', h)\n",
     "not declared in plugin.toml"),
    ("X = 1\n", "no setup"),
])
async def test_setup_must_match_the_manifest(env: Env, init: str, message: str) -> None:
    d = env.plugin("strict", calls=["strict.x"], init=init)
    with pytest.raises(errors.PluginError, match=message):
        await env.manager.load(d, NOW)
    assert env.registry.get("strict.x") is None


async def test_plugin_calls_manage_plugins_over_urfa(env: Env) -> None:
    pdir = env.tmp / "available"
    d = write_plugin(pdir, "viaurfa", calls=["viaurfa.hi"], init="""\
        async def hi(ctx):
            return "hi"
        def setup(api):
            api.register_call("viaurfa.hi", hi)
        """)
    env.key.sign(d)
    env.registry.register_all(plugin_calls(env.manager, plugin_dir=pdir, clock=lambda: NOW))
    reader = env.registry.snapshot("admin", frozenset({"plugins.read"}))
    assert reader.names() == ["plugins.list"]
    admin = env.registry.snapshot("admin", frozenset({"plugins.*"}))
    load = admin.lookup("plugins.load").spec.handler
    with pytest.raises(CallFailed, match="plugin.error: .*plain name"):
        await load(None, path=str(d))
    record = await load(None, path=d.name)
    assert record["name"] == "viaurfa" and record["state"] == "loaded"
    listed = await reader.lookup("plugins.list").spec.handler(None)
    assert [(p["name"], p["version"], p["symbols"]) for p in listed] == [("viaurfa", "1.0.0", ["viaurfa.hi"])]
    result = await admin.lookup("plugins.unload").spec.handler(None, name="viaurfa")
    assert result == {"name": "viaurfa", "deleted": ["viaurfa.hi"], "state": "unloaded"}
    assert "plugins.load" not in env.registry.snapshot("user", ALL).names()
    reader.close()
    admin.close()


async def test_two_concurrent_loads_of_one_plugin_load_it_once(env: Env) -> None:
    d = env.plugin("twice", calls=["twice.x"], init="""\
        async def x(ctx):
            return 1
        async def setup(api):
            import asyncio
            await asyncio.sleep(0.02)
            api.register_call("twice.x", x)
        """)
    results = await asyncio.gather(env.manager.load(d, NOW), env.manager.load(d, NOW),
                                   return_exceptions=True)
    assert sorted(type(r).__name__ for r in results) == ["PluginStateError", "dict"]
    assert env.manager.get("twice")["state"] == "loaded"  # type: ignore[index]
