"""NetFlow v5: fixed 24-byte header, up to 30 fixed 48-byte records.

Theory of operation: `decode_v5_packets` takes a batch as one buffer and
the packets' start offsets, validates every header at once (one fancy index
gathers them into `HEADER_DTYPE` rows), and joins the packets' record bytes.
`records_to_flows` then decodes the records of the whole batch with one
`np.frombuffer` over a big-endian structured dtype and converts the
sysUpTime-relative First/Last to epoch milliseconds with the header values
repeated per record. The per-flow cost is a few numpy column copies.
`split_v5` / `decode_v5_packet` do the same for one packet (tests, tools).
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
    bad: list[tuple[int, str]]  # (position in the input arrays, reason)
    packet_positions: np.ndarray  # positions of the decoded packets, in order
    headers: np.ndarray  # HEADER_DTYPE row per decoded packet


def gather(u8: np.ndarray, starts: np.ndarray, size: int) -> np.ndarray:
    """``size`` bytes at each of ``starts`` as an (n, size) uint8 array (one fancy index)."""
    return u8[starts[:, None] + np.arange(size, dtype=np.int64)]


def decode_v5_packets(
    data: bytes, starts: np.ndarray, lengths: np.ndarray, exporter_hi: np.ndarray, exporter_lo: np.ndarray
) -> V5Batch:
    """Decode many v5 packets that lie in one buffer at ``starts``; the other arrays are per packet.

    Headers are validated and decoded for the whole batch at once (one fancy
    index gathers them); Python only slices each packet's records for the
    join that `records_to_flows` decodes.
    """
    u8 = np.frombuffer(data, dtype=np.uint8)
    n = len(starts)
    bad: list[tuple[int, str]] = []
    big = lengths >= HEADER_SIZE
    head = np.zeros(n, dtype=np.int64)
    if big.any():
        at = starts[big]
        head[big] = (u8[at].astype(np.int64) << 24) | (u8[at + 1].astype(np.int64) << 16) \
            | (u8[at + 2].astype(np.int64) << 8) | u8[at + 3]
    version, count = head >> 16, head & 0xFFFF
    wrong = ~big | (version != 5)
    misfit = ~wrong & ((count < 1) | (count > MAX_RECORDS) | (lengths < HEADER_SIZE + count * RECORD_SIZE))
    bad.extend((int(k), "not a v5 packet (short or wrong version)") for k in np.flatnonzero(wrong))
    bad.extend((int(k), f"v5 count {int(count[k])} does not fit a {int(lengths[k])}-byte packet")
               for k in np.flatnonzero(misfit))
    keep = ~wrong & ~misfit
    if len(u8):
        headers = np.ascontiguousarray(gather(u8, starts[keep], HEADER_SIZE)).view(HEADER_DTYPE).reshape(-1)
    else:
        headers = np.zeros(0, dtype=HEADER_DTYPE)
    late = headers["nsecs"] >= 1_000_000_000
    if late.any():
        bad.extend((int(k), "v5 unix_nsecs is not below one second") for k in np.flatnonzero(keep)[late])
        keep[np.flatnonzero(keep)[late]] = False
        headers = headers[~late]
    if bad:
        bad.sort()
    positions = np.flatnonzero(keep)
    counts = count[keep]
    first = (starts[keep] + HEADER_SIZE).tolist()
    view = memoryview(data)
    records = b"".join([view[a:a + c * RECORD_SIZE] for a, c in zip(first, counts.tolist())])
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
