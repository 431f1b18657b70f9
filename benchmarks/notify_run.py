"""Low-balance notifications through the outbox to a real SMTP server and webhook receiver, per second.

One run, one embedded PostgreSQL, receivers in a process of their own (an
aiosmtpd SMTP server and an aiohttp webhook receiver that checks every
signature and de-duplicates by event id, both on loopback):

1. **ledger** — N accounts with a low-balance threshold are charged below it
   in batches of 1 000 (``post_charges``): the ledger's crossing check
   enqueues N ``balance.low`` events in the postings' transactions;
2. **dispatch** — the outbox's ``dispatch`` with ``route_notifications``
   renders N emails and N webhook bodies into deliveries;
3. **deliver** — the notify edge's ``Deliverer`` (SMTP connections reused,
   signed POSTs, bounded concurrency) sends what ``claim`` leases, and
   ``done`` acknowledges it, both channels at once;
4. **ceiling** — a bare sender (aiosmtplib and aiohttp, the same connections
   and concurrency, messages prepared in advance, no database) sends N
   emails and N webhooks straight to the same receivers;
5. **deployed** — as an ISP runs it: ``billcore serve`` (supervisor, core,
   the ``notify`` edge as its own process) on the same database; N more
   accounts are charged below their threshold and the clock runs until the
   receivers hold N emails and N webhooks.  Here the core's dispatcher
   (woken by NOTIFY) fans out and the edge claims and acknowledges over
   URFA, as in production.

Figures: notifications per second (each notification is one email and one
webhook) in-process (dispatch + deliver) and deployed (from the first
charge to the last message received), per phase, and the ratio of each to
the bare sender's ceiling.  Usage::

    python benchmarks/notify_run.py [--n 100000] [--concurrency 32] [--tiny]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _machine import machine, publish, tree_commit  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "notify_run"
UNIT = 1_000_000
NOW = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.timezone.utc)


# -- the receivers' process ------------------------------------------------------

async def receivers(secret: bytes) -> None:
    """An SMTP server and a webhook receiver on loopback; ports on stdout; counts at GET /stats."""
    from aiohttp import web
    from aiosmtpd.smtp import SMTP

    from billcore.common.webhook_sig import verify

    counts = {"emails": 0, "webhooks": 0, "duplicates": 0, "rejected": 0}
    seen: set[str] = set()

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            counts["emails"] += 1
            return "250 OK"

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        if not verify(secret, request.headers.get("X-Billcore-Timestamp", ""), body,
                      request.headers.get("X-Billcore-Signature", ""), time.time()):
            counts["rejected"] += 1
            return web.Response(status=401)
        event = request.headers.get("X-Billcore-Event", "")
        if event in seen:
            counts["duplicates"] += 1
        else:
            seen.add(event)
            counts["webhooks"] += 1
        return web.Response(text="ok")

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(counts)

    async def reset(request: web.Request) -> web.Response:
        for key in counts:
            counts[key] = 0
        seen.clear()
        return web.json_response(counts)

    loop = asyncio.get_running_loop()
    smtp = await loop.create_server(lambda: SMTP(Handler(), hostname="sink", decode_data=False), "127.0.0.1", 0)
    app = web.Application()
    app.router.add_post("/hook", hook)
    app.router.add_get("/stats", stats)
    app.router.add_post("/reset", reset)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    http_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(json.dumps({"smtp": smtp.sockets[0].getsockname()[1], "http": http_port}), flush=True)
    await loop.run_in_executor(None, sys.stdin.read)      # until the parent closes our stdin
    smtp.close()
    await runner.cleanup()


# -- the measured side -----------------------------------------------------------

async def stats(session: Any, url: str) -> dict[str, int]:
    async with session.get(url + "/stats") as r:
        data: dict[str, int] = await r.json()
        return data


async def wait_counts(session: Any, url: str, n: int, timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        got = await stats(session, url)
        if got["emails"] >= n and got["webhooks"] >= n:
            return got
        if time.monotonic() > deadline:
            raise SystemExit(f"receivers got {got}, expected {n} of each")
        await asyncio.sleep(0.05)


async def build(conn: Any, n: int, hook_url: str, store: Any) -> int:
    from billcore.billing import notify_webhooks

    await conn.execute(
        "INSERT INTO users(login, email, language, scram_salt, scram_iterations, scram_stored_key, scram_server_key)"
        " SELECT 'u' || g, 'u' || g || '@example.test', CASE WHEN g % 2 = 0 THEN 'ru' ELSE 'en' END,"
        " '\\x00', 4096, '\\x00', '\\x00' FROM generate_series(1, $1) g", n)
    await conn.execute("INSERT INTO accounts(user_id, is_basic, balance, credit, low_balance)"
                       " SELECT id, true, 20000000, 1000000000000, 10000000 FROM users ORDER BY id")
    await notify_webhooks.add(conn, store, "bench", hook_url, ["balance.low"], True, NOW)
    await conn.execute("VACUUM ANALYZE")
    return int(await conn.fetchval("SELECT min(id) FROM accounts"))


async def ledger_phase(pool: Any, first: int, n: int, tag: str = "bench") -> float:
    from billcore.billing.ledger import Entry, post_charges

    started = time.perf_counter()
    for lo in range(0, n, 1000):
        entries = [Entry(first + i, -15 * UNIT, "charge", f"{tag}-{i}") for i in range(lo, min(n, lo + 1000))]
        async with pool.acquire() as conn, conn.transaction():
            await post_charges(conn, entries, actor="bench", now=NOW)
    return time.perf_counter() - started


async def deployed_phase(uri: str, tmp: Path, n: int, ports: dict[str, int], secret: bytes, concurrency: int,
                         batch: int, session: Any, http_url: str) -> tuple[float, float]:
    """``billcore serve`` with the notify edge; N more crossings; (seconds to all received, ledger seconds)."""
    import asyncpg

    from billcore.common.config import load_config
    from billcore.radius.secrets import SecretStore
    from tests.running import BillcoreProcess

    work = tmp / "serve"
    work.mkdir()
    bc = BillcoreProcess(work, dsn=uri, periodic={"enabled": False}, outbox={"poll_interval": 1.0}, notify={
        "enabled": True, "smtp_host": "127.0.0.1", "smtp_port": ports["smtp"], "mail_from": "billing@isp.test",
        "concurrency": concurrency, "batch": min(batch, 1000), "poll_interval": 1.0})
    # the core seals webhook secrets with its own key: make it now and seal the endpoint's secret with it
    key_path = load_config(bc.config_path).secret_key_path
    key_path.parent.mkdir(parents=True, exist_ok=True)
    store = SecretStore(SecretStore.load_or_create_key(key_path))
    pool = await asyncpg.create_pool(uri, min_size=1, max_size=4)
    try:
        async with pool.acquire() as conn:
            await conn.execute("UPDATE webhooks SET secret_enc = $1", store.seal(secret))
            await conn.execute(
                "INSERT INTO users(login, email, language, scram_salt, scram_iterations, scram_stored_key,"
                " scram_server_key) SELECT 'v' || g, 'v' || g || '@example.test',"
                " CASE WHEN g % 2 = 0 THEN 'ru' ELSE 'en' END, '\\x00', 4096, '\\x00', '\\x00'"
                " FROM generate_series(1, $1) g", n)
            await conn.execute("INSERT INTO accounts(user_id, is_basic, balance, credit, low_balance)"
                               " SELECT id, true, 20000000, 1000000000000, 10000000 FROM users"
                               " WHERE login LIKE 'v%' ORDER BY id")
            first = int(await conn.fetchval("SELECT min(a.id) FROM accounts a JOIN users u ON u.id = a.user_id"
                                            " WHERE u.login LIKE 'v%'"))
            await conn.execute("VACUUM ANALYZE")
        bc.start()
        try:
            bc.wait_for(r'role=core .*msg="core serving"', timeout=120)
            bc.wait_for(r'role=notify .*msg="core connected"', timeout=120)
            async with session.post(http_url + "/reset") as r:
                await r.read()
            started = time.perf_counter()
            ledger_s = await ledger_phase(pool, first, n, "deployed")
            got = await wait_counts(session, http_url, n, 1800)
            took = time.perf_counter() - started
            if got["rejected"] or got["duplicates"]:
                raise SystemExit(f"receivers (deployed): {got}")
            return took, ledger_s
        finally:
            bc.stop()
    finally:
        await pool.close()


async def dispatch_phase(pool: Any) -> tuple[float, int]:
    from billcore.billing.notify_route import RouteSettings, route_notifications
    from billcore.billing.notify_templates import MoneyStyle
    from billcore.billing.outbox_delivery import dispatch

    settings = RouteSettings(MoneyStyle(2, "RUB"), "en", "isp.test")

    async def router(conn: Any, events: Any, now: dt.datetime) -> Any:
        return await route_notifications(conn, events, now, settings)

    started = time.perf_counter()
    made = 0
    async with pool.acquire() as conn:
        while True:
            result = await dispatch(conn, [router], NOW, 500)
            if not result.events:
                break
            made += result.deliveries
    return time.perf_counter() - started, made


async def deliver_phase(pool: Any, deliverer: Any, batch: int) -> float:
    from billcore.billing.outbox_delivery import claim, done

    async def channel(name: str) -> None:
        while True:
            async with pool.acquire() as conn:
                rows = [c.as_dict() for c in await claim(conn, name, batch, 600, NOW)]
            if not rows:
                return
            delivered, failed = await deliverer.deliver(rows)
            if failed:
                raise SystemExit(f"{len(failed)} deliveries failed: {failed[0][1]}")
            async with pool.acquire() as conn:
                await done(conn, delivered, NOW)

    started = time.perf_counter()
    # two claimers per channel keep the senders busy while a batch is acknowledged
    await asyncio.gather(*(channel(c) for c in ("email", "webhook") for _ in range(2)))
    return time.perf_counter() - started


async def bare_phase(n: int, smtp_port: int, hook_url: str, secret: bytes, concurrency: int) -> float:
    """The receivers' ceiling: prepared messages, the same connections and concurrency, no database."""
    import aiohttp
    import aiosmtplib

    from billcore.common.webhook_sig import sign
    from notify.deliver import build_email

    emails = [build_email({"id": i, "event_id": i, "message": {"to": f"u{i}@example.test", "subject": "Low",
                                                                 "body": "Your balance is low: 5.00 RUB.\n"}},
                          "billing@isp.test") for i in range(n)]
    bodies = [json.dumps({"id": i, "event": "balance.low", "data": {"balance": 5 * UNIT}}).encode() for i in range(n)]
    connections = max(1, concurrency // 2)
    next_mail = iter(range(n))

    async def mail_worker() -> None:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=smtp_port, timeout=30)
        await client.connect()
        for i in next_mail:
            await client.sendmail("billing@isp.test", [f"u{i}@example.test"], emails[i])
        await client.quit()

    next_hook = iter(range(n))

    async def hook_worker(session: aiohttp.ClientSession) -> None:
        for i in next_hook:
            ts = int(time.time())
            headers = {"Content-Type": "application/json", "X-Billcore-Event": f"bare-{i}",
                       "X-Billcore-Timestamp": str(ts), "X-Billcore-Signature": sign(secret, ts, bodies[i])}
            async with session.post(hook_url, data=bodies[i], headers=headers) as r:
                await r.content.read(65536)

    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(mail_worker() for _ in range(connections)),
                             *(hook_worker(session) for _ in range(max(1, concurrency - connections))))
    return time.perf_counter() - started


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="low-balance notifications (each: an email and a webhook)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--tiny", action="store_true", help="1,000 notifications (CI)")
    ap.add_argument("--receivers", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.receivers:
        await receivers(args.receivers.encode())
        return
    n = 1_000 if args.tiny else args.n

    import aiohttp
    import asyncpg
    import pgserver

    from billcore.billing import notify_webhooks
    from billcore.db.migrate import migrate
    from billcore.radius.secrets import SecretStore
    from notify.deliver import MailSettings
    from notify.process import Deliverer, NotifySettings, SecretCache

    load_before = [round(x, 2) for x in os.getloadavg()]
    tmp = Path(tempfile.mkdtemp(prefix="notify-bench-"))
    server = pgserver.get_server(tmp / "pg", cleanup_mode="stop")
    store = SecretStore(secrets.token_bytes(32))
    secret_holder: list[bytes] = []
    peer: subprocess.Popen[str] | None = None
    try:
        uri = server.get_uri()
        pool = await asyncpg.create_pool(uri, min_size=2, max_size=8)
        async with pool.acquire() as conn:
            await migrate(conn)
        # the receivers need the endpoint's secret: make the endpoint first with a placeholder URL
        async with pool.acquire() as conn:
            made = await notify_webhooks.add(conn, store, "probe", "http://127.0.0.1:1/", ["none.none"], False, NOW)
        secret_holder.append(made["secret"].encode())
        peer = subprocess.Popen([sys.executable, __file__, "--receivers", made["secret"]], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert peer.stdout is not None
        ports = json.loads(peer.stdout.readline())
        http_url = f"http://127.0.0.1:{ports['http']}"
        async with pool.acquire() as conn:
            await conn.execute("DELETE FROM webhooks")
            first = await build(conn, n, http_url + "/hook", store)
            await conn.execute("UPDATE webhooks SET secret_enc = $1", store.seal(secret_holder[0]))

        async def fetch(ids: list[int]) -> list[dict[str, Any]]:
            async with pool.acquire() as conn:
                return await notify_webhooks.secrets_of(conn, store, ids)

        settings = NotifySettings(MailSettings("127.0.0.1", ports["smtp"], mail_from="billing@isp.test", timeout=30,
                                               connections=max(1, args.concurrency // 2)),
                                  webhook_timeout=30, concurrency=args.concurrency, batch=args.batch)
        deliverer = Deliverer(settings, SecretCache(fetch))
        async with aiohttp.ClientSession() as http:
            ledger_s = await ledger_phase(pool, first, n)
            events = await pool.fetchval("SELECT count(*) FROM outbox_events WHERE event = 'balance.low'")
            if events != n:
                raise SystemExit(f"the ledger enqueued {events} balance.low events for {n} crossings")
            print(f"ledger: {n:,} crossings in {ledger_s:.2f} s", flush=True)
            dispatch_s, deliveries = await dispatch_phase(pool)
            if deliveries != 2 * n:
                raise SystemExit(f"dispatch made {deliveries} deliveries, expected {2 * n}")
            print(f"dispatch: {deliveries:,} deliveries in {dispatch_s:.2f} s", flush=True)
            deliver_s = await deliver_phase(pool, deliverer, args.batch)
            got = await wait_counts(http, http_url, n, 60)
            if got["rejected"] or got["duplicates"]:
                raise SystemExit(f"receivers: {got}")
            print(f"deliver: {n:,} emails + {n:,} webhooks in {deliver_s:.2f} s", flush=True)
            await deliverer.close()
            async with http.post(http_url + "/reset") as r:
                await r.read()
            bare_s = await bare_phase(n, ports["smtp"], http_url + "/hook", secret_holder[0], args.concurrency)
            await wait_counts(http, http_url, n, 60)
            print(f"bare sender: {n:,} emails + {n:,} webhooks in {bare_s:.2f} s", flush=True)
            await pool.close()
            deployed_s, deployed_ledger_s = await deployed_phase(
                uri, tmp, n, ports, secret_holder[0], args.concurrency, args.batch, http, http_url)
            print(f"deployed (billcore serve + notify edge): {n:,} notifications received {deployed_s:.2f} s"
                  f" after the first charge (charging took {deployed_ledger_s:.2f} s)", flush=True)
    finally:
        if peer is not None:
            if peer.stdin is not None:
                peer.stdin.close()
            try:
                peer.wait(timeout=10)
            except subprocess.TimeoutExpired:
                peer.kill()
        server.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)

    end_to_end = dispatch_s + deliver_s
    report = {
        "benchmark": "notify_run", "notifications": n, "concurrency": args.concurrency, "batch": args.batch,
        "ledger_seconds": round(ledger_s, 3), "dispatch_seconds": round(dispatch_s, 3),
        "deliver_seconds": round(deliver_s, 3), "bare_seconds": round(bare_s, 3),
        "notifications_per_s": round(n / end_to_end), "deliver_per_s": round(n / deliver_s),
        "ceiling_per_s": round(n / bare_s), "ratio_to_ceiling": round(bare_s / deliver_s, 3),
        "deployed_seconds": round(deployed_s, 3), "deployed_ledger_seconds": round(deployed_ledger_s, 3),
        "deployed_per_s": round(n / deployed_s), "deployed_ratio_to_ceiling": round(bare_s / deployed_s, 3),
        "commit": tree_commit(), "machine": machine(), "load_average_before": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    text = (
        "# notify_run: low-balance notifications through the outbox (one email + one webhook each)\n\n"
        "| notifications | ledger s | dispatch s | deliver s | notifications/s (dispatch + deliver) |"
        " deliver/s | bare sender/s (ceiling) | deliver ÷ ceiling | deployed: notifications/s (first charge →"
        " last received) | deployed ÷ ceiling |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        f"| {n:,} | {ledger_s:.2f} | {dispatch_s:.2f} | {deliver_s:.2f} | {n / end_to_end:,.0f} |"
        f" {n / deliver_s:,.0f} | {n / bare_s:,.0f} | {bare_s / deliver_s:.2f} | {n / deployed_s:,.0f} |"
        f" {bare_s / deployed_s:.2f} |\n\n"
        f"Deployed: `billcore serve` with the core and the notify edge as separate processes on the same"
        f" database (the edge claims and acknowledges over URFA; [notify] concurrency {args.concurrency},"
        f" batch {min(args.batch, 1000)}); its figure includes charging the N accounts"
        f" ({deployed_ledger_s:.2f} s), as the crossings happen while it runs.  "
        f"Receivers: aiosmtpd and an aiohttp receiver checking every HMAC signature, in their own process on"
        f" loopback; concurrency {args.concurrency}, claims of {args.batch}.  Machine: {report['machine']['cpu']},"
        f" nproc {report['machine']['nproc']}, load {load_before} → {report['load_average_after']};"
        f" commit {report['commit']}.\n")
    publish(report, text, OUT, args.tiny)


if __name__ == "__main__":
    asyncio.run(main())
