"""netflow.snapshot keeps recently ended bindings, so replayed or late flows find their account."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg
import numpy as np
import pytest

from billcore.api import netflow_calls, tariffs
from billcore.api.netflow_calls import snapshot_chunks
from billcore.common.config import Config
from billcore.server.context import CoreContext
from netflow.classifier import Classifier, Snapshot
from netflow.flows import FLOW_DTYPE, addr_to_pair
from netflow.snapshot import SnapshotLoader
from tests.test_tariffs_api import Ctx
from tests.test_usage_commit import make_accounts
from urfa.messages import Event

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


def wire_chunk(bindings: list[tuple[str, int, int, int | None]]) -> dict[str, Any]:
    """A bindings chunk as the core sends it (big-endian columns), built from prefixes in Python."""
    from netflow.classifier import prefix_range

    address, bits = b"", b""
    for prefix, _, _, _ in bindings:
        start, end = prefix_range(prefix)
        address += start.to_bytes(16, "big")
        bits += (128 - (end - start + 1).bit_length() + 1).to_bytes(2, "big")
    return {"kind": "bindings", "n": len(bindings), "address": address, "bits": bits,
            "account": b"".join(a.to_bytes(8, "big") for _, a, _, _ in bindings),
            "from_ms": b"".join(f.to_bytes(8, "big") for _, _, f, _ in bindings),
            "to_ms": b"".join((-1 if t is None else t).to_bytes(8, "big", signed=True) for *_, t in bindings)}


def test_wire_columns_classify_like_bindings() -> None:
    """The streamed columns compile to the classifier the `Binding` objects compile to."""
    from netflow.classifier import Binding
    from netflow.errors import ClassifierError

    rows = [("10.0.0.0/24", 5, 0, None), ("10.0.1.7/32", 6, 1_000, 5_000), ("10.0.1.7/32", 7, 5_000, None),
            ("2001:db8::/64", 8, 0, None), ("2001:db8:0:1::5/128", 9, 0, 10_000)]
    loader = SnapshotLoader()
    loader.feed(wire_chunk(rows))
    snapshot, version = loader.finish({"version": 3, "bindings": len(rows), "rules": 0})
    wire = Classifier(snapshot)
    objects = Classifier(Snapshot(tuple(Binding(p, a, f, t) for p, a, f, t in rows), (), 0))
    rng = np.random.default_rng(1)
    addrs = ["10.0.0.0", "10.0.0.255", "10.0.1.6", "10.0.1.7", "10.0.1.8", "2001:db8::1", "2001:db8:0:1::5",
             "2001:db8:0:1::6", "192.0.2.1"]
    pairs = [addr_to_pair(a) for a in addrs]
    hi = np.array([p[0] for p in pairs] * 20, dtype=np.uint64)
    lo = np.array([p[1] for p in pairs] * 20, dtype=np.uint64)
    at = rng.integers(0, 30_000, len(hi))
    assert version == 3
    assert wire.accounts(hi, lo, at).tolist() == objects.accounts(hi, lo, at).tolist()
    assert wire.accounts(hi, lo, at).any()
    # a chunk whose prefix has host bits set, or an answer that counts other rows, is refused
    bad = wire_chunk([("10.0.0.0/24", 5, 0, None)])
    bad["address"] = (int.from_bytes(bad["address"], "big") | 1).to_bytes(16, "big")
    with pytest.raises(ClassifierError, match="host bits"):
        SnapshotLoader().feed(bad)
    short = SnapshotLoader()
    short.feed(wire_chunk(rows))
    with pytest.raises(ClassifierError, match="incomplete"):
        short.finish({"version": 3, "bindings": len(rows) + 1, "rules": 0})


def test_worker_reloads_for_a_newer_version_only(tmp_path: Any) -> None:
    """A load at version 10 holds every change up to 10: an event for 10 (a change committed just
    before the core's snapshot, announced after) costs no second load; 11 does; so does a reconnect."""
    from netflow.core_session import CoreAccess
    from netflow.worker import Worker, WorkerSettings

    worker = Worker(WorkerSettings("w", "127.0.0.1", 0, tmp_path, None), CoreAccess((), "nobody", lambda: ""))
    events = worker.core.events
    assert worker.stale()  # nothing loaded yet
    events.snapshot_stale, worker.classifier_version = False, 10
    events.apply(Event("classifier", {"version": 10}))
    assert not worker.stale()
    events.apply(Event("classifier", {"version": 11}))
    assert worker.stale()
    events.connected()  # reconnected: events may be lost
    assert worker.stale()


PASSWORD = "netflow-worker-pw"


class SnapshotCore:
    """The real URFA service with a ``netflow.snapshot`` that streams nothing at ``version``; counts loads."""

    def __init__(self) -> None:
        self.version = 10
        self.loads = 0
        self.service: Any = None
        self.port = 0

    async def start(self) -> SnapshotCore:
        from billcore.server.calls import CallRegistry, CallSpec
        from billcore.server.service import URFAConfig, URFAService
        from billcore.server.sessions import Principal
        from tests.conftest import free_port
        from urfa import scram

        principal = Principal("system", "nf", 1, frozenset({"netflow.read", "netflow.submit", "events.subscribe"}),
                              scram.make_verifier(PASSWORD, iterations=4096))

        class OneLogin:
            async def find_principal(self, kind: str, login: str) -> Principal | None:
                return principal if (kind, login) == ("system", "nf") else None

            async def accounts_of(self, user_id: int) -> frozenset[int]:
                return frozenset()

        async def snapshot(ctx: Any) -> dict[str, int]:
            self.loads += 1
            return {"version": self.version, "bindings": 0, "rules": 0}

        registry = CallRegistry()
        registry.register_all([CallSpec("netflow.snapshot", snapshot, right="netflow.read", result="map",
                                        streaming=True, bound="stream")])
        self.service = URFAService(registry, OneLogin(), URFAConfig(secret=b"k" * 32))
        self.port = free_port()
        await self.service.start(tcp=("127.0.0.1", self.port))
        return self


async def until(condition: Any, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition never held"
        await asyncio.sleep(0.01)


async def test_a_failing_classifier_event_marks_the_snapshot_stale_is_logged_and_the_pump_goes_on(
        tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A failure in applying a classifier event must not end the event pump silently (it did, under
    contextlib.suppress): it is logged, the snapshot is marked stale and reloaded, and later events still
    arrive."""
    from netflow.core_session import CoreAccess
    from netflow.worker import Worker, WorkerSettings
    from urfa.link import Address

    core = await SnapshotCore().start()
    worker = Worker(WorkerSettings("w", "127.0.0.1", 0, tmp_path, None),
                    CoreAccess((Address("127.0.0.1", core.port),), "nf", lambda: PASSWORD))
    events = worker.core.events
    apply = events.apply
    failures: list[Event] = []

    def apply_failing_once(event: Event) -> None:  # a bug in the apply step, for one event
        if not failures:
            failures.append(event)
            raise KeyError("a bug in the apply step")
        apply(event)

    events.apply = apply_failing_once  # type: ignore[method-assign]
    stop = asyncio.Event()
    try:
        await worker.core.start().ready()
        await worker.refresh_classifier(stop)
        assert not worker.stale() and core.loads == 1
        caplog.set_level(logging.WARNING, logger="netflow.worker")

        core.version = 11
        core.service.publish("classifier", {"version": 11})
        await until(worker.stale)
        assert failures and "event handler failed" in caplog.text and "a bug in the apply step" in caplog.text
        await worker.refresh_classifier(stop)
        assert not worker.stale() and core.loads == 2 and worker.classifier_version == 11

        core.version = 12
        core.service.publish("classifier", {"version": 12})  # the pump went on
        await until(worker.stale)
        assert events.seen_version == 12
        await worker.refresh_classifier(stop)
        assert not worker.stale() and core.loads == 3
    finally:
        await worker.core.close()
        await core.service.stop()
