"""The batch decoder equals the packet-by-packet walk, exactly, on random traffic.

`netflow.decode.decode_packets` decodes v5 headers in bulk and takes a fast
path for single-data-set v9/IPFIX packets, per (exporter, domain) run between
state-changing packets. `tests/reference_decode.py` is the plain walk it
replaced. Hypothesis builds mixed traffic (several exporters and domains, v5,
v9, IPFIX, template (re)definitions, options data that changes sampling,
variable-length records, data before its template, truncated and garbage
packets, sequence jumps), cuts it into batches at random, and both decoders
must give the same flows, malformed packets, pending sets, sequence gaps,
and leave the same template cache and sequence tracker behind.
"""

from __future__ import annotations

import struct

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netflow import exporter as X
from netflow.decode import decode_batch, decode_packets, decode_pending
from netflow.flows import Datagram, Packets
from netflow.templates import SequenceTracker, TemplateCache
from tests import reference_decode as ref

CLOCK = X.ExportClock(1_700_000_000_000 - 86_400_000, 1_700_000_000_000)
EXPORTERS = ("192.0.2.1", "192.0.2.2", "2001:db8::7")


def flows(draw: st.DrawFn, n: int, v6: bool | None = None, named: bool = False, big: int = 1 << 34
          ) -> list[X.FlowSpec]:
    out = []
    for _ in range(n):
        six = draw(st.booleans()) if v6 is None else v6
        src = f"2001:db8::{draw(st.integers(1, 9))}" if six else f"10.0.0.{draw(st.integers(1, 9))}"
        dst = f"2001:db8:1::{draw(st.integers(1, 9))}" if six else f"203.0.113.{draw(st.integers(1, 9))}"
        out.append(X.FlowSpec(src, dst, draw(st.integers(0, 65535)), 443, 6, draw(st.integers(0, big)),
                              draw(st.integers(0, 1000)), CLOCK.export_ms - 5000, CLOCK.export_ms - 1000,
                              interface_name="eth0" if named and not six else ""))
    return out


def v9_header(count: int, sequence: int, source: int) -> bytes:
    return struct.pack(">HHIIII", 9, count, CLOCK.uptime_ms, CLOCK.export_ms // 1000, sequence, source)


def ipfix_message(body: bytes, sequence: int, domain: int) -> bytes:
    return struct.pack(">HHIII", 10, 16 + len(body), CLOCK.export_ms // 1000, sequence, domain) + body


@st.composite
def packet(draw: st.DrawFn) -> tuple[str, bytes]:
    exporter = draw(st.sampled_from(EXPORTERS))
    domain = draw(st.integers(0, 2))
    seq = draw(st.sampled_from([0, 1, 2, 7, 100, 0xFFFF_FFFF]))
    kind = draw(st.sampled_from(["v5", "v9-data", "v9-data", "v9-data", "v9-templates", "v9-mixed",
                                 "v9-options", "v9-options-data", "v9-redefine", "ipfix-data", "ipfix-data",
                                 "ipfix-templates", "ipfix-var", "ipfix-options", "ipfix-withdraw",
                                 "truncated", "garbage"]))
    if kind == "v5":
        return exporter, X.build_v5(flows(draw, draw(st.integers(1, 30)), v6=False, big=0xFFFF_FFFF), CLOCK, seq, domain,
                                    draw(st.sampled_from([0, 0, 10])))[0]
    if kind == "v9-data":  # one data set: the fast path
        six = draw(st.booleans())
        return exporter, X.build_v9(flows(draw, draw(st.integers(0, 24)), v6=six), CLOCK, domain, seq,
                                    with_templates=False)[0]
    if kind == "v9-mixed":  # two data sets: the slow path
        return exporter, X.build_v9(flows(draw, 2, v6=False) + flows(draw, 2, v6=True), CLOCK, domain, seq,
                                    with_templates=False)[0]
    if kind == "v9-templates":
        return exporter, X.build_v9(flows(draw, draw(st.integers(0, 3))), CLOCK, domain, seq)[0]
    if kind == "v9-options":
        tmpl, data = X.v9_options_flowset(draw(st.sampled_from([1, 10, 100])))
        return exporter, v9_header(1, seq, domain) + tmpl + data
    if kind == "v9-options-data":  # one data set of an options template: fast shape, changes state
        _, data = X.v9_options_flowset(draw(st.sampled_from([1, 10, 100])))
        return exporter, v9_header(1, seq, domain) + data
    if kind == "v9-redefine":  # template 256 with fewer fields: later data parses differently
        fields = ((8, 4), (12, 4), (1, 8))
        return exporter, v9_header(1, seq, domain) + X._set(0, X._template_body(X.V9_TEMPLATE_V4, fields))
    if kind == "ipfix-data":
        six = draw(st.booleans())
        return exporter, X.build_ipfix(flows(draw, draw(st.integers(0, 20)), v6=six), CLOCK.export_ms // 1000,
                                       domain, seq, with_templates=False)[0]
    if kind == "ipfix-var":
        return exporter, X.build_ipfix(flows(draw, draw(st.integers(1, 5)), v6=False, named=True),
                                       CLOCK.export_ms // 1000, domain, seq, with_templates=False)[0]
    if kind == "ipfix-templates":
        return exporter, X.build_ipfix(flows(draw, draw(st.integers(0, 3))), CLOCK.export_ms // 1000, domain, seq)[0]
    if kind == "ipfix-options":
        tmpl, data = X.ipfix_options_sets(1, draw(st.sampled_from([0, 9, 99])))
        body = draw(st.sampled_from([tmpl + data, data]))
        return exporter, ipfix_message(body, seq, domain)
    if kind == "ipfix-withdraw":
        return exporter, ipfix_message(struct.pack(">HHHH", 2, 8, X.IPFIX_TEMPLATE_V4, 0), seq, domain)
    if kind == "truncated":
        whole = X.build_v9(flows(draw, 3, v6=False), CLOCK, domain, seq, with_templates=False)[0]
        return exporter, whole[:draw(st.integers(0, len(whole) - 1))]
    return exporter, draw(st.binary(min_size=0, max_size=64))


def rows(flow_array: np.ndarray) -> list[bytes]:
    return sorted(r.tobytes() for r in flow_array)


def outcome(result: object) -> tuple[object, ...]:
    r = result  # a DecodeResult
    return (
        rows(r.flows),  # type: ignore[attr-defined]
        r.packets,  # type: ignore[attr-defined]
        [(m.index, m.reason) for m in r.malformed],  # type: ignore[attr-defined]
        sorted((p.index, p.set_offsets, p.datagram.exporter, p.datagram.payload, p.datagram.received_ns)
               for p in r.pending),  # type: ignore[attr-defined]
        r.missing_template_sets,  # type: ignore[attr-defined]
        sorted((g.exporter, g.domain, g.version, g.expected, g.received, g.lost) for g in r.gaps),  # type: ignore[attr-defined]
    )


def cache_state(cache: TemplateCache) -> object:
    return (sorted((e, d, repr(rec)) for e, d, rec, _ in cache.snapshot()),
            sorted((k, s.sampling, s.init_ms, sorted(s.samplers.items())) for k, s in cache._domains.items()))  # noqa: SLF001


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(packet(), min_size=1, max_size=60), st.lists(st.integers(1, 20), min_size=1, max_size=10))
def test_batch_decoder_equals_packet_walk(traffic: list[tuple[str, bytes]], cuts: list[int]) -> None:
    grams = [Datagram(e, p, 2055, k) for k, (e, p) in enumerate(traffic)]
    new_cache, new_tracker = TemplateCache(), SequenceTracker()
    old_cache, old_tracker = TemplateCache(), SequenceTracker()
    new_pending: list = []
    old_pending: list = []
    at = 0
    for size in cuts * (len(grams) // sum(cuts) + 1):
        batch = grams[at:at + size]
        at += size
        if not batch:
            break
        new = decode_packets(Packets.from_datagrams(batch), new_cache, new_tracker, now=float(at))
        old = ref.decode_batch(batch, old_cache, old_tracker, now=float(at))
        assert outcome(new) == outcome(old)
        # the pending sets of earlier batches, resumed after this batch's templates
        again_new = decode_pending(new_pending, new_cache)
        again_old = ref.decode_pending(old_pending, old_cache)
        assert outcome(again_new) == outcome(again_old)
        new_pending = list(again_new.pending) + list(new.pending)
        old_pending = list(again_old.pending) + list(old.pending)
    assert cache_state(new_cache) == cache_state(old_cache)
    assert new_tracker._next == old_tracker._next  # noqa: SLF001
    assert new_tracker.lost == old_tracker.lost


def test_steady_v9_and_ipfix_take_the_fast_path_and_equal_the_walk() -> None:
    """A realistic stream: templates once, then hundreds of single-set packets per domain."""
    spec = [X.FlowSpec(f"10.0.{i % 7}.{i % 200 + 1}", "203.0.113.9", i, 443, 6, 1000 + i, 3,
                       CLOCK.export_ms - 3000, CLOCK.export_ms - 1000) for i in range(24 * 300)]
    v9 = X.build_v9(spec, CLOCK, source_id=3)
    ipf = X.build_ipfix(spec, CLOCK.export_ms // 1000, domain=4, per_packet=24)
    grams = [Datagram("192.0.2.1", p) for pair in zip(v9, ipf) for p in pair]
    new = decode_batch(grams, TemplateCache(), SequenceTracker(), now=0)
    old = ref.decode_batch(grams, TemplateCache(), SequenceTracker(), now=0)
    assert outcome(new) == outcome(old)
    assert len(new.flows) == 2 * len(spec) and not new.gaps and not new.malformed
