"""IPFIX (RFC 7011): messages, template/options-template sets, data sets.

Theory of operation: the same shape as `v9.py` — validate the message
header, walk sets bounded by their lengths, learn templates first, then
slice data sets into the batch's `RecordCollector`. IPFIX adds:

- enterprise-specific field specifiers (bit 15 of the element id, followed
  by a 4-byte enterprise number); they are carried in the template and
  skipped when decoding;
- template withdrawal (a template record with field count 0; id 2/3 withdraws
  all of the domain's templates);
- variable-length fields (length 65535, RFC 7011 §7): each value is prefixed
  by a 1-byte length, or 255 and a 2-byte length. Only templates that have
  such a field take the per-record slow path, which packs the fixed fields of
  every record into a row of the template's compiled dtype and skips the rest.
  Each record consumes at least one byte per field, so the loop is bounded by
  the set length.

The message header's sequence number counts data records (options data
included) sent in the observation domain before this message (§3.1). When a
data set waits for its template, its record count is unknown, so sequence
tracking restarts at the next message instead of reporting a false gap.
"""

from __future__ import annotations

import struct

from netflow.errors import DecodeError, TemplateError
from netflow.flows import EXPORTER_KEYS, SequenceGap
from netflow.templates import (
    VARIABLE_LENGTH,
    Chunk,
    CompiledTemplate,
    FieldSpec,
    RecordCollector,
    SequenceTracker,
    TemplateCache,
    TemplateRecord,
)
from netflow.v9 import apply_options, pending_sets

HEADER = struct.Struct(">HHIII")
SET_HEADER = struct.Struct(">HH")
TEMPLATE_SET, OPTIONS_SET, FIRST_DATA_SET = 2, 3, 256


def walk_ipfix(
    exporter: str,
    payload: bytes,
    cache: TemplateCache,
    tracker: SequenceTracker | None,
    collector: RecordCollector,
    now: float,
) -> tuple[list[int], SequenceGap | None]:
    """Walk one IPFIX message; returns (offsets of sets missing a template, gap)."""
    version, end, export_s, sequence, domain = _header(payload)
    data_sets: list[tuple[int, int, int]] = []
    pos = HEADER.size
    while end - pos >= SET_HEADER.size:
        set_id, length = SET_HEADER.unpack_from(payload, pos)
        if length < SET_HEADER.size or pos + length > end:
            raise DecodeError(f"IPFIX set length {length} at {pos} overruns the message")
        body = pos + SET_HEADER.size
        if set_id in (TEMPLATE_SET, OPTIONS_SET):
            for template_id, record in parse_templates(payload, body, pos + length, set_id):
                if record is None:
                    cache.withdraw(exporter, domain, None if template_id == set_id else template_id)
                else:
                    cache.learn(exporter, domain, record, now)
        elif set_id >= FIRST_DATA_SET:
            data_sets.append((pos, set_id, length))
        pos += length
    if pos != end:
        raise DecodeError("IPFIX message length does not end on a set boundary")
    local: list[Chunk] = []
    missing, records = _data_sets(payload, data_sets, exporter, domain, export_s, cache, local)
    for chunk in local:
        collector.add(*chunk)
    gap = None
    if tracker is not None:
        gap = tracker.observe(exporter, domain, 10, sequence, None if missing else records)
    return missing, gap


def resume_ipfix(
    exporter: str,
    payload: bytes,
    offsets: tuple[int, ...],
    cache: TemplateCache,
    collector: RecordCollector,
) -> list[int]:
    """Decode only the data sets at `offsets`; returns those still missing."""
    _version, end, export_s, _sequence, domain = _header(payload)
    data_sets = pending_sets(payload[:end], offsets, HEADER.size)
    local: list[Chunk] = []
    missing, _ = _data_sets(payload, data_sets, exporter, domain, export_s, cache, local)
    for chunk in local:
        collector.add(*chunk)
    return missing


def _header(payload: bytes) -> tuple[int, int, int, int, int]:
    if len(payload) < HEADER.size:
        raise DecodeError(f"IPFIX message of {len(payload)} bytes is shorter than its header")
    version, length, export_s, sequence, domain = HEADER.unpack_from(payload)
    if version != 10:
        raise DecodeError(f"version {version} is not 10")
    if length < HEADER.size or length > len(payload):
        raise DecodeError(f"IPFIX length {length} does not fit the {len(payload)}-byte datagram")
    return version, length, export_s, sequence, domain


def _data_sets(
    payload: bytes,
    data_sets: list[tuple[int, int, int]],
    exporter: str,
    domain: int,
    export_s: int,
    cache: TemplateCache,
    out: list[Chunk],
) -> tuple[list[int], int]:
    missing: list[int] = []
    records = 0
    if not data_sets:
        return missing, records
    hi, lo = EXPORTER_KEYS.get(exporter)
    state = cache.domain(exporter, domain)
    view = memoryview(payload)
    for pos, set_id, length in data_sets:
        compiled = cache.get(exporter, domain, set_id)
        if compiled is None:
            missing.append(pos)
            continue
        start, stop = pos + SET_HEADER.size, pos + length
        rows: bytes | memoryview
        if compiled.variable:
            rows, count = pack_variable(compiled, payload, start, stop)
        else:
            count = (stop - start) // compiled.fixed_size
            rows = view[start : start + count * compiled.fixed_size]
        records += count
        if count == 0:
            continue
        if compiled.record.options:
            apply_options(compiled, bytes(rows), count, exporter, domain, cache)
            continue
        ctx = (hi, lo, domain, 0, export_s * 1000, state.sampling, state.init_ms)
        out.append((compiled, state, rows, count, ctx))
    return missing, records


def pack_variable(compiled: CompiledTemplate, payload: bytes, pos: int, end: int) -> tuple[bytes, int]:
    """Slow path: copy each record's fixed fields into a packed row."""
    fields = compiled.record.fields
    minimum = sum(1 if f.length == VARIABLE_LENGTH else f.length for f in fields)
    pad = b"\x00" * (compiled.dtype.itemsize - compiled.fixed_size)
    out = bytearray()
    count = 0
    while end - pos >= minimum:
        for spec in fields:
            if spec.length != VARIABLE_LENGTH:
                if pos + spec.length > end:
                    raise DecodeError("IPFIX record overruns its set")
                out += payload[pos : pos + spec.length]
                pos += spec.length
                continue
            if pos >= end:
                raise DecodeError("IPFIX variable-length field overruns its set")
            size = payload[pos]
            pos += 1
            if size == 255:
                if pos + 2 > end:
                    raise DecodeError("IPFIX variable-length prefix overruns its set")
                size = int.from_bytes(payload[pos : pos + 2], "big")
                pos += 2
            if pos + size > end:
                raise DecodeError("IPFIX variable-length value overruns its set")
            pos += size
        out += pad
        count += 1
    return bytes(out), count


def parse_templates(
    payload: bytes, pos: int, end: int, set_id: int
) -> list[tuple[int, TemplateRecord | None]]:
    """Template records of one set; a None record is a withdrawal of its id."""
    records: list[tuple[int, TemplateRecord | None]] = []
    head = 6 if set_id == OPTIONS_SET else 4
    while end - pos >= 4:
        template_id, field_count = SET_HEADER.unpack_from(payload, pos)
        if field_count == 0:
            if template_id != set_id and template_id < FIRST_DATA_SET:
                if template_id == 0:
                    break  # padding
                raise TemplateError(f"withdrawal of template id {template_id}")
            records.append((template_id, None))
            pos += 4
            continue
        if template_id < FIRST_DATA_SET or end - pos < head:
            raise TemplateError(f"template id {template_id} is malformed")
        scope = struct.unpack_from(">H", payload, pos + 4)[0] if head == 6 else 0
        if head == 6 and not 1 <= scope <= field_count:
            raise TemplateError(f"options template {template_id} has scope count {scope}")
        pos += head
        fields = []
        for _ in range(field_count):
            if end - pos < 4:
                raise TemplateError(f"template {template_id} overruns its set")
            ie, length = SET_HEADER.unpack_from(payload, pos)
            pos += 4
            enterprise = 0
            if ie & 0x8000:
                if end - pos < 4:
                    raise TemplateError(f"template {template_id} overruns its set")
                enterprise = struct.unpack_from(">I", payload, pos)[0]
                pos += 4
                ie &= 0x7FFF
            fields.append(FieldSpec(ie, length, enterprise))
        records.append(
            (template_id, TemplateRecord(10, template_id, tuple(fields), scope, set_id == OPTIONS_SET))
        )
    return records
