"""Batch decoding: many datagrams of any version in, one flow array out.

Theory of operation: the worker hands over a batch of `Datagram`s exactly as
its journal stored them. Each datagram is validated and walked in Python
(per packet, never per flow); the records themselves are decoded in bulk at
the end: v5 records of the whole batch in one `np.frombuffer`, v9/IPFIX
records in one per template. A bad packet never spoils the batch: it is
listed in `DecodeResult.malformed` and contributes nothing. Data sets whose
template is unknown are listed in `DecodeResult.pending`; `decode_pending`
decodes exactly those sets later, so nothing is lost and nothing counted
twice.

Output order: v5 flows in packet order, then v9/IPFIX flows grouped by
template. Nothing downstream depends on order.
"""

from __future__ import annotations

import struct
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
    Pending,
    SequenceGap,
)
from netflow.templates import RecordCollector, SequenceTracker, TemplateCache

MAX_DATAGRAM = 65535
_VERSION = struct.Struct(">H")


def decode_batch(
    datagrams: Iterable[Datagram],
    cache: TemplateCache,
    tracker: SequenceTracker | None,
    now: float,
) -> DecodeResult:
    """Decode a batch; `now` drives template refresh (same clock as `cache.expire`)."""
    malformed: list[Malformed] = []
    pending: list[Pending] = []
    gaps: list[SequenceGap] = []
    collector = RecordCollector()
    v5_parts: list[memoryview | bytes] = []
    v5_meta: list[tuple[int, int, int, int, int, int, int]] = []
    packets = 0
    missing_sets = 0
    for index, dg in enumerate(datagrams):
        packets += 1
        payload = dg.payload
        try:
            if len(payload) > MAX_DATAGRAM:
                raise DecodeError(f"datagram of {len(payload)} bytes exceeds {MAX_DATAGRAM}")
            if len(payload) < 2:
                raise DecodeError("datagram too short for a version field")
            version = _VERSION.unpack_from(payload)[0]
            if version == 5:
                count, uptime, export_ms, seq, engine, sampling, records = v5.split_v5(payload)
                hi, lo = EXPORTER_KEYS.get(dg.exporter)
                v5_parts.append(records)
                v5_meta.append((count, hi, lo, uptime, export_ms, engine, sampling))
                gap = tracker.observe(dg.exporter, engine, 5, seq, count) if tracker else None
                missing: list[int] = []
            else:
                if version == 9:
                    missing, gap = v9.walk_v9(dg.exporter, payload, cache, tracker, collector, now)
                elif version == 10:
                    missing, gap = ipfix.walk_ipfix(dg.exporter, payload, cache, tracker, collector, now)
                else:
                    raise DecodeError(f"unsupported NetFlow version {version}")
        except DecodeError as exc:
            malformed.append(Malformed(index, str(exc)))
            continue
        if gap is not None:
            gaps.append(gap)
        if missing:
            missing_sets += len(missing)
            pending.append(Pending(index, dg, tuple(missing)))
    parts = collector.finish()
    if v5_parts:
        parts.insert(0, _v5_flows(v5_parts, v5_meta))
    flows = np.concatenate(parts) if parts else np.zeros(0, dtype=FLOW_DTYPE)
    return DecodeResult(flows, packets, tuple(malformed), tuple(pending), missing_sets, tuple(gaps))


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
            version = _VERSION.unpack_from(payload)[0] if len(payload) >= 2 else 0
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


def _v5_flows(parts: list[memoryview | bytes], meta: list[tuple[int, ...]]) -> np.ndarray:
    cols = np.array(meta, dtype=np.uint64).T
    return v5.records_to_flows(
        b"".join(parts),
        cols[0].astype(np.int64),
        cols[1],
        cols[2],
        cols[3].astype(np.uint32),
        cols[4].astype(np.int64),
        cols[5].astype(np.uint32),
        cols[6].astype(np.uint32),
    )

