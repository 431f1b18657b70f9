"""Raw flows in hourly Parquet files, exact across crashes, with retention.

Theory of operation
-------------------
Layout (`billcore.common.rawflows`, shared with the core's reader,
``billcore.billing.rawflows``; Hive-style partitions, so DuckDB
``read_parquet('raw/*/*.parquet', hive_partitioning=true)``, Spark and
ClickHouse read it as one table)::

    <raw_dir>/hour=2024-03-20T12/w<worker>-<from>-<to>.parquet

One row per classified *leg* (a flow between two bound addresses is two
rows, one per account; a flow of no account is one row with account 0), by
the hour of the flow's start. ``from``/``to`` are the journal range of the
worker whose batches the file holds (20-digit offsets), so a file name says
exactly which received packets it covers.

The worker adds each batch's legs after decoding. `RawWriter.add_legs`
gathers the legs' columns right away (nothing of the batch's flow array is
kept) and appends them to the part file of their hour, which stays open
under a temporary name ``w<worker>-<from>.parquet.tmp`` for the whole flush
window; a part file gets a Parquet row group whenever `row_group_rows` legs
of its hour are waiting, so between flushes the writer holds at most about
two row groups of legs, not the window. `flush` writes what waits, closes and
fsyncs every part file, renames each to its final name, fsyncs the hour
directories and then writes the worker's raw watermark file
``_marks/w<worker>`` (same dance). A crash before the renames leaves only
temporary files, deleted at start; a crash between the renames and the mark
leaves part files whose ``from`` is at or beyond the mark: `RawWriter`
deletes them at start, the worker replays the journal from the mark (the
journal is never trimmed above it), and they are written again. So every
leg is in exactly one file.

Both promises on time — a window is flushed `flush_interval` after its
first leg, retention runs hourly — hold on an idle collector too: the worker
calls `tick` whenever it has nothing to read, so neither waits for the next
packet (which may never come: an exporter taken away, a quiet night).

A flush window has one part file per hour. An exporter with a broken clock
can spread one batch over many hours, so at most `MAX_OPEN_HOURS` part files
take rows as they come; the rows of any further hour are written and closed
at once, and `due` asks for a flush before the next batch (which could hold
that hour again).

Addresses are kept as the flow representation's 128-bit halves
(``src_hi``/``src_lo``; IPv4 mapped into ``::ffff:0:0/96``) plus ``src``
and ``dst`` as text in the core's ``netflow.raw`` answers; counters are the exported
(sampled) values with the ``sampling`` interval beside them.

Encodings are chosen per column, because the CPU goes into encoding and
compressing, not into writing: DELTA_BINARY_PACKED for times, accounts and
byte counts (cheap, and as small as zstd makes them), dictionary for the
few-valued columns (class, direction, exporter, protocol, flags,
interfaces), plain + zstd for address high halves and ports, and
dictionary + zstd for address low halves and packet counts, whose
dictionary page is kept small: a column with more distinct values than it
holds (IPv6 interface ids are random 64-bit values) goes on in plain, where
hashing every value would cost more and delta blocks would be 8 bytes wide.
Every column is NOT NULL, which spares the definition levels; statistics
are kept for the columns readers filter on (times, account, exporter).
Readers need DELTA_BINARY_PACKED, in Parquet since format 2.0: DuckDB 0.9+,
Spark 3.3+ (vectorized), ClickHouse and Arrow read it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from billcore.common.rawflows import HOUR_MS, PART_GLOB, RAW_COLUMNS, hour_dir
from netflow.classifier import Legs
from netflow.errors import NetflowError
from netflow.journal import fsync_path as _fsync_path

__all__ = ["RAW_DTYPE", "RAW_SCHEMA", "MAX_OPEN_HOURS", "RawStoreError", "RawWriter", "legs_columns", "legs_table",
           "apply_retention"]

RAW_DTYPE = np.dtype(list(RAW_COLUMNS))

_NAMES: tuple[str, ...] = RAW_DTYPE.names or ()
RAW_SCHEMA = pa.schema([pa.field(n, pa.from_numpy_dtype(RAW_DTYPE[n]), nullable=False) for n in _NAMES])

MAX_OPEN_HOURS = 24
"""Part files taking rows at once; one more hour in a window is written at once and forces a flush."""

_LEG_FIELDS = ("account", "klass", "direction")
_FLOW_FIELDS = tuple(n for n in _NAMES if n not in _LEG_FIELDS)
_GATHER_FIELDS = tuple(n for n in _FLOW_FIELDS if n != "first_ms")  # add_legs takes first_ms first, to sort

_GATHER_ROWS = 4096
"""Legs gathered per step. Their flow rows (~400 kB) stay in L2 while the fields are copied out; gathering
whole columns from the flow array instead streams all of it through the cache once per field."""

# Encodings per column, measured (see the module docstring).
_DELTA = ("first_ms", "last_ms", "account", "bytes")
_PLAIN = ("src_hi", "dst_hi", "src_port", "dst_port")
_ZSTD = _PLAIN + ("src_lo", "dst_lo", "packets")
_PARQUET_OPTIONS: dict[str, Any] = {
    "use_dictionary": [n for n in _NAMES if n not in _DELTA + _PLAIN],
    "column_encoding": {**dict.fromkeys(_DELTA, "DELTA_BINARY_PACKED"), **dict.fromkeys(_PLAIN, "PLAIN")},
    "compression": {n: "zstd" if n in _ZSTD else "none" for n in _NAMES},
    # a column with more values than this page holds (8192 of 8 bytes) goes on plain: hashing them
    # would cost more than zstd does, for no smaller a file
    "dictionary_pagesize_limit": 64 << 10,
    "write_statistics": ["first_ms", "last_ms", "account", "exporter_hi", "exporter_lo"],
}


@functools.lru_cache(maxsize=8)
def _field_runs(dtype: np.dtype, names: tuple[str, ...]) -> tuple[tuple[int, int, tuple[str, ...]], ...]:
    """``names`` of the flow ``dtype`` as runs ``(offset, size, names)`` of adjacent fields of one size,
    each run a block of columns of the rows seen as a matrix of size-byte words; size 0: copy by name."""
    fields = dtype.fields
    assert fields is not None, "flows are a structured array"
    runs: list[tuple[int, int, list[str]]] = []
    for offset, size, name in sorted((fields[n][1], fields[n][0].itemsize, n) for n in names):
        if offset % size or dtype.itemsize % size or RAW_DTYPE[name].itemsize != size:
            runs.append((offset, 0, [name]))
        elif runs and runs[-1][1] == size and runs[-1][0] + size * len(runs[-1][2]) == offset:
            runs[-1][2].append(name)
        else:
            runs.append((offset, size, [name]))
    return tuple((offset, size, tuple(run)) for offset, size, run in runs)


def _gather(flows: np.ndarray, index: np.ndarray, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Columns ``names`` of ``flows[index]``, copied out a few thousand rows at a time."""
    n = len(index)
    runs = _field_runs(flows.dtype, names)
    blocks = [np.empty((len(run), n), f"u{size}") if size else np.empty(n, RAW_DTYPE[run[0]])
              for _, size, run in runs]
    for a in range(0, n, _GATHER_ROWS):
        rows = flows.take(index[a:a + _GATHER_ROWS])
        b = a + len(rows)
        for (offset, size, run), block in zip(runs, blocks):
            if size:
                words = rows.view(f"u{size}").reshape(len(rows), -1)
                block[:, a:b] = words[:, offset // size:offset // size + len(run)].T
            else:
                block[a:b] = rows[run[0]]
    out = {}
    for (_, size, run), block in zip(runs, blocks):
        for k, name in enumerate(run):
            out[name] = block[k].view(RAW_DTYPE[name]) if size else block
    return out


def legs_columns(flows: np.ndarray, legs: Legs) -> dict[str, np.ndarray]:
    """RAW_DTYPE columns of the legs, one contiguous array each."""
    out = _gather(flows, legs.flow, _FLOW_FIELDS)
    for name in _LEG_FIELDS:
        out[name] = getattr(legs, name).astype(RAW_DTYPE[name], copy=False)
    return {name: out[name] for name in _NAMES}


def legs_table(flows: np.ndarray, legs: Legs) -> np.ndarray:
    """One RAW_DTYPE row per leg (tests, tools; the writer keeps columns)."""
    out = np.empty(len(legs.flow), dtype=RAW_DTYPE)
    for name, col in legs_columns(flows, legs).items():
        out[name] = col
    return out


def _fsync_write(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    _fsync_path(tmp)
    os.replace(tmp, path)
    _fsync_path(path.parent)


def apply_retention(root: Path, days: int, now_s: float) -> list[Path]:
    """Delete hour directories older than ``days`` (0: keep for ever)."""
    if days <= 0 or not root.exists():
        return []
    cutoff = datetime.fromtimestamp(now_s, timezone.utc) - timedelta(days=days)
    gone = []
    for path in root.glob("hour=*"):
        try:
            hour = datetime.strptime(path.name[5:], "%Y-%m-%dT%H").replace(tzinfo=timezone.utc)
        except ValueError:
            continue
        if hour + timedelta(hours=1) <= cutoff:
            shutil.rmtree(path, ignore_errors=True)
            gone.append(path)
    return gone


class RawStoreError(NetflowError):
    """A part file or the watermark could not be written; the writer takes nothing more, and a new one
    (the restarted worker) replays the journal from the watermark."""


class _HourPart:
    """One hour's part file of the current flush window: legs waiting for a row group, and the file,
    under its temporary name, from the first row group on."""

    __slots__ = ("tmp", "waiting", "rows", "sink", "writer", "closed")

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.waiting: list[pa.RecordBatch] = []
        self.rows = 0
        self.sink: pa.NativeFile | None = None
        self.writer: pq.ParquetWriter | None = None
        self.closed = False

    def add(self, batch: pa.RecordBatch) -> None:
        assert not self.closed, "a closed part file takes no more rows"
        self.waiting.append(batch)
        self.rows += batch.num_rows

    def write_waiting(self) -> None:
        """The waiting legs as one row group."""
        if not self.rows:
            return
        if self.writer is None:
            self.tmp.parent.mkdir(parents=True, exist_ok=True)
            self.sink = pa.OSFile(str(self.tmp), "wb")
            self.writer = pq.ParquetWriter(self.sink, RAW_SCHEMA, **_PARQUET_OPTIONS)
        self.writer.write_table(pa.Table.from_batches(self.waiting, RAW_SCHEMA), row_group_size=self.rows)
        self.waiting, self.rows = [], 0

    def close(self) -> None:
        """Write what waits, finish the file and fsync it; it keeps its temporary name."""
        if self.closed:
            return
        self.write_waiting()
        if self.writer is not None and self.sink is not None:
            self.writer.close()
            os.fsync(self.sink.fileno())
            self.sink.close()
        self.closed = True

    def abandon(self) -> None:
        """After a failed write: drop the file (a half-written footer is worth nothing)."""
        # the failure is already on its way up; this only releases the descriptor
        with contextlib.suppress(OSError, pa.ArrowException):
            if self.writer is not None and self.writer.is_open:
                self.writer.close()
        if self.sink is not None and not self.sink.closed:
            self.sink.close()
        self.tmp.unlink(missing_ok=True)


class RawWriter:
    """One worker's writer of raw legs: a part file per hour, open during a flush window and renamed into
    place by `flush`, which then moves the watermark."""

    def __init__(self, root: Path, worker: str, retention_days: int = 90, flush_rows: int = 2_000_000,
                 flush_interval: float = 60.0, row_group_rows: int = 131_072) -> None:
        if row_group_rows <= 0:
            raise ValueError("row_group_rows must be positive")
        self.root = Path(root)
        self.worker = worker
        self.retention_days = retention_days
        self.flush_rows = flush_rows
        self.flush_interval = flush_interval
        self.row_group_rows = row_group_rows
        self._marks = self.root / "_marks"
        self._marks.mkdir(parents=True, exist_ok=True)
        self._hours: dict[int, _HourPart] = {}
        self._waiting = 0  # legs waiting for a row group, over all hours
        self._overflow = False  # an hour beyond MAX_OPEN_HOURS was closed: flush before more legs
        self._failed: BaseException | None = None
        self.rows = 0
        self._from: int | None = None
        self._to = 0
        self._since = 0.0
        self._retention_at = 0.0
        self._forget_unmarked()

    def watermark(self) -> int | None:
        """Journal offset up to which every leg is in a part file (None: nothing yet)."""
        try:
            return int((self._marks / f"w{self.worker}").read_text())
        except FileNotFoundError:
            return None

    def _forget_unmarked(self) -> None:
        mark = self.watermark() or 0
        prefix = f"w{self.worker}-"
        for path in self.root.glob(f"hour=*/{prefix}*.tmp"):
            path.unlink()
        for path in self.root.glob(f"hour=*/{prefix}{PART_GLOB}"):
            start = path.stem[len(prefix):].split("-")[0]
            if start.isdigit() and int(start) >= mark:
                path.unlink()

    def add(self, rows: np.ndarray, first: int, end: int, now: float | None = None) -> None:
        """Add RAW_DTYPE rows covering journal range [first, end)."""
        hours = rows["first_ms"] // HOUR_MS
        if len(rows) and hours.min() != hours.max():
            order = np.argsort(hours, kind="stable")
            rows, hours = rows.take(order), hours.take(order)
        self._add({n: np.ascontiguousarray(rows[n]) for n in _NAMES}, hours, first, end, now)

    def add_legs(self, flows: np.ndarray, legs: Legs, first: int, end: int, now: float | None = None) -> None:
        """Add a batch's legs covering journal range [first, end); nothing of `flows` is kept."""
        index, account, klass, direction = legs.flow, legs.account, legs.klass, legs.direction
        first_ms = flows["first_ms"].take(index)
        hours = first_ms // HOUR_MS
        if len(index) and hours.min() != hours.max():
            # gathered in hour order, so that each hour's legs are one run
            order = np.argsort(hours, kind="stable")
            index, account, klass, direction = (a.take(order) for a in (index, account, klass, direction))
            first_ms, hours = first_ms.take(order), hours.take(order)
        cols = _gather(flows, index, _GATHER_FIELDS)
        cols["first_ms"] = first_ms
        for name, col in (("account", account), ("klass", klass), ("direction", direction)):
            cols[name] = col.astype(RAW_DTYPE[name], copy=False)
        self._add(cols, hours, first, end, now)

    def _add(self, cols: dict[str, np.ndarray], hours: np.ndarray, first: int, end: int, now: float | None) -> None:
        """Legs in hour order (their ``hours`` beside them) to the part files of their hours."""
        self._usable()
        if self._overflow:
            self.flush(now)  # the caller did not heed `due`, and a closed hour may come again
        if self._from is None:
            self._from = first
            self._since = time.monotonic() if now is None else now
        try:
            self._add_runs(cols, hours)
        except BaseException as exc:
            self._fail(exc)
            raise
        self.rows += len(hours)
        self._to = end

    def _add_runs(self, cols: dict[str, np.ndarray], hours: np.ndarray) -> None:
        n = len(hours)
        if not n:
            return
        cuts = [0, n] if hours[0] == hours[-1] else np.flatnonzero(np.r_[True, hours[1:] != hours[:-1], True]).tolist()
        for a, b in zip(cuts[:-1], cuts[1:]):
            hour = int(hours[a])
            # a slice keeps the whole batch's columns alive while it waits: copy the minor hours' legs
            minor = 2 * (b - a) < n
            batch = pa.RecordBatch.from_arrays(
                [pa.array(cols[name][a:b].copy() if minor else cols[name][a:b]) for name in _NAMES],
                schema=RAW_SCHEMA)
            part = self._hours.get(hour)
            if part is None:
                name = f"w{self.worker}-{self._from:020d}.parquet.tmp"
                part = self._hours[hour] = _HourPart(hour_dir(self.root, hour * HOUR_MS) / name)
                if len(self._hours) > MAX_OPEN_HOURS:
                    part.add(batch)
                    part.close()
                    self._overflow = True
                    continue
            part.add(batch)
            self._waiting += b - a
            if part.rows >= self.row_group_rows:
                self._waiting -= part.rows
                part.write_waiting()
        if self._waiting >= 2 * self.row_group_rows:
            for part in self._hours.values():
                part.write_waiting()
            self._waiting = 0

    def due(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return self._from is not None and (self._overflow or self.rows >= self.flush_rows
                                           or now - self._since >= self.flush_interval)

    def tick_due(self, now: float | None = None, wall: float | None = None) -> bool:
        """Whether `tick` has work: a window whose time is up, or retention not run for an hour."""
        wall = time.time() if wall is None else wall
        return self.due(now) or (self.retention_days > 0 and wall - self._retention_at > 3600)

    def tick(self, now: float | None = None, wall: float | None = None) -> None:
        """The timer of an idle collector: flush a window whose time is up (retention follows a flush),
        else apply retention if it has not run for an hour."""
        if self.due(now):
            self.flush(now, wall)
        else:
            self._retain(time.time() if wall is None else wall)

    def flush(self, now: float | None = None, wall: float | None = None) -> None:
        """Close and rename the window's part files, then move the watermark to the window's end."""
        self._usable()
        if self._from is None:
            return
        name = f"w{self.worker}-{self._from:020d}-{self._to:020d}.parquet"
        try:
            parts = [self._hours[h] for h in sorted(self._hours)]
            for part in parts:
                part.close()
            folders = set()
            for part in parts:
                if part.writer is not None:
                    os.replace(part.tmp, part.tmp.with_name(name))
                    folders.add(part.tmp.parent)
            for folder in sorted(folders):
                _fsync_path(folder)  # the renames are durable before the mark says so
            _fsync_write(self._marks / f"w{self.worker}", lambda p: p.write_text(str(self._to)))
        except BaseException as exc:
            self._fail(exc)
            raise
        self._reset()
        self._retain(time.time() if wall is None else wall)

    def _retain(self, wall: float) -> None:
        if wall - self._retention_at > 3600:
            apply_retention(self.root, self.retention_days, wall)
            self._retention_at = wall

    def _usable(self) -> None:
        if self._failed is not None:
            raise RawStoreError("an earlier raw write failed; restart from the watermark") from self._failed

    def _fail(self, exc: BaseException) -> None:
        for part in self._hours.values():
            part.abandon()
        self._reset()
        self._failed = exc

    def _reset(self) -> None:
        self._hours, self._waiting, self._overflow = {}, 0, False
        self.rows, self._from = 0, None
