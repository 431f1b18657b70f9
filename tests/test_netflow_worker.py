"""The NetFlow workers in a real billcore: packets in, exact charges out, raw flows kept."""

from __future__ import annotations

import random
import socket
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from netflow.batches import DecoderState
from netflow.exporter import ExportClock, FlowSpec, build_ipfix, build_v5, build_v9
from netflow.snapshot import rules_from_wire
from tests.test_netflow_worker_support import charged, netflow_core, recent_ms, setup_accounts, wait_charged
from tests.waiting import eventually

ACCOUNTS_V4 = [f"10.20.0.{i}" for i in range(1, 9)]
ACCOUNTS_V6 = ["2001:db8::a", "2001:db8::b"]


def flows_for(addresses: list[str], n: int, seed: int, at_ms: int) -> list[FlowSpec]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        local = rng.choice(addresses)
        remote = "2001:db8:ffff::1" if ":" in local else f"198.51.100.{rng.randrange(1, 250)}"
        src, dst = (local, remote) if rng.random() < 0.5 else (remote, local)
        out.append(FlowSpec(src, dst, rng.randrange(1, 65535), 443, 6, rng.randrange(40, 1_500_000),
                            rng.randrange(1, 1000), at_ms, at_ms + 1000))
    return out


def expected_bytes(flows: list[FlowSpec], accounts: dict[str, int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for f in flows:
        for addr in (f.src, f.dst):
            if addr in accounts:
                out[accounts[addr]] = out.get(accounts[addr], 0) + f.bytes
    return out


def send(port: int, packets: list[bytes], source_port: int = 0) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", source_port))
        for p in packets:
            s.sendto(p, ("127.0.0.1", port))


async def test_v5_v9_ipfix_are_charged_exactly_and_kept_raw(tmp_path: Path, db_dsn: str) -> None:
    accounts = await setup_accounts(db_dsn, ACCOUNTS_V4 + ACCOUNTS_V6)
    at = recent_ms()
    v5 = flows_for(ACCOUNTS_V4, 3000, 1, at)
    v9 = flows_for(ACCOUNTS_V4 + ACCOUNTS_V6, 3000, 2, at)
    ipfix = flows_for(ACCOUNTS_V4 + ACCOUNTS_V6, 3000, 3, at)
    clock = ExportClock(at - 3_600_000, at + 5000)
    # v9 data of the first packet arrives BEFORE its template: it must wait, not be lost
    v9_packets = build_v9(v9, clock, source_id=7)
    v9_packets = v9_packets[1:2] + v9_packets[:1] + v9_packets[2:]
    bc = netflow_core(tmp_path, db_dsn)
    with bc:
        port = bc_port(bc)
        bc.wait_for(r'msg="netflow serving"', timeout=60)
        send(port, build_v5(v5, clock), 40001)
        send(port, v9_packets, 40002)
        send(port, build_ipfix(ipfix, at // 1000 + 5, domain=3), 40003)
        want = expected_bytes(v5 + v9 + ipfix, accounts)
        got = await wait_charged(db_dsn, want, timeout=60)
        assert got == want
        counters, ledger = await charged(db_dsn)
        assert ledger == want  # 1 micro-unit per byte
        # an unknown exporter is refused: nothing more is charged
        refused_before = bc.metric("netflow_drops_total", reason="exporter")
        stranger = build_v5(v5[:30], clock)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.2", 0))
            for p in stranger:
                s.sendto(p, ("127.0.0.1", port))
        await eventually(lambda: bc.metric("netflow_drops_total", reason="exporter") >= refused_before + len(stranger),
                         what="the stranger's packets counted as refused")
        assert (await charged(db_dsn))[0] == want
    # stopped cleanly: the raw store holds every leg, per account
    raw = tmp_path / "var" / "netflow" / "raw"
    tables = [pq.read_table(p) for p in raw.glob("hour=*/*.parquet")]
    per_account: dict[int, int] = {}
    for t in tables:
        for acc, nbytes in zip(t["account"].to_pylist(), t["bytes"].to_pylist()):
            if acc:
                per_account[acc] = per_account.get(acc, 0) + nbytes
    assert per_account == want


def bc_port(bc: object) -> int:
    text = Path(bc.config_path).read_text()  # type: ignore[attr-defined]
    section = text.split("[netflow]")[1]
    for line in section.splitlines():
        if line.startswith("port = "):
            return int(line.split("=")[1])
    raise AssertionError("no netflow port in the config")


def test_rules_from_wire_keep_order_and_split_iface() -> None:
    rules = rules_from_wire([{"class_id": 2, "skip": False, "local_net": None, "remote_net": "192.0.2.0/24",
                              "local_ports": None, "remote_ports": [80, 80], "protocol": 6, "exporter": None,
                              "iface": 4},
                             {"class_id": 1, "skip": False}])
    assert [r.class_id for r in rules] == [2, 2, 1]
    assert rules[0].input_if == (4,) and rules[1].output_if == (4,)
    assert rules[0].remote_ports == ((80, 80),) and rules[0].protocols == (6,)


def test_decoder_state_round_trips_templates_and_pending() -> None:
    from netflow.decode import decode_batch
    from netflow.flows import Datagram

    at = recent_ms()
    clock = ExportClock(at - 1000, at)
    packets = build_v9(flows_for(ACCOUNTS_V4, 48, 9, at), clock)
    state = DecoderState()
    decode_batch([Datagram("127.0.0.1", packets[0])], state.cache, state.tracker, 0.0)
    again = DecoderState.loads(state.dumps())
    assert len(again.cache) == len(state.cache) == 2
    res = decode_batch([Datagram("127.0.0.1", packets[1])], again.cache, again.tracker, 0.0)
    assert len(res.flows) == 24 and not res.pending


def test_merged_chunk_aggregates_equal_one_aggregate_of_the_whole_batch() -> None:
    """The shipper decodes a batch in chunks and merges their aggregates: exactly the sums of one pass."""
    import numpy as np

    from netflow.batches import AGG_COLUMNS, merge_aggregates
    from netflow.classifier import Binding, Classifier, Snapshot, TrafficRule, aggregate
    from netflow.flows import FLOW_DTYPE, V4_MAPPED

    rng = np.random.default_rng(5)
    n = 30_000
    flows = np.zeros(n, dtype=FLOW_DTYPE)
    flows["src_lo"] = V4_MAPPED | (0x0A000000 + rng.integers(1, 300, n)).astype(np.uint64)
    flows["dst_lo"] = V4_MAPPED | (0xCB007100 + rng.integers(1, 9, n)).astype(np.uint64)
    flows["first_ms"] = 1_700_000_000_000 + rng.integers(0, 3 * 3_600_000, n)
    flows["bytes"] = rng.integers(0, 1 << 40, n, dtype=np.uint64)
    flows["packets"], flows["sampling"] = rng.integers(1, 1000, n, dtype=np.uint64), rng.integers(1, 3, n)
    classifier = Classifier(Snapshot(tuple(Binding(f"10.0.{k // 256}.{k % 256}/32", k) for k in range(1, 300)),
                                     (TrafficRule(7, remote=("203.0.113.0/28",)), TrafficRule(9)), 0))
    whole = aggregate(flows, classifier.classify(flows))
    merged = None
    for a, b in ((0, 7000), (7000, 7001), (7001, 20_000), (20_000, n)):
        part = aggregate(flows[a:b], classifier.classify(flows[a:b]))
        merged = part if merged is None else merge_aggregates(merged, part)
    assert merged is not None
    for name in AGG_COLUMNS:
        assert np.array_equal(getattr(merged, name), getattr(whole, name)), name
    assert merged.implausible == whole.implausible


def test_merge_aggregates_builds_by_field_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reorder of Aggregates' fields must not swap columns: bytes stay bytes, packets stay packets."""
    import dataclasses

    import numpy as np

    from netflow import batches
    from netflow.classifier import Aggregates

    @dataclasses.dataclass(frozen=True)
    class Reordered:  # the same fields, sums first and keys last
        packets: np.ndarray
        flows: np.ndarray
        bytes: np.ndarray
        hour_ms: np.ndarray
        direction: np.ndarray
        klass: np.ndarray
        account: np.ndarray
        implausible: int

    def row(account: int, nbytes: int, packets: int, flows: int) -> Aggregates:
        def column(value: int, dtype: str = "<i8") -> np.ndarray:
            return np.array([value], dtype=dtype)
        return Aggregates(account=column(account), klass=column(7), direction=column(1), hour_ms=column(0),
                          bytes=column(nbytes, "<u8"), packets=column(packets, "<u8"), flows=column(flows),
                          implausible=1)

    monkeypatch.setattr(batches, "Aggregates", Reordered)
    merged = batches.merge_aggregates(row(5, 1000, 3, 1), row(5, 500, 2, 1))
    assert isinstance(merged, Reordered)
    assert (merged.account.tolist(), merged.klass.tolist(), merged.bytes.tolist(), merged.packets.tolist(),
            merged.flows.tolist(), merged.implausible) == ([5], [7], [1500], [5], [2], 2)
