"""Packet builders: the exporter side of v5, v9 and IPFIX, for tests and benchmarks.

Theory of operation: given `FlowSpec`s (what a router saw), build the exact
datagrams a router would send, so a test can assert that decoding returns
exactly what went in, and a benchmark can generate realistic traffic. The
builders pick fixed templates (one IPv4, one IPv6, and for IPFIX one with a
variable-length interfaceName) and split flows into packets of bounded size.
Times are absolute epoch milliseconds in `FlowSpec`; builders turn them into
sysUpTime-relative values where the format wants that.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from netflow.errors import NetflowError


@dataclass(frozen=True, slots=True)
class FlowSpec:
    src: str
    dst: str
    src_port: int = 0
    dst_port: int = 0
    proto: int = 6
    bytes: int = 0
    packets: int = 0
    first_ms: int = 0
    last_ms: int = 0
    input_if: int = 0
    output_if: int = 0
    tcp_flags: int = 0
    tos: int = 0
    interface_name: str = ""  # IPFIX variable-length field only

    @property
    def is_v6(self) -> bool:
        return ipaddress.ip_address(self.src).version == 6


@dataclass(frozen=True, slots=True)
class ExportClock:
    """The exporter's notion of time: when it booted and when it sends."""

    boot_ms: int
    export_ms: int

    @property
    def uptime_ms(self) -> int:
        return (self.export_ms - self.boot_ms) & 0xFFFF_FFFF

    def uptime_at(self, epoch_ms: int) -> int:
        return (epoch_ms - self.boot_ms) & 0xFFFF_FFFF


def _chunks(flows: Sequence[FlowSpec], size: int) -> list[Sequence[FlowSpec]]:
    return [flows[i : i + size] for i in range(0, len(flows), size)]


def _v4(addr: str) -> int:
    return int(ipaddress.IPv4Address(addr))


# ---------------------------------------------------------------- v5

_V5_HEADER = struct.Struct(">HHIIIIBBH")
_V5_RECORD = struct.Struct(">IIIHHIIIIHHBBBBHHBBH")


def build_v5(
    flows: Sequence[FlowSpec],
    clock: ExportClock,
    flow_sequence: int = 0,
    engine_id: int = 0,
    sampling_interval: int = 0,
    per_packet: int = 30,
) -> list[bytes]:
    """v5 packets (at most 30 records each); the sequence counts flows."""
    if not 1 <= per_packet <= 30:
        raise NetflowError("v5 carries 1..30 records per packet")
    packets = []
    secs, ms = divmod(clock.export_ms, 1000)
    for chunk in _chunks(flows, per_packet):
        out = bytearray(
            _V5_HEADER.pack(5, len(chunk), clock.uptime_ms, secs, ms * 1_000_000,
                            flow_sequence & 0xFFFF_FFFF, 0, engine_id, sampling_interval & 0x3FFF)
        )
        for f in chunk:
            out += _V5_RECORD.pack(
                _v4(f.src), _v4(f.dst), 0, f.input_if, f.output_if, f.packets, f.bytes,
                clock.uptime_at(f.first_ms), clock.uptime_at(f.last_ms), f.src_port, f.dst_port,
                0, f.tcp_flags, f.proto, f.tos, 0, 0, 0, 0, 0,
            )
        flow_sequence += len(chunk)
        packets.append(bytes(out))
    return packets


# ---------------------------------------------------------------- v9

V9_TEMPLATE_V4 = 256
V9_TEMPLATE_V6 = 257
V9_OPTIONS_TEMPLATE = 258

_V9_FIELDS_V4 = ((8, 4), (12, 4), (7, 2), (11, 2), (4, 1), (6, 1), (5, 1), (10, 4), (14, 4),
                 (1, 8), (2, 8), (22, 4), (21, 4))
_V9_FIELDS_V6 = ((27, 16), (28, 16), (7, 2), (11, 2), (4, 1), (6, 1), (5, 1), (10, 4), (14, 4),
                 (1, 8), (2, 8), (22, 4), (21, 4))
_V9_OPTIONS_SCOPE = ((1, 4),)  # scope: system
_V9_OPTIONS_FIELDS = ((34, 4), (35, 1))  # SAMPLING_INTERVAL, SAMPLING_ALGORITHM


def _pad4(body: bytes) -> bytes:
    return body + b"\x00" * (-len(body) % 4)


def _set(set_id: int, body: bytes) -> bytes:
    body = _pad4(body)
    return struct.pack(">HH", set_id, 4 + len(body)) + body


def _template_body(template_id: int, fields: Sequence[tuple[int, int]]) -> bytes:
    return struct.pack(">HH", template_id, len(fields)) + b"".join(struct.pack(">HH", *f) for f in fields)


def v9_template_flowset() -> bytes:
    return _set(0, _template_body(V9_TEMPLATE_V4, _V9_FIELDS_V4) + _template_body(V9_TEMPLATE_V6, _V9_FIELDS_V6))


def v9_options_flowset(sampling_interval: int) -> tuple[bytes, bytes]:
    """(options template flowset, options data flowset) announcing 1-in-N sampling."""
    scope = b"".join(struct.pack(">HH", *f) for f in _V9_OPTIONS_SCOPE)
    opts = b"".join(struct.pack(">HH", *f) for f in _V9_OPTIONS_FIELDS)
    tmpl = _set(1, struct.pack(">HHH", V9_OPTIONS_TEMPLATE, len(scope), len(opts)) + scope + opts)
    data = _set(V9_OPTIONS_TEMPLATE, struct.pack(">IIB", 0, sampling_interval, 2))
    return tmpl, data


def _v9_record(f: FlowSpec, clock: ExportClock) -> bytes:
    addrs = ipaddress.ip_address(f.src).packed + ipaddress.ip_address(f.dst).packed
    return addrs + struct.pack(
        ">HHBBBIIQQII", f.src_port, f.dst_port, f.proto, f.tcp_flags, f.tos, f.input_if, f.output_if,
        f.bytes, f.packets, clock.uptime_at(f.first_ms), clock.uptime_at(f.last_ms),
    )


def build_v9(
    flows: Sequence[FlowSpec],
    clock: ExportClock,
    source_id: int = 0,
    package_sequence: int = 0,
    with_templates: bool = True,
    sampling_interval: int | None = None,
    per_packet: int = 24,
) -> list[bytes]:
    """v9 packets; templates (and sampling options) ride in the first packet."""
    packets = []
    chunks = _chunks(flows, per_packet) or [()]
    for n, chunk in enumerate(chunks):
        sets = []
        if n == 0 and with_templates:
            sets.append(v9_template_flowset())
        if n == 0 and sampling_interval is not None:
            sets.extend(v9_options_flowset(sampling_interval))
        for tid, fam in ((V9_TEMPLATE_V4, False), (V9_TEMPLATE_V6, True)):
            recs = [_v9_record(f, clock) for f in chunk if f.is_v6 == fam]
            if recs:
                sets.append(_set(tid, b"".join(recs)))
        count = len(chunk) + (2 if n == 0 and with_templates else 0)
        secs = clock.export_ms // 1000
        header = struct.pack(">HHIIII", 9, count, clock.uptime_ms, secs, package_sequence & 0xFFFF_FFFF, source_id)
        package_sequence += 1
        packets.append(header + b"".join(sets))
    return packets


# ---------------------------------------------------------------- IPFIX

IPFIX_TEMPLATE_V4 = 300
IPFIX_TEMPLATE_V6 = 301
IPFIX_TEMPLATE_VAR = 302
IPFIX_OPTIONS_TEMPLATE = 303
ENTERPRISE = 29305  # an enterprise-specific field the collector must skip

_IPFIX_TAIL = ((7, 2), (11, 2), (4, 1), (6, 1), (5, 1), (10, 4), (14, 4), (1, 8), (2, 8), (152, 8), (153, 8))


def _ipfix_fields(template_id: int) -> list[tuple[int, int, int]]:
    if template_id == IPFIX_TEMPLATE_V6:
        head = [(27, 16, 0), (28, 16, 0)]
    else:
        head = [(8, 4, 0), (12, 4, 0)]
    fields = head + [(ie, ln, 0) for ie, ln in _IPFIX_TAIL]
    if template_id == IPFIX_TEMPLATE_VAR:
        fields.insert(2, (82, 65535, 0))  # interfaceName, variable length
        fields.append((1, 4, ENTERPRISE))  # enterprise-specific, 4 bytes
    return fields


def ipfix_template_set() -> bytes:
    body = b""
    for tid in (IPFIX_TEMPLATE_V4, IPFIX_TEMPLATE_V6, IPFIX_TEMPLATE_VAR):
        fields = _ipfix_fields(tid)
        body += struct.pack(">HH", tid, len(fields))
        for ie, ln, ent in fields:
            body += struct.pack(">HH", ie | (0x8000 if ent else 0), ln) + (struct.pack(">I", ent) if ent else b"")
    return _set(2, body)


def ipfix_options_sets(packet_interval: int, packet_space: int) -> tuple[bytes, bytes]:
    """Options template (scope: observationDomainId) + data with RFC 5477 sampling."""
    tmpl = struct.pack(">HHH", IPFIX_OPTIONS_TEMPLATE, 3, 1) + struct.pack(">HHHHHH", 149, 4, 305, 4, 306, 4)
    data = struct.pack(">III", 0, packet_interval, packet_space)
    return _set(3, tmpl), _set(IPFIX_OPTIONS_TEMPLATE, data)


def _varlen(value: bytes) -> bytes:
    if len(value) < 255:
        return bytes([len(value)]) + value
    return b"\xff" + struct.pack(">H", len(value)) + value


def _ipfix_record(f: FlowSpec, variable: bool) -> bytes:
    out = ipaddress.ip_address(f.src).packed + ipaddress.ip_address(f.dst).packed
    if variable:
        out += _varlen(f.interface_name.encode())
    out += struct.pack(
        ">HHBBBIIQQQQ", f.src_port, f.dst_port, f.proto, f.tcp_flags, f.tos, f.input_if, f.output_if,
        f.bytes, f.packets, f.first_ms, f.last_ms,
    )
    if variable:
        out += struct.pack(">I", 0xDEADBEEF)
    return out


def build_ipfix(
    flows: Sequence[FlowSpec],
    export_s: int,
    domain: int = 0,
    sequence: int = 0,
    with_templates: bool = True,
    sampling: tuple[int, int] | None = None,
    per_packet: int = 20,
) -> list[bytes]:
    """IPFIX messages; v4 flows with an interface name use the variable-length template.

    `sequence` counts data records (options data included), as RFC 7011 says.
    """
    packets = []
    for n, chunk in enumerate(_chunks(flows, per_packet) or [()]):
        sets = []
        records = 0
        if n == 0 and with_templates:
            sets.append(ipfix_template_set())
        if n == 0 and sampling is not None:
            sets.extend(ipfix_options_sets(*sampling))
            records += 1
        groups = (
            (IPFIX_TEMPLATE_V4, [f for f in chunk if not f.is_v6 and not f.interface_name], False),
            (IPFIX_TEMPLATE_VAR, [f for f in chunk if not f.is_v6 and f.interface_name], True),
            (IPFIX_TEMPLATE_V6, [f for f in chunk if f.is_v6], False),
        )
        for tid, group, variable in groups:
            if group:
                sets.append(_set(tid, b"".join(_ipfix_record(f, variable) for f in group)))
                records += len(group)
        body = b"".join(sets)
        header = struct.pack(">HHIII", 10, 16 + len(body), export_s, sequence & 0xFFFF_FFFF, domain)
        sequence += records
        packets.append(header + body)
    return packets
