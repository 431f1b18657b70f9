"""NetFlow v9 (RFC 3954): templates, options templates and data flowsets.

Theory of operation: `walk_v9` validates one export packet and walks its
flowsets, each bounded by its length field (>= 4, inside the packet, so the
walk ends in at most len/4 steps whatever the exporter claims). Template and
options-template flowsets go into the `TemplateCache` first; data flowsets are
then sliced into whole records and handed to a `RecordCollector`, which
decodes them per template for the whole batch. Options data (sampling
interval, sampler ids) updates the domain's state right away, because data
records that follow rely on it. Data for an unknown template is not decoded:
its set offset is returned so the caller can keep the packet and decode just
those sets once the template arrives (`decode.decode_pending`).

Sequence numbers count export packets per source id (RFC 3954 §5.1).
Everything from one packet is committed to the collector only when the whole
packet walked cleanly, so a malformed packet adds no flows.
"""

from __future__ import annotations

import struct

import numpy as np

from netflow.errors import DecodeError, TemplateError
from netflow.flows import EXPORTER_KEYS, SequenceGap
from netflow.templates import (
    IE_PACKET_INTERVAL,
    IE_PACKET_SPACE,
    IE_SAMPLER_ID,
    IE_SAMPLER_RANDOM_INTERVAL,
    IE_SAMPLING_INTERVAL,
    IE_SELECTOR_ID,
    IE_SYSTEM_INIT_MS,
    Chunk,
    CompiledTemplate,
    DomainState,
    FieldSpec,
    RecordCollector,
    SequenceTracker,
    TemplateCache,
    TemplateRecord,
)

HEADER = struct.Struct(">HHIIII")
SET_HEADER = struct.Struct(">HH")
TEMPLATE_SET, OPTIONS_SET, FIRST_DATA_SET = 0, 1, 256


def walk_v9(
    exporter: str,
    payload: bytes,
    cache: TemplateCache,
    tracker: SequenceTracker | None,
    collector: RecordCollector,
    now: float,
) -> tuple[list[int], SequenceGap | None]:
    """Walk one v9 packet; returns (offsets of sets missing a template, gap)."""
    if len(payload) < HEADER.size:
        raise DecodeError(f"v9 packet of {len(payload)} bytes is shorter than its header")
    version, _count, uptime, secs, sequence, source_id = HEADER.unpack_from(payload)
    if version != 9:
        raise DecodeError(f"version {version} is not 9")
    data_sets: list[tuple[int, int, int]] = []
    pos, end = HEADER.size, len(payload)
    while end - pos >= SET_HEADER.size:
        set_id, length = SET_HEADER.unpack_from(payload, pos)
        if length < SET_HEADER.size or pos + length > end:
            raise DecodeError(f"v9 flowset length {length} at {pos} overruns the packet")
        body = pos + SET_HEADER.size
        if set_id == TEMPLATE_SET:
            for record in parse_templates(payload, body, pos + length):
                cache.learn(exporter, source_id, record, now)
        elif set_id == OPTIONS_SET:
            for record in parse_options_templates(payload, body, pos + length):
                cache.learn(exporter, source_id, record, now)
        elif set_id >= FIRST_DATA_SET:
            data_sets.append((pos, set_id, length))
        pos += length
    hi, lo = EXPORTER_KEYS.get(exporter)
    state = cache.domain(exporter, source_id)
    ctx = (hi, lo, source_id, uptime, secs * 1000, 0, 0)
    local: list[Chunk] = []
    missing = data_sets_into(payload, data_sets, exporter, source_id, cache, state, ctx, local)
    for chunk in local:
        collector.add(*chunk)
    gap = tracker.observe(exporter, source_id, 9, sequence, 1) if tracker else None
    return missing, gap


def data_sets_into(
    payload: bytes,
    data_sets: list[tuple[int, int, int]],
    exporter: str,
    domain: int,
    cache: TemplateCache,
    state: DomainState,
    ctx: tuple[int, int, int, int, int, int, int],
    out: list[Chunk],
) -> list[int]:
    """Slice fixed-width data sets into `out`; return offsets of missing ones."""
    missing = []
    view = memoryview(payload)
    for pos, set_id, length in data_sets:
        compiled = cache.get(exporter, domain, set_id)
        if compiled is None:
            missing.append(pos)
            continue
        size = compiled.fixed_size
        count = (length - SET_HEADER.size) // size
        if count == 0:
            continue
        start = pos + SET_HEADER.size
        if compiled.record.options:
            apply_options(compiled, payload[start : start + count * size], count, exporter, domain, cache)
            continue
        sampled = ctx[:5] + (state.sampling, state.init_ms)
        out.append((compiled, state, view[start : start + count * size], count, sampled))
    return missing


def apply_options(
    compiled: CompiledTemplate,
    rows: bytes,
    count: int,
    exporter: str,
    domain: int,
    cache: TemplateCache,
) -> None:
    """Record sampling intervals and boot times carried by options data."""
    raw = np.frombuffer(rows, dtype=compiled.dtype, count=count)
    interval = compiled.uint(raw, IE_SAMPLING_INTERVAL)
    if interval is None:
        interval = compiled.uint(raw, IE_SAMPLER_RANDOM_INTERVAL)
    if interval is None:
        selected = compiled.uint(raw, IE_PACKET_INTERVAL)
        space = compiled.uint(raw, IE_PACKET_SPACE)
        if selected is not None and space is not None:
            # RFC 5477: select `selected` packets, then skip `space` packets
            interval = (selected + space) // np.maximum(selected, np.uint64(1))
    sampler = compiled.uint(raw, IE_SAMPLER_ID)
    if sampler is None:
        sampler = compiled.uint(raw, IE_SELECTOR_ID)
    if interval is not None:
        for k in range(count):
            sid = None if sampler is None else int(sampler[k])
            cache.record_sampling(exporter, domain, int(interval[k]), sid)
    init = compiled.uint(raw, IE_SYSTEM_INIT_MS)
    if init is not None:
        cache.domain(exporter, domain).init_ms = int(init[-1])


def parse_templates(payload: bytes, pos: int, end: int) -> list[TemplateRecord]:
    records = []
    while end - pos >= 4:
        template_id, field_count = SET_HEADER.unpack_from(payload, pos)
        if template_id == 0 and field_count == 0:
            break  # padding
        if template_id < FIRST_DATA_SET:
            raise TemplateError(f"template id {template_id} below 256")
        pos += 4
        if field_count == 0 or pos + 4 * field_count > end:
            raise TemplateError(f"template {template_id} with {field_count} fields overruns its set")
        fields = _fields(payload, pos, field_count)
        pos += 4 * field_count
        records.append(TemplateRecord(9, template_id, fields))
    return records


def parse_options_templates(payload: bytes, pos: int, end: int) -> list[TemplateRecord]:
    records = []
    while end - pos >= 6:
        template_id, scope_len, option_len = struct.unpack_from(">HHH", payload, pos)
        if template_id == 0:
            break  # padding
        if template_id < FIRST_DATA_SET or scope_len % 4 or option_len % 4:
            raise TemplateError(f"options template {template_id} is malformed")
        pos += 6
        total = (scope_len + option_len) // 4
        if total == 0 or pos + scope_len + option_len > end:
            raise TemplateError(f"options template {template_id} overruns its set")
        fields = _fields(payload, pos, total)
        pos += scope_len + option_len
        records.append(TemplateRecord(9, template_id, fields, scope_len // 4, options=True))
    return records


def _fields(payload: bytes, pos: int, count: int) -> tuple[FieldSpec, ...]:
    return tuple(
        FieldSpec(ie, length)
        for ie, length in struct.iter_unpack(">HH", payload[pos : pos + 4 * count])
    )


def resume_v9(
    exporter: str,
    payload: bytes,
    offsets: tuple[int, ...],
    cache: TemplateCache,
    collector: RecordCollector,
) -> list[int]:
    """Decode only the data sets at `offsets` (left pending earlier); returns
    those still missing. No templates are learned and no sequence is counted."""
    if len(payload) < HEADER.size:
        raise DecodeError("v9 packet shorter than its header")
    version, _count, uptime, secs, _sequence, source_id = HEADER.unpack_from(payload)
    if version != 9:
        raise DecodeError(f"version {version} is not 9")
    data_sets = pending_sets(payload, offsets, HEADER.size)
    hi, lo = EXPORTER_KEYS.get(exporter)
    state = cache.domain(exporter, source_id)
    local: list[Chunk] = []
    missing = data_sets_into(
        payload, data_sets, exporter, source_id, cache, state, (hi, lo, source_id, uptime, secs * 1000, 0, 0), local
    )
    for chunk in local:
        collector.add(*chunk)
    return missing


def pending_sets(payload: bytes, offsets: tuple[int, ...], first: int) -> list[tuple[int, int, int]]:
    """Re-validate the set headers at `offsets`; (offset, set id, length) each."""
    sets = []
    for pos in offsets:
        if pos < first or pos + SET_HEADER.size > len(payload):
            raise DecodeError(f"pending set offset {pos} is outside the packet")
        set_id, length = SET_HEADER.unpack_from(payload, pos)
        if set_id < FIRST_DATA_SET or length < SET_HEADER.size or pos + length > len(payload):
            raise DecodeError(f"pending set at {pos} is not a data set")
        sets.append((pos, set_id, length))
    return sets
