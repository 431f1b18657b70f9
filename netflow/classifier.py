"""Classification: which account a flow belongs to, and which traffic class.

Theory of operation. A `Snapshot` (IP bindings and ordered traffic-class
rules, as the core loaded them) compiles once into sorted interval arrays;
then every batch is classified with `np.searchsorted`, never a per-flow loop.

Addresses are the 128-bit values of `flows.py` (v4 mapped into v6), so a
prefix is an interval [start, end]. `RangeSet.lookup` finds the interval that
holds each address: v4-mapped queries use a uint64 search on the low half,
others compare 16-byte big-endian keys (numpy's fixed-width bytes compare as
unsigned, which is numeric order).

Bindings: an address range belongs to at most one account at any instant.
Distinct binding prefixes must be disjoint (no nesting: a /32 inside a bound
/24 is refused, since "which one wins" is a policy the core must decide
before it gets here), and the time windows [valid_from, valid_to) of
bindings of the same prefix must not overlap. Lookup: range -> segment,
then one `searchsorted` over keys `segment << 42 | valid_from_ms`.
The flow's `first_ms` picks the binding in force.

Direction: a flow whose source is bound is outbound for that account; whose
destination is bound, inbound. A flow between two bound addresses is two
legs, one per account; a flow with neither is one leg of account 0. Rules
see each leg's local (account) side and remote side; the first matching rule
gives the class, a matching `skip` rule gives SKIP (not charged), and no
match gives the default class.

`aggregate` sums the legs per (account, class, direction, hour) exactly, in
uint64 (never float): sort a packed key, `np.add.reduceat`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import numpy as np

from netflow.errors import ClassifierError
from netflow.flows import V4_MAPPED

SKIP = -1
INBOUND, OUTBOUND = 0, 1
TIME_BITS = 42  # epoch milliseconds up to the year 2109
TIME_LIMIT = (1 << TIME_BITS) - 1
MAX_BINDINGS = 1 << 21
MAX_RULES = 4096
MAX_LEGS = 1 << 23
MAX_FLOW_BYTES = 1 << 40  # a single (scaled) record beyond 1 TB is not plausible
HOUR_MS = 3_600_000
_U64 = np.uint64
_MASK64 = (1 << 64) - 1


_MAPPED_START, _MAPPED_END = V4_MAPPED, V4_MAPPED | 0xFFFF_FFFF


def prefix_ranges(prefix: str) -> list[tuple[int, int]]:
    """Like `prefix_range`, but a short IPv6 prefix (e.g. ::/0) that covers the
    v4-mapped block ::ffff:0:0/96 excludes it: "any IPv6" does not mean IPv4."""
    start, end = prefix_range(prefix)
    if ":" not in prefix or not (start <= _MAPPED_START and _MAPPED_END <= end):
        return [(start, end)]
    if prefix.lower().startswith("::ffff:") and (start, end) == (_MAPPED_START, _MAPPED_END):
        return [(start, end)]  # written as the mapped block on purpose
    return [(s, e) for s, e in ((start, _MAPPED_START - 1), (_MAPPED_END + 1, end)) if s <= e]


def prefix_range(prefix: str) -> tuple[int, int]:
    """'10.0.0.0/8' or '2001:db8::/32' -> inclusive 128-bit [start, end] in flow space."""
    try:
        net = ipaddress.ip_network(prefix, strict=True)
    except ValueError as exc:
        raise ClassifierError(f"bad prefix {prefix!r}: {exc}") from exc
    start, end = int(net.network_address), int(net.broadcast_address)
    if net.version == 4:
        start, end = V4_MAPPED | start, V4_MAPPED | end
    return start, end


def _s16(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    keys = np.empty(len(hi), dtype=[("h", ">u8"), ("l", ">u8")])
    keys["h"] = hi
    keys["l"] = lo
    return keys.view("S16")


class RangeSet:
    """Disjoint inclusive 128-bit intervals, each tagged with a value."""

    def __init__(self, ranges: list[tuple[int, int]], values: list[int] | None = None) -> None:
        order = sorted(range(len(ranges)), key=lambda k: ranges[k])
        self.starts = [ranges[k][0] for k in order]
        self.ends = [ranges[k][1] for k in order]
        self.values = np.array([values[k] if values else k for k in order], dtype=np.int64)
        for k in range(1, len(order)):
            if self.starts[k] <= self.ends[k - 1]:
                raise ClassifierError("ranges overlap")
        hi = np.array([s >> 64 for s in self.starts], dtype=_U64)
        lo = np.array([s & _MASK64 for s in self.starts], dtype=_U64)
        self._start16 = _s16(hi, lo)
        self._end16 = _s16(
            np.array([e >> 64 for e in self.ends], dtype=_U64),
            np.array([e & _MASK64 for e in self.ends], dtype=_U64),
        )
        # the part of each range inside hi == 0, where v4-mapped addresses live
        low = [(k, s, min(e, _MASK64)) for k, (s, e) in enumerate(zip(self.starts, self.ends)) if s <= _MASK64]
        self._low_index = np.array([k for k, _, _ in low], dtype=np.int64)
        self._low_start = np.array([s for _, s, _ in low], dtype=_U64)
        self._low_end = np.array([e for _, _, e in low], dtype=_U64)

    @classmethod
    def union(cls, prefixes: tuple[str, ...]) -> RangeSet:
        """Membership set of possibly overlapping prefixes (merged)."""
        merged: list[list[int]] = []
        for start, end in sorted(r for p in prefixes for r in prefix_ranges(p)):
            if merged and start <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        return cls([(s, e) for s, e in merged])

    def lookup(self, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        """Value of the range holding each address, or -1."""
        out = np.full(len(hi), -1, dtype=np.int64)
        if not self.starts or not len(hi):
            return out
        low = hi == 0
        if low.any():
            q = lo[low]
            k = np.searchsorted(self._low_start, q, side="right") - 1
            kc = np.maximum(k, 0)
            ok = (k >= 0) & (q <= self._low_end[kc]) if len(self._low_start) else np.zeros(len(q), bool)
            found = np.full(len(q), -1, dtype=np.int64)
            if len(self._low_start):
                found[ok] = self.values[self._low_index[kc[ok]]]
            out[low] = found
        high = ~low
        if high.any():
            q16 = _s16(hi[high], lo[high])
            k = np.searchsorted(self._start16, q16, side="right") - 1
            kc = np.maximum(k, 0)
            ok = (k >= 0) & (q16 <= self._end16[kc])
            found = np.full(len(q16), -1, dtype=np.int64)
            found[ok] = self.values[kc[ok]]
            out[high] = found
        return out

    def contains(self, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        return self.lookup(hi, lo) >= 0


@dataclass(frozen=True, slots=True)
class Binding:
    """`prefix` belongs to `account` during [valid_from_ms, valid_to_ms)."""

    prefix: str
    account: int
    valid_from_ms: int = 0
    valid_to_ms: int | None = None  # None: until further notice


@dataclass(frozen=True, slots=True)
class TrafficRule:
    """One rule of the ordered rule list; an empty criterion matches anything.

    Port ranges are inclusive (lo, hi) pairs. `skip` marks a negative rule:
    a leg it matches is not charged (class SKIP).
    """

    class_id: int
    local: tuple[str, ...] = ()
    remote: tuple[str, ...] = ()
    local_ports: tuple[tuple[int, int], ...] = ()
    remote_ports: tuple[tuple[int, int], ...] = ()
    protocols: tuple[int, ...] = ()
    exporters: tuple[str, ...] = ()
    input_if: tuple[int, ...] = ()
    output_if: tuple[int, ...] = ()
    skip: bool = False


@dataclass(frozen=True, slots=True)
class Snapshot:
    bindings: tuple[Binding, ...]
    rules: tuple[TrafficRule, ...]
    default_class: int


@dataclass(frozen=True, slots=True)
class Legs:
    """Classified legs: one per (flow, bound side); arrays of equal length."""

    flow: np.ndarray  # int64 index into the flow array
    account: np.ndarray  # int64; 0 = no account
    klass: np.ndarray  # int32; SKIP = not charged
    direction: np.ndarray  # uint8; INBOUND / OUTBOUND
    at_ms: np.ndarray  # int64; the flow time used for the binding (for time ranges)


@dataclass(frozen=True, slots=True)
class _CompiledRule:
    class_id: int
    local: RangeSet | None
    remote: RangeSet | None
    local_ports: tuple[tuple[int, int], ...]
    remote_ports: tuple[tuple[int, int], ...]
    protocols: np.ndarray | None
    exporters: RangeSet | None
    input_if: np.ndarray | None
    output_if: np.ndarray | None


def _exporter_prefix(text: str) -> str:
    return text if "/" in text else f"{text}/{32 if ':' not in text else 128}"


class Classifier:
    """Compiled form of a `Snapshot`; immutable, shareable, safe to swap whole."""

    def __init__(self, snapshot: Snapshot) -> None:
        if len(snapshot.bindings) > MAX_BINDINGS or len(snapshot.rules) > MAX_RULES:
            raise ClassifierError("snapshot exceeds the binding or rule limit")
        if snapshot.default_class < 0:
            raise ClassifierError("default class must be >= 0")
        self.default_class = snapshot.default_class
        self._compile_bindings(snapshot.bindings)
        self.rules = tuple(self._compile_rule(r) for r in snapshot.rules)

    def _compile_bindings(self, bindings: tuple[Binding, ...]) -> None:
        by_range: dict[tuple[int, int], list[Binding]] = {}
        for b in bindings:
            if not 0 < b.account < 1 << 32:
                raise ClassifierError(f"binding {b.prefix}: account {b.account} out of range")
            to = TIME_LIMIT + 1 if b.valid_to_ms is None else b.valid_to_ms
            if not 0 <= b.valid_from_ms < to <= TIME_LIMIT + 1:
                raise ClassifierError(f"binding {b.prefix}: empty or out-of-range validity")
            if len(prefix_ranges(b.prefix)) != 1:
                raise ClassifierError(f"binding {b.prefix} would cover every IPv4 address")
            by_range.setdefault(prefix_range(b.prefix), []).append(b)
        ranges = sorted(by_range)
        try:
            self.segments = RangeSet(ranges)
        except ClassifierError as exc:
            raise ClassifierError("binding prefixes overlap (nested or duplicate ranges)") from exc
        keys, to_ms, accounts = [], [], []
        for seg, rng in enumerate(ranges):
            windows = sorted(by_range[rng], key=lambda b: b.valid_from_ms)
            for prev, nxt in zip(windows, windows[1:]):
                if prev.valid_to_ms is None or prev.valid_to_ms > nxt.valid_from_ms:
                    raise ClassifierError(f"bindings of {nxt.prefix} overlap in time")
            for b in windows:
                keys.append((seg << TIME_BITS) | b.valid_from_ms)
                to_ms.append(TIME_LIMIT + 1 if b.valid_to_ms is None else b.valid_to_ms)
                accounts.append(b.account)
        self._keys = np.array(keys, dtype=_U64)
        self._to_ms = np.array(to_ms, dtype=np.int64)
        self._accounts = np.array(accounts, dtype=np.int64)

    @staticmethod
    def _compile_rule(rule: TrafficRule) -> _CompiledRule:
        if rule.class_id <= 0 and not rule.skip:
            raise ClassifierError("class ids are positive")
        for lo, hi in rule.local_ports + rule.remote_ports:
            if not 0 <= lo <= hi <= 65535:
                raise ClassifierError(f"bad port range {lo}-{hi}")
        if len(rule.local_ports) > 64 or len(rule.remote_ports) > 64:
            raise ClassifierError("at most 64 port ranges per rule")

        def ints(values: tuple[int, ...]) -> np.ndarray | None:
            return np.array(values, dtype=np.int64) if values else None

        return _CompiledRule(
            SKIP if rule.skip else rule.class_id,
            RangeSet.union(rule.local) if rule.local else None,
            RangeSet.union(rule.remote) if rule.remote else None,
            rule.local_ports,
            rule.remote_ports,
            ints(rule.protocols),
            RangeSet.union(tuple(_exporter_prefix(e) for e in rule.exporters)) if rule.exporters else None,
            ints(rule.input_if),
            ints(rule.output_if),
        )

    def accounts(self, hi: np.ndarray, lo: np.ndarray, at_ms: np.ndarray) -> np.ndarray:
        """Account bound to each address at each time (0 = none)."""
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
        if len(flow) > MAX_LEGS:
            raise ClassifierError(f"batch of {len(flow)} legs exceeds {MAX_LEGS}")
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
        """First matching rule sets `klass` of each undecided leg.

        A leg's columns are gathered from `flows` only when a rule asks for
        them (gathering whole structured rows copied every field of every flow).
        """
        columns: dict[str, np.ndarray] = {}

        def col(name: str) -> np.ndarray:
            got = columns.get(name)
            if got is None:
                got = columns[name] = flows[name].take(flow)
            return got

        def side(local: bool, src: str, dst: str) -> np.ndarray:
            key = f"{'local' if local else 'remote'}:{src}"
            got = columns.get(key)
            if got is None:
                a, b = (src, dst) if local else (dst, src)
                got = columns[key] = np.where(outbound, col(a), col(b))
            return got

        for rule in self.rules:
            if not undecided.any():
                break
            m = undecided.copy()
            if rule.protocols is not None:
                m &= np.isin(col("proto"), rule.protocols)
            if rule.input_if is not None:
                m &= np.isin(col("input_if"), rule.input_if)
            if rule.output_if is not None:
                m &= np.isin(col("output_if"), rule.output_if)
            if rule.local_ports:
                m &= _in_ports(side(True, "src_port", "dst_port"), rule.local_ports)
            if rule.remote_ports:
                m &= _in_ports(side(False, "src_port", "dst_port"), rule.remote_ports)
            if rule.local is not None:
                m &= rule.local.contains(side(True, "src_hi", "dst_hi"), side(True, "src_lo", "dst_lo"))
            if rule.remote is not None:
                m &= rule.remote.contains(side(False, "src_hi", "dst_hi"), side(False, "src_lo", "dst_lo"))
            if rule.exporters is not None:
                m &= rule.exporters.contains(col("exporter_hi"), col("exporter_lo"))
            klass[m] = rule.class_id
            undecided &= ~m


def _in_ports(ports: np.ndarray, ranges: tuple[tuple[int, int], ...]) -> np.ndarray:
    m = np.zeros(len(ports), dtype=bool)
    for lo, hi in ranges:
        m |= (ports >= lo) & (ports <= hi)
    return m


@dataclass(frozen=True, slots=True)
class Aggregates:
    """Exact sums per (account, class, direction, hour start)."""

    account: np.ndarray
    klass: np.ndarray
    direction: np.ndarray
    hour_ms: np.ndarray
    bytes: np.ndarray  # uint64
    packets: np.ndarray  # uint64
    flows: np.ndarray  # int64
    implausible: int  # legs dropped for a counter beyond MAX_FLOW_BYTES


def aggregate(
    flows: np.ndarray,
    legs: Legs,
    hour_ms: int = HOUR_MS,
    apply_sampling: bool = True,
    include_skipped: bool = False,
) -> Aggregates:
    """Sum bytes/packets of classified legs per (account, class, direction, bucket).

    Buckets start at multiples of `hour_ms` since the epoch, by the leg's
    `at_ms`. With `apply_sampling`, counters are multiplied by the flow's
    1-in-N interval (an estimate of the real traffic). SKIP legs are left
    out unless `include_skipped`.
    """
    keep = np.ones(len(legs.flow), dtype=bool) if include_skipped else legs.klass != SKIP
    index = legs.flow[keep]
    # gather the three columns needed, not whole structured rows
    raw_bytes, raw_packets = flows["bytes"].take(index), flows["packets"].take(index)
    scale = flows["sampling"].take(index).astype(_U64) if apply_sampling else np.ones(len(index), dtype=_U64)
    scale = np.maximum(scale, _U64(1))
    with np.errstate(over="ignore"):
        nbytes = raw_bytes * scale
        npackets = raw_packets * scale
    sane = (raw_bytes <= _U64(MAX_FLOW_BYTES)) & (scale <= _U64(1 << 32))
    sane &= (nbytes <= _U64(MAX_FLOW_BYTES)) & (npackets <= _U64(MAX_FLOW_BYTES))
    implausible = int((~sane).sum())
    account = legs.account[keep][sane]
    klass = legs.klass[keep][sane].astype(np.int64)
    direction = legs.direction[keep][sane].astype(np.int64)
    bucket = legs.at_ms[keep][sane] // hour_ms
    nbytes, npackets = nbytes[sane], npackets[sane]
    hours, hour_idx = np.unique(bucket, return_inverse=True)
    if len(hours) >= 1 << 15:
        raise ClassifierError("a batch spans more than 32767 buckets")
    key = (((account.astype(_U64) << _U64(16)) | (klass + 1).astype(_U64)) << _U64(1)) | direction.astype(_U64)
    key = (key << _U64(15)) | hour_idx.astype(_U64)
    order = np.argsort(key, kind="stable")
    key = key[order]
    if not len(key):
        empty = np.zeros(0, dtype=np.int64)
        return Aggregates(empty, empty, empty, empty, empty.astype(_U64), empty.astype(_U64), empty, implausible)
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    first = order[starts]
    return Aggregates(
        account=account[first],
        klass=klass[first],
        direction=direction[first],
        hour_ms=hours[hour_idx[first]] * hour_ms,
        bytes=np.add.reduceat(nbytes[order], starts),
        packets=np.add.reduceat(npackets[order], starts),
        flows=np.diff(np.r_[starts, len(key)]),
        implausible=implausible,
    )
