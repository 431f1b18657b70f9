"""The common flow record that every decoder produces.

Theory of operation: v5, v9 and IPFIX all decode into one numpy structured
array of `FLOW_DTYPE`, so classification and aggregation are written once and
run vectorized over a whole batch of packets.

Addresses (exporter, source, destination) are 128-bit values held as two
native uint64 halves, `*_hi` and `*_lo`. IPv4 is stored IPv4-mapped
(``::ffff:a.b.c.d``: hi = 0, lo = 0xffff_0000_0000 | v4), so one comparison
space orders v4 and v6 alike and a v4 prefix is a 128-bit interval like any
other; `ip_version` says which family the flow was exported as.

Times are absolute epoch milliseconds (int64), converted from the exporter's
sysUpTime-relative counters by each decoder. `bytes` and `packets` are the
exported (possibly sampled) counters, never scaled: `sampling` records the
1-in-N interval in force (1 = unsampled or unknown), and whoever turns flows
into money decides whether to scale.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from netflow.errors import DecodeError

FLOW_DTYPE = np.dtype(
    [
        ("exporter_hi", "<u8"),
        ("exporter_lo", "<u8"),
        ("src_hi", "<u8"),
        ("src_lo", "<u8"),
        ("dst_hi", "<u8"),
        ("dst_lo", "<u8"),
        ("first_ms", "<i8"),
        ("last_ms", "<i8"),
        ("bytes", "<u8"),
        ("packets", "<u8"),
        ("domain", "<u4"),  # v9 source id / IPFIX observation domain / v5 engine
        ("input_if", "<u4"),
        ("output_if", "<u4"),
        ("sampling", "<u4"),
        ("src_port", "<u2"),
        ("dst_port", "<u2"),
        ("proto", "u1"),
        ("tcp_flags", "u1"),
        ("tos", "u1"),
        ("ip_version", "u1"),
    ]
)

V4_MAPPED = 0xFFFF_0000_0000
"""The low half of ::ffff:0.0.0.0; OR a v4 address into it."""

MAX_EXPORTER_CACHE = 4096


def empty_flows(n: int = 0) -> np.ndarray:
    return np.zeros(n, dtype=FLOW_DTYPE)


def addr_to_pair(addr: str | bytes) -> tuple[int, int]:
    """Text or packed (4/16 bytes) address -> (hi, lo) in the flow representation."""
    try:
        if isinstance(addr, (bytes, bytearray)):
            ip = ipaddress.ip_address(bytes(addr))
        else:
            ip = ipaddress.ip_address(addr)
    except ValueError as exc:
        raise DecodeError(f"not an IP address: {addr!r}") from exc
    if ip.version == 4:
        return 0, V4_MAPPED | int(ip)
    value = int(ip)
    return value >> 64, value & 0xFFFF_FFFF_FFFF_FFFF


class ExporterKeys:
    """Bounded memo of exporter text address -> (hi, lo).

    The UDP source address is parsed once per exporter, not once per packet.
    """

    __slots__ = ("_cache",)

    def __init__(self) -> None:
        self._cache: dict[str, tuple[int, int]] = {}

    def get(self, addr: str) -> tuple[int, int]:
        pair = self._cache.get(addr)
        if pair is None:
            pair = addr_to_pair(addr)
            if len(self._cache) >= MAX_EXPORTER_CACHE:
                self._cache.clear()
            self._cache[addr] = pair
        return pair


EXPORTER_KEYS = ExporterKeys()


@dataclass(frozen=True, slots=True)
class Datagram:
    """One UDP payload as received: what the journal stores and decoders read."""

    exporter: str
    payload: bytes
    port: int = 0
    received_ns: int = 0


@dataclass(frozen=True, slots=True)
class Packets:
    """A batch of datagrams in receive order: one payload buffer and per-packet arrays.

    This is how the worker reads its journal and how `decode.decode_packets`
    takes its input, so that per-packet work is numpy over the batch (header
    fields gathered from ``data`` at ``starts``) rather than a Python object
    per datagram. `offsets` are the journal offsets of the records the
    packets came from (informational: pending sets remember them).
    """

    data: bytes
    starts: np.ndarray  # int64 offset of each payload in `data`
    lengths: np.ndarray  # int64
    exporter_no: np.ndarray  # int64 index into `exporters`
    exporters: tuple[str, ...]
    ports: np.ndarray  # int64
    received_ns: np.ndarray  # int64
    offsets: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.starts)

    def payload(self, k: int) -> bytes:
        start = int(self.starts[k])
        return self.data[start:start + int(self.lengths[k])]

    def datagram(self, k: int) -> Datagram:
        return Datagram(self.exporters[int(self.exporter_no[k])], self.payload(k), int(self.ports[k]),
                        int(self.received_ns[k]))

    @classmethod
    def empty(cls) -> Packets:
        none = np.zeros(0, dtype=np.int64)
        return cls(b"", none, none, none, (), none, none, none)

    @classmethod
    def from_datagrams(cls, datagrams: Iterable[Datagram], offsets: Iterable[int] | None = None) -> Packets:
        grams = list(datagrams)
        names: dict[str, int] = {}
        numbers = [names.setdefault(d.exporter, len(names)) for d in grams]
        lengths = np.array([len(d.payload) for d in grams], dtype=np.int64)
        starts = np.zeros(len(grams), dtype=np.int64)
        if len(grams):
            np.cumsum(lengths[:-1], out=starts[1:])
        return cls(
            data=b"".join(d.payload for d in grams),
            starts=starts,
            lengths=lengths,
            exporter_no=np.array(numbers, dtype=np.int64),
            exporters=tuple(names),
            ports=np.array([d.port for d in grams], dtype=np.int64),
            received_ns=np.array([d.received_ns for d in grams], dtype=np.int64),
            offsets=np.array(list(offsets) if offsets is not None else [0] * len(grams), dtype=np.int64),
        )


@dataclass(frozen=True, slots=True)
class Malformed:
    """A packet of the batch that could not be decoded, and why."""

    index: int
    reason: str


@dataclass(frozen=True, slots=True)
class Pending:
    """Data sets of one packet that waited for a template.

    `set_offsets` are the byte offsets of the skipped data sets inside
    `datagram.payload`. `decode_pending` decodes exactly those sets later, so
    the sets that did decode the first time are never counted twice.
    """

    index: int
    datagram: Datagram
    set_offsets: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SequenceGap:
    """The exporter's sequence counter jumped: `lost` units never arrived.

    Units are flows for v5, packets for v9 and data records for IPFIX.
    A negative `lost` means a late or repeated packet (or an exporter restart).
    """

    exporter: str
    domain: int
    version: int
    expected: int
    received: int
    lost: int


@dataclass(frozen=True, slots=True)
class DecodeResult:
    flows: np.ndarray
    packets: int
    malformed: tuple[Malformed, ...]
    pending: tuple[Pending, ...]
    missing_template_sets: int
    gaps: tuple[SequenceGap, ...]
