"""Batch decoding: many datagrams of any version in, one flow array out.

Theory of operation: the worker hands over a batch of datagrams exactly as
its journal stored them, as `Packets` (one payload buffer, per-packet
arrays). Versions, lengths and header fields are read for the whole batch at
once with numpy (gathers at the packets' start offsets), so the common
packets never become Python objects:

* **v5**: headers are validated and decoded in bulk, the records of every
  packet are joined and decoded with one `np.frombuffer` (`v5.py`).
* **v9 / IPFIX fast path**: a packet that is exactly one header and one data
  set (the steady state of every exporter between template refreshes) is
  recognised from its header fields alone. Such packets are decoded per
  (exporter, domain) *run*: between two packets of the domain that change
  its state (templates, options data), the template of each set id is looked
  up once and the records of the whole run are handed to the
  `RecordCollector` in one `add_many`.
* **slow path**: every other v9/IPFIX packet (templates, options, several
  sets, variable-length fields, anything malformed) is walked in Python by
  `v9.walk_v9` / `ipfix.walk_ipfix`, in receive order within its domain.

Because templates, sampling state and sequence numbers belong to one
(exporter, domain), processing each domain's packets in order, with the
state-changing packets as barriers, decodes exactly what a packet-by-packet
walk would. Sequence numbers of every packet of a stream are checked in
order at the end (`SequenceTracker.observe_many`).

A bad packet never spoils the batch: it is listed in
`DecodeResult.malformed` and contributes nothing. Data sets whose template
is unknown are listed in `DecodeResult.pending`; `decode_pending` decodes
exactly those sets later, so nothing is lost and nothing counted twice.

Output order: v5 flows in packet order, then v9/IPFIX flows grouped by
template. Nothing downstream depends on order.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from netflow import ipfix, v5, v9
from netflow.errors import DecodeError
from netflow.flows import (
    EXPORTER_KEYS,
    FLOW_DTYPE,
    Datagram,
    DecodeResult,
    Malformed,
    Packets,
    Pending,
    SequenceGap,
)
from netflow.templates import RecordCollector, SequenceTracker, TemplateCache

MAX_DATAGRAM = 65535
_UNSEEN, _RESTART = -2, -1  # sequence advance markers: packet not observed / count unknown


def decode_batch(
    datagrams: Iterable[Datagram],
    cache: TemplateCache,
    tracker: SequenceTracker | None,
    now: float,
) -> DecodeResult:
    """`decode_packets` over `Datagram` objects (tests, tools)."""
    return decode_packets(Packets.from_datagrams(datagrams), cache, tracker, now)


def decode_packets(
    packets: Packets,
    cache: TemplateCache,
    tracker: SequenceTracker | None,
    now: float,
) -> DecodeResult:
    """Decode a batch; `now` drives template refresh (same clock as `cache.expire`)."""
    n = len(packets)
    malformed: list[Malformed] = []
    pending: list[Pending] = []
    gaps: list[SequenceGap] = []
    parts: list[np.ndarray] = []
    if n == 0:
        return DecodeResult(np.zeros(0, dtype=FLOW_DTYPE), 0, (), (), 0, ())
    u8 = np.frombuffer(packets.data, dtype=np.uint8)
    starts, lengths = packets.starts, packets.lengths
    sized = (lengths >= 2) & (lengths <= MAX_DATAGRAM)
    version = np.zeros(n, dtype=np.int64)
    at = starts[sized]
    version[sized] = (u8[at].astype(np.int64) << 8) | u8[at + 1]
    malformed.extend(Malformed(int(k), f"datagram of {int(lengths[k])} bytes") for k in np.flatnonzero(~sized))
    known = sized & ((version == 5) | (version == 9) | (version == 10))
    malformed.extend(Malformed(int(k), f"unsupported NetFlow version {int(version[k])}")
                     for k in np.flatnonzero(sized & ~known))
    five = np.flatnonzero(known & (version == 5))
    if len(five):
        parts.append(_v5(packets, five, tracker, malformed, gaps))
    templated = np.flatnonzero(known & (version != 5))
    missing_sets = 0
    if len(templated):
        walk = _Templated(packets, u8, templated, version[templated], cache, now)
        walk.run()
        malformed.extend(walk.malformed)
        pending.extend(sorted(walk.pending, key=lambda p: p.index))
        missing_sets = walk.missing_sets
        if tracker is not None:
            gaps.extend(walk.sequences(tracker))
        parts.extend(walk.collector.finish())
    malformed.sort(key=lambda m: m.index)
    flows = np.concatenate(parts) if len(parts) > 1 else parts[0] if parts else np.zeros(0, dtype=FLOW_DTYPE)
    return DecodeResult(flows, n, tuple(malformed), tuple(pending), missing_sets, tuple(gaps))


def _exporter_pairs(packets: Packets) -> np.ndarray:
    return np.array([EXPORTER_KEYS.get(name) for name in packets.exporters], dtype=np.uint64).reshape(-1, 2)


def _v5(
    packets: Packets,
    positions: np.ndarray,
    tracker: SequenceTracker | None,
    malformed: list[Malformed],
    gaps: list[SequenceGap],
) -> np.ndarray:
    pairs = _exporter_pairs(packets)
    ids = packets.exporter_no[positions]
    batch = v5.decode_v5_packets(packets.data, packets.starts[positions], packets.lengths[positions],
                                 pairs[ids, 0], pairs[ids, 1])
    malformed.extend(Malformed(int(positions[k]), reason) for k, reason in batch.bad)
    if tracker is not None and len(batch.headers):
        h = batch.headers
        engine = (h["engine_type"].astype(np.int64) << 8) | h["engine_id"]
        streams, which = np.unique((ids[batch.packet_positions] << 16) | engine, return_inverse=True)
        for k, stream in enumerate(streams.tolist()):
            mask = which == k
            gaps.extend(tracker.observe_many(
                packets.exporters[stream >> 16], stream & 0xFFFF, 5, h["sequence"][mask], h["count"][mask]))
    return batch.flows


class _Recorder:
    """Stands in for the `SequenceTracker` while a packet is walked: notes what it saw."""

    __slots__ = ("seen",)

    def __init__(self) -> None:
        self.seen: tuple[int, int | None] | None = None

    def observe(self, exporter: str, domain: int, version: int, sequence: int,
                advance: int | None) -> SequenceGap | None:
        self.seen = (sequence, advance)
        return None


class _Templated:
    """The v9/IPFIX packets of one batch: header fields in bulk, then runs per domain."""

    def __init__(self, packets: Packets, u8: np.ndarray, positions: np.ndarray, version: np.ndarray,
                 cache: TemplateCache, now: float) -> None:
        self.packets, self.cache, self.now = packets, cache, now
        self.positions = positions
        self.version = version
        self.collector = RecordCollector()
        self.malformed: list[Malformed] = []
        self.pending: list[Pending] = []
        self.missing_sets = 0
        self.view = memoryview(packets.data)
        m = len(positions)
        starts, lengths = packets.starts[positions], packets.lengths[positions]
        ipfix_ = version == 10
        self.head = np.where(ipfix_, ipfix.HEADER.size, v9.HEADER.size)
        self.starts, self.lengths = starts, lengths

        def field(offset: np.ndarray | int, width: int, where: np.ndarray) -> np.ndarray:
            out = np.zeros(m, dtype=np.int64)
            at = (starts + offset)[where]
            acc = np.zeros(len(at), dtype=np.int64)
            for k in range(width):
                acc = (acc << 8) | u8[at + k]
            out[where] = acc
            return out

        headed = lengths >= self.head
        setted = lengths >= self.head + 4
        self.domain = np.where(headed, field(np.where(ipfix_, 12, 16), 4, headed), -1)
        self.sequence = field(np.where(ipfix_, 8, 12), 4, headed)
        self.export_ms = field(np.where(ipfix_, 4, 8), 4, headed) * 1000
        self.uptime = np.where(ipfix_, 0, field(4, 4, headed))
        self.set_id = field(self.head, 2, setted)
        self.set_len = field(self.head + 2, 2, setted)
        total = np.where(ipfix_, field(2, 2, headed), lengths)
        self.fast = setted & (self.set_id >= 256) & (self.set_len >= 4) & (self.head + self.set_len == lengths) \
            & (total == lengths)
        self.advance = np.full(m, _UNSEEN, dtype=np.int64)  # sequence bookkeeping per packet

    # -- driving ---------------------------------------------------------------
    def run(self) -> None:
        exporter = self.packets.exporter_no[self.positions]
        key = exporter * (1 << 33) + (self.domain + 1)
        order = np.lexsort((np.arange(len(key)), key))  # by domain, then receive order
        cuts = np.flatnonzero(np.r_[True, key[order][1:] != key[order][:-1], True])
        for a, b in zip(cuts[:-1].tolist(), cuts[1:].tolist()):
            self._domain(order[a:b])

    def _domain(self, idx: np.ndarray) -> None:
        """One (exporter, domain)'s packets in order: fast runs between state-changing packets."""
        slow = np.flatnonzero(~self.fast[idx]).tolist()
        prev = 0
        for k in slow + [len(idx)]:
            if k > prev:
                self._run(idx[prev:k])
            if k < len(idx):
                self._walk(int(idx[k]))
            prev = k + 1

    def _run(self, run: np.ndarray) -> None:
        """Single-data-set packets of one domain with no state change between them."""
        exporter = self.packets.exporters[int(self.packets.exporter_no[self.positions[run[0]]])]
        domain = int(self.domain[run[0]])
        while len(run):
            sets = self.set_id[run]
            ids = np.unique(sets).tolist()
            templates = {sid: self.cache.get(exporter, domain, sid) for sid in ids}
            barrier = [sid for sid, t in templates.items() if t is not None and t.record.options]
            cut = len(run)
            if barrier:  # options data changes the domain's sampling: it is walked in its place
                cut = int(np.flatnonzero(np.isin(sets, barrier))[0])
            for sid in ids:
                mine = run[:cut][sets[:cut] == sid]
                if not len(mine):
                    continue
                compiled = templates[sid]
                if compiled is None:
                    self._missing(exporter, domain, mine)
                elif compiled.variable:
                    for k in mine.tolist():
                        self._walk(k)
                else:
                    self._decode(exporter, domain, compiled, mine)
            if cut < len(run):
                self._walk(int(run[cut]))
            run = run[cut + 1:]

    # -- the three outcomes ------------------------------------------------------
    def _decode(self, exporter: str, domain: int, compiled: object, idx: np.ndarray) -> None:
        size = compiled.fixed_size  # type: ignore[attr-defined]
        counts = (self.set_len[idx] - 4) // size
        is_ipfix = self.version[idx] == 10
        self.advance[idx] = np.where(is_ipfix, counts, 1)
        keep = counts > 0
        idx, counts = idx[keep], counts[keep]
        if not len(idx):
            return
        first = (self.starts[idx] + self.head[idx] + 4).tolist()
        view = self.view
        rows = b"".join([view[a:a + c * size] for a, c in zip(first, counts.tolist())])
        state = self.cache.domain(exporter, domain)
        hi, lo = EXPORTER_KEYS.get(exporter)
        n = len(idx)
        ctx = (np.full(n, hi, dtype=np.uint64), np.full(n, lo, dtype=np.uint64), np.full(n, domain, dtype=np.int64),
               self.uptime[idx], self.export_ms[idx], np.full(n, state.sampling, dtype=np.int64),
               np.full(n, state.init_ms, dtype=np.int64))
        self.collector.add_many(compiled, state, rows, counts, ctx)  # type: ignore[arg-type]

    def _missing(self, exporter: str, domain: int, idx: np.ndarray) -> None:
        try:
            self.cache.domain(exporter, domain)  # as the walk would: the domain is known from now on
        except DecodeError as exc:  # too many domains: the walk refuses such packets whole
            self.malformed.extend(Malformed(int(self.positions[k]), str(exc)) for k in idx.tolist())
            return
        self.advance[idx] = np.where(self.version[idx] == 10, _RESTART, 1)
        for k in idx.tolist():
            position = int(self.positions[k])
            self.pending.append(Pending(position, self.packets.datagram(position), (int(self.head[k]),)))
        self.missing_sets += len(idx)

    def _walk(self, k: int) -> None:
        position = int(self.positions[k])
        packets = self.packets
        exporter = packets.exporters[int(packets.exporter_no[position])]
        payload = packets.payload(position)
        recorder = _Recorder()
        walker = v9.walk_v9 if self.version[k] == 9 else ipfix.walk_ipfix
        try:
            missing, _ = walker(exporter, payload, self.cache, recorder, self.collector, self.now)  # type: ignore[arg-type]
        except DecodeError as exc:
            self.malformed.append(Malformed(position, str(exc)))
            return
        if recorder.seen is not None:
            self.sequence[k] = recorder.seen[0]
            self.advance[k] = _RESTART if recorder.seen[1] is None else recorder.seen[1]
        if missing:
            self.missing_sets += len(missing)
            self.pending.append(Pending(position, packets.datagram(position), tuple(missing)))

    # -- sequence numbers ------------------------------------------------------
    def sequences(self, tracker: SequenceTracker) -> list[SequenceGap]:
        """Check every observed packet's sequence number, per stream in receive order."""
        seen = np.flatnonzero(self.advance != _UNSEEN)
        if not len(seen):
            return []
        exporter = self.packets.exporter_no[self.positions[seen]]
        key = (exporter * (1 << 33) + self.domain[seen]) * 16 + self.version[seen]
        order = seen[np.lexsort((self.positions[seen], key))]
        key = np.sort(key)  # same order as `order`: lexsort's primary key
        cuts = np.flatnonzero(np.r_[True, key[1:] != key[:-1], True])
        gaps: list[SequenceGap] = []
        for a, b in zip(cuts[:-1].tolist(), cuts[1:].tolist()):
            k = order[a:b]
            name = self.packets.exporters[int(self.packets.exporter_no[self.positions[k[0]]])]
            domain, version = int(self.domain[k[0]]), int(self.version[k[0]])
            advance = self.advance[k]
            if (advance >= 0).all():
                gaps.extend(tracker.observe_many(name, domain, version, self.sequence[k], advance))
                continue
            for seq, adv in zip(self.sequence[k].tolist(), advance.tolist()):
                gap = tracker.observe(name, domain, version, seq, None if adv == _RESTART else adv)
                if gap is not None:
                    gaps.append(gap)
        return gaps


def decode_pending(pending: Iterable[Pending], cache: TemplateCache) -> DecodeResult:
    """Decode the sets that waited for templates; still-missing ones stay pending."""
    collector = RecordCollector()
    still: list[Pending] = []
    malformed: list[Malformed] = []
    missing_sets = 0
    packets = 0
    for item in pending:
        packets += 1
        payload = item.datagram.payload
        try:
            version = payload[0] << 8 | payload[1] if len(payload) >= 2 else 0
            if version == 9:
                left = v9.resume_v9(item.datagram.exporter, payload, item.set_offsets, cache, collector)
            elif version == 10:
                left = ipfix.resume_ipfix(item.datagram.exporter, payload, item.set_offsets, cache, collector)
            else:
                raise DecodeError(f"version {version} has no templates to wait for")
        except DecodeError as exc:
            malformed.append(Malformed(item.index, str(exc)))
            continue
        if left:
            missing_sets += len(left)
            still.append(Pending(item.index, item.datagram, tuple(left)))
    parts = collector.finish()
    flows = np.concatenate(parts) if parts else np.zeros(0, dtype=FLOW_DTYPE)
    return DecodeResult(flows, packets, tuple(malformed), tuple(still), missing_sets, ())
