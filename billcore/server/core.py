"""The core process: the only writer of billing state.

Start-up: open the pool (waiting while the database is unreachable), apply
pending migrations, provision the edges' system logins, build the call
registry from every built-in call module, load the configured plugins, serve
URFA (TCP, optional TLS, and a Unix socket) and metrics, and run the
periodic-charge scheduler.  Stop: close the listeners, stop the scheduler
between batches, tear plugins down, close the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import hashlib
import hmac
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

import asyncpg

from billcore.server import metrics
from billcore.billing.clock import BillingClock, clock_floor
from billcore.common.money import parse_money
from billcore.billing.payments import PromisedRule
from billcore.server.calls import CallRegistry, CallSpec
from billcore.common.config import Config
from billcore.common.gctune import tune as tune_gc
from billcore.server.context import CoreContext, utcnow
from billcore.db.migrate import migrate
from billcore.db.pool import DB_GONE, DatabaseHealth, describe_dsn, guard_database, open_pool, watch_database
from billcore.server.principals import DatabaseAuth, ensure_service_login
from billcore.server.service import URFAConfig, URFAService

__all__ = ["run", "build_calls", "urfa_config"]

log = logging.getLogger("billcore.server.core")


def urfa_config(config: Config, secret: bytes) -> URFAConfig:
    urfa = config.urfa
    return URFAConfig(
        session_timeout=float(urfa.session_timeout),
        handshake_timeout=urfa.handshake_timeout,
        max_frame=urfa.max_frame,
        max_inflight=urfa.max_inflight,
        max_connections_per_ip=urfa.max_connections_per_ip,
        max_sessions_per_login=urfa.max_sessions_per_login,
        max_sessions_per_system=urfa.max_sessions_per_system,
        login_failures=urfa.login_failures_per_minute,
        login_window=60.0,
        # fake salts for unknown logins must stay the same across restarts,
        # or a login that exists would be told apart by its stable salt
        secret=hmac.new(secret, b"billcore urfa mock salts", hashlib.sha256).digest(),
    )


def tls_context(config: Config) -> ssl.SSLContext | None:
    if not config.urfa.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(config.urfa.tls_cert, config.urfa.tls_key)
    return ctx


def build_calls(core: CoreContext, on_gone: Callable[[str], None] | None = None) -> list[CallSpec]:
    """Every built-in call module's calls; ``on_gone(reason)`` hears of every call that found the
    database gone (so monitoring sees an outage shorter than the probe's interval)."""
    from billcore.api import money_calls, netflow_calls, operators, periodic, portal_calls, reports, tariffs
    from billcore.api import api_tokens, fup_calls, health, notify_calls, outbox_calls, radius_history
    from billcore.api.radius import calls as radius_calls
    from billcore.api import invoice_calls
    from billcore.api import invoice_export, whatif_calls

    specs = [
        *money_calls(core), *tariffs.calls(core), *reports.calls(core),
        *portal_calls.calls(core), *radius_calls(core), *netflow_calls.calls(core), *periodic.calls(core),
        *operators.calls(core), *radius_history.calls(core), *health.calls(core),
        *api_tokens.calls(core), *outbox_calls.calls(core), *fup_calls.calls(core), *notify_calls.calls(core),
        *invoice_calls.calls(core),
        *whatif_calls.calls(core), *invoice_export.calls(core),
    ]
    from billcore.api import report_calls
    specs += report_calls.calls(core)
    return [dataclasses.replace(spec, handler=guard_database(spec.handler, on_gone)) for spec in specs]


def edge_roles(config: Config) -> list[str]:
    from billcore.server.supervisor import children_for

    return sorted({child.role for child in children_for(config)} - {"core"})


async def _watch_pool(pool: asyncpg.Pool) -> None:
    while True:
        metrics.DB_POOL_SIZE.set(pool.get_size())
        metrics.DB_POOL_IDLE.set(pool.get_idle_size())
        await asyncio.sleep(5)


def _database_health() -> DatabaseHealth:
    """``billcore_db_up`` and /ready follow the probe; one log line per change."""
    def changed(up: bool, after: float, reason: str) -> None:
        metrics.DB_UP.set(1 if up else 0)
        if up:
            log.info("database reachable", extra={"after_s": round(after, 2)})
        else:
            log.warning("database unreachable; calls answer core.db_unavailable until it is back",
                        extra={"reason": reason})

    return DatabaseHealth(changed)


async def _relay_classifier(dsn: str, service: URFAService, pool: asyncpg.Pool) -> None:
    """Bindings, classes or rules changed (any code path: the trigger
    NOTIFYs at commit): tell the NetFlow workers to reload their snapshot."""
    from billcore.db.notify import relay_notifications

    catching_up: set[asyncio.Task[None]] = set()  # referenced until done, or the loop may drop them

    def publish(payload: str | None) -> None:
        if payload is not None:
            service.publish("classifier", {"version": int(payload)})
        else:  # (re)connected: we may have missed changes; the version is cheap to read
            task = asyncio.get_running_loop().create_task(_publish_current(pool, service))
            catching_up.add(task)
            task.add_done_callback(catching_up.discard)

    await relay_notifications(dsn, "billcore_classifier", publish)


async def _publish_current(pool: asyncpg.Pool, service: URFAService) -> None:
    try:
        version = await pool.fetchval("SELECT version FROM classifier_version")
    except DB_GONE:  # gone again: the relay calls us once more when it reconnects
        return
    service.publish("classifier", {"version": int(version)})


async def periodic_once(core: CoreContext, progress: Any = None, waiting: Any = None) -> Any:
    """One scheduler pass: expire promised payments, run due charges, tell hooks and RADIUS.

    The scheduler, ``periodic.run`` and ``billcore periodic run-now`` all come
    here, one at a time (``periodic_lock``); ``progress(RunProgress)`` hears of
    every committed batch, ``waiting()`` that another run holds the lock."""
    from billcore.api.periodic import periodic_lock

    async with periodic_lock(core.pool, waiting):
        return await _periodic_pass(core, progress)


async def _periodic_pass(core: CoreContext, progress: Any) -> Any:
    from billcore.api import announce, listened
    from billcore.billing.payments import expire_promised
    from billcore.billing.scheduler import RunProgress, run_due
    from billcore.server.automation import automation_pass

    def report(p: RunProgress) -> None:
        metrics.periodic_progress(p)
        if progress is not None:
            progress(p)

    async with core.pool.acquire() as conn:
        await announce(core, await expire_promised(conn, core.now()))
    await automation_pass(core)   # FUP restores and dunning (billcore.server.automation)

    # Per-row events cost a 1M-account run real time: enqueued (in each
    # batch's transaction) only while a plugin listens (checked per run:
    # plugins load and unload at run time).  period.closed always is.
    result = await run_due(core.pool, core.now(), tz=core.config.zone,
                           batch_size=core.config.periodic.batch_size,
                           progress=report, charged_events=listened(core, "account.charged"))
    metrics.periodic_finished(result)
    await announce(core, result.block_changes)
    if result.charges:
        log.info("periodic run", extra={"accounts": result.accounts, "charges": result.charges,
                                        "amount": result.amount, "periods_closed": result.periods_closed})
    return result


async def _periodic(core: CoreContext) -> None:

    while True:
        try:
            await periodic_once(core)
        except DB_GONE as exc:
            metrics.periodic_failed()
            log.warning("periodic run failed, will retry", extra={"reason": f"{type(exc).__name__}: {exc}"})
        await asyncio.sleep(core.config.periodic.interval)


async def run(config: Config, dsn: str, index: int, stop: asyncio.Event) -> None:
    pool = await _open(config, dsn, stop)
    if pool is None:
        return
    tasks: list[asyncio.Task[Any]] = []
    service: URFAService | None = None
    plugins: Any = None
    try:
        async with pool.acquire() as conn:
            await migrate(conn)
            for role in edge_roles(config):
                await ensure_service_login(conn, config.data_dir, role)

        from billcore.radius.secrets import SecretStore

        key = SecretStore.load_or_create_key(config.secret_key_path)  # read once: RADIUS secrets and URFA mock salts
        secret_store = SecretStore(key)
        registry = CallRegistry()
        service = URFAService(registry, auth=DatabaseAuth(pool), config=urfa_config(config, key))
        from billcore.server.metrics import observe_call

        service.observe = observe_call
        # billing time never runs backwards (a stepped wall clock): billcore/billing/clock.py
        core = CoreContext(pool=pool, config=config, publish=service.publish, now=BillingClock(utcnow, floor=await clock_floor(pool)).now)
        core.extras["secret_store"] = secret_store
        core.extras["promised_rule"] = PromisedRule(
            amount=parse_money(config.billing.promised_amount),
            duration=datetime.timedelta(days=config.billing.promised_days),
        )
        plugins = await _start_plugins(core, registry)
        _outbox(core)   # before the calls: outbox.* reach it through core.extras
        health = _database_health()
        registry.register_all(build_calls(core, lambda reason: health.observe(False, time.monotonic(), reason)))

        sock = config.urfa_socket
        if sock is not None:
            sock.parent.mkdir(parents=True, exist_ok=True)
            sock.unlink(missing_ok=True)
        await service.start(
            tcp=(config.urfa.host, config.urfa.port),
            unix=str(sock) if sock is not None else None,
            ssl=tls_context(config),
        )
        if sock is not None:
            sock.chmod(0o660)
        if config.metrics.enabled:
            def ready() -> tuple[bool, str]:
                return (True, "ready") if health.up else (False, "database unavailable")

            metrics.serve(config.metrics.host, config.metrics.port, ready=ready)
        tasks.append(asyncio.create_task(_watch_pool(pool)))
        tasks.append(asyncio.create_task(watch_database(pool, health)))
        tasks.append(asyncio.create_task(_relay_classifier(dsn, service, pool)))
        tasks.append(asyncio.create_task(_run_outbox(core, dsn)))
        if config.periodic.enabled:
            tasks.append(asyncio.create_task(_periodic(core)))
        tune_gc()   # after start-up: what exists now lives as long as the process
        log.info(
            "core serving",
            extra={"db": describe_dsn(dsn), "urfa": f"{config.urfa.host}:{config.urfa.port}",
                   "tls": bool(config.urfa.tls_cert), "unix": str(sock or "off"),
                   "calls": len(registry.symbols())},
        )
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if service is not None:
            await service.stop()
        if plugins is not None:
            await plugins.close()
        try:
            await asyncio.wait_for(pool.close(), timeout=5)
        except DB_GONE as exc:  # (timeouts included) the server went first, e.g. with a killed supervisor
            log.info("database gone before the pool closed", extra={"reason": f"{type(exc).__name__}: {exc}"})


def _outbox(core: CoreContext) -> Any:
    """The outbox's dispatcher and hook worker, with the routers this core has."""
    from billcore.server.outbox_service import OutboxService, hook_router, plugin_channel_deliverer, radius_router

    bus = core.extras.get("hooks")
    from billcore.billing.notify_route import route_notifications

    async def notifications(conn: Any, events: Any, now: datetime.datetime) -> Any:
        # the plugins' notification channels loaded at dispatch time get their short messages
        return await route_notifications(conn, events, now, channels=bus.channel_names() if bus is not None else ())

    routers = [radius_router, notifications] + ([hook_router(bus)] if bus is not None else [])
    service = OutboxService(core.pool, core.config.outbox, routers, bus, core.publish, core.now)
    if bus is not None:
        service.in_core["plugin"] = plugin_channel_deliverer(bus)
    core.extras["outbox"] = service
    return service


async def _run_outbox(core: CoreContext, dsn: str) -> None:
    from billcore.server import outbox_service

    await outbox_service.run(core.extras["outbox"], dsn)


async def _start_plugins(core: CoreContext, registry: CallRegistry) -> Any:
    """The plugin manager, its admin calls, and the plugins named in config."""
    from pathlib import Path

    from billcore.api import announce, who
    from billcore.billing import audit
    from billcore.billing.payments import add_payment
    from billcore.plugins import HookBus, PluginManager
    from billcore.plugins.admin_calls import plugin_calls
    from billcore.plugins.api import PLUGIN_API_VERSION
    from billcore.server.call_context import CallContext

    config = core.config

    class Billing:
        async def add_payment(self, account_id: int, amount: int, external_id: str,
                              method: str, comment: str) -> int:
            async with core.pool.acquire() as conn:
                result = await add_payment(conn, account_id=account_id, amount=amount, method=method,
                                           actor="plugin", external_id=external_id, comment=comment,
                                           now=core.now())
            # As for payments.add: payment.added went to the outbox with the payment
            await announce(core, result.block_changes)
            return int(result.payment_id)

        async def accounts_of(self, user_id: int) -> list[int]:
            rows = await core.pool.fetch("SELECT id FROM accounts WHERE user_id = $1 ORDER BY id", user_id)
            return [int(row["id"]) for row in rows]

    bus = HookBus()
    config.plugin_key_dir.mkdir(parents=True, exist_ok=True)
    config_dir = Path(config.plugins.config_dir) if config.plugins.config_dir else config.data_dir / "plugin-config"
    manager = PluginManager(
        registry, bus, config.plugin_key_dir, config.data_dir / "plugin-state", PLUGIN_API_VERSION,
        config.plugins.installation_id or None, core.pool, billing=Billing(), config_dir=config_dir,
    )

    core.extras["plugins"] = manager
    core.extras["hooks"] = bus
    async def audit_plugin(ctx: CallContext, action: str, obj: str, after: dict[str, Any]) -> None:
        try:
            async with core.pool.acquire() as conn:
                await audit.record(conn, who(ctx), action, obj, after=after, now=core.now())
        except (asyncpg.PostgresError, OSError):  # the plugin change is made: the call must not fail
            log.warning("plugin change not audited", extra={"action": action, "object": obj})

    registry.register_all(plugin_calls(manager, plugin_dir=config.plugin_dir, audit=audit_plugin))
    for name in config.plugins.load:
        record = await manager.load(config.plugin_dir / name, time.time())
        log.info("plugin loaded", extra={"plugin": record.get("name"), "version": record.get("version")})
    return manager


async def _open(config: Config, dsn: str, stop: asyncio.Event) -> asyncpg.Pool | None:
    """Open the pool, or give up quietly when asked to stop meanwhile."""
    opening = asyncio.create_task(open_pool(dsn, config.database))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({opening, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if opening.done():
        stopping.cancel()
        return opening.result()
    opening.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await opening
    return None
