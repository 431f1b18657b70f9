"""netflow.snapshot keeps recently ended bindings, so replayed or late flows find their account."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg
import numpy as np

from billcore.api import netflow_calls, tariffs
from billcore.api.netflow_calls import snapshot_chunks
from billcore.config import Config
from billcore.context import CoreContext
from netflow.classifier import Classifier, Snapshot
from netflow.flows import FLOW_DTYPE, addr_to_pair
from netflow.snapshot import SnapshotLoader
from tests.test_tariffs_api import Ctx
from tests.test_usage_commit import make_accounts

NOW = datetime(2024, 4, 10, 12, tzinfo=timezone.utc)


async def snapshot_at(conn: asyncpg.Connection, since: datetime, rows: int = 16_384) -> tuple[Snapshot, int]:
    """The classifier snapshot as a worker loads it: `snapshot_chunks` fed to a `SnapshotLoader`."""
    loader = SnapshotLoader()
    async for chunk in snapshot_chunks(conn, since, rows):
        if chunk["kind"] == "end":
            return loader.finish(chunk)
        loader.feed(chunk)
    raise AssertionError("no end chunk")


def flow_at(src: str, at: datetime) -> Any:
    f = np.zeros(1, dtype=FLOW_DTYPE)
    f["src_hi"], f["src_lo"] = addr_to_pair(src)
    f["dst_hi"], f["dst_lo"] = addr_to_pair("198.51.100.1")
    f["first_ms"] = f["last_ms"] = int(at.timestamp() * 1000)
    f["bytes"], f["packets"], f["ip_version"], f["sampling"] = 100, 1, 4, 1
    return f


async def test_snapshot_holds_bindings_ended_within_the_history_window(pool: asyncpg.Pool) -> None:
    core = CoreContext(pool, Config(), publish=lambda t, p: None, now=lambda: NOW)
    fn = {s.name: s.handler for s in [*tariffs.calls(core), *netflow_calls.calls(core)]}
    admin = Ctx("admin", 1)
    async with pool.acquire() as conn:
        old, new, gone = await make_accounts(conn, 3)
    inet = (await fn["classes.add"](admin, name="inet"))["id"]
    await fn["classes.add_rule"](admin, class_id=inet)
    # 192.0.2.5 moved from `old` to `new` an hour ago; `gone` lost its address 30 days ago
    moved = NOW - timedelta(hours=1)
    b = await fn["bindings.add"](admin, account_id=old, prefix="192.0.2.5/32", valid_from=NOW - timedelta(days=60))
    await fn["bindings.end"](admin, binding_id=b["id"], at=moved)
    await fn["bindings.add"](admin, account_id=new, prefix="192.0.2.5/32", valid_from=moved)
    g = await fn["bindings.add"](admin, account_id=gone, prefix="192.0.2.9/32", valid_from=NOW - timedelta(days=90))
    await fn["bindings.end"](admin, binding_id=g["id"], at=NOW - timedelta(days=30))

    worker = Ctx("system", 1)
    loader = SnapshotLoader()
    answer = await fn["netflow.snapshot"](worker)
    for chunk in worker.chunks:
        loader.feed(chunk)
    snapshot, _ = loader.finish(answer)
    assert sorted(snapshot.bindings.account.tolist()) == [old, new]  # type: ignore[union-attr]
    classifier = Classifier(snapshot)
    flows = np.concatenate([flow_at("192.0.2.5", moved - timedelta(minutes=5)),  # replayed: before the move
                            flow_at("192.0.2.5", moved + timedelta(minutes=5))])
    legs = classifier.classify(flows)
    owners = {int(legs.account[i]) for i in range(len(legs.account)) if legs.account[i] > 0}
    assert owners == {old, new}
