"""Decoding v5, v9 and IPFIX returns exactly what the exporter put in."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from billcore.common.rawflows import pair_to_addr
from netflow.decode import decode_batch, decode_pending
from netflow.errors import DecodeError, NetflowError
from netflow.exporter import (
    ExportClock,
    FlowSpec,
    build_ipfix,
    build_v5,
    build_v9,
    v9_template_flowset,
)
from netflow.flows import Datagram, addr_to_pair
from netflow.templates import SequenceTracker, TemplateCache
from netflow.v5 import decode_v5_packet

BOOT = 1_700_000_000_000
CLOCK = ExportClock(boot_ms=BOOT, export_ms=BOOT + 3_600_000)
EXPORTER = "192.0.2.1"


def v4_flows(n: int, base: int = 0) -> list[FlowSpec]:
    return [
        FlowSpec(
            src=f"10.0.{(base + i) // 250}.{(base + i) % 250 + 1}",
            dst="198.51.100.7",
            src_port=1024 + i,
            dst_port=443,
            proto=6,
            bytes=1_000 + 37 * i,
            packets=1 + i,
            first_ms=CLOCK.export_ms - 60_000 + i,
            last_ms=CLOCK.export_ms - 1_000 + i,
            input_if=3,
            output_if=7 + i % 3,
            tcp_flags=0x1B,
            tos=i % 4,
        )
        for i in range(n)
    ]


def v6_flows(n: int) -> list[FlowSpec]:
    return [
        FlowSpec(
            src=f"2001:db8:1::{i + 1:x}",
            dst="2001:db8:ffff::53",
            src_port=40_000 + i,
            dst_port=53,
            proto=17,
            bytes=(1 << 33) + i,  # needs the 64-bit counter
            packets=2,
            first_ms=CLOCK.export_ms - 5_000,
            last_ms=CLOCK.export_ms - 10,
            input_if=70_000,
            output_if=2,
        )
        for i in range(n)
    ]


def as_rows(flows: np.ndarray) -> list[tuple]:
    rows = []
    for f in flows:
        rows.append(
            (
                pair_to_addr(f["src_hi"], f["src_lo"]),
                pair_to_addr(f["dst_hi"], f["dst_lo"]),
                int(f["src_port"]), int(f["dst_port"]), int(f["proto"]), int(f["bytes"]),
                int(f["packets"]), int(f["first_ms"]), int(f["last_ms"]),
                int(f["input_if"]), int(f["output_if"]), int(f["tcp_flags"]), int(f["tos"]),
            )
        )
    return sorted(rows)


def spec_rows(specs: list[FlowSpec]) -> list[tuple]:
    return sorted(
        (s.src, s.dst, s.src_port, s.dst_port, s.proto, s.bytes, s.packets, s.first_ms, s.last_ms,
         s.input_if, s.output_if, s.tcp_flags, s.tos)
        for s in specs
    )


def grams(packets: list[bytes], exporter: str = EXPORTER) -> list[Datagram]:
    return [Datagram(exporter, p) for p in packets]


def test_v5_round_trip_with_absolute_times_and_sampling() -> None:
    specs = v4_flows(95)
    packets = build_v5(specs, CLOCK, flow_sequence=1000, engine_id=9, sampling_interval=0x4000 | 100)
    assert len(packets) == 4
    result = decode_batch(grams(packets), TemplateCache(), SequenceTracker(), now=0)
    assert result.malformed == () and result.gaps == ()
    assert as_rows(result.flows) == spec_rows(specs)
    assert set(result.flows["sampling"]) == {100}  # mode bits stripped
    assert set(result.flows["domain"]) == {9}
    assert set(result.flows["ip_version"]) == {4}
    hi, lo = addr_to_pair(EXPORTER)
    assert (result.flows["exporter_lo"] == lo).all() and (result.flows["exporter_hi"] == hi).all()


def test_v5_times_survive_sysuptime_wraparound() -> None:
    # booted 50 days ago: the 32-bit millisecond uptime has wrapped once
    clock = ExportClock(boot_ms=CLOCK.export_ms - 50 * 86_400_000, export_ms=CLOCK.export_ms)
    spec = FlowSpec("10.0.0.1", "10.0.0.2", bytes=5, packets=1,
                    first_ms=clock.export_ms - (clock.uptime_ms + 5_000), last_ms=clock.export_ms - 100)
    flows = decode_v5_packet(build_v5([spec], clock)[0])
    assert int(flows["first_ms"][0]) == spec.first_ms
    assert int(flows["last_ms"][0]) == spec.last_ms


def test_v5_sequence_gap_counts_lost_flows() -> None:
    packets = build_v5(v4_flows(90), CLOCK, flow_sequence=500)
    tracker = SequenceTracker()
    result = decode_batch(grams([packets[0], packets[2]]), TemplateCache(), tracker, now=0)
    assert [(g.expected, g.received, g.lost) for g in result.gaps] == [(530, 560, 30)]
    assert tracker.lost == 30


def test_v9_round_trip_v4_and_v6_with_sampling_options() -> None:
    specs = v4_flows(50) + v6_flows(11)
    packets = build_v9(specs, CLOCK, source_id=77, package_sequence=5, sampling_interval=512)
    result = decode_batch(grams(packets), TemplateCache(), SequenceTracker(), now=0)
    assert result.malformed == () and result.pending == () and result.gaps == ()
    assert as_rows(result.flows) == spec_rows(specs)
    assert set(result.flows["sampling"]) == {512}
    assert set(result.flows["domain"]) == {77}
    v6 = result.flows[result.flows["ip_version"] == 6]
    assert len(v6) == 11 and int(v6["bytes"].min()) == 1 << 33


def test_v9_data_before_template_is_pending_then_decoded_exactly_once() -> None:
    specs = v4_flows(48)
    first, second = build_v9(specs, CLOCK, with_templates=False)  # 24 flows each
    cache = TemplateCache()
    early = decode_batch(grams([first]), cache, SequenceTracker(), now=0)
    assert len(early.flows) == 0 and early.missing_template_sets == 1
    assert len(early.pending) == 1 and early.pending[0].datagram.payload == first
    # the template arrives (a later packet); the second data packet decodes at once
    header = struct.pack(">HHIIII", 9, 2, CLOCK.uptime_ms, CLOCK.export_ms // 1000, 1, 0)
    later = decode_batch(grams([header + v9_template_flowset(), second]), cache, None, now=1)
    assert len(later.flows) == 24
    replayed = decode_pending(early.pending, cache)
    assert replayed.pending == () and len(replayed.flows) == 24
    assert as_rows(np.concatenate([later.flows, replayed.flows])) == spec_rows(specs)


def test_v9_pending_keeps_only_the_missing_sets() -> None:
    # one packet with a known v4 set and an unknown v6 set: only the v6 set waits
    cache = TemplateCache()
    decode_batch(grams(build_v9([], CLOCK)), cache, None, now=0)
    cache.withdraw(EXPORTER, 0, 257)
    specs = v4_flows(3) + v6_flows(2)
    (packet,) = build_v9(specs, CLOCK, with_templates=False)
    result = decode_batch(grams([packet]), cache, None, now=1)
    assert len(result.flows) == 3 and len(result.pending[0].set_offsets) == 1
    decode_batch(grams(build_v9([], CLOCK)), cache, None, now=2)
    replay = decode_pending(result.pending, cache)
    assert as_rows(np.concatenate([result.flows, replay.flows])) == spec_rows(specs)


def test_v9_templates_expire_and_refresh() -> None:
    cache = TemplateCache(timeout=60)
    decode_batch(grams(build_v9(v4_flows(1), CLOCK)), cache, None, now=1000)
    assert len(cache) == 2
    assert cache.expire(now=1059) == 0
    decode_batch(grams(build_v9([], CLOCK)), cache, None, now=1050)  # refresh
    assert cache.expire(now=1100) == 0 and cache.expire(now=1111) == 2
    result = decode_batch(grams(build_v9(v4_flows(2), CLOCK, with_templates=False)), cache, None, now=1112)
    assert len(result.flows) == 0 and result.missing_template_sets == 1


def test_templates_are_per_exporter_and_source_id() -> None:
    cache = TemplateCache()
    decode_batch(grams(build_v9([], CLOCK, source_id=1)), cache, None, now=0)
    data = build_v9(v4_flows(2), CLOCK, source_id=2, with_templates=False)
    assert decode_batch(grams(data), cache, None, now=0).missing_template_sets == 1
    data = build_v9(v4_flows(2), CLOCK, source_id=1, with_templates=False)
    assert decode_batch(grams(data, "192.0.2.99"), cache, None, now=0).missing_template_sets == 1
    assert len(decode_batch(grams(data), cache, None, now=0).flows) == 2


def test_v9_sequence_counts_packets() -> None:
    packets = build_v9(v4_flows(96), CLOCK, source_id=3, package_sequence=10)
    tracker = SequenceTracker()
    result = decode_batch(grams([packets[0], packets[1], packets[3]]), TemplateCache(), tracker, now=0)
    assert [(g.expected, g.received, g.lost) for g in result.gaps] == [(12, 13, 1)]


def test_v9_reduced_size_fields() -> None:
    # bytes as a 3-byte counter, packets as 1 byte, ifindex as 2 bytes
    fields = ((8, 4), (12, 4), (1, 3), (2, 1), (10, 2), (14, 2), (21, 4), (22, 4))
    tmpl = struct.pack(">HH", 400, len(fields)) + b"".join(struct.pack(">HH", *f) for f in fields)
    record = (bytes([10, 0, 0, 1, 10, 0, 0, 2]) + (0xABCDEF).to_bytes(3, "big") + bytes([9])
              + struct.pack(">HHII", 5, 6, CLOCK.uptime_ms - 10, CLOCK.uptime_ms - 20))
    sets = struct.pack(">HH", 0, 4 + len(tmpl)) + tmpl
    sets += struct.pack(">HH", 400, 4 + 2 * len(record) + 2) + record * 2 + b"\0\0"
    header = struct.pack(">HHIIII", 9, 3, CLOCK.uptime_ms, CLOCK.export_ms // 1000, 0, 0)
    flows = decode_batch(grams([header + sets]), TemplateCache(), None, now=0).flows
    assert len(flows) == 2
    assert int(flows["bytes"][0]) == 0xABCDEF and int(flows["packets"][0]) == 9
    assert (int(flows["input_if"][0]), int(flows["output_if"][0])) == (5, 6)
    assert int(flows["last_ms"][0]) == CLOCK.export_ms - 10
    assert int(flows["first_ms"][0]) == CLOCK.export_ms - 20


def test_ipfix_round_trip_variable_length_enterprise_v6_and_sampling() -> None:
    named = [FlowSpec("10.9.0.1", "203.0.113.5", 1, 2, 6, 77, 1, CLOCK.export_ms - 9, CLOCK.export_ms,
                      interface_name="x" * n) for n in (0, 1, 254, 255, 300)]
    named = [f for f in named if f.interface_name]  # empty name -> fixed template
    specs = v4_flows(30) + v6_flows(5) + named
    packets = build_ipfix(specs, CLOCK.export_ms // 1000, domain=4, sequence=0, sampling=(1, 99))
    result = decode_batch(grams(packets), TemplateCache(), SequenceTracker(), now=0)
    assert result.malformed == () and result.gaps == () and result.pending == ()
    assert as_rows(result.flows) == spec_rows(specs)
    assert set(result.flows["sampling"]) == {100}  # 1 selected, 99 skipped


def test_ipfix_sequence_counts_data_records() -> None:
    packets = build_ipfix(v4_flows(60), 1_700_000_000, domain=1, sequence=100)
    tracker = SequenceTracker()
    result = decode_batch(grams([packets[0], packets[2]]), TemplateCache(), tracker, now=0)
    assert [(g.expected, g.received, g.lost) for g in result.gaps] == [(120, 140, 20)]


def test_ipfix_template_withdrawal() -> None:
    cache = TemplateCache()
    decode_batch(grams(build_ipfix([], 1_700_000_000)), cache, None, now=0)
    assert len(cache) == 3
    withdraw_all = struct.pack(">HHHH", 2, 8, 2, 0)
    message = struct.pack(">HHIII", 10, 16 + len(withdraw_all), 1_700_000_000, 0, 0) + withdraw_all
    result = decode_batch(grams([message]), cache, None, now=1)
    assert result.malformed == () and len(cache) == 0


def test_bad_packet_does_not_spoil_the_batch() -> None:
    good = build_v5(v4_flows(10), CLOCK)[0]
    v9 = build_v9(v4_flows(5), CLOCK)[0]
    batch = grams([good, good[:-1], b"\x00\x07" + good[2:], v9[:-8], v9])
    result = decode_batch(batch, TemplateCache(), None, now=0)
    assert [m.index for m in result.malformed] == [1, 2, 3]
    assert as_rows(result.flows) == spec_rows(v4_flows(10) + v4_flows(5))


def test_template_limits_are_enforced() -> None:
    cache = TemplateCache(max_per_domain=1)
    result = decode_batch(grams(build_v9([], CLOCK)), cache, None, now=0)
    assert len(result.malformed) == 1 and len(cache) == 1


def test_single_packet_decoder_raises_only_its_own_errors() -> None:
    with pytest.raises(DecodeError):
        decode_v5_packet(b"\x00\x05" + b"\x00" * 10)
    with pytest.raises(NetflowError):
        decode_v5_packet(build_v9([], CLOCK)[0])


def test_v5_gaps_per_exporter_and_engine_in_one_batch() -> None:
    a = build_v5(v4_flows(150), CLOCK, flow_sequence=0, engine_id=1)  # 5 packets of 30
    b = build_v5(v4_flows(60), CLOCK, flow_sequence=7, engine_id=2)  # 2 packets
    batch = grams([a[0], a[2]]) + grams([b[0]], "192.0.2.2") + grams([a[3], a[4]]) + grams([b[1]], "192.0.2.2")
    bad_nsecs = bytearray(a[1])
    bad_nsecs[12:16] = (2_000_000_000).to_bytes(4, "big")
    batch.append(Datagram(EXPORTER, bytes(bad_nsecs)))
    tracker = SequenceTracker()
    result = decode_batch(batch, TemplateCache(), tracker, now=0)
    assert [m.index for m in result.malformed] == [6]
    assert [(g.exporter, g.domain, g.expected, g.received, g.lost) for g in result.gaps] == [
        (EXPORTER, 1, 30, 60, 30)
    ]
    assert len(result.flows) == 4 * 30 + 60
    # the tracker carries on into the next batch
    late = decode_batch(grams(build_v5(v4_flows(1), CLOCK, flow_sequence=151, engine_id=1)), TemplateCache(), tracker, 0)
    assert [(g.expected, g.lost) for g in late.gaps] == [(150, 1)]


def test_ipfix_uptime_times_use_system_init_from_options_and_sampler_ids() -> None:
    init_ms = CLOCK.export_ms - 7_200_000
    # options template 400: scope observationDomainId, systemInitTimeMilliseconds,
    # samplerId 48 with its samplerRandomInterval 50
    opt_tmpl = struct.pack(">HHH", 400, 4, 1) + struct.pack(">HHHHHHHH", 149, 4, 160, 8, 48, 1, 50, 4)
    opt_data = struct.pack(">IQBI", 0, init_ms, 7, 250) + b"\x00\x00\x00"
    # data template 401: src, dst, octets, flowStartSysUpTime 22, flowEndSysUpTime 21, samplerId
    fields = ((8, 4), (12, 4), (1, 8), (22, 4), (21, 4), (48, 1))
    tmpl = struct.pack(">HH", 401, len(fields)) + b"".join(struct.pack(">HH", *f) for f in fields)
    record = bytes([10, 0, 0, 1, 10, 0, 0, 2]) + struct.pack(">QIIB", 4242, 1_000, 61_000, 7)
    sets = (struct.pack(">HH", 3, 4 + len(opt_tmpl) + 2) + opt_tmpl + b"\0\0"
            + struct.pack(">HH", 2, 4 + len(tmpl)) + tmpl
            + struct.pack(">HH", 400, 4 + len(opt_data)) + opt_data
            + struct.pack(">HH", 401, 4 + len(record) + 3) + record + b"\0\0\0")
    message = struct.pack(">HHIII", 10, 16 + len(sets), CLOCK.export_ms // 1000, 0, 5) + sets
    result = decode_batch(grams([message]), TemplateCache(), SequenceTracker(), now=0)
    assert result.malformed == ()
    (flow,) = result.flows
    assert (int(flow["first_ms"]), int(flow["last_ms"])) == (init_ms + 1_000, init_ms + 61_000)
    assert int(flow["bytes"]) == 4242 and int(flow["sampling"]) == 250


@pytest.mark.parametrize("first_uptime, expect_offset", [
    ((1 << 32) - 300_000, -300_000),  # softflowd -r: a packet 5 min before its start, wrapped negative
    (5_000, 5_000),  # an ordinary uptime
])
def test_ipfix_uptime_is_taken_modulo_2_32_near_the_export_time(first_uptime: int, expect_offset: int) -> None:
    init_ms = CLOCK.export_ms - 10_000
    opt_tmpl = struct.pack(">HHH", 400, 2, 1) + struct.pack(">HHHH", 149, 4, 160, 8)
    opt_data = struct.pack(">IQ", 0, init_ms)
    fields = ((8, 4), (12, 4), (1, 8), (22, 4), (21, 4))
    tmpl = struct.pack(">HH", 401, len(fields)) + b"".join(struct.pack(">HH", *f) for f in fields)
    record = bytes([10, 0, 0, 1, 10, 0, 0, 2]) + struct.pack(">QII", 99, first_uptime, (first_uptime + 500) % (1 << 32))
    sets = (struct.pack(">HH", 3, 4 + len(opt_tmpl)) + opt_tmpl
            + struct.pack(">HH", 2, 4 + len(tmpl)) + tmpl
            + struct.pack(">HH", 400, 4 + len(opt_data)) + opt_data
            + struct.pack(">HH", 401, 4 + len(record)) + record)
    message = struct.pack(">HHIII", 10, 16 + len(sets), CLOCK.export_ms // 1000, 0, 5) + sets
    result = decode_batch(grams([message]), TemplateCache(), SequenceTracker(), now=0)
    (flow,) = result.flows
    assert int(flow["first_ms"]) == init_ms + expect_offset
    assert int(flow["last_ms"]) == init_ms + expect_offset + 500


def test_template_snapshot_lets_another_worker_decode() -> None:
    first = TemplateCache()
    decode_batch(grams(build_ipfix([], 1_700_000_000, domain=3)), first, None, now=10)
    second = TemplateCache()
    for exporter, domain, record, seen in first.snapshot():
        second.learn(exporter, domain, record, seen)
    data = build_ipfix(v4_flows(4), 1_700_000_000, domain=3, with_templates=False)
    assert len(decode_batch(grams(data), second, None, now=11).flows) == 4
