"""Reading the journal a batch at a time and decoding it with state: what the shipper ships.

Theory of operation
-------------------
`JournalTail` reads whole records of a journal that is still being written,
from its position up to a limit (`netflow.plan` decides the limit).
`BatchDecoder` decodes them carrying the decoder's state (`DecoderState`:
v9/IPFIX templates, sequence counters, and data sets still waiting for their
template); that state is what a checkpoint holds (`netflow.checkpoints`).
`cut_batch` decodes chunks of `CHUNK_PACKETS`, classifies and aggregates
them, and merges them into one batch of at most ``batch_packets`` packets
and `MAX_ROWS` billable aggregate rows: a chunk that would pass the row cap
is undone (decoder state and tail) and left for the next batch.

Pending packets are capped (`MAX_PENDING`) and expire after `PENDING_TTL`
seconds of exporter time (counted as missing-template drops).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from netflow.classifier import Aggregates, Classifier, Legs, aggregate
from netflow.decode import decode_packets, decode_pending
from netflow.flows import FLOW_DTYPE, Packets, Pending
from netflow.journal import JournalRecord, list_segments, records_to_packets, scan_records
from netflow.templates import SequenceTracker, TemplateCache

__all__ = ["JournalTail", "DecoderState", "BatchStats", "BatchDecoder", "Chunk", "Batch", "cut_batch",
           "AGG_COLUMNS", "billable_rows", "merge_aggregates", "encode_aggregates", "MAX_ROWS"]

MAX_ROWS = 12_000  # aggregate rows per netflow.submit (8 int64 columns stay < 1 MB)
PENDING_TTL = 3600.0  # seconds of exporter time a data set may wait for its template
MAX_PENDING = 65_536  # packets waiting for templates, per worker
READ_BYTES = 8 << 20  # journal bytes the shipper reads at a time
CHUNK_PACKETS = 4_000  # packets decoded at a time: arrays stay small enough to be reused, not faulted in


class JournalTail:
    """Incremental reader of a journal that is being written: [position, limit)."""

    def __init__(self, directory: Path, position: int) -> None:
        self.directory = directory
        self.position = position

    def read(self, limit: int, max_packets: int) -> Packets:
        """Whole records from `position` (which moves past them) holding about ``max_packets`` datagrams.

        Reads at most `READ_BYTES` at a time (more only for a record larger
        than that), never across a segment end, so a batch is one read
        buffer and its packets point into it.
        """
        if self.position >= limit:
            return Packets.empty()
        segments = list_segments(self.directory)
        seg = None
        for n, (base, path) in enumerate(segments):
            nxt = segments[n + 1][0] if n + 1 < len(segments) else None
            if base <= self.position and (nxt is None or self.position < nxt):
                seg = (base, path, nxt)
                break
        if seg is None:
            raise RuntimeError(f"journal offset {self.position} is in no segment of {self.directory}")
        base, path, nxt = seg
        if nxt is not None and self.position - base >= path.stat().st_size:
            # the gap a lifted run leaves (`Journal.lift_run`): nothing was ever there
            self.position = min(nxt, limit)
            return Packets.empty()
        end = min(limit, nxt) if nxt is not None else limit
        size = READ_BYTES
        while True:
            want = min(size, end - self.position)
            with open(path, "rb") as f:
                f.seek(self.position - base)
                data = f.read(want)
            out = []
            packets = 0
            for record in scan_records(data, self.position):
                out.append(record)
                packets += len(record.index)
                if packets >= max_packets:
                    break
            if out or want >= end - self.position:
                break
            size *= 4  # one record larger than the read
        if not out:
            raise RuntimeError(f"journal record at {self.position} in {path.name} does not scan")
        self.position = out[-1].end
        return records_to_packets(out, data)

    def rewind(self, position: int) -> None:
        self.position = position


@dataclass
class DecoderState:
    cache: TemplateCache = field(default_factory=TemplateCache)
    tracker: SequenceTracker = field(default_factory=SequenceTracker)
    pending: list[Pending] = field(default_factory=list)  # Pending.index = journal offset of the packet

    def dumps(self) -> bytes:
        return pickle.dumps((self.cache, self.tracker, self.pending), protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def loads(cls, data: bytes) -> DecoderState:
        # our own file, written by this worker (never bytes from outside)
        cache, tracker, pending = pickle.loads(data)  # noqa: S301
        return cls(cache, tracker, pending)


@dataclass(frozen=True, slots=True)
class BatchStats:
    packets: int
    flows: int
    undecodable: int
    missing_template: int
    sequence_lost: int

    def plus(self, other: BatchStats) -> BatchStats:
        return BatchStats(self.packets + other.packets, self.flows + other.flows,
                          self.undecodable + other.undecodable, self.missing_template + other.missing_template,
                          self.sequence_lost + other.sequence_lost)


class BatchDecoder:
    """Decodes batches of journal records, carrying templates and pending sets."""

    def __init__(self, state: DecoderState, sampling: dict[tuple[int, int], int]) -> None:
        self.state = state
        self.sampling = sampling

    def decode(self, batch: Packets | list[JournalRecord]) -> tuple[np.ndarray, BatchStats]:
        """Decode a batch (as `JournalTail.read` gives it, or records of a `JournalReader`)."""
        st = self.state
        packets = batch if isinstance(batch, Packets) else \
            Packets.from_datagrams([r.datagram for r in batch], [r.offset for r in batch])
        if not len(packets):
            return np.zeros(0, FLOW_DTYPE), BatchStats(0, 0, 0, 0, 0)
        now = int(packets.received_ns[-1]) / 1e9
        result = decode_packets(packets, st.cache, st.tracker, now)
        parts = [result.flows]
        fresh = [Pending(int(packets.offsets[p.index]), p.datagram, p.set_offsets) for p in result.pending]
        old = st.pending
        expired = 0
        if old:
            again = decode_pending(old, st.cache)
            parts.append(again.flows)
            old = list(again.pending)
            horizon = now - PENDING_TTL
            kept = [p for p in old if p.datagram.received_ns / 1e9 >= horizon]
            expired += sum(len(p.set_offsets) for p in old) - sum(len(p.set_offsets) for p in kept)
            old = kept
        if fresh:
            # templates that came later in this same batch
            again = decode_pending(fresh, st.cache)
            parts.append(again.flows)
            fresh = list(again.pending)
        pending = old + fresh
        if len(pending) > MAX_PENDING:
            expired += sum(len(p.set_offsets) for p in pending[:-MAX_PENDING])
            pending = pending[-MAX_PENDING:]
        st.pending = pending
        flows = np.concatenate(parts) if len(parts) > 1 else parts[0]
        for (hi, lo), n in self.sampling.items():
            flows["sampling"][(flows["exporter_hi"] == hi) & (flows["exporter_lo"] == lo)] = n
        lost = sum(g.lost for g in result.gaps if g.lost > 0)
        return flows, BatchStats(result.packets, len(flows), len(result.malformed), expired, lost)



AGG_COLUMNS = ("account", "klass", "direction", "hour_ms", "bytes", "packets", "flows")
_KEYS = ("account", "klass", "direction", "hour_ms")
_SUMS = ("bytes", "packets", "flows")


def billable_rows(agg: Aggregates) -> int:
    return int(np.count_nonzero((agg.account > 0) & (agg.klass > 0)))


def merge_aggregates(first: Aggregates, second: Aggregates) -> Aggregates:
    """The sums of two batches' aggregates, per (account, class, direction, hour), exact.

    Built by field name: a reordering of `Aggregates`' fields cannot swap columns (bytes for packets)."""
    cols = {name: np.concatenate([getattr(first, name), getattr(second, name)]) for name in AGG_COLUMNS}
    order = np.lexsort(tuple(cols[name] for name in reversed(_KEYS)))
    keys = {name: cols[name].take(order) for name in _KEYS}
    change = np.zeros(len(order), dtype=bool)
    if len(order):
        change[0] = True
    for column in keys.values():
        change[1:] |= column[1:] != column[:-1]
    starts = np.flatnonzero(change)
    merged = {name: column.take(starts) for name, column in keys.items()}
    merged |= {name: np.add.reduceat(cols[name].take(order), starts) if len(order) else cols[name]
               for name in _SUMS}
    return Aggregates(**merged, implausible=first.implausible + second.implausible)


def encode_aggregates(agg: Aggregates) -> dict[str, bytes]:
    """Billable rows (account > 0, class > 0) as little-endian int64 columns."""
    keep = (agg.account > 0) & (agg.klass > 0)
    return {name: np.ascontiguousarray(getattr(agg, name)[keep], dtype="<i8").tobytes() for name in AGG_COLUMNS}


# ---------------------------------------------------------------- one batch


@dataclass(frozen=True, slots=True)
class Chunk:
    """A decoded journal range [start, end): its flows and their classified legs (for the raw store)."""

    start: int
    end: int
    flows: np.ndarray
    legs: Legs


@dataclass(frozen=True, slots=True)
class Batch:
    chunks: list[Chunk]
    aggregates: Aggregates
    stats: BatchStats


def _decode_chunk(decoder: BatchDecoder, tail: JournalTail, classifier: Classifier, limit: int,
                  max_packets: int, saved: bytes) -> tuple[Packets, np.ndarray, Legs, Aggregates, BatchStats]:
    """Decode and aggregate the next chunk; too many rows → fewer packets from the same state."""
    start = tail.position
    while True:
        records = tail.read(limit, max_packets)
        flows, stats = decoder.decode(records)
        legs = classifier.classify(flows)
        agg = aggregate(flows, legs)
        billable = billable_rows(agg)
        if billable <= MAX_ROWS or len(np.unique(records.offsets)) <= 1:
            break
        decoder.state = DecoderState.loads(saved)
        tail.rewind(start)
        max_packets = max(1, len(records) // 2)
    if billable > MAX_ROWS:
        raise RuntimeError(f"one journal record makes {billable} aggregate rows, over {MAX_ROWS}")
    return records, flows, legs, agg, stats


def cut_batch(decoder: BatchDecoder, tail: JournalTail, classifier: Classifier, limit: int,
              batch_packets: int) -> Batch:
    """Decode chunks of `CHUNK_PACKETS` up to ``batch_packets`` (or ``limit``) into one batch.

    Small chunks keep the worker's arrays small (CPU per flow rises with
    arrays past glibc's mmap threshold); one batch of many chunks keeps
    the core's work per flow small (its cost is per call and per account
    touched). A chunk that would take the merged aggregates past
    MAX_ROWS is undone (decoder state and tail) and left for the next batch.
    """
    chunks: list[Chunk] = []
    merged: Aggregates | None = None
    total = BatchStats(0, 0, 0, 0, 0)
    packets = 0
    while tail.position < limit and packets < batch_packets:
        start = tail.position
        saved = decoder.state.dumps()
        records, flows, legs, agg, stats = _decode_chunk(decoder, tail, classifier, limit, CHUNK_PACKETS, saved)
        combined = agg if merged is None else merge_aggregates(merged, agg)
        if merged is not None and billable_rows(combined) > MAX_ROWS:
            decoder.state = DecoderState.loads(saved)
            tail.rewind(start)
            break
        merged = combined
        total = total.plus(stats)
        chunks.append(Chunk(start, tail.position, flows, legs))
        packets += len(records)
    assert merged is not None, "a batch starts below the limit"
    return Batch(chunks, merged, total)
