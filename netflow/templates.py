"""Templates for NetFlow v9 and IPFIX: compiling, caching, expiring.

Theory of operation: a template record (a list of (element id, length)
fields) compiles once into a numpy structured dtype whose offsets mirror the
wire layout, plus a plan saying which fields feed which column of
`FLOW_DTYPE`. Decoding a data set is then `np.frombuffer(set, dtype)` and a
handful of column assignments, whatever the number of records. Compiled
templates are memoized by their field list, so a thousand exporters sending
the same template share one compiled object.

Fields of odd width (RFC 7011 reduced-size encoding, e.g. a 3-byte counter)
compile to a uint8 sub-array that is folded into an integer; variable-length
IPFIX fields (length 65535) are not part of the dtype at all: such templates
take the slow path in `ipfix.py`, which copies the fixed-width fields of each
record into a packed row of `CompiledTemplate.dtype` and drops the rest.

`TemplateCache` holds the templates of every (exporter, domain) with the time
each was last (re)announced; `expire(now)` forgets the stale ones, so data
for them is counted as missing-template until the exporter re-announces.
It also keeps each domain's sampling state from options data, and is bounded
in templates per domain and in total. `SequenceTracker` follows each
exporter's sequence counter and reports gaps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from netflow.errors import TemplateError
from netflow.flows import FLOW_DTYPE, V4_MAPPED, SequenceGap

VARIABLE_LENGTH = 65535
MAX_FIELDS = 256
MAX_RECORD_BYTES = 65535
MAX_COMPILED = 4096

# Information element ids (RFC 3954 field types 1-127 are the same as RFC 7012).
IE_OCTETS, IE_PACKETS, IE_PROTO, IE_TOS, IE_TCP_FLAGS = 1, 2, 4, 5, 6
IE_SRC_PORT, IE_SRC_V4, IE_INPUT_IF, IE_DST_PORT, IE_DST_V4 = 7, 8, 10, 11, 12
IE_OUTPUT_IF, IE_LAST_UPTIME, IE_FIRST_UPTIME = 14, 21, 22
IE_OUT_OCTETS, IE_OUT_PACKETS, IE_SRC_V6, IE_DST_V6 = 23, 24, 27, 28
IE_SAMPLING_INTERVAL, IE_SAMPLER_ID, IE_SAMPLER_RANDOM_INTERVAL = 34, 48, 50
IE_START_S, IE_END_S, IE_START_MS, IE_END_MS = 150, 151, 152, 153
IE_START_DELTA_US, IE_END_DELTA_US = 158, 159
IE_SYSTEM_INIT_MS = 160
UPTIME_SKEW_MS = 3_600_000  # how far after the export time a sysUpTime-stamped flow may end
IE_SELECTOR_ID, IE_PACKET_INTERVAL, IE_PACKET_SPACE = 302, 305, 306


@dataclass(frozen=True, slots=True)
class FieldSpec:
    ie: int
    length: int
    enterprise: int = 0


@dataclass(frozen=True, slots=True)
class TemplateRecord:
    """A template as announced on the wire; the unit workers may share."""

    version: int  # 9 or 10
    template_id: int
    fields: tuple[FieldSpec, ...]
    scope_count: int = 0  # leading scope fields of an options template
    options: bool = False


@dataclass(frozen=True, slots=True)
class Context:
    """Per-record context arrays for converting one group of records."""

    exporter_hi: np.ndarray
    exporter_lo: np.ndarray
    domain: np.ndarray
    uptime_ms: np.ndarray  # v9 header sysUpTime; 0 for IPFIX
    export_ms: np.ndarray  # header export time, epoch ms
    sampling: np.ndarray  # domain default when the record does not say
    init_ms: np.ndarray  # IPFIX systemInitTimeMilliseconds of the domain, 0 unknown


@dataclass(frozen=True, slots=True, eq=False)
class CompiledTemplate:
    record: TemplateRecord
    dtype: np.dtype  # fixed-width fields only, at their wire offsets (packed if variable)
    names: tuple[str | None, ...]  # dtype field name per template field; None for var/skipped
    fixed_size: int  # wire size when not variable; packed row size otherwise
    variable: bool
    index: dict[int, int]  # first occurrence of each (non-enterprise) ie -> field position

    def has(self, ie: int) -> bool:
        return ie in self.index

    def uint(self, raw: np.ndarray, ie: int) -> np.ndarray | None:
        """Column of element `ie` as uint64, or None when absent or not an integer."""
        pos = self.index.get(ie)
        if pos is None:
            return None
        name = self.names[pos]
        if name is None:
            return None
        length = self.record.fields[pos].length
        col = raw[name]
        if length in (1, 2, 4, 8):
            return col.astype(np.uint64)
        if length > 8:
            return None
        acc = np.zeros(len(raw), dtype=np.uint64)
        for k in range(length):
            acc = (acc << np.uint64(8)) | col[:, k].astype(np.uint64)
        return acc

    def _column(self, raw: np.ndarray, ie: int) -> np.ndarray | None:
        """Element `ie` as an unsigned column, without a copy when it is 1, 2, 4 or 8 bytes wide."""
        pos = self.index.get(ie)
        if pos is None or self.names[pos] is None:
            return None
        if self.record.fields[pos].length in (1, 2, 4, 8):
            return raw[self.names[pos]]
        return self.uint(raw, ie)

    def to_flows(
        self, raw: np.ndarray, ctx: Context, samplers: dict[int, int] | None = None
    ) -> np.ndarray:
        """Project decoded records onto FLOW_DTYPE.

        `samplers` maps the domain's sampler/selector ids to intervals, for
        records that name their sampler instead of carrying the interval.
        """
        n = len(raw)
        out = np.zeros(n, dtype=FLOW_DTYPE)
        out["exporter_hi"] = ctx.exporter_hi
        out["exporter_lo"] = ctx.exporter_lo
        out["domain"] = ctx.domain
        for target, ies in _COUNTERS:
            for ie in ies:
                col = self._column(raw, ie)
                if col is not None:
                    out[target] = col
                    break
        for target, ie in _SMALL:
            col = self._column(raw, ie)
            if col is not None:
                # integer assignment keeps the low bits, as `& _MASKS[target]` would
                out[target] = col
        self._addresses(raw, out)
        self._times(raw, ctx, out)
        self._sampling(raw, ctx, out, samplers or {})
        return out

    def _addresses(self, raw: np.ndarray, out: np.ndarray) -> None:
        v4 = [self._fixed(ie, 4) for ie in (IE_SRC_V4, IE_DST_V4)]
        v6 = [self._fixed(ie, 16) for ie in (IE_SRC_V6, IE_DST_V6)]
        if v4[0] or v4[1] or not (v6[0] or v6[1]):
            for side, name in zip(("src", "dst"), v4):
                out[f"{side}_lo"] = V4_MAPPED
                if name:
                    out[f"{side}_lo"] |= raw[name].astype(np.uint64)
            out["ip_version"] = 4
            return
        for side, name in zip(("src", "dst"), v6):
            if name:
                out[f"{side}_hi"] = raw[name]["hi"]
                out[f"{side}_lo"] = raw[name]["lo"]
        out["ip_version"] = 6

    def _fixed(self, ie: int, length: int) -> str | None:
        pos = self.index.get(ie)
        if pos is None or self.record.fields[pos].length != length:
            return None
        return self.names[pos]

    def _times(self, raw: np.ndarray, ctx: Context, out: np.ndarray) -> None:
        export_ms = ctx.export_ms.astype(np.int64)
        for target, ms_ie, s_ie, up_ie, delta_ie in (
            ("first_ms", IE_START_MS, IE_START_S, IE_FIRST_UPTIME, IE_START_DELTA_US),
            ("last_ms", IE_END_MS, IE_END_S, IE_LAST_UPTIME, IE_END_DELTA_US),
        ):
            col = self.uint(raw, ms_ie)
            if col is not None:
                out[target] = col.astype(np.int64)
                continue
            col = self.uint(raw, s_ie)
            if col is not None:
                out[target] = col.astype(np.int64) * 1000
                continue
            col = self.uint(raw, up_ie)
            if col is not None and self.record.version == 9:
                age = (ctx.uptime_ms - col) & np.uint64(0xFFFF_FFFF)
                out[target] = export_ms - age.astype(np.int64)
                continue
            if col is not None:
                init = self.uint(raw, IE_SYSTEM_INIT_MS)
                base = init.astype(np.int64) if init is not None else ctx.init_ms.astype(np.int64)
                known = base > 0
                # the uptime is an unsigned32: it wraps every 49.7 days, and softflowd reading a
                # pcap sends packets older than its start as negative (wrapped) values. Take the
                # time congruent to init + uptime mod 2^32 that lies within [49.7 days, 1 hour)
                # before the export time.
                age = (export_ms - base - col.astype(np.int64) + UPTIME_SKEW_MS) % (1 << 32) - UPTIME_SKEW_MS
                out[target] = np.where(known, export_ms - age, export_ms)
                continue
            col = self.uint(raw, delta_ie)
            if col is not None:
                out[target] = export_ms - (col // np.uint64(1000)).astype(np.int64)
                continue
            out[target] = export_ms

    def _sampling(
        self, raw: np.ndarray, ctx: Context, out: np.ndarray, samplers: dict[int, int]
    ) -> None:
        default = ctx.sampling
        ids = self.uint(raw, IE_SAMPLER_ID)
        if ids is None:
            ids = self.uint(raw, IE_SELECTOR_ID)
        if ids is not None and samplers:
            default = default.copy()
            for sid, interval in samplers.items():
                default[ids == sid] = interval
        rate = None
        for ie in (IE_SAMPLING_INTERVAL, IE_SAMPLER_RANDOM_INTERVAL):
            rate = self.uint(raw, ie)
            if rate is not None:
                break
        if rate is None:
            out["sampling"] = default
            return
        rate = np.minimum(rate, np.uint64(0xFFFF_FFFF))
        out["sampling"] = np.where(rate == 0, default, rate)


_COUNTERS = (
    ("bytes", (IE_OCTETS, IE_OUT_OCTETS)),
    ("packets", (IE_PACKETS, IE_OUT_PACKETS)),
)
_SMALL = (
    ("proto", IE_PROTO),
    ("tos", IE_TOS),
    ("tcp_flags", IE_TCP_FLAGS),
    ("src_port", IE_SRC_PORT),
    ("dst_port", IE_DST_PORT),
    ("input_if", IE_INPUT_IF),
    ("output_if", IE_OUTPUT_IF),
)
_MASKS = {
    "proto": 0xFF,
    "tos": 0xFF,
    "tcp_flags": 0xFF,
    "src_port": 0xFFFF,
    "dst_port": 0xFFFF,
    "input_if": 0xFFFF_FFFF,
    "output_if": 0xFFFF_FFFF,
}

_ADDR6 = np.dtype([("hi", ">u8"), ("lo", ">u8")])
_compiled: dict[TemplateRecord, CompiledTemplate] = {}


def compile_template(record: TemplateRecord) -> CompiledTemplate:
    """Compile (memoized) a template record into its dtype and plan."""
    hit = _compiled.get(record)
    if hit is not None:
        return hit
    if not record.fields or len(record.fields) > MAX_FIELDS:
        raise TemplateError(f"template {record.template_id}: {len(record.fields)} fields")
    names: list[str | None] = []
    formats: list[object] = []
    offsets: list[int] = []
    index: dict[int, int] = {}
    offset = 0
    variable = False
    for pos, spec in enumerate(record.fields):
        if spec.length == 0:
            raise TemplateError(f"template {record.template_id}: zero-length field")
        if record.version == 10 and spec.length == VARIABLE_LENGTH:
            variable = True
            names.append(None)
            continue
        name = f"f{pos}"
        names.append(name)
        offsets.append(offset)
        formats.append(_field_format(spec))
        offset += spec.length
        if spec.enterprise == 0 and spec.ie not in index:
            index[spec.ie] = pos
    for spec_pos, spec in enumerate(record.fields):
        if spec.enterprise == 0 and spec.ie not in index and names[spec_pos] is None:
            index[spec.ie] = spec_pos
    if offset > MAX_RECORD_BYTES or (offset == 0 and not variable):
        raise TemplateError(f"template {record.template_id}: record of {offset} bytes")
    dtype = np.dtype(
        {
            "names": [n for n in names if n is not None],
            "formats": formats,
            "offsets": offsets,
            "itemsize": max(offset, 1),
        }
    )
    compiled = CompiledTemplate(record, dtype, tuple(names), offset, variable, index)
    if len(_compiled) >= MAX_COMPILED:
        _compiled.clear()
    _compiled[record] = compiled
    return compiled


def _field_format(spec: FieldSpec) -> object:
    if spec.enterprise == 0 and spec.ie in (IE_SRC_V6, IE_DST_V6) and spec.length == 16:
        return _ADDR6
    if spec.length in (1, 2, 4, 8):
        return f">u{spec.length}"
    return ("u1", (spec.length,))


@dataclass(slots=True)
class DomainState:
    """What an (exporter, domain) told us: templates, sampling, boot time."""

    templates: dict[int, CompiledTemplate] = field(default_factory=dict)
    sampling: int = 1
    samplers: dict[int, int] = field(default_factory=dict)
    init_ms: int = 0


class TemplateCache:
    """Templates per (exporter, domain, template id), with refresh and expiry.

    Times are whatever clock the caller passes as `now` (seconds, monotonic or
    wall); `timeout` is in the same unit. A template announced again is
    refreshed; an identical announcement keeps the compiled object.
    """

    def __init__(
        self,
        timeout: float = 1800.0,
        max_per_domain: int = 512,
        max_total: int = 16384,
        max_domains: int = 4096,
    ) -> None:
        self.timeout = timeout
        self.max_per_domain = max_per_domain
        self.max_total = max_total
        self.max_domains = max_domains
        self._domains: dict[tuple[str, int], DomainState] = {}
        self._total = 0
        self._now: dict[tuple[str, int, int], float] = {}

    def __len__(self) -> int:
        return self._total

    def domain(self, exporter: str, domain: int) -> DomainState:
        key = (exporter, domain)
        state = self._domains.get(key)
        if state is None:
            if len(self._domains) >= self.max_domains:
                raise TemplateError(f"more than {self.max_domains} exporter domains")
            state = self._domains[key] = DomainState()
        return state

    def learn(self, exporter: str, domain: int, record: TemplateRecord, now: float) -> CompiledTemplate:
        compiled = compile_template(record)
        state = self.domain(exporter, domain)
        if record.template_id not in state.templates:
            if len(state.templates) >= self.max_per_domain or self._total >= self.max_total:
                raise TemplateError(f"template limit reached for {exporter} domain {domain}")
            self._total += 1
        state.templates[record.template_id] = compiled
        self._now[(exporter, domain, record.template_id)] = now
        return compiled

    def withdraw(self, exporter: str, domain: int, template_id: int | None = None) -> int:
        """Forget one template, or all of the domain's when `template_id` is None."""
        state = self._domains.get((exporter, domain))
        if state is None:
            return 0
        ids = list(state.templates) if template_id is None else [template_id]
        gone = 0
        for tid in ids:
            if state.templates.pop(tid, None) is not None:
                self._now.pop((exporter, domain, tid), None)
                gone += 1
        self._total -= gone
        return gone

    def get(self, exporter: str, domain: int, template_id: int) -> CompiledTemplate | None:
        state = self._domains.get((exporter, domain))
        if state is None:
            return None
        return state.templates.get(template_id)

    def expire(self, now: float) -> int:
        """Forget templates not announced for `timeout`; returns how many."""
        stale = [key for key, seen in self._now.items() if now - seen > self.timeout]
        for exporter, domain, tid in stale:
            self.withdraw(exporter, domain, tid)
        return len(stale)

    def snapshot(self) -> list[tuple[str, int, TemplateRecord, float]]:
        """Every live template with its last announcement, for sharing between workers."""
        out = []
        for (exporter, domain), state in self._domains.items():
            for tid, compiled in state.templates.items():
                out.append((exporter, domain, compiled.record, self._now[(exporter, domain, tid)]))
        return out

    def record_sampling(
        self, exporter: str, domain: int, interval: int, sampler_id: int | None = None
    ) -> None:
        interval = max(1, min(int(interval), 0xFFFF_FFFF))
        state = self.domain(exporter, domain)
        state.sampling = interval
        if sampler_id is not None and (sampler_id in state.samplers or len(state.samplers) < 1024):
            state.samplers[sampler_id] = interval

    def sampling(self, exporter: str, domain: int) -> int:
        state = self._domains.get((exporter, domain))
        return 1 if state is None else state.sampling


class SequenceTracker:
    """Expected next sequence number per (exporter, domain, version)."""

    def __init__(self, max_streams: int = 65536) -> None:
        self.max_streams = max_streams
        self._next: dict[tuple[str, int, int], int] = {}
        self.lost = 0

    def observe(
        self, exporter: str, domain: int, version: int, sequence: int, advance: int | None
    ) -> SequenceGap | None:
        """Check `sequence` against the expectation, then expect `sequence + advance`.

        `advance` None means this packet's contribution is unknown (data for a
        missing template in IPFIX): the next packet is accepted as is.
        """
        key = (exporter, domain, version)
        expected = self._next.get(key)
        if advance is None:
            self._next.pop(key, None)
        else:
            if key not in self._next and len(self._next) >= self.max_streams:
                self._next.pop(next(iter(self._next)))
            self._next[key] = (sequence + advance) & 0xFFFF_FFFF
        if expected is None or expected == sequence:
            return None
        diff = (sequence - expected) & 0xFFFF_FFFF
        lost = diff if diff < 0x8000_0000 else diff - 0x1_0000_0000
        if lost > 0:
            self.lost += lost
        return SequenceGap(exporter, domain, version, expected, sequence, lost)

    def observe_many(
        self, exporter: str, domain: int, version: int, sequences: np.ndarray, advances: np.ndarray
    ) -> list[SequenceGap]:
        """`observe` for consecutive packets of one stream, vectorized."""
        if not len(sequences):
            return []
        seq = sequences.astype(np.int64)
        chained = (seq[:-1] + advances[:-1].astype(np.int64)) & 0xFFFF_FFFF
        gaps = []
        first = self.observe(exporter, domain, version, int(seq[0]), int(advances[0]))
        if first is not None:
            gaps.append(first)
        key = (exporter, domain, version)
        for k in np.flatnonzero(chained != seq[1:]):
            self._next[key] = int(chained[k])
            gap = self.observe(exporter, domain, version, int(seq[k + 1]), int(advances[k + 1]))
            if gap is not None:
                gaps.append(gap)
        # observe() only ran at gaps: move the expectation to the batch's end
        self._next[key] = int((seq[-1] + int(advances[-1])) & 0xFFFF_FFFF)
        return gaps


Chunk = tuple["CompiledTemplate", "DomainState", "bytes | memoryview", int, tuple[int, int, int, int, int, int, int]]
"""Arguments of one `RecordCollector.add`: records of one data set, not yet decoded."""


class RecordCollector:
    """Gathers data records of one batch per compiled template.

    Walking a packet only slices bytes and notes its header values; all
    decoding happens in `finish`, one `np.frombuffer` per template per batch,
    which is what makes v9/IPFIX decoding cost per batch rather than per set.
    `add` takes one data set (the walkers); `add_many` takes the joined
    records of many sets with per-set arrays (the batch fast path).
    """

    __slots__ = ("_groups", "records")

    def __init__(self) -> None:
        # keyed by (template, domain): compiled templates are shared between exporters, but a
        # domain's sampler map (applied in `finish`) is its own
        self._groups: dict[tuple[int, int], tuple[CompiledTemplate, DomainState, list[tuple[object, ...]],
                                      list[tuple[bytes, np.ndarray, tuple[np.ndarray, ...]]]]] = {}
        self.records = 0

    def _group(self, compiled: CompiledTemplate, state: DomainState) -> tuple[Any, ...]:
        key = (id(compiled), id(state))
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = (compiled, state, [], [])
        return group

    def add(
        self,
        compiled: CompiledTemplate,
        state: DomainState,
        rows: bytes | memoryview,
        count: int,
        ctx: tuple[int, int, int, int, int, int, int],
    ) -> None:
        """`rows` holds `count` records laid out as `compiled.dtype`; `ctx` is
        (exporter_hi, exporter_lo, domain, uptime_ms, export_ms, sampling, init_ms)."""
        self._group(compiled, state)[2].append((rows, count, *ctx))
        self.records += count

    def add_many(
        self,
        compiled: CompiledTemplate,
        state: DomainState,
        rows: bytes,
        counts: np.ndarray,
        ctx: tuple[np.ndarray, ...],
    ) -> None:
        """`add` for many sets at once: `rows` joined, `counts` and the 7 `ctx` columns per set."""
        self._group(compiled, state)[3].append((rows, counts, ctx))
        self.records += int(counts.sum())

    def finish(self) -> list[np.ndarray]:
        out = []
        for compiled, state, chunks, many in self._groups.values():
            pieces: list[Any] = [c[0] for c in chunks] + [m[0] for m in many]
            data = b"".join(pieces)
            counts = np.concatenate([np.array([c[1] for c in chunks], dtype=np.int64)]
                                    + [m[1].astype(np.int64) for m in many])
            raw = np.frombuffer(data, dtype=compiled.dtype, count=int(counts.sum()))
            cols = [np.repeat(np.concatenate([np.array([c[k] for c in chunks], dtype=np.uint64)]
                                             + [m[2][k - 2].astype(np.uint64) for m in many]), counts)
                    for k in range(2, 9)]
            ctx = Context(*cols)
            out.append(compiled.to_flows(raw, ctx, state.samplers))
        return out
