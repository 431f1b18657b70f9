"""Reference decoder: the packet-by-packet walk that `netflow.decode.decode_packets` must equal.

Kept verbatim from before the batch fast paths (with the v5 batch decoder of
that time as `_old_v5_batch`), so `tests/test_netflow_decode_fastpath.py` can
compare the two on random traffic. `decode_pending` did not change and is
re-exported from `netflow.decode`.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from netflow import ipfix, v5, v9
from netflow.errors import DecodeError, UnsupportedVersion
from netflow.flows import (
    EXPORTER_KEYS,
    FLOW_DTYPE,
    Datagram,
    DecodeResult,
    Malformed,
    Pending,
    SequenceGap,
)
from netflow.decode import decode_pending  # noqa: F401 - unchanged by the fast paths; the test calls it from here
from netflow.templates import RecordCollector, SequenceTracker, TemplateCache

MAX_DATAGRAM = 65535  # noqa: this module is the reference, not used by the worker


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
    v5_payloads: list[bytes] = []
    v5_exporters: list[int] = []
    v5_index: list[int] = []
    exporters: dict[str, int] = {}
    packets = 0
    missing_sets = 0
    for index, dg in enumerate(datagrams):
        packets += 1
        payload = dg.payload
        if len(payload) > MAX_DATAGRAM or len(payload) < 2:
            malformed.append(Malformed(index, f"datagram of {len(payload)} bytes"))
            continue
        if payload[0] == 0 and payload[1] == 5:
            exp = exporters.get(dg.exporter)
            if exp is None:
                exp = exporters[dg.exporter] = len(exporters)
            v5_payloads.append(payload)
            v5_exporters.append(exp)
            v5_index.append(index)
            continue
        version = payload[0] << 8 | payload[1]
        try:
            if version == 9:
                missing, gap = v9.walk_v9(dg.exporter, payload, cache, tracker, collector, now)
            elif version == 10:
                missing, gap = ipfix.walk_ipfix(dg.exporter, payload, cache, tracker, collector, now)
            else:
                raise UnsupportedVersion(f"unsupported NetFlow version {version}")
        except DecodeError as exc:
            malformed.append(Malformed(index, str(exc)))
            continue
        if gap is not None:
            gaps.append(gap)
        if missing:
            missing_sets += len(missing)
            pending.append(Pending(index, dg, tuple(missing)))
    parts = collector.finish()
    if v5_payloads:
        parts.insert(0, _v5(v5_payloads, v5_exporters, v5_index, exporters, tracker, malformed, gaps))
        malformed.sort(key=lambda m: m.index)
    flows = np.concatenate(parts) if len(parts) > 1 else parts[0] if parts else np.zeros(0, dtype=FLOW_DTYPE)
    return DecodeResult(flows, packets, tuple(malformed), tuple(pending), missing_sets, tuple(gaps))


def _v5(
    payloads: list[bytes],
    exporter_ids: list[int],
    indices: list[int],
    exporters: dict[str, int],
    tracker: SequenceTracker | None,
    malformed: list[Malformed],
    gaps: list[SequenceGap],
) -> np.ndarray:
    names = list(exporters)
    pairs = np.array([EXPORTER_KEYS.get(name) for name in names], dtype=np.uint64).reshape(-1, 2)
    ids = np.array(exporter_ids, dtype=np.int64)
    batch = _old_v5_batch(payloads, pairs[ids, 0], pairs[ids, 1])
    malformed.extend(Malformed(indices[k], reason) for k, reason in batch.bad)
    if tracker is not None and len(batch.headers):
        h = batch.headers
        engine = (h["engine_type"].astype(np.int64) << 8) | h["engine_id"]
        streams, which = np.unique((ids[batch.packet_positions] << 16) | engine, return_inverse=True)
        for n, stream in enumerate(streams):
            mask = which == n
            gaps.extend(
                tracker.observe_many(
                    names[int(stream) >> 16], int(stream) & 0xFFFF, 5, h["sequence"][mask], h["count"][mask]
                )
            )
    return batch.flows


def _old_v5_batch(payloads: list[bytes], exporter_hi: np.ndarray, exporter_lo: np.ndarray) -> v5.V5Batch:
    """Decode many v5 packets: Python touches each packet once (length checks),
    numpy decodes headers and records in bulk. `exporter_*` are per packet."""
    heads: list[bytes] = []
    parts: list[bytes] = []
    keep: list[int] = []
    bad: list[tuple[int, str]] = []
    for k, p in enumerate(payloads):
        n = len(p)
        count = (p[2] << 8 | p[3]) if n >= v5.HEADER_SIZE else 0
        if n < v5.HEADER_SIZE or p[0] != 0 or p[1] != 5:
            bad.append((k, "not a v5 packet (short or wrong version)"))
        elif not 1 <= count <= v5.MAX_RECORDS or n < v5.HEADER_SIZE + count * v5.RECORD_SIZE:
            bad.append((k, f"v5 count {count} does not fit a {n}-byte packet"))
        else:
            heads.append(p[:v5.HEADER_SIZE])
            parts.append(p[v5.HEADER_SIZE : v5.HEADER_SIZE + count * v5.RECORD_SIZE])
            keep.append(k)
    positions = np.array(keep, dtype=np.int64)
    headers = np.frombuffer(b"".join(heads), dtype=v5.HEADER_DTYPE)
    records = b"".join(parts)
    counts = headers["count"].astype(np.int64)
    valid = headers["nsecs"] < 1_000_000_000
    if not valid.all():
        bad.extend((int(positions[k]), "v5 unix_nsecs is not below one second") for k in np.flatnonzero(~valid))
        raw = np.frombuffer(records, dtype=v5.RECORD_DTYPE)[np.repeat(valid, counts)]
        records, headers, positions, counts = raw.tobytes(), headers[valid], positions[valid], counts[valid]
        bad.sort()
    interval = headers["sampling"] & 0x3FFF
    flows = v5.records_to_flows(
        records,
        counts,
        exporter_hi[positions],
        exporter_lo[positions],
        headers["uptime"],
        headers["secs"].astype(np.int64) * 1000 + headers["nsecs"] // 1_000_000,
        headers["engine_type"].astype(np.uint32) << 8 | headers["engine_id"],
        np.where(interval == 0, 1, interval).astype(np.uint32),
    )
    return v5.V5Batch(flows, bad, positions, headers)
