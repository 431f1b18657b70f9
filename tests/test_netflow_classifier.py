"""Classifier and aggregate: vectorized answers equal a naive per-flow reference."""

from __future__ import annotations

import ipaddress
from collections import defaultdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netflow.classifier import (
    INBOUND,
    MAX_FLOW_BYTES,
    OUTBOUND,
    SKIP,
    Binding,
    Classifier,
    Snapshot,
    TrafficRule,
    aggregate,
)
from netflow.errors import ClassifierError
from netflow.flows import FLOW_DTYPE, addr_to_pair

T0 = 1_700_000_000_000
HOUR = 3_600_000


def make_flows(rows: list[dict]) -> np.ndarray:
    out = np.zeros(len(rows), dtype=FLOW_DTYPE)
    for i, r in enumerate(rows):
        for side in ("src", "dst", "exporter"):
            hi, lo = addr_to_pair(r.get(side, "192.0.2.1"))
            out[i][f"{side}_hi"], out[i][f"{side}_lo"] = hi, lo
        for name in ("src_port", "dst_port", "proto", "input_if", "output_if", "bytes", "packets"):
            out[i][name] = r.get(name, 0)
        out[i]["first_ms"] = r.get("at", T0)
        out[i]["sampling"] = r.get("sampling", 1)
    return out


BINDINGS = (
    Binding("10.0.0.0/24", 1),
    Binding("10.0.1.7/32", 2, T0, T0 + HOUR),
    Binding("10.0.1.7/32", 3, T0 + HOUR),
    Binding("2001:db8:1::/48", 4),
)


def legs_of(classifier: Classifier, flows: np.ndarray) -> set[tuple[int, int, int, int]]:
    legs = classifier.classify(flows)
    return {(int(f), int(a), int(k), int(d)) for f, a, k, d in zip(legs.flow, legs.account, legs.klass, legs.direction)}


def test_accounts_and_direction_v4_v6_and_dynamic_bindings() -> None:
    c = Classifier(Snapshot(BINDINGS, (), default_class=9))
    flows = make_flows([
        {"src": "10.0.0.5", "dst": "8.8.8.8"},  # 1 outbound
        {"src": "8.8.8.8", "dst": "10.0.0.255"},  # 1 inbound
        {"src": "10.0.1.7", "dst": "1.1.1.1", "at": T0 + 10},  # 2 (first window)
        {"src": "10.0.1.7", "dst": "1.1.1.1", "at": T0 + HOUR},  # 3 (second window starts)
        {"src": "10.0.1.7", "dst": "1.1.1.1", "at": T0 - 1},  # bound to nobody yet
        {"src": "2001:db8:1:ffff::1", "dst": "2001:db8:2::1"},  # 4 outbound v6
        {"src": "10.0.0.1", "dst": "2001:db8:1::1"},  # nonsense mix, still two legs
        {"src": "10.0.0.1", "dst": "10.0.0.2"},  # subscriber to subscriber: two legs
        {"src": "10.0.2.1", "dst": "::ffff:10.0.0.9"},  # v4-mapped v6 dst is the v4 address
    ])
    assert legs_of(c, flows) == {
        (0, 1, 9, OUTBOUND), (1, 1, 9, INBOUND), (2, 2, 9, OUTBOUND), (3, 3, 9, OUTBOUND),
        (4, 0, 0, INBOUND), (5, 4, 9, OUTBOUND), (6, 1, 9, OUTBOUND), (6, 4, 9, INBOUND),
        (7, 1, 9, OUTBOUND), (7, 1, 9, INBOUND), (8, 1, 9, INBOUND),
    }


def test_overlapping_bindings_are_refused() -> None:
    with pytest.raises(ClassifierError):
        Classifier(Snapshot((Binding("10.0.0.0/24", 1), Binding("10.0.0.8/29", 2)), (), 1))
    with pytest.raises(ClassifierError):
        Classifier(Snapshot((Binding("10.0.0.0/24", 1, 0, 100), Binding("10.0.0.0/24", 2, 99)), (), 1))
    with pytest.raises(ClassifierError):
        Classifier(Snapshot((Binding("10.0.0.1/24", 1),), (), 1))  # host bits set


def test_rules_first_match_wins_skip_and_default() -> None:
    rules = (
        TrafficRule(0, remote=("10.0.0.0/8",), skip=True),  # on-net traffic is free
        TrafficRule(5, remote_ports=((53, 53),), protocols=(17,)),  # DNS
        TrafficRule(6, remote=("203.0.113.0/24",), local_ports=((8000, 8999),)),
        TrafficRule(7, exporters=("192.0.2.50",), input_if=(3,)),
        TrafficRule(8, output_if=(4, 5)),
    )
    c = Classifier(Snapshot(BINDINGS, rules, default_class=1))
    flows = make_flows([
        {"src": "10.0.0.1", "dst": "10.9.9.9"},  # skip
        {"src": "10.0.0.1", "dst": "8.8.8.8", "dst_port": 53, "proto": 17},  # 5 outbound
        {"src": "8.8.8.8", "dst": "10.0.0.1", "src_port": 53, "proto": 17},  # 5: remote port is src
        {"src": "8.8.8.8", "dst": "10.0.0.1", "dst_port": 53, "proto": 17},  # remote port 0: default
        {"src": "203.0.113.9", "dst": "10.0.0.1", "dst_port": 8080},  # 6 inbound: local port 8080
        {"src": "10.0.0.1", "dst": "1.2.3.4", "exporter": "192.0.2.50", "input_if": 3},  # 7
        {"src": "10.0.0.1", "dst": "1.2.3.4", "exporter": "192.0.2.51", "input_if": 3, "output_if": 5},  # 8
        {"src": "10.0.0.1", "dst": "1.2.3.4", "dst_port": 53, "proto": 17, "output_if": 4},  # 5 before 8
    ])
    got = {f: k for f, _a, k, _d in legs_of(c, flows)}
    assert got == {0: SKIP, 1: 5, 2: 5, 3: 1, 4: 6, 5: 7, 6: 8, 7: 5}


# ---------------------------------------------------------------- property: equals a naive reference

V4_POOL = [f"10.{a}.{b}.0/24" for a in range(3) for b in range(3)]
ADDRS = ["10.0.0.5", "10.1.2.200", "10.2.1.1", "10.3.0.1", "8.8.8.8", "2001:db8::1", "2001:db8:0:1::9",
         "203.0.113.4"]


@st.composite
def snapshots(draw: st.DrawFn) -> Snapshot:
    prefixes = draw(st.lists(st.sampled_from(V4_POOL + ["2001:db8::/64"]), unique=True, max_size=6))
    bindings = []
    for n, p in enumerate(prefixes):
        cut = draw(st.integers(0, 3)) * HOUR
        if cut:
            bindings.append(Binding(p, 10 + n, T0, T0 + cut))
            bindings.append(Binding(p, 20 + n, T0 + cut))
        else:
            bindings.append(Binding(p, 10 + n))
    rules = []
    for cid in range(1, draw(st.integers(0, 5)) + 1):
        rules.append(TrafficRule(
            cid,
            local=tuple(draw(st.lists(st.sampled_from(V4_POOL + ["10.0.0.0/8", "2001:db8::/32"]), max_size=2))),
            remote=tuple(draw(st.lists(st.sampled_from(["8.0.0.0/8", "203.0.113.0/24", "::/0", "10.0.0.0/8"]), max_size=2))),
            remote_ports=tuple(draw(st.lists(st.sampled_from([(53, 53), (1, 1023), (80, 443)]), max_size=2))),
            protocols=tuple(draw(st.lists(st.sampled_from([6, 17]), max_size=1))),
            skip=draw(st.booleans()),
        ))
    return Snapshot(tuple(bindings), tuple(rules), default_class=99)


def naive(snapshot: Snapshot, row: dict) -> list[tuple[int, int, int]]:
    def account(addr: str, at: int) -> int:
        ip = ipaddress.ip_address(addr)
        for b in snapshot.bindings:
            to = b.valid_to_ms if b.valid_to_ms is not None else 1 << 60
            if ip.version == ipaddress.ip_network(b.prefix).version and ip in ipaddress.ip_network(b.prefix) \
                    and b.valid_from_ms <= at < to:
                return b.account
        return 0

    def within(addr: str, nets: tuple[str, ...]) -> bool:
        ip = ipaddress.ip_address(addr)
        return any(ip.version == ipaddress.ip_network(n).version and ip in ipaddress.ip_network(n) for n in nets)

    out = []
    src, dst = account(row["src"], row["at"]), account(row["dst"], row["at"])
    for acc, local, remote, lport, rport, direction in (
        (src, row["src"], row["dst"], row["src_port"], row["dst_port"], OUTBOUND),
        (dst, row["dst"], row["src"], row["dst_port"], row["src_port"], INBOUND),
    ):
        if not acc:
            continue
        klass = snapshot.default_class
        for r in snapshot.rules:
            if (not r.local or within(local, r.local)) and (not r.remote or within(remote, r.remote)) \
                    and (not r.remote_ports or any(a <= rport <= b for a, b in r.remote_ports)) \
                    and (not r.protocols or row["proto"] in r.protocols):
                klass = SKIP if r.skip else r.class_id
                break
        out.append((acc, klass, direction))
    if not src and not dst:
        out.append((0, 0, INBOUND))
    return out


@settings(max_examples=150, deadline=None)
@given(snapshots(), st.lists(st.fixed_dictionaries({
    "src": st.sampled_from(ADDRS), "dst": st.sampled_from(ADDRS),
    "src_port": st.sampled_from([53, 80, 1000, 40000]), "dst_port": st.sampled_from([53, 443, 8080]),
    "proto": st.sampled_from([6, 17]), "at": st.sampled_from([T0 - 1, T0, T0 + HOUR, T0 + 5 * HOUR]),
}), max_size=30))
def test_classifier_equals_naive_reference(snapshot: Snapshot, rows: list[dict]) -> None:
    c = Classifier(snapshot)
    flows = make_flows(rows)
    got = sorted((f, a, k, d) for f, a, k, d in legs_of(c, flows))
    want = sorted((i, *leg) for i, row in enumerate(rows) for leg in naive(snapshot, row))
    assert got == want


# ---------------------------------------------------------------- aggregate

def test_aggregate_sums_exactly_per_account_class_direction_hour() -> None:
    c = Classifier(Snapshot(BINDINGS, (TrafficRule(2, remote_ports=((53, 53),)),), default_class=1))
    rows = []
    rng = np.random.default_rng(7)
    for i in range(40000):
        rows.append({
            "src": "10.0.0.%d" % (i % 200) if i % 3 else "8.8.4.4",
            "dst": "8.8.8.8" if i % 3 else "2001:db8:1::5",
            "dst_port": 53 if i % 5 == 0 else 443,
            "src_port": 1,
            "bytes": int(rng.integers(1 << 38, 1 << 39)) | 1,  # totals beyond float's 2**53
            "packets": i, "at": T0 + int(rng.integers(0, 4 * HOUR)), "sampling": 1 + i % 2,
        })
    flows = make_flows(rows)
    legs = c.classify(flows)
    agg = aggregate(flows, legs)
    want: dict[tuple, list[int]] = defaultdict(lambda: [0, 0, 0])
    for f, a, k, d, at in zip(legs.flow, legs.account, legs.klass, legs.direction, legs.at_ms):
        key = (int(a), int(k), int(d), int(at) // HOUR * HOUR)
        want[key][0] += rows[f]["bytes"] * (1 + f % 2)
        want[key][1] += rows[f]["packets"] * (1 + f % 2)
        want[key][2] += 1
    got = {
        (int(a), int(k), int(d), int(h)): [int(b), int(p), int(n)]
        for a, k, d, h, b, p, n in zip(agg.account, agg.klass, agg.direction, agg.hour_ms, agg.bytes,
                                       agg.packets, agg.flows)
    }
    assert got == dict(want)
    assert sum(v[0] for v in got.values()) > 1 << 53


def test_aggregate_drops_skipped_and_implausible_legs() -> None:
    c = Classifier(Snapshot(BINDINGS, (TrafficRule(0, remote=("10.0.0.0/8",), skip=True),), 1))
    flows = make_flows([
        {"src": "10.0.0.1", "dst": "10.5.5.5", "bytes": 100},  # skipped
        {"src": "10.0.0.1", "dst": "8.8.8.8", "bytes": MAX_FLOW_BYTES + 1},  # implausible
        {"src": "10.0.0.1", "dst": "8.8.8.8", "bytes": 1 << 30, "sampling": 1 << 20},  # scaled too far
        {"src": "10.0.0.1", "dst": "8.8.8.8", "bytes": 700},
    ])
    agg = aggregate(flows, c.classify(flows))
    assert agg.implausible == 2
    assert [int(b) for b in agg.bytes] == [700]
    assert len(aggregate(flows, c.classify(flows), include_skipped=True).bytes) == 2
