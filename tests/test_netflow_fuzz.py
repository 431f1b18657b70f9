"""Fuzzing the decoders: hostile bytes never escape as anything but our errors.

For random bytes and for mutated valid packets of each version, the batch
decoder must return (never raise), the single-packet paths may raise only
NetflowError, the output stays proportional to the input (a lying count or
length field buys no allocation), and nothing hangs (hypothesis deadline).
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netflow.decode import decode_batch, decode_pending
from netflow.errors import NetflowError
from netflow.exporter import ExportClock, FlowSpec, build_ipfix, build_v5, build_v9
from netflow.flows import Datagram
from netflow.templates import SequenceTracker, TemplateCache
from netflow.v5 import decode_v5_packet

CLOCK = ExportClock(boot_ms=1_700_000_000_000, export_ms=1_700_000_500_000)
SPECS = [
    FlowSpec("10.0.0.1", "10.0.0.2", 1, 2, 6, 100, 1, CLOCK.export_ms - 10, CLOCK.export_ms),
    FlowSpec("2001:db8::1", "2001:db8::2", 3, 4, 17, 200, 2, CLOCK.export_ms - 10, CLOCK.export_ms),
    FlowSpec("10.0.0.3", "10.0.0.4", 5, 6, 6, 300, 3, CLOCK.export_ms - 10, CLOCK.export_ms,
             interface_name="eth0"),
]
SEEDS = {
    5: build_v5(SPECS[:1] * 3, CLOCK)[0],
    9: build_v9(SPECS[:2], CLOCK, sampling_interval=10)[0],
    10: build_ipfix(SPECS, CLOCK.export_ms // 1000, sampling=(1, 9))[0],
}
FUZZ = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


def check(payloads: list[bytes]) -> None:
    cache, tracker = TemplateCache(max_per_domain=64, max_total=256), SequenceTracker()
    result = decode_batch([Datagram("192.0.2.1", p) for p in payloads], cache, tracker, now=0)
    total = sum(len(p) for p in payloads)
    # every flow needs at least one byte of input: no amplification by lying fields
    assert len(result.flows) <= total
    assert len(result.malformed) + len(result.pending) <= len(payloads)
    again = decode_pending(result.pending, cache)
    assert len(again.flows) <= total
    try:
        if payloads and payloads[0][:2] == b"\x00\x05":
            decode_v5_packet(payloads[0])
    except NetflowError:
        pass


@FUZZ
@given(st.lists(st.binary(max_size=1500), max_size=4))
def test_random_bytes(payloads: list[bytes]) -> None:
    check(payloads)


@FUZZ
@given(st.sampled_from([5, 9, 10]), st.binary(max_size=1500))
def test_random_bytes_behind_a_valid_version(version: int, tail: bytes) -> None:
    check([struct.pack(">H", version) + tail])


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(SEEDS[draw(st.sampled_from([5, 9, 10]))])
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["flip", "word", "truncate", "insert"]))
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "word":
            # counts and lengths are 16-bit: write hostile values over them
            value = draw(st.sampled_from([0, 1, 3, 4, 255, 256, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF]))
            data[pos : pos + 2] = struct.pack(">H", value)
        elif kind == "truncate":
            del data[pos:]
        else:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


@FUZZ
@given(st.lists(mutated(), min_size=1, max_size=4))
def test_mutated_valid_packets(payloads: list[bytes]) -> None:
    check(payloads)


@FUZZ
@given(mutated())
def test_mutated_after_valid_templates(payload: bytes) -> None:
    # templates known first, so mutated data sets reach the record decoders
    check([SEEDS[9], SEEDS[10], payload])


def test_lying_v9_template_does_not_allocate() -> None:
    # a template claiming 65535-byte fields and a data set claiming 65535 bytes
    tmpl = struct.pack(">HH", 256, 2) + struct.pack(">HHHH", 1, 0xFFFF, 2, 0xFFFF)
    sets = struct.pack(">HH", 0, 4 + len(tmpl)) + tmpl + struct.pack(">HH", 256, 0xFFFF)
    packet = struct.pack(">HHIIII", 9, 1, 0, 0, 0, 0) + sets
    result = decode_batch([Datagram("192.0.2.1", packet)], TemplateCache(), None, now=0)
    assert len(result.flows) == 0 and len(result.malformed) == 1
