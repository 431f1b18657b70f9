"""The fast classifier and aggregate answer exactly what a plain one answers.

The oracle shares nothing with the code under test's address handling:
`OracleRanges` builds address sets from `ipaddress` networks and looks each
address up with Python ints and `bisect` (not the S16 keys, the low/high
split or the direct v4 table; a rule's prefixes are merged by
`ipaddress.collapse_addresses`, not by `RangeSet.union`). `Reference` is a
plain classifier on it (a sorted search for every binding window, rules
applied in order) and `ref_aggregate` sums groups in a dict, where the code
has the direct table, the per-segment latest window and dense/positional
group sums. Hypothesis draws snapshots (v4 and v6 prefixes of every length,
time windows, nested or overlapping ones that must be refused alike) and
flows aimed at range and window edges.
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import netflow.classifier as C
from netflow.classifier import (
    HOUR_MS,
    MAX_FLOW_BYTES,
    SKIP,
    TIME_BITS,
    TIME_LIMIT,
    Aggregates,
    Binding,
    Classifier,
    Legs,
    RangeSet,
    Snapshot,
    TrafficRule,
    aggregate,
    prefix_range,
    prefix_ranges,
)
from netflow.errors import ClassifierError
from netflow.flows import FLOW_DTYPE, V4_MAPPED

_U64 = np.uint64
_MASK64 = (1 << 64) - 1
T0 = 1_700_000_000_000


# ---------------------------------------------------------------- the oracle's address sets

# Built from `ipaddress` networks and looked up one address at a time with
# Python ints and `bisect`: nothing of the code under test (its S16 keys, its
# low/high split, its direct v4 table, its prefix parsing or range merging).
MAPPED_BLOCK = ipaddress.IPv6Network("::ffff:0:0/96")


def flow_network(prefix: str) -> ipaddress.IPv6Network:
    """A prefix as a network of the flow address space, where IPv4 is v4-mapped IPv6."""
    try:
        net = ipaddress.ip_network(prefix, strict=True)
    except ValueError as exc:
        raise ClassifierError(f"bad prefix {prefix!r}") from exc
    if isinstance(net, ipaddress.IPv4Network):
        return ipaddress.IPv6Network((int(MAPPED_BLOCK.network_address) + int(net.network_address),
                                      96 + net.prefixlen))
    return net


def flow_networks(prefix: str) -> list[ipaddress.IPv6Network]:
    """"Any IPv6" does not mean IPv4: an IPv6 prefix wider than the v4-mapped
    block leaves the block out (the block written as itself keeps it)."""
    net = flow_network(prefix)
    if ":" in prefix and net != MAPPED_BLOCK and net.supernet_of(MAPPED_BLOCK):
        return list(net.address_exclude(MAPPED_BLOCK))
    return [net]


class OracleRanges:
    """Disjoint inclusive ranges of the 128-bit flow space; ``lookup`` gives the
    position (in the list given) of the range holding each address, -1 for none."""

    def __init__(self, ranges: list[tuple[int, int]]) -> None:
        order = sorted(range(len(ranges)), key=lambda k: ranges[k])
        self.starts = [ranges[k][0] for k in order]
        self.ends = [ranges[k][1] for k in order]
        self.positions = order
        if any(later <= end for end, later in zip(self.ends, self.starts[1:])):
            raise ClassifierError("ranges overlap")

    @classmethod
    def of_prefixes(cls, prefixes: tuple[str, ...]) -> OracleRanges:
        networks = ipaddress.collapse_addresses(n for p in prefixes for n in flow_networks(p))
        return cls([(int(n.network_address), int(n.broadcast_address)) for n in networks])

    def lookup(self, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        found = []
        for high, low in zip(hi.tolist(), lo.tolist()):
            address = high << 64 | low
            k = bisect.bisect_right(self.starts, address) - 1
            found.append(self.positions[k] if k >= 0 and address <= self.ends[k] else -1)
        return np.array(found, dtype=np.int64)

    def contains(self, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        return self.lookup(hi, lo) >= 0


# ---------------------------------------------------------------- the reference classifier and aggregate

class Reference:
    """The plain `Classifier` (bindings, accounts, classify, rules) on `OracleRanges`."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.default_class = snapshot.default_class
        by_range: dict[tuple[int, int], list[Binding]] = {}
        for b in listed(snapshot):
            if not 0 < b.account < 1 << 32:
                raise ClassifierError("account out of range")
            to = TIME_LIMIT + 1 if b.valid_to_ms is None else b.valid_to_ms
            if not 0 <= b.valid_from_ms < to <= TIME_LIMIT + 1:
                raise ClassifierError("empty or out-of-range validity")
            if len(flow_networks(b.prefix)) != 1:
                raise ClassifierError("would cover every IPv4 address")
            net = flow_network(b.prefix)
            by_range.setdefault((int(net.network_address), int(net.broadcast_address)), []).append(b)
        ranges = sorted(by_range)
        self.segments = OracleRanges(ranges)
        keys, to_ms, accounts = [], [], []
        for seg, rng in enumerate(ranges):
            windows = sorted(by_range[rng], key=lambda b: b.valid_from_ms)
            for prev, nxt in zip(windows, windows[1:]):
                if prev.valid_to_ms is None or prev.valid_to_ms > nxt.valid_from_ms:
                    raise ClassifierError("overlap in time")
            for b in windows:
                keys.append((seg << TIME_BITS) | b.valid_from_ms)
                to_ms.append(TIME_LIMIT + 1 if b.valid_to_ms is None else b.valid_to_ms)
                accounts.append(b.account)
        self._keys = np.array(keys, dtype=_U64)
        self._to_ms = np.array(to_ms, dtype=np.int64)
        self._accounts = np.array(accounts, dtype=np.int64)
        self.rules = [self._rule(r) for r in snapshot.rules]

    @staticmethod
    def _rule(rule: TrafficRule) -> dict[str, Any]:
        def ints(values: tuple[int, ...]) -> np.ndarray | None:
            return np.array(values, dtype=np.int64) if values else None

        exporters = tuple(e if "/" in e else f"{e}/{32 if ':' not in e else 128}" for e in rule.exporters)
        return {
            "class_id": SKIP if rule.skip else rule.class_id,
            "local": OracleRanges.of_prefixes(rule.local) if rule.local else None,
            "remote": OracleRanges.of_prefixes(rule.remote) if rule.remote else None,
            "local_ports": rule.local_ports, "remote_ports": rule.remote_ports,
            "protocols": ints(rule.protocols), "input_if": ints(rule.input_if),
            "output_if": ints(rule.output_if),
            "exporters": OracleRanges.of_prefixes(exporters) if exporters else None,
        }

    def accounts(self, hi: np.ndarray, lo: np.ndarray, at_ms: np.ndarray) -> np.ndarray:
        seg = self.segments.lookup(hi, lo)
        out = np.zeros(len(hi), dtype=np.int64)
        hit = seg >= 0
        if not hit.any():
            return out
        t = np.clip(at_ms[hit], 0, TIME_LIMIT)
        key = (seg[hit].astype(_U64) << _U64(TIME_BITS)) | t.astype(_U64)
        k = np.searchsorted(self._keys, key, side="right") - 1
        kc = np.maximum(k, 0)
        ok = (k >= 0) & ((self._keys[kc] >> _U64(TIME_BITS)) == seg[hit].astype(_U64)) & (t < self._to_ms[kc])
        found = np.zeros(len(t), dtype=np.int64)
        found[ok] = self._accounts[kc[ok]]
        out[hit] = found
        return out

    def classify(self, flows: np.ndarray, time_field: str = "first_ms") -> Legs:
        at = flows[time_field]
        src = self.accounts(flows["src_hi"], flows["src_lo"], at)
        dst = self.accounts(flows["dst_hi"], flows["dst_lo"], at)
        out_idx = np.flatnonzero(src > 0)
        in_idx = np.flatnonzero(dst > 0)
        none_idx = np.flatnonzero((src == 0) & (dst == 0))
        flow = np.concatenate([out_idx, in_idx, none_idx])
        account = np.concatenate([src[out_idx], dst[in_idx], np.zeros(len(none_idx), np.int64)])
        outbound = np.concatenate(
            [np.ones(len(out_idx), bool), np.zeros(len(in_idx), bool), np.zeros(len(none_idx), bool)]
        )
        klass = np.full(len(flow), self.default_class, dtype=np.int32)
        undecided = account > 0
        klass[~undecided] = 0
        if self.rules and undecided.any():
            self._apply_rules(flows, flow, outbound, klass, undecided)
        direction = outbound.astype(np.uint8)
        return Legs(flow, account, klass, direction, at.take(flow).astype(np.int64, copy=False))

    def _apply_rules(self, flows: np.ndarray, flow: np.ndarray, outbound: np.ndarray, klass: np.ndarray,
                     undecided: np.ndarray) -> None:
        def col(name: str) -> np.ndarray:
            return flows[name].take(flow)

        def side(local: bool, src: str, dst: str) -> np.ndarray:
            a, b = (src, dst) if local else (dst, src)
            return np.where(outbound, col(a), col(b))

        for rule in self.rules:
            if not undecided.any():
                break
            m = undecided.copy()
            if rule["protocols"] is not None:
                m &= np.isin(col("proto"), rule["protocols"])
            if rule["input_if"] is not None:
                m &= np.isin(col("input_if"), rule["input_if"])
            if rule["output_if"] is not None:
                m &= np.isin(col("output_if"), rule["output_if"])
            for ports, local, a, b in ((rule["local_ports"], True, "src_port", "dst_port"),
                                       (rule["remote_ports"], False, "src_port", "dst_port")):
                if ports:
                    p = side(local, a, b)
                    m &= np.any([(p >= lo) & (p <= hi) for lo, hi in ports], axis=0)
            if rule["local"] is not None:
                m &= rule["local"].contains(side(True, "src_hi", "dst_hi"), side(True, "src_lo", "dst_lo"))
            if rule["remote"] is not None:
                m &= rule["remote"].contains(side(False, "src_hi", "dst_hi"), side(False, "src_lo", "dst_lo"))
            if rule["exporters"] is not None:
                m &= rule["exporters"].contains(col("exporter_hi"), col("exporter_lo"))
            klass[m] = rule["class_id"]
            undecided &= ~m


def ref_aggregate(flows: np.ndarray, legs: Legs, hour_ms: int = HOUR_MS, apply_sampling: bool = True,
                  include_skipped: bool = False) -> Aggregates:
    """The plain way: filter, then one stable sort by the key columns and sums of runs.

    Two deliberate differences from the code this replaced: the sanity check
    happens before multiplying by the sampling interval (a product past 2**64
    wrapped to a small number and was charged), and the key is four columns,
    not one packed uint64 (class ids >= 65535 collided with the direction bit,
    and more than 32767 hours in a batch stopped the worker).
    """
    keep = np.ones(len(legs.flow), dtype=bool) if include_skipped else legs.klass != SKIP
    index = legs.flow[keep]
    raw_bytes, raw_packets = flows["bytes"].take(index), flows["packets"].take(index)
    scale = flows["sampling"].take(index).astype(_U64) if apply_sampling else np.ones(len(index), dtype=_U64)
    scale = np.maximum(scale, _U64(1))
    sane = (raw_bytes <= _U64(MAX_FLOW_BYTES) // scale) & (raw_packets <= _U64(MAX_FLOW_BYTES) // scale)
    implausible = int((~sane).sum())
    account = legs.account[keep][sane]
    klass = legs.klass[keep][sane].astype(np.int64)
    direction = legs.direction[keep][sane].astype(np.int64)
    bucket = legs.at_ms[keep][sane] // hour_ms
    nbytes, npackets = raw_bytes[sane] * scale[sane], raw_packets[sane] * scale[sane]
    if not len(account):
        empty = np.zeros(0, dtype=np.int64)
        return Aggregates(empty, empty, empty, empty, empty.astype(_U64), empty.astype(_U64), empty, implausible)
    rows = sorted(zip(account.tolist(), klass.tolist(), direction.tolist(), bucket.tolist(), range(len(account))))
    groups: dict[tuple[int, int, int, int], list[int]] = {}
    for a, k, d, b, n in rows:
        groups.setdefault((a, k, d, b), []).append(n)
    keys = list(groups)
    return Aggregates(
        account=np.array([k[0] for k in keys], dtype=np.int64),
        klass=np.array([k[1] for k in keys], dtype=np.int64),
        direction=np.array([k[2] for k in keys], dtype=np.int64),
        hour_ms=np.array([k[3] for k in keys], dtype=np.int64) * hour_ms,
        bytes=np.array([sum(int(nbytes[n]) for n in g) for g in groups.values()], dtype=_U64),
        packets=np.array([sum(int(npackets[n]) for n in g) for g in groups.values()], dtype=_U64),
        flows=np.array([len(g) for g in groups.values()], dtype=np.int64),
        implausible=implausible,
    )


# ---------------------------------------------------------------- helpers

def same_arrays(got: object, want: object, fields: tuple[str, ...]) -> None:
    for name in fields:
        g, w = getattr(got, name), getattr(want, name)
        assert g.dtype == w.dtype, (name, g.dtype, w.dtype)
        assert np.array_equal(g, w), name


LEG_FIELDS = ("flow", "account", "klass", "direction", "at_ms")
AGG_FIELDS = ("account", "klass", "direction", "hour_ms", "bytes", "packets", "flows")


def same_aggregates(got: Aggregates, want: Aggregates) -> None:
    same_arrays(got, want, AGG_FIELDS)
    assert got.implausible == want.implausible


@contextmanager
def patched(name: str, value: object) -> Iterator[None]:
    saved = getattr(C, name)
    setattr(C, name, value)
    try:
        yield
    finally:
        setattr(C, name, saved)


def listed(snapshot: Snapshot) -> tuple[Binding, ...]:
    """The snapshots drawn here list their bindings (never the columnar form)."""
    assert isinstance(snapshot.bindings, tuple)
    return snapshot.bindings


def pair(value: int) -> tuple[int, int]:
    return value >> 64, value & _MASK64


def v4(text: str) -> int:
    return V4_MAPPED | int(ipaddress.IPv4Address(text))


# ---------------------------------------------------------------- strategies

V4_NETS = ["10.0.0.0", "10.0.1.0", "10.1.0.0", "10.255.255.0", "100.64.0.0", "0.0.0.0", "255.255.255.0",
           "192.0.2.0", "172.16.0.0", "203.0.113.0"]
V6_NETS = ["2001:db8::", "2001:db8:0:1::", "2001:db8:1::", "2001:db8::ff00", "::", "::1:0:0:0",
           "ffff:ffff::", "fe80::", "2001:db8::1:0", "::ffff:0:0"]


@st.composite
def prefixes(draw: st.DrawFn) -> str:
    if draw(st.booleans()):
        base = int(ipaddress.IPv4Address(draw(st.sampled_from(V4_NETS))))
        length = draw(st.integers(1, 32))
        base = (base | draw(st.integers(0, 255)) << 8 | draw(st.integers(0, 255))) & ~((1 << (32 - length)) - 1)
        return f"{ipaddress.IPv4Address(base & 0xFFFFFFFF)}/{length}"
    base = int(ipaddress.IPv6Address(draw(st.sampled_from(V6_NETS))))
    length = draw(st.sampled_from([1, 16, 32, 47, 48, 56, 63, 64, 65, 80, 96, 97, 120, 127, 128]))
    base = (base | draw(st.integers(0, 0xFFFF)) << 64 | draw(st.integers(0, 0xFFFF))) & ~((1 << (128 - length)) - 1)
    return f"{ipaddress.IPv6Address(base & ((1 << 128) - 1))}/{length}"


@st.composite
def snapshots(draw: st.DrawFn) -> Snapshot:
    bindings = []
    for n, prefix in enumerate(draw(st.lists(prefixes(), max_size=12))):
        cuts = sorted(draw(st.lists(st.integers(0, 6), max_size=4)))
        windows = draw(st.sampled_from(["static", "sessions", "gapped", "overlapping"]))
        account = 1 + n * 10
        if windows == "static" or not cuts:
            bindings.append(Binding(prefix, account, draw(st.sampled_from([0, T0]))))
            continue
        edges = [T0 + c * HOUR_MS for c in cuts]
        for k, start in enumerate(edges):
            end = edges[k + 1] if k + 1 < len(edges) else None
            if windows == "gapped" and end is not None:
                end -= 1
            if windows == "overlapping" and end is not None:
                end += 1
            if end is not None and end <= start:
                continue
            bindings.append(Binding(prefix, account + k, start, end))
        if draw(st.booleans()) and bindings:  # a closed last window
            last = bindings.pop()
            bindings.append(Binding(last.prefix, last.account, last.valid_from_ms, last.valid_from_ms + HOUR_MS))
    rules = []
    for cid in range(1, draw(st.integers(0, 4)) + 1):
        rules.append(TrafficRule(
            cid,
            local=tuple(draw(st.lists(prefixes(), max_size=2))),
            remote=tuple(draw(st.lists(st.one_of(prefixes(), st.sampled_from(["::/0", "0.0.0.0/0"])),
                                       max_size=3))),
            remote_ports=tuple(draw(st.lists(st.sampled_from([(53, 53), (1, 1023)]), max_size=1))),
            skip=draw(st.booleans()),
        ))
    return Snapshot(tuple(bindings), tuple(rules), default_class=draw(st.sampled_from([0, 7])))


def edge_addresses(snapshot: Snapshot) -> list[int]:
    """Both ends of every bound and rule range, one step outside each, and some fixed points."""
    out = [v4("0.0.0.0"), v4("255.255.255.255"), V4_MAPPED - 1, V4_MAPPED | (1 << 32), 0, 1, _MASK64,
           1 << 64, (1 << 128) - 1, int(ipaddress.IPv6Address("2001:db8::5"))]
    prefixes_seen = [b.prefix for b in listed(snapshot)]
    for r in snapshot.rules:
        prefixes_seen += list(r.local) + list(r.remote)
    for p in prefixes_seen:
        for start, end in prefix_ranges(p):
            out += [start, end, max(start - 1, 0), min(end + 1, (1 << 128) - 1), (start + end) // 2]
    return out


def times(snapshot: Snapshot) -> list[int]:
    out = [-5, 0, T0 - 1, TIME_LIMIT, TIME_LIMIT + 5]
    for b in listed(snapshot):
        out += [b.valid_from_ms - 1, b.valid_from_ms]
        if b.valid_to_ms is not None:
            out += [b.valid_to_ms - 1, b.valid_to_ms]
    return out


Drawn = TypeVar("Drawn")


class Draw(Protocol):
    """``st.DrawFn`` or ``DataObject.draw``: both draw a value from a strategy."""

    def __call__(self, strategy: st.SearchStrategy[Drawn], /) -> Drawn: ...


def make_flows(draw: Draw, snapshot: Snapshot, n: int) -> np.ndarray:
    """Flows mostly aimed at one binding: an edge of its range at an edge of its window."""
    addrs = edge_addresses(snapshot)
    when = times(snapshot)
    flows = np.zeros(n, dtype=FLOW_DTYPE)

    def address(b: Binding | None) -> int:
        if b is None:
            value = draw(st.sampled_from(addrs))
        else:
            start, end = prefix_range(b.prefix)
            value = draw(st.sampled_from([start, end, max(start - 1, 0), min(end + 1, (1 << 128) - 1)]))
        if draw(st.integers(0, 9)) == 0:  # the same low half under a v6 high half: not a v4 address
            value = (value & _MASK64) | (0x20010DB8 << 96)
        return value

    def moment(b: Binding | None) -> int:
        if b is None:
            return draw(st.sampled_from(when))
        edges = [b.valid_from_ms - 1, b.valid_from_ms]
        if b.valid_to_ms is not None:
            edges += [b.valid_to_ms - 1, b.valid_to_ms]
        return draw(st.sampled_from(edges))

    for i in range(n):
        aimed = bool(listed(snapshot)) and draw(st.booleans())
        b = draw(st.sampled_from(listed(snapshot))) if aimed else None
        local = draw(st.sampled_from(["src", "dst"]))
        for side in ("src", "dst", "exporter"):
            flows[i][f"{side}_hi"], flows[i][f"{side}_lo"] = pair(address(b if side == local else None))
        flows[i]["first_ms"] = moment(b)
        flows[i]["src_port"] = draw(st.sampled_from([53, 80, 40000]))
        flows[i]["dst_port"] = draw(st.sampled_from([53, 443]))
        flows[i]["bytes"] = draw(st.sampled_from([0, 1, 1500, (1 << 20) - 1, 1 << 20, MAX_FLOW_BYTES,
                                                  MAX_FLOW_BYTES + 1, (1 << 64) - 1]))
        flows[i]["packets"] = draw(st.sampled_from([0, 1, 3, MAX_FLOW_BYTES, MAX_FLOW_BYTES + 1, (1 << 64) - 1]))
        flows[i]["sampling"] = draw(st.sampled_from([0, 1, 2, 1000, (1 << 32) - 1]))
    return flows


# ---------------------------------------------------------------- properties

@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), snapshots(), st.booleans())
def test_classify_and_aggregate_equal_the_reference(data: st.DataObject, snapshot: Snapshot, few_blocks: bool) -> None:
    try:
        ref = Reference(snapshot)
    except ClassifierError:
        with pytest.raises(ClassifierError):
            Classifier(snapshot)
        return
    # with one block at most, the /16s beyond it take the binary search from the table's "search" cell
    with patched("V4_TABLE_BLOCKS", 1 if few_blocks else C.V4_TABLE_BLOCKS):
        c = Classifier(snapshot)
    flows = make_flows(data.draw, snapshot, data.draw(st.integers(0, 40)))
    at = flows["first_ms"]
    for side in ("src", "dst"):
        got = c.accounts(flows[f"{side}_hi"], flows[f"{side}_lo"], at)
        assert got.dtype == np.int64
        assert np.array_equal(got, ref.accounts(flows[f"{side}_hi"], flows[f"{side}_lo"], at))
    legs, want = c.classify(flows), ref.classify(flows)
    same_arrays(legs, want, LEG_FIELDS)
    for kwargs in ({}, {"include_skipped": True}, {"apply_sampling": False}, {"hour_ms": 60_000}):
        same_aggregates(aggregate(flows, legs, **kwargs), ref_aggregate(flows, legs, **kwargs))


@st.composite
def interval_sets(draw: st.DrawFn) -> list[tuple[int, int]]:
    """Disjoint intervals (not only prefixes) around the v4-mapped block and elsewhere."""
    anchors = [0, V4_MAPPED, V4_MAPPED | 0x0A000000, V4_MAPPED | 0xFFFF0000, 1 << 64, (1 << 64) + (1 << 32),
               int(ipaddress.IPv6Address("2001:db8::")), (1 << 128) - (1 << 20)]
    points = sorted({min(max(draw(st.sampled_from(anchors)) + draw(st.integers(-70_000, 200_000)), 0),
                         (1 << 128) - 1) for _ in range(draw(st.integers(0, 16)))})
    out = []
    for k in range(0, len(points) - 1, 2):
        if draw(st.booleans()):
            out.append((points[k], points[k + 1]))
        else:
            out.append((points[k], points[k]))
    return out


@settings(max_examples=300, deadline=None)
@given(st.data(), interval_sets(), st.integers(0, 3))
def test_range_lookup_equals_the_reference(data: st.DataObject, ranges: list[tuple[int, int]], blocks: int) -> None:
    with patched("V4_TABLE_BLOCKS", blocks if blocks < 3 else C.V4_TABLE_BLOCKS):
        direct = RangeSet(ranges, direct=True)
    plain = RangeSet(ranges)
    ref = OracleRanges(ranges)
    queries = [0, 1, V4_MAPPED - 1, V4_MAPPED, V4_MAPPED | 0xFFFFFFFF, (V4_MAPPED | 0xFFFFFFFF) + 1, _MASK64,
               1 << 64, (1 << 128) - 1]
    for s, e in ranges:
        edges = [s, e, max(s - 1, 0), min(e + 1, (1 << 128) - 1)]
        queries += edges + [(q & _MASK64) | (1 << 64) for q in edges]  # v4-looking low half, v6 high half
    queries += data.draw(st.lists(st.integers(0, (1 << 128) - 1), max_size=10))
    hi = np.array([q >> 64 for q in queries], dtype=_U64)
    lo = np.array([q & _MASK64 for q in queries], dtype=_U64)
    want = ref.lookup(hi, lo)
    assert np.array_equal(direct.lookup(hi, lo), want)
    assert np.array_equal(plain.lookup(hi, lo), want)
    assert np.array_equal(direct.contains(hi, lo), want >= 0)


@st.composite
def leg_batches(draw: st.DrawFn) -> tuple[np.ndarray, Legs]:
    n = draw(st.integers(0, 60))
    accounts = draw(st.sampled_from([[0, 1, 2, 500], [0, (1 << 22) - 1, 1 << 22, (1 << 32) - 1]]))
    classes = draw(st.sampled_from([[SKIP, 0, 1, 7], [SKIP, 0, 0xFFFE, 0xFFFF, 70_000]]))
    hours = draw(st.sampled_from([[T0, T0 + HOUR_MS - 1, T0 + HOUR_MS, T0 + 5 * HOUR_MS],
                                  [-1, 0, T0, T0 + (1 << 15) * HOUR_MS], [T0 + (1 << 16) * HOUR_MS * k
                                                                           for k in range(3)]]))
    flows = np.zeros(max(n, 1), dtype=FLOW_DTYPE)
    flows["bytes"] = [draw(st.sampled_from([1, 1500, (1 << 20) + 3, MAX_FLOW_BYTES, MAX_FLOW_BYTES + 1]))
                      for _ in range(len(flows))]
    flows["packets"] = [draw(st.sampled_from([1, 2, MAX_FLOW_BYTES])) for _ in range(len(flows))]
    flows["sampling"] = [draw(st.sampled_from([0, 1, 3])) for _ in range(len(flows))]
    flow = np.array([draw(st.integers(0, len(flows) - 1)) for _ in range(n)], dtype=np.int64)
    legs = Legs(
        flow,
        np.array([draw(st.sampled_from(accounts)) for _ in range(n)], dtype=np.int64),
        np.array([draw(st.sampled_from(classes)) for _ in range(n)], dtype=np.int32),
        np.array([draw(st.integers(0, 1)) for _ in range(n)], dtype=np.uint8),
        np.array([draw(st.sampled_from(hours)) for _ in range(n)], dtype=np.int64),
    )
    return flows, legs


@settings(max_examples=400, deadline=None)
@given(leg_batches(), st.booleans(), st.booleans())
def test_aggregate_paths_equal_the_reference(batch: tuple[np.ndarray, Legs], dense: bool, skipped: bool) -> None:
    """Every path (dense cells, sorted positions, the packed-key fallback) gives the reference's rows.

    Small batches take the dense cells when their accounts are below 2**22; no cells at all forces the
    sorted path; huge accounts, classes beyond 16 bits and buckets spread wide take the fallback."""
    flows, legs = batch
    try:
        want = ref_aggregate(flows, legs, include_skipped=skipped)
    except ClassifierError:
        with pytest.raises(ClassifierError):
            aggregate(flows, legs, include_skipped=skipped)
        return
    with patched("_DENSE_CELLS", C._DENSE_CELLS if dense else 0):
        same_aggregates(aggregate(flows, legs, include_skipped=skipped), want)


# ---------------------------------------------------------------- at realistic sizes

def test_large_snapshots_equal_the_reference() -> None:
    """20,000 /32s spread over 300 /16s (more than the table has blocks for), v6 /48s and /128s in one /64,
    and addresses with several sessions: a batch of random flows gives the reference's legs and sums."""
    rng = np.random.default_rng(5)
    sixteens = rng.choice(np.r_[256:0x6440, 0x6480:223 << 8], 300, replace=False)  # not in 100.64.0.0/10
    hosts = np.unique((sixteens[rng.integers(0, 300, 20_000)] << 16) | rng.integers(0, 1 << 16, 20_000))
    bindings = [Binding(f"{ipaddress.IPv4Address(int(a))}/32", k + 1) for k, a in enumerate(hosts[:-500])]
    for k, a in enumerate(hosts[-500:]):  # three sessions each, the last one still open
        for w in range(3):
            bindings.append(Binding(f"{ipaddress.IPv4Address(int(a))}/32", 100_000 + 3 * k + w, T0 + w * HOUR_MS,
                                    None if w == 2 else T0 + (w + 1) * HOUR_MS - 7))
    bindings += [Binding(f"2001:db8:{k:x}::/48", 200_000 + k) for k in range(2000)]
    bindings += [Binding(f"2001:db8:ffff:1::{k:x}/128", 300_000 + k) for k in range(1, 200)]
    bindings += [Binding("100.64.0.0/10", 400_000)]
    snapshot = Snapshot(tuple(bindings), (TrafficRule(3, remote=("8.0.0.0/8", "2001:db8::/32")), TrafficRule(1)),
                        default_class=1)
    with patched("V4_TABLE_BLOCKS", 64):
        c = Classifier(snapshot)
    ref = Reference(snapshot)
    n = 200_000
    flows = np.zeros(n, dtype=FLOW_DTYPE)
    kind = rng.integers(0, 5, n)
    lo = np.where(kind == 0, V4_MAPPED | hosts[rng.integers(0, len(hosts), n)].astype(np.uint64),
                  V4_MAPPED | rng.integers(0, 1 << 32, n).astype(np.uint64))
    lo = np.where(kind == 1, V4_MAPPED | (0x64400000 + rng.integers(-5, (1 << 22) + 5, n)).astype(np.uint64), lo)
    hi = np.where(kind == 2, np.uint64(0x20010DB8 << 32) | rng.integers(0, 2100, n).astype(np.uint64) << 16, 0)
    hi = np.where(kind == 3, np.uint64(0x20010DB8FFFF0001), hi).astype(np.uint64)
    lo = np.where(kind == 3, rng.integers(0, 220, n).astype(np.uint64), lo)
    lo = np.where(kind == 2, rng.integers(0, 1 << 63, n).astype(np.uint64), lo)
    flows["src_hi"], flows["src_lo"] = hi, lo
    flows["dst_hi"], flows["dst_lo"] = 0, V4_MAPPED | rng.integers(0, 1 << 32, n).astype(np.uint64)
    flows["first_ms"] = T0 + rng.integers(-HOUR_MS, 4 * HOUR_MS, n)
    flows["bytes"] = rng.integers(1, 1 << 40, n).astype(np.uint64)
    flows["packets"] = rng.integers(1, 1 << 20, n).astype(np.uint64)
    flows["sampling"] = rng.integers(0, 3, n)
    legs = c.classify(flows)
    same_arrays(legs, ref.classify(flows), LEG_FIELDS)
    assert (legs.account > 0).mean() > 0.3
    same_aggregates(aggregate(flows, legs), ref_aggregate(flows, legs))
    with patched("_DENSE_CELLS", 0):
        same_aggregates(aggregate(flows, legs), ref_aggregate(flows, legs))


def test_aggregate_rows_are_ordered_by_account_class_direction_hour() -> None:
    """Callers (journal, reports) see the same row order as before: ascending key."""
    snapshot = Snapshot(tuple(Binding(f"10.0.{k // 250}.{k % 250 + 1}/32", 1000 - k) for k in range(500)),
                        (TrafficRule(2, remote_ports=((53, 53),)),), default_class=1)
    c = Classifier(snapshot)
    rng = np.random.default_rng(3)
    flows = np.zeros(50_000, dtype=FLOW_DTYPE)
    flows["src_lo"] = V4_MAPPED | (0x0A000000 + rng.integers(0, 600, len(flows)).astype(np.uint64))
    flows["dst_lo"] = V4_MAPPED | 0x08080808
    flows["dst_port"] = rng.choice([53, 443], len(flows))
    flows["first_ms"] = T0 + rng.integers(0, 3 * HOUR_MS, len(flows))
    flows["bytes"] = rng.integers(1, 1 << 40, len(flows)).astype(np.uint64)
    legs = c.classify(flows)
    agg = aggregate(flows, legs)
    key = list(zip(agg.account.tolist(), agg.klass.tolist(), agg.direction.tolist(), agg.hour_ms.tolist()))
    assert key == sorted(key) and len(set(key)) == len(key)
    assert int(agg.bytes.sum()) == int(flows["bytes"].sum())
    same_aggregates(agg, ref_aggregate(flows, legs))


def test_garbage_counters_and_clocks_cannot_wrap_collide_or_stop_the_worker() -> None:
    """A sampled counter whose product passes 2**64 is implausible (it used to wrap to a small
    charge); class ids past 65535 and a batch over 40,000 different hours aggregate exactly."""
    n = 40_000
    flows = np.zeros(n, dtype=FLOW_DTYPE)
    flows["bytes"], flows["packets"], flows["sampling"] = 1000, 1, 1
    flows["bytes"][0] = (1 << 63) + 7  # times 2 wraps to 14 bytes
    flows["sampling"][0] = 2
    at = np.arange(n, dtype=np.int64) * HOUR_MS  # a broken exporter clock: every flow another hour
    legs = Legs(np.arange(n), np.full(n, 5), np.where(np.arange(n) % 2, 70_000, 1).astype(np.int32),
                np.zeros(n, dtype=np.uint8), at)
    agg = aggregate(flows, legs)
    assert agg.implausible == 1
    assert len(agg.account) == n - 1 and set(agg.klass.tolist()) == {1, 70_000}
    assert int(agg.bytes.sum()) == 1000 * (n - 1) and agg.flows.tolist() == [1] * (n - 1)
