"""NetFlow v5: fixed 24-byte header, up to 30 fixed 48-byte records.

Theory of operation: `split_v5` validates one packet's header in Python (a
few hundred nanoseconds) and returns the header values and the slice of
record bytes. `records_to_flows` then decodes the records of a whole batch
with one `np.frombuffer` over a big-endian structured dtype and converts the
sysUpTime-relative First/Last to epoch milliseconds with the header values
repeated per record. The per-flow cost is a few numpy column copies.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from netflow.errors import DecodeError
from netflow.flows import FLOW_DTYPE, V4_MAPPED

HEADER = struct.Struct(">HHIIIIBBH")
HEADER_SIZE = HEADER.size  # 24
RECORD_SIZE = 48
MAX_RECORDS = 30

RECORD_DTYPE = np.dtype(
    [
        ("src", ">u4"),
        ("dst", ">u4"),
        ("nexthop", ">u4"),
        ("input", ">u2"),
        ("output", ">u2"),
        ("packets", ">u4"),
        ("bytes", ">u4"),
        ("first", ">u4"),
        ("last", ">u4"),
        ("src_port", ">u2"),
        ("dst_port", ">u2"),
        ("pad1", "u1"),
        ("tcp_flags", "u1"),
        ("proto", "u1"),
        ("tos", "u1"),
        ("src_as", ">u2"),
        ("dst_as", ">u2"),
        ("src_mask", "u1"),
        ("dst_mask", "u1"),
        ("pad2", ">u2"),
    ]
)
assert RECORD_DTYPE.itemsize == RECORD_SIZE


def split_v5(payload: bytes) -> tuple[int, int, int, int, int, int, bytes | memoryview]:
    """Validate a v5 packet; return (count, uptime_ms, export_ms, sequence,
    engine, sampling, record bytes)."""
    if len(payload) < HEADER_SIZE:
        raise DecodeError(f"v5 packet of {len(payload)} bytes is shorter than its header")
    version, count, uptime, secs, nsecs, sequence, etype, eid, sampling = HEADER.unpack_from(
        payload
    )
    if version != 5:
        raise DecodeError(f"version {version} is not 5")
    if not 1 <= count <= MAX_RECORDS:
        raise DecodeError(f"v5 count {count} outside 1..{MAX_RECORDS}")
    end = HEADER_SIZE + count * RECORD_SIZE
    if len(payload) < end:
        raise DecodeError(f"v5 packet of {len(payload)} bytes cannot hold {count} records")
    if nsecs >= 1_000_000_000:
        raise DecodeError("v5 unix_nsecs is not below one second")
    interval = sampling & 0x3FFF
    return (
        count,
        uptime,
        secs * 1000 + nsecs // 1_000_000,
        sequence,
        (etype << 8) | eid,
        interval if interval > 0 else 1,
        memoryview(payload)[HEADER_SIZE:end],
    )


def records_to_flows(
    records: bytes,
    counts: np.ndarray,
    exporter_hi: np.ndarray,
    exporter_lo: np.ndarray,
    uptime_ms: np.ndarray,
    export_ms: np.ndarray,
    engine: np.ndarray,
    sampling: np.ndarray,
) -> np.ndarray:
    """Decode the joined records of many packets; the other arrays are per packet."""
    raw = np.frombuffer(records, dtype=RECORD_DTYPE)
    out = np.empty(len(raw), dtype=FLOW_DTYPE)
    up = np.repeat(uptime_ms.astype(np.uint32), counts)
    exp = np.repeat(export_ms.astype(np.int64), counts)
    out["exporter_hi"] = np.repeat(exporter_hi, counts)
    out["exporter_lo"] = np.repeat(exporter_lo, counts)
    out["src_hi"] = 0
    out["dst_hi"] = 0
    out["src_lo"] = raw["src"].astype(np.uint64) | np.uint64(V4_MAPPED)
    out["dst_lo"] = raw["dst"].astype(np.uint64) | np.uint64(V4_MAPPED)
    # uint32 wraparound makes the age right across a sysUpTime rollover
    out["first_ms"] = exp - (up - raw["first"]).astype(np.int64)
    out["last_ms"] = exp - (up - raw["last"]).astype(np.int64)
    out["bytes"] = raw["bytes"]
    out["packets"] = raw["packets"]
    out["domain"] = np.repeat(engine, counts)
    out["input_if"] = raw["input"]
    out["output_if"] = raw["output"]
    out["sampling"] = np.repeat(sampling, counts)
    out["src_port"] = raw["src_port"]
    out["dst_port"] = raw["dst_port"]
    out["proto"] = raw["proto"]
    out["tcp_flags"] = raw["tcp_flags"]
    out["tos"] = raw["tos"]
    out["ip_version"] = 4
    return out


HEADER_DTYPE = np.dtype(
    [
        ("version", ">u2"),
        ("count", ">u2"),
        ("uptime", ">u4"),
        ("secs", ">u4"),
        ("nsecs", ">u4"),
        ("sequence", ">u4"),
        ("engine_type", "u1"),
        ("engine_id", "u1"),
        ("sampling", ">u2"),
    ]
)


@dataclass(frozen=True, slots=True)
class V5Batch:
    flows: np.ndarray
    bad: list[tuple[int, str]]  # (position in the input list, reason)
    packet_positions: np.ndarray  # positions of the decoded packets, in order
    headers: np.ndarray  # HEADER_DTYPE row per decoded packet


def decode_v5_batch(payloads: list[bytes], exporter_hi: np.ndarray, exporter_lo: np.ndarray) -> V5Batch:
    """Decode many v5 packets: Python touches each packet once (length checks),
    numpy decodes headers and records in bulk. `exporter_*` are per packet."""
    heads: list[bytes] = []
    parts: list[bytes] = []
    keep: list[int] = []
    bad: list[tuple[int, str]] = []
    for k, p in enumerate(payloads):
        n = len(p)
        count = (p[2] << 8 | p[3]) if n >= HEADER_SIZE else 0
        if n < HEADER_SIZE or p[0] != 0 or p[1] != 5:
            bad.append((k, "not a v5 packet (short or wrong version)"))
        elif not 1 <= count <= MAX_RECORDS or n < HEADER_SIZE + count * RECORD_SIZE:
            bad.append((k, f"v5 count {count} does not fit a {n}-byte packet"))
        else:
            heads.append(p[:HEADER_SIZE])
            parts.append(p[HEADER_SIZE : HEADER_SIZE + count * RECORD_SIZE])
            keep.append(k)
    positions = np.array(keep, dtype=np.int64)
    headers = np.frombuffer(b"".join(heads), dtype=HEADER_DTYPE)
    records = b"".join(parts)
    counts = headers["count"].astype(np.int64)
    valid = headers["nsecs"] < 1_000_000_000
    if not valid.all():
        bad.extend((int(positions[k]), "v5 unix_nsecs is not below one second") for k in np.flatnonzero(~valid))
        raw = np.frombuffer(records, dtype=RECORD_DTYPE)[np.repeat(valid, counts)]
        records, headers, positions, counts = raw.tobytes(), headers[valid], positions[valid], counts[valid]
        bad.sort()
    interval = headers["sampling"] & 0x3FFF
    flows = records_to_flows(
        records,
        counts,
        exporter_hi[positions],
        exporter_lo[positions],
        headers["uptime"],
        headers["secs"].astype(np.int64) * 1000 + headers["nsecs"] // 1_000_000,
        headers["engine_type"].astype(np.uint32) << 8 | headers["engine_id"],
        np.where(interval == 0, 1, interval).astype(np.uint32),
    )
    return V5Batch(flows, bad, positions, headers)


def decode_v5_packet(payload: bytes, exporter_hi: int = 0, exporter_lo: int = 0) -> np.ndarray:
    """Decode one packet (tests, tools); batches go through `decode.decode_batch`."""
    count, uptime, export_ms, _seq, engine, sampling, records = split_v5(payload)
    one = np.array([count])
    return records_to_flows(
        bytes(records),
        one,
        np.array([exporter_hi], dtype=np.uint64),
        np.array([exporter_lo], dtype=np.uint64),
        np.array([uptime], dtype=np.uint32),
        np.array([export_ms], dtype=np.int64),
        np.array([engine], dtype=np.uint32),
        np.array([sampling], dtype=np.uint32),
    )
