"""NetFlow at scale: a real core with 100 000+ bound IPs charges its first flow within 10 s.

Before the snapshot was streamed, `netflow.snapshot` was one result over the
1 MB frame cap from ~38 000 bindings on: the core logged "result of
netflow.snapshot cannot be sent", the worker got `internal` and retried
forever, and no flow was ever charged.

Also here: the chunked load is one consistent database snapshot (a binding
committed between two chunks is not in it, and the version says so), and a
binding committed while a worker loads its snapshot is charged all the same.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

import asyncpg
import numpy as np

from billcore.api.netflow_calls import snapshot_chunks
from billcore.billing import tariffs as T
from netflow.classifier import Classifier
from netflow.exporter import ExportClock, FlowSpec, build_v5
from netflow.flows import FLOW_DTYPE, addr_to_pair
from netflow.snapshot import SnapshotLoader
from tests.test_netflow_worker import bc_port
from tests.test_netflow_worker_support import charged, netflow_core, recent_ms, setup_accounts

UTC = timezone.utc
SINCE = datetime(2020, 1, 1, tzinfo=UTC)
BULK = 100_000
BULK_BASE = "10.64.0.0"  # bulk account k (0-based) holds BULK_BASE + k


async def bind_many(conn: asyncpg.Connection, n: int, base: str = BULK_BASE) -> int:
    """n users, accounts and /32 bindings from ``base`` on, set-based (seconds, not minutes);
    returns the first account id (account first + k holds base + k)."""
    first_user = await conn.fetchval("SELECT coalesce(max(id), 0) + 1 FROM users")
    await conn.execute(
        "INSERT INTO users(login, scram_salt, scram_iterations, scram_stored_key, scram_server_key)"
        " SELECT 'bulk' || g, '\\x00', 4096, '\\x00', '\\x00' FROM generate_series(1, $1) g", n)
    await conn.execute("INSERT INTO accounts(user_id, credit) SELECT id, 0 FROM users WHERE id >= $1 ORDER BY id",
                       first_user)
    first = await conn.fetchval("SELECT min(a.id) FROM accounts a WHERE a.user_id >= $1", first_user)
    await conn.execute(
        "INSERT INTO ip_bindings(account_id, prefix, kind, source, valid_from)"
        " SELECT id, set_masklen($2::inet + (id - $1), 32)::cidr, 'static', 'admin', $3"
        " FROM accounts WHERE id >= $1 ORDER BY random()", first, base, SINCE)  # GiST: 7x faster than in order
    await conn.execute("ANALYZE")
    return int(first)


def v5_packet(src: str, nbytes: int, at_ms: int) -> bytes:
    (packet,) = build_v5([FlowSpec(src, "198.51.100.7", 40000, 443, 6, nbytes, 3, at_ms, at_ms + 1000)],
                         ExportClock(at_ms - 60_000, at_ms + 5000))
    return packet


def send(port: int, packet: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(packet, ("127.0.0.1", port))


async def wait_account(dsn: str, account: int, nbytes: int, timeout: float) -> float | None:
    """Seconds until ``account``'s counters hold ``nbytes`` (None: not within ``timeout``)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if (await charged(dsn))[0].get(account) == nbytes:
            return time.monotonic() - start
        await asyncio.sleep(0.05)
    return None


async def test_a_core_with_100k_bound_ips_charges_its_first_flow_within_10s(tmp_path: Path, db_dsn: str) -> None:
    accounts = await setup_accounts(db_dsn, ["10.20.0.1"])  # the per-byte tariff, and one account on it
    conn = await asyncpg.connect(db_dsn)
    try:
        built = time.monotonic()
        first = await bind_many(conn, BULK)
        built = time.monotonic() - built
        # accounts on the tariff that get their address only while the worker loads (below)
        tariff = await conn.fetchval("SELECT id FROM tariffs WHERE name = 'per-byte'")
        late = []
        for _ in range(40):
            user = await conn.fetchval(
                "INSERT INTO users(login, scram_salt, scram_iterations, scram_stored_key, scram_server_key)"
                " VALUES ('late' || nextval('users_id_seq'), '\\x00', 4096, '\\x00', '\\x00') RETURNING id")
            account = await conn.fetchval("INSERT INTO accounts(user_id, credit) VALUES ($1, 10^15) RETURNING id", user)
            await T.link_tariff(conn, account, tariff, now=SINCE, tz=UTC, actor="test")
            late.append(account)
        assert await conn.fetchval("SELECT count(*) FROM ip_bindings") == BULK + 1
    finally:
        await conn.close()
    print(f"{BULK} accounts and bindings built in {built:.1f}s")

    bc = netflow_core(tmp_path, db_dsn, workers=1)
    started = time.monotonic()
    with bc:
        port = bc_port(bc)
        bc.wait_for(r'msg="core serving"', timeout=60)
        # bind the late accounts one by one while the worker starts and loads its snapshot
        binder = await asyncpg.connect(db_dsn)
        try:
            for k, account in enumerate(late):
                await binder.execute(
                    "INSERT INTO ip_bindings(account_id, prefix, kind, source, valid_from)"
                    " VALUES ($1, $2::cidr, 'static', 'admin', $3)", account, f"10.30.0.{k + 1}/32", SINCE)
                if 'msg="netflow serving"' in bc.log() and k >= 10:
                    break
                await asyncio.sleep(0.02)
            bound = k + 1
        finally:
            await binder.close()
        bc.wait_for(r'msg="netflow serving"', timeout=60)
        ready = time.monotonic() - started
        at = recent_ms()
        send(port, v5_packet("10.20.0.1", 1234, at))
        waited = await wait_account(db_dsn, accounts["10.20.0.1"], 1234, timeout=30)
        assert waited is not None, bc.log()[-3000:]
        first_charge = time.monotonic() - started
        loaded = re.search(r'msg="classifier loaded".*', bc.log())
        print(f"worker ready {ready:.2f}s after start; first flow charged {first_charge:.2f}s after start "
              f"({waited:.2f}s after the packet); {loaded.group(0) if loaded else ''}")
        assert loaded and int(re.findall(r"bindings=(\d+)", loaded.group(0))[0]) > BULK
        assert "cannot be sent" not in bc.log()
        assert first_charge < 10.0, f"first flow charged {first_charge:.1f}s after start"
        # every account bound during the load is charged too (the change's NOTIFY reloads the snapshot)
        for k in (0, bound // 2, bound - 1):
            send(port, v5_packet(f"10.30.0.{k + 1}", 777 + k, at))
        for k in (0, bound // 2, bound - 1):
            assert await wait_account(db_dsn, late[k], 777 + k, timeout=20) is not None, (k, bound)
        # and a bulk binding is found among the 100k (no tariff: rated as rejected, not unbound)
        send(port, v5_packet("10.64.1.44", 99, at))
        bc.wait_for(r'msg="netflow usage rejected by rating".*rows=1', timeout=20)
        assert first > 0


async def test_chunked_snapshot_is_one_database_snapshot(db_dsn: str) -> None:
    """A binding committed between two chunks is not in the load, and the load's version is older:
    the worker, told of the newer version, loads again (see `netflow.snapshot`)."""
    conn = await asyncpg.connect(db_dsn)
    other = await asyncpg.connect(db_dsn)
    try:
        first = await bind_many(conn, 5000)
        loader = SnapshotLoader()
        end = None
        async for chunk in snapshot_chunks(conn, SINCE, rows=1000):
            if chunk["kind"] == "end":
                end = chunk
                break
            loader.feed(chunk)
            if loader.chunks == 2:  # between chunks: move one bulk address and add another
                async with other.transaction():
                    await other.execute("UPDATE ip_bindings SET valid_to = $2 WHERE account_id = $1",
                                        first + 10, datetime(2024, 1, 1, tzinfo=UTC))
                    await other.execute(
                        "INSERT INTO ip_bindings(account_id, prefix, kind, source, valid_from)"
                        " VALUES ($1, '10.99.0.1/32', 'static', 'admin', $2)", first + 4000, SINCE)
        assert end is not None and loader.chunks == 5  # 5 000 bindings in chunks of 1 000; no rules
        snapshot, version = loader.finish(end)
        assert version < await other.fetchval("SELECT version FROM classifier_version")
        classifier = Classifier(snapshot)
        flows = np.zeros(3, dtype=FLOW_DTYPE)
        for k, addr in enumerate(["10.64.0.10", "10.99.0.1", "10.64.19.135"]):
            flows["src_hi"][k], flows["src_lo"][k] = addr_to_pair(addr)
        flows["first_ms"] = int(datetime(2025, 1, 1, tzinfo=UTC).timestamp() * 1000)
        owners = classifier.accounts(flows["src_hi"], flows["src_lo"], flows["first_ms"])
        # as the snapshot saw it: 10.64.0.10 still bound, 10.99.0.1 not yet, the last bulk one there
        assert owners.tolist() == [first + 10, 0, first + 4999]
        again = SnapshotLoader()
        async for chunk in snapshot_chunks(conn, SINCE, rows=1000):
            if chunk["kind"] == "end":
                snapshot, _ = again.finish(chunk)
                break
            again.feed(chunk)
        owners = Classifier(snapshot).accounts(flows["src_hi"], flows["src_lo"], flows["first_ms"])
        assert owners.tolist() == [0, first + 4000, first + 4999]
    finally:
        await conn.close()
        await other.close()
