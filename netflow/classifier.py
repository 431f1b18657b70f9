"""Classification: which account a flow belongs to, and which traffic class.

Theory of operation. A `Snapshot` (IP bindings and ordered traffic-class
rules, as the core loaded them) compiles once into sorted interval arrays and
lookup tables; then every batch is classified with vectorized gathers and
`np.searchsorted`, never a per-flow loop.

Addresses are the 128-bit values of `flows.py` (v4 mapped into v6), so a
prefix is an interval [start, end]. `RangeSet` finds the interval that holds
each address by binary search: addresses with hi == 0 (v4-mapped among them)
search the low halves (uint64), others the high halves (uint64), and only
where several ranges start in the address's /64 does it compare 16-byte
big-endian keys (numpy's fixed-width bytes compare as unsigned, which is
numeric order). The binding segments also get a DIR-16-16 direct table for
the v4-mapped block (`_V4Table`): the upper 16 bits of the v4 address pick
"no segment", "one segment for the whole /16" or a block of 65536 cells, one
per lower 16 bits; two gathers instead of a binary search. At most
`V4_TABLE_BLOCKS` /16s get a block (64 MB); addresses in the others, and
every address outside the v4-mapped block, take the binary search.

Bindings: an address range belongs to at most one account at any instant.
Distinct binding prefixes must be disjoint (no nesting: a /32 inside a bound
/24 is refused, since "which one wins" is a policy the core must decide
before it gets here), and the time windows [valid_from, valid_to) of
bindings of the same prefix must not overlap. Lookup: range -> segment. A
segment holds its latest window (a static binding, or the current RADIUS
session) and its account directly; only a flow older than that window, in a
segment that has earlier windows, takes one more `searchsorted` over the keys
`segment << 42 | valid_from_ms` of those. The flow's `first_ms` picks the
binding in force.

Direction: a flow whose source is bound is outbound for that account; whose
destination is bound, inbound. A flow between two bound addresses is two
legs, one per account; a flow with neither is one leg of account 0. Rules
see each leg's local (account) side and remote side; the first matching rule
gives the class, a matching `skip` rule gives SKIP (not charged), and no
match gives the default class.

`aggregate` sums the legs per (account, class, direction, hour) exactly, in
uint64 (never float), into rows ordered by that key. Each leg gets a group
number whose bit fields are the account (or its rank) and the ranks of the
class and hour among those present. A batch has few groups (hundreds of
accounts over an hour or two): each possible group gets a cell and
`np.add.at` sums into it. When they are many, `group << position bits |
position` is sorted (a plain sort is several times cheaper than an argsort)
and runs are summed with `np.add.reduceat`. Values beyond what the group
number packs fall back to a stable argsort of one packed key; all three give
the same rows.

Size: over 600 lines on purpose. The compiled snapshot (`RangeSet`,
`_V4Table`, `Classifier`) and `aggregate` share the leg layout (`Legs`, SKIP,
the 42-bit time keys) and the vectorized idioms this docstring describes;
read together, the theory above can be checked against the code in one
place. `aggregate` is the first candidate for a module of its own once the
classifier's tests (being rewritten with independent oracles) have settled.
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


def _le128(a_hi: np.ndarray, a_lo: np.ndarray, b_hi: np.ndarray, b_lo: np.ndarray) -> np.ndarray:
    """a <= b for 128-bit values split into uint64 halves, elementwise."""
    le: np.ndarray = (a_hi < b_hi) | ((a_hi == b_hi) & (a_lo <= b_lo))
    return le


def _s16(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    keys = np.empty(len(hi), dtype=[("h", ">u8"), ("l", ">u8")])
    keys["h"] = hi
    keys["l"] = lo
    return keys.view("S16")


class RangeSet:
    """Disjoint inclusive 128-bit intervals, each tagged with a value.

    Held as numpy columns only (about 40 bytes per range, plus the direct
    table), so a million binding segments cost tens of MB, not Python ints.
    `direct=True` adds a `_V4Table` for the v4-mapped block (up to ~64 MB:
    meant for the binding segments, not for every rule's address list).
    """

    def __init__(self, ranges: list[tuple[int, int]], values: list[int] | None = None,
                 direct: bool = False) -> None:
        self._build(np.array([s >> 64 for s, _ in ranges], dtype=_U64),
                    np.array([s & _MASK64 for s, _ in ranges], dtype=_U64),
                    np.array([e >> 64 for _, e in ranges], dtype=_U64),
                    np.array([e & _MASK64 for _, e in ranges], dtype=_U64),
                    None if values is None else np.array(values, dtype=np.int64), direct)

    @classmethod
    def from_columns(cls, start_hi: np.ndarray, start_lo: np.ndarray, end_hi: np.ndarray, end_lo: np.ndarray,
                     values: np.ndarray | None = None, direct: bool = False) -> RangeSet:
        """The same set from uint64 columns of the 128-bit starts and inclusive ends (any order)."""
        self = cls.__new__(cls)
        self._build(start_hi.astype(_U64, copy=False), start_lo.astype(_U64, copy=False),
                    end_hi.astype(_U64, copy=False), end_lo.astype(_U64, copy=False), values, direct)
        return self

    def _build(self, start_hi: np.ndarray, start_lo: np.ndarray, end_hi: np.ndarray, end_lo: np.ndarray,
               values: np.ndarray | None, direct: bool) -> None:
        order = np.lexsort((end_lo, end_hi, start_lo, start_hi))  # (start, end) order, as sorted tuples
        self._n = n = len(order)
        self._start_hi, self._start_lo = start_hi.take(order), start_lo.take(order)
        self._end_hi, self._end_lo = end_hi.take(order), end_lo.take(order)
        self.values = order.astype(np.int64) if values is None else values.astype(np.int64).take(order)
        if n > 1 and _le128(self._start_hi[1:], self._start_lo[1:], self._end_hi[:-1], self._end_lo[:-1]).any():
            raise ClassifierError("ranges overlap")
        # index len(ranges) is "no range": its value is -1
        self._values = np.append(self.values, np.int64(-1))
        # ranges that start in the same /64 (above the v4-mapped one) need 16-byte keys to tell apart
        above = self._start_hi[self._start_hi != 0]
        self._shared_hi = bool((above[1:] == above[:-1]).any())
        if self._shared_hi:
            self._start16 = _s16(self._start_hi, self._start_lo)
            self._end16 = _s16(self._end_hi, self._end_lo)
        # the part of each range inside hi == 0, where v4-mapped addresses live
        self._low_index = np.flatnonzero(self._start_hi == 0)
        self._low_start = self._start_lo.take(self._low_index)
        self._low_end = np.where(self._end_hi.take(self._low_index) == 0, self._end_lo.take(self._low_index),
                                 _U64(_MASK64))
        self._v4 = _V4Table.build(self._low_start, self._low_end, self._low_index, n) if direct else None

    def __len__(self) -> int:
        return self._n

    def nbytes(self) -> int:
        """Bytes of numpy memory this set holds (the direct table included)."""
        arrays = [self._start_hi, self._start_lo, self._end_hi, self._end_lo, self.values, self._values,
                  self._low_index, self._low_start, self._low_end]
        if self._shared_hi:
            arrays += [self._start16, self._end16]
        if self._v4 is not None:
            arrays += [self._v4.top, self._v4.cells]
        return sum(a.nbytes for a in arrays)

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

    def index(self, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        """Position (in sorted order) of the range holding each address; len(ranges) if none."""
        table = self._v4
        if table is None or not len(hi):
            return self._search(hi, lo)
        lo = np.ascontiguousarray(lo)  # one strided pass over the flow records, not one per step
        found = table.lookup(lo)  # nonsense for addresses outside the v4-mapped block: redone below
        redo = (lo >> 32) != 0xFFFF
        redo |= hi != 0
        if table.searched:
            redo |= found == table.search
        if redo.any():
            at = np.flatnonzero(redo)
            found[at] = self._search(hi.take(at), lo.take(at))
        return found

    def _search(self, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        n = self._n
        out = np.full(len(hi), n, dtype=np.intp)
        if not n or not len(hi):
            return out
        low = hi == 0
        if low.any() and len(self._low_start):
            q = lo[low]
            k = np.searchsorted(self._low_start, q, side="right") - 1
            kc = np.maximum(k, 0)
            ok = (k >= 0) & (q <= self._low_end[kc])
            out[low] = np.where(ok, self._low_index.take(kc), n)
        high = np.flatnonzero(~low)
        if len(high):
            out[high] = self._search_high(hi.take(high), lo.take(high))
        return out

    def _search_high(self, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        """`_search` for addresses with hi != 0: a uint64 search on the high halves.

        The candidate is the last range starting at or before the address: the
        last one whose start's high half is <= hi, or the one before it when
        that one starts later in the address's own /64.
        """
        n = self._n
        r = np.searchsorted(self._start_hi, hi, side="right")
        last = np.maximum(r - 1, 0)
        same = self._start_hi.take(last) == hi
        k = r - 1 - (same & (lo < self._start_lo.take(last)))
        kc = np.maximum(k, 0)
        end_hi = self._end_hi.take(kc)
        ok = (k >= 0) & ((hi < end_hi) | ((hi == end_hi) & (lo <= self._end_lo.take(kc))))
        out = np.where(ok, kc, n)
        if self._shared_hi:
            twice = np.flatnonzero(same & (r >= 2) & (self._start_hi.take(np.maximum(r - 2, 0)) == hi))
            if len(twice):
                q16 = _s16(hi.take(twice), lo.take(twice))
                k = np.searchsorted(self._start16, q16, side="right") - 1
                kc = np.maximum(k, 0)
                out[twice] = np.where((k >= 0) & (q16 <= self._end16[kc]), kc, n)
        return out

    def lookup(self, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        """Value of the range holding each address, or -1."""
        return self._values.take(self.index(hi, lo))

    def contains(self, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        return self.index(hi, lo) < self._n


V4_TABLE_BLOCKS = 256  # /16s with a block of their own: 256 x 65536 int32 cells = 64 MB at most


class _V4Table:
    """DIR-16-16 direct lookup of the ranges that meet the v4-mapped block.

    `top[a >> 16]` packs `cell_base << 16 | mask` for each /16 of the v4
    address a; the answer is `cells[cell_base + (a & mask)]`. mask is 0 for a
    /16 with one answer throughout (no range, one range covering it all, or
    `search`), 0xFFFF for a /16 with a block of its own. A cell holds a range
    position, `none` (no range) or `search` (this /16 did not get a block:
    ask the binary search).
    """

    def __init__(self, top: np.ndarray, cells: np.ndarray, search: int, searched: bool) -> None:
        self.top, self.cells, self.search, self.searched = top, cells, search, searched

    @classmethod
    def build(cls, low_start: np.ndarray, low_end: np.ndarray, low_index: np.ndarray, n: int) -> _V4Table | None:
        """Table of the ranges (sorted positions `low_index`, of n) that meet the block; None if none do."""
        assert n + 1 < 1 << 31
        none, search = n, n + 1
        meets = (low_end >= _U64(_MAPPED_START)) & (low_start <= _U64(_MAPPED_END))
        if not meets.any():
            return None
        # the pieces of ranges inside the block, as 32-bit v4 offsets [first, last]
        first = (np.maximum(low_start[meets], _U64(_MAPPED_START)) - _U64(_MAPPED_START)).astype(np.int64)
        last = (np.minimum(low_end[meets], _U64(_MAPPED_END)) - _U64(_MAPPED_START)).astype(np.int64)
        which = low_index[meets]
        sixteens = np.arange(1 << 16, dtype=np.int64) << 16
        j = np.searchsorted(last, sixteens, side="left")  # first piece ending in or after each /16
        count = np.searchsorted(first, sixteens | 0xFFFF, side="right") - j  # pieces meeting each /16
        jc = np.minimum(j, len(first) - 1)
        whole = (first[jc] <= sixteens) & (last[jc] >= (sixteens | 0xFFFF))  # one piece covers it
        partial = np.flatnonzero((count > 0) & ~whole)
        if len(partial) > V4_TABLE_BLOCKS:
            busiest = np.argsort(-count[partial], kind="stable")[:V4_TABLE_BLOCKS]
            blocks = np.sort(partial[busiest])
        else:
            blocks = partial
        wholes = np.flatnonzero(whole)
        base = np.zeros(1 << 16, dtype=np.int64)  # cell 0: none
        base[partial] = 1  # cell 1: search (the blocks overwrite theirs below)
        base[wholes] = 2 + np.arange(len(wholes))
        offset = 2 + len(wholes)
        base[blocks] = offset + (np.arange(len(blocks), dtype=np.int64) << 16)
        mask = np.zeros(1 << 16, dtype=np.int64)
        mask[blocks] = 0xFFFF
        # each block's cells, painted as runs: gap (none), piece, gap, piece, ..., gap
        per = count[blocks]
        piece = np.repeat(j[blocks] - (np.cumsum(per) - per), per) + np.arange(per.sum())
        owner = np.repeat(np.arange(len(blocks), dtype=np.int64) << 16, per)
        origin = np.repeat(sixteens[blocks], per)
        run_first = owner + np.maximum(first[piece] - origin, 0)
        run_end = owner + np.minimum(last[piece] - origin, 0xFFFF) + 1
        lengths = np.empty(2 * len(piece) + 1, dtype=np.int64)
        lengths[0:-1:2] = run_first - np.r_[np.int64(0), run_end[:-1]]
        lengths[1::2] = run_end - run_first
        lengths[-1] = (len(blocks) << 16) - (run_end[-1] if len(piece) else 0)
        values = np.full(len(lengths), none, dtype=np.int32)
        values[1::2] = which[piece]
        cells = np.concatenate([
            np.array([none, search], dtype=np.int32),
            which[jc[wholes]].astype(np.int32),
            np.repeat(values, lengths),
        ])
        assert len(cells) == offset + (len(blocks) << 16)
        return cls((base << 16) | mask, cells, search, len(blocks) < len(partial))

    def lookup(self, lo: np.ndarray) -> np.ndarray:
        """Cell of each v4-mapped low half (any other value gives some in-bounds cell)."""
        a = lo.view(np.int64)
        entry = self.top.take((a >> 16) & 0xFFFF)
        cell: np.ndarray = self.cells.take((entry >> 16) + (a & entry & 0xFFFF))
        return cell


@dataclass(frozen=True, slots=True)
class Binding:
    """`prefix` belongs to `account` during [valid_from_ms, valid_to_ms)."""

    prefix: str
    account: int
    valid_from_ms: int = 0
    valid_to_ms: int | None = None  # None: until further notice


@dataclass(frozen=True, slots=True)
class BindingColumns:
    """Bindings as numpy columns: the form a large snapshot travels and compiles in.

    One row per binding, no Python object per row (a `Binding` with its
    prefix string costs ~200 bytes; a row here 48). Addresses are 128-bit
    flow-space values split into uint64 halves, `end` inclusive;
    `valid_to_ms` is `TIME_LIMIT + 1` for "until further notice".
    """

    start_hi: np.ndarray
    start_lo: np.ndarray
    end_hi: np.ndarray
    end_lo: np.ndarray
    account: np.ndarray
    valid_from_ms: np.ndarray
    valid_to_ms: np.ndarray

    def __len__(self) -> int:
        return len(self.account)

    @classmethod
    def from_bindings(cls, bindings: tuple[Binding, ...]) -> BindingColumns:
        ranges = []
        for b in bindings:
            if len(prefix_ranges(b.prefix)) != 1:
                raise ClassifierError(f"binding {b.prefix} would cover every IPv4 address")
            ranges.append(prefix_range(b.prefix))

        def u64(values: list[int]) -> np.ndarray:
            return np.array(values, dtype=_U64)

        return cls(u64([s >> 64 for s, _ in ranges]), u64([s & _MASK64 for s, _ in ranges]),
                   u64([e >> 64 for _, e in ranges]), u64([e & _MASK64 for _, e in ranges]),
                   np.array([b.account for b in bindings], dtype=np.int64),
                   np.array([b.valid_from_ms for b in bindings], dtype=np.int64),
                   np.array([TIME_LIMIT + 1 if b.valid_to_ms is None else b.valid_to_ms for b in bindings],
                            dtype=np.int64))

    @classmethod
    def from_prefixes(cls, address: np.ndarray, bits: np.ndarray, account: np.ndarray,
                      valid_from_ms: np.ndarray, valid_to_ms: np.ndarray) -> BindingColumns:
        """Rows of (16-byte big-endian flow-space network address, prefix length in flow space 0..128,
        account, from, to); a v4 /n is ::ffff:a.b.c.d/(96 + n). Host bits must be zero."""
        if address.dtype != np.dtype("S16") or not len(address) == len(bits) == len(account):
            raise ClassifierError("binding columns differ in length or type")
        if len(bits) and (int(bits.min()) < 0 or int(bits.max()) > 128):
            raise ClassifierError("binding prefix length out of 0..128")
        halves = address.view(">u8").reshape(-1, 2)
        start_hi, start_lo = halves[:, 0].astype(_U64), halves[:, 1].astype(_U64)
        host = 128 - bits.astype(np.int64)  # host bits of each prefix
        ones = _U64(_MASK64)
        # 1 << 64 is not a uint64: masks of 64 host bits or more are all-ones by np.where
        lo_mask = np.where(host >= 64, ones, (_U64(1) << np.minimum(host, 63).astype(_U64)) - _U64(1))
        hi_mask = np.where(host >= 128, ones, np.where(host > 64, (_U64(1) << np.clip(host - 64, 0, 63).astype(_U64))
                                                        - _U64(1), _U64(0)))
        if ((start_hi & hi_mask) | (start_lo & lo_mask)).any():
            raise ClassifierError("a binding prefix has host bits set")
        return cls(start_hi, start_lo, start_hi | hi_mask, start_lo | lo_mask, account.astype(np.int64),
                   valid_from_ms.astype(np.int64), valid_to_ms.astype(np.int64))

    @classmethod
    def concat(cls, parts: list[BindingColumns]) -> BindingColumns:
        if not parts:
            empty, none = np.zeros(0, dtype=_U64), np.zeros(0, dtype=np.int64)
            return cls(empty, empty, empty, empty, none, none, none)
        return cls(*(np.concatenate([getattr(p, name) for p in parts]) for name in cls.__slots__))

    def prefix(self, k: int) -> str:
        """Row k's prefix as text (for error messages)."""
        start = int(self.start_hi[k]) << 64 | int(self.start_lo[k])
        end = int(self.end_hi[k]) << 64 | int(self.end_lo[k])
        size = end - start + 1
        bits = 128 - (size.bit_length() - 1)
        if start & ~0xFFFF_FFFF == V4_MAPPED and bits >= 96:
            return f"{ipaddress.IPv4Address(start & 0xFFFF_FFFF)}/{bits - 96}"
        return f"{ipaddress.IPv6Address(start)}/{bits}"

    def nbytes(self) -> int:
        return sum(getattr(self, name).nbytes for name in self.__slots__)


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
    bindings: tuple[Binding, ...] | BindingColumns
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
        bindings = snapshot.bindings
        self._compile_bindings(bindings if isinstance(bindings, BindingColumns)
                               else BindingColumns.from_bindings(bindings))
        self.rules = tuple(self._compile_rule(r) for r in snapshot.rules)

    def _compile_bindings(self, cols: BindingColumns) -> None:
        """Segments (distinct prefixes) with their latest window, and the earlier windows by key.

        Vectorized: one lexsort of the rows by (range, valid_from), so a
        million bindings compile in about a second with no per-row Python.
        """
        n = len(cols)
        account, since, until = cols.account, cols.valid_from_ms, cols.valid_to_ms
        bad = np.flatnonzero((account <= 0) | (account >= 1 << 32))
        if len(bad):
            k = int(bad[0])
            raise ClassifierError(f"binding {cols.prefix(k)}: account {int(account[k])} out of range")
        bad = np.flatnonzero((since < 0) | (since >= until) | (until > TIME_LIMIT + 1))
        if len(bad):
            raise ClassifierError(f"binding {cols.prefix(int(bad[0]))}: empty or out-of-range validity")
        covers = ((cols.start_hi == 0) & (cols.start_lo <= _U64(_MAPPED_START))
                  & ((cols.end_hi > 0) | (cols.end_lo >= _U64(_MAPPED_END))))
        covers &= (cols.start_hi != 0) | (cols.start_lo != _U64(_MAPPED_START)) | (cols.end_hi != 0) \
            | (cols.end_lo != _U64(_MAPPED_END))
        if covers.any():
            raise ClassifierError(f"binding {cols.prefix(int(np.flatnonzero(covers)[0]))} would cover every IPv4 address")
        order = np.lexsort((since, cols.end_lo, cols.end_hi, cols.start_lo, cols.start_hi))
        s_hi, s_lo, e_hi, e_lo = (x.take(order) for x in (cols.start_hi, cols.start_lo, cols.end_hi, cols.end_lo))
        account, since, until = account.take(order), since.take(order), until.take(order)
        new = np.ones(n, dtype=bool)  # first row of a segment (a distinct range)
        new[1:] = (s_hi[1:] != s_hi[:-1]) | (s_lo[1:] != s_lo[:-1]) | (e_hi[1:] != e_hi[:-1]) | (e_lo[1:] != e_lo[:-1])
        clash = np.flatnonzero(~new[1:] & (until[:-1] > since[1:]))
        if len(clash):
            raise ClassifierError(f"bindings of {cols.prefix(int(order[clash[0] + 1]))} overlap in time")
        first = np.flatnonzero(new)
        try:
            self.segments = RangeSet.from_columns(s_hi.take(first), s_lo.take(first), e_hi.take(first),
                                                  e_lo.take(first), direct=True)
        except ClassifierError as exc:
            raise ClassifierError("binding prefixes overlap (nested or duplicate ranges)") from exc
        assert (self.segments.values == np.arange(len(first))).all()  # sorted ranges: position = segment
        # per segment, plus a last entry for "no segment" (account 0, an empty window): the
        # latest window, which holds nearly every live flow; earlier windows of the same
        # segment (an address that had other sessions lately) are searched by key
        last = np.append(first[1:] - 1, n - 1).astype(np.intp) if n else first
        self._seg_account = np.append(account.take(last), np.int64(0))
        self._seg_from = np.append(since.take(last), np.int64(0))
        self._seg_to = np.append(until.take(last), np.int64(0))
        self._seg_earlier = np.append(last > first, False)
        earlier = np.ones(n, dtype=bool)
        earlier[last] = False
        segment = (np.cumsum(new) - 1).astype(_U64)
        # keys ascend: rows are sorted by (segment, valid_from)
        self._keys = (segment[earlier] << _U64(TIME_BITS)) | since[earlier].astype(_U64)
        self._to_ms = until[earlier]
        self._accounts = account[earlier]
        # every binding is [0, forever): the flow time does not matter
        self._timeless = not len(self._keys) and not self._seg_from.any() \
            and bool((self._seg_to[:-1] == TIME_LIMIT + 1).all())

    def nbytes(self) -> int:
        """Bytes of numpy memory the compiled bindings hold (what grows with them)."""
        arrays = (self._seg_account, self._seg_from, self._seg_to, self._seg_earlier, self._keys, self._to_ms,
                  self._accounts)
        return self.segments.nbytes() + sum(a.nbytes for a in arrays)

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
        seg = self.segments.index(hi, lo)
        out = self._seg_account.take(seg)
        if self._timeless:
            return out
        t = np.clip(at_ms, 0, TIME_LIMIT)
        since = self._seg_from.take(seg)
        out *= (t >= since) & (t < self._seg_to.take(seg))
        if not len(self._keys):
            return out
        earlier = np.flatnonzero((t < since) & self._seg_earlier.take(seg))
        if len(earlier):
            t = t.take(earlier)
            seg64 = seg.take(earlier).astype(_U64)
            key = (seg64 << _U64(TIME_BITS)) | t.astype(_U64)
            k = np.searchsorted(self._keys, key, side="right") - 1
            kc = np.maximum(k, 0)
            ok = (k >= 0) & ((self._keys[kc] >> _U64(TIME_BITS)) == seg64) & (t < self._to_ms[kc])
            out[earlier] = np.where(ok, self._accounts.take(kc), 0)
        return out

    def classify(self, flows: np.ndarray, time_field: str = "first_ms") -> Legs:
        at = np.ascontiguousarray(flows[time_field])
        src = self.accounts(flows["src_hi"], flows["src_lo"], at)
        dst = self.accounts(flows["dst_hi"], flows["dst_lo"], at)
        out_idx = np.flatnonzero(src > 0)
        in_idx = np.flatnonzero(dst > 0)
        none_idx = np.flatnonzero((src | dst) == 0)
        n_out, bound = len(out_idx), len(out_idx) + len(in_idx)
        flow = np.concatenate([out_idx, in_idx, none_idx])
        if len(flow) > MAX_LEGS:
            raise ClassifierError(f"batch of {len(flow)} legs exceeds {MAX_LEGS}")
        account = np.zeros(len(flow), dtype=np.int64)
        src.take(out_idx, out=account[:n_out])
        dst.take(in_idx, out=account[n_out:bound])
        direction = np.zeros(len(flow), dtype=np.uint8)
        direction[:n_out] = OUTBOUND
        klass = np.zeros(len(flow), dtype=np.int32)
        klass[:bound] = self.default_class
        if self.rules and bound:
            undecided = np.zeros(len(flow), dtype=bool)
            undecided[:bound] = True
            self._apply_rules(flows, flow, direction.view(bool), klass, undecided)
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
            np.copyto(klass, rule.class_id, where=m)
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
    out unless `include_skipped`. Rows come out ordered by (account, class,
    direction, bucket).
    """
    index, account, klass, direction, at_ms = legs.flow, legs.account, legs.klass, legs.direction, legs.at_ms
    if not include_skipped:
        keep = klass != SKIP
        if not keep.all():
            index, account, klass, direction, at_ms = (x[keep] for x in (index, account, klass, direction, at_ms))
    # gather the three columns needed, not whole structured rows
    raw_bytes, raw_packets = flows["bytes"].take(index), flows["packets"].take(index)
    if apply_sampling:
        # `sampling` is a uint32 column: the scale never exceeds 2**32
        scale = np.maximum(flows["sampling"].take(index), 1).astype(_U64)
        # checked before multiplying: a product past 2**64 would wrap to a small, "sane" number
        limit = _U64(MAX_FLOW_BYTES) // scale
        sane = (raw_bytes <= limit) & (raw_packets <= limit)
        with np.errstate(over="ignore"):  # the insane rows may wrap; they are dropped below
            nbytes = raw_bytes * scale
            npackets = raw_packets * scale
    else:
        nbytes, npackets = raw_bytes, raw_packets
        sane = (nbytes <= _U64(MAX_FLOW_BYTES)) & (npackets <= _U64(MAX_FLOW_BYTES))
    implausible = len(sane) - int(np.count_nonzero(sane))
    if implausible:
        account, klass, direction, at_ms, nbytes, npackets = (
            x[sane] for x in (account, klass, direction, at_ms, nbytes, npackets))
    if not len(account):
        empty = np.zeros(0, dtype=np.int64)
        return Aggregates(empty, empty, empty, empty, empty.astype(_U64), empty.astype(_U64), empty, implausible)
    bucket = at_ms // hour_ms
    sums = _group_sums(account, klass, direction, bucket, nbytes, npackets)
    if sums is None:
        sums = _sum_sorted(account, klass, direction, bucket, nbytes, npackets)
    acc, cls, dirs, hours, sums_b, sums_p, counts = sums
    assert int(counts.sum()) == len(account) and int(sums_b.sum()) == int(nbytes.sum())
    return Aggregates(acc, cls, dirs, hours * hour_ms, sums_b, sums_p, counts, implausible)


_Sums = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]
_DENSE_ACCOUNTS = 1 << 22  # account ids below this are renumbered through a presence array (4 MB)
_DENSE_CELLS = 1 << 20  # at most this many group cells (24 MB), and 4 per leg (+ 65536)


def _renumber(values: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct values, each value's rank among them) for values in [0, size)."""
    seen = np.zeros(size, dtype=bool)
    seen[values] = True
    distinct = np.flatnonzero(seen)
    rank = np.empty(size, dtype=np.intp)
    rank[distinct] = np.arange(len(distinct))
    return distinct, rank.take(values)


def _group_sums(account: np.ndarray, klass: np.ndarray, direction: np.ndarray, bucket: np.ndarray,
                nbytes: np.ndarray, npackets: np.ndarray) -> _Sums | None:
    """Sums per group number, ascending; None when a column's range does not fit.

    The group number orders legs by (account, class, direction, bucket): bit
    fields of the account id (or its rank), the rank of the class and of the
    bucket among those present, and the direction.
    When the possible groups are few (a batch holds a few hundred accounts over
    an hour or two), each gets a uint64 cell and `np.add.at` sums into it;
    otherwise `(group << position bits) | position` is sorted (a plain sort,
    several times cheaper than an argsort) and runs are summed with
    `np.add.reduceat`. Each summand is at most MAX_FLOW_BYTES = 2**40 and a
    batch has at most MAX_LEGS = 2**23 legs, so no uint64 sum can wrap.
    """
    n = len(account)
    low = int(bucket.min())
    span = int(bucket.max()) - low + 1
    amax = int(account.max())
    if (int(account.min()) < 0 or int(klass.min()) < SKIP or int(klass.max()) >= 0xFFFF
            or int(direction.max()) > 1 or span >= 1 << 15):
        return None  # outside the ranges `_sum_sorted` packs without collisions: it decides
    classes, cls = _renumber(klass.astype(np.intp) - SKIP, int(klass.max()) - SKIP + 1)
    hours, hour = _renumber(bucket - low, span)
    hour_bits = (len(hours) - 1).bit_length()
    tail_bits = (len(classes) - 1).bit_length() + 1 + hour_bits  # class rank, direction, hour rank
    accounts, acc = _renumber(account, amax + 1) if amax < _DENSE_ACCOUNTS else (None, account)
    size = (amax + 1 if accounts is None else len(accounts)) << tail_bits
    shift = n.bit_length()  # bits of a leg's position
    dense = accounts is not None and size <= min(4 * n + (1 << 16), _DENSE_CELLS)
    if not dense and size > 1 << (63 - shift):
        return None
    group = (acc << tail_bits) | (cls << (hour_bits + 1)) | (direction.astype(np.intp) << hour_bits) | hour
    if dense:
        counts = np.bincount(group, minlength=size)
        present = np.flatnonzero(counts)
        sums_b = np.zeros(size, dtype=_U64)
        np.add.at(sums_b, group, nbytes)
        sums_p = np.zeros(size, dtype=_U64)
        np.add.at(sums_p, group, npackets)
        counts, sums_b, sums_p = counts.take(present), sums_b.take(present), sums_p.take(present)
    else:
        packed = np.sort((group << shift) | np.arange(n))
        order = packed & ((1 << shift) - 1)
        group = packed >> shift
        starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
        present = group.take(starts)
        sums_b = np.add.reduceat(nbytes.take(order), starts)
        sums_p = np.add.reduceat(npackets.take(order), starts)
        counts = np.diff(np.r_[starts, n])
    a = present >> tail_bits
    k = (present & ((1 << tail_bits) - 1)) >> (hour_bits + 1)
    return (a if accounts is None else accounts.take(a), classes.take(k) + SKIP, (present >> hour_bits) & 1,
            hours.take(present & ((1 << hour_bits) - 1)) + low, sums_b, sums_p, counts)


def _sum_sorted(account: np.ndarray, klass: np.ndarray, direction: np.ndarray, bucket: np.ndarray,
                nbytes: np.ndarray, npackets: np.ndarray) -> _Sums:
    """Sums by a lexicographic sort of the four key columns: any value range, several times slower.

    No packed key, so nothing can collide: class ids of any size, and a batch
    whose flows claim thousands of different hours (a broken exporter clock)
    is summed like any other instead of stopping the worker.
    """
    klass = klass.astype(np.int64)
    direction = direction.astype(np.int64)
    order = np.lexsort((bucket, direction, klass, account))
    columns = [c.take(order) for c in (account, klass, direction, bucket)]
    change = np.zeros(len(order), dtype=bool)
    change[0] = True
    for c in columns:
        change[1:] |= c[1:] != c[:-1]
    starts = np.flatnonzero(change)
    acc, cls, dirs, hours = (c.take(starts) for c in columns)
    return (acc, cls, dirs, hours, np.add.reduceat(nbytes.take(order), starts),
            np.add.reduceat(npackets.take(order), starts), np.diff(np.r_[starts, len(order)]))
