"""Raw flows in hourly Parquet files, exact across crashes, with retention.

Theory of operation
-------------------
Layout (Hive-style partitions, so DuckDB ``read_parquet('raw/*/*.parquet',
hive_partitioning=true)``, Spark and ClickHouse read it as one table)::

    <raw_dir>/hour=2024-03-20T12/w<worker>-<from>-<to>.parquet

One row per classified *leg* (a flow between two bound addresses is two
rows, one per account; a flow of no account is one row with account 0), by
the hour of the flow's start. ``from``/``to`` are the journal range of the
worker whose batches the file holds (20-digit offsets), so a file name says
exactly which received packets it covers.

The worker adds each batch's legs after decoding; `flush` writes one part
file per hour touched (temporary name, fsync, rename) and then the worker's
raw watermark file ``_marks/w<worker>`` (same dance). A crash between the
two leaves part files whose ``from`` is at or beyond the mark: `RawWriter`
deletes them at start, the worker replays the journal from the mark (the
journal is never trimmed above it), and they are written again. So every
leg is in exactly one file.

Addresses are kept as the flow representation's 128-bit halves
(``src_hi``/``src_lo``; IPv4 mapped into ``::ffff:0:0/96``) plus ``src``
and ``dst`` as text in `read_account` answers; counters are the exported
(sampled) values with the ``sampling`` interval beside them.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from netflow.classifier import Legs
from netflow.flows import pair_to_addr

__all__ = ["RAW_DTYPE", "RawWriter", "legs_columns", "legs_table", "read_account", "hour_dir", "apply_retention"]

HOUR_MS = 3_600_000

RAW_DTYPE = np.dtype([
    ("first_ms", "<i8"), ("last_ms", "<i8"), ("account", "<i8"), ("klass", "<i4"), ("direction", "u1"),
    ("exporter_hi", "<u8"), ("exporter_lo", "<u8"), ("src_hi", "<u8"), ("src_lo", "<u8"),
    ("dst_hi", "<u8"), ("dst_lo", "<u8"), ("src_port", "<u2"), ("dst_port", "<u2"), ("proto", "u1"),
    ("tcp_flags", "u1"), ("tos", "u1"), ("ip_version", "u1"), ("bytes", "<u8"), ("packets", "<u8"),
    ("sampling", "<u4"), ("input_if", "<u4"), ("output_if", "<u4"), ("domain", "<u4"),
])


_LEG_FIELDS = ("account", "klass", "direction")


def legs_columns(flows: np.ndarray, legs: Legs) -> dict[str, np.ndarray]:
    """RAW_DTYPE columns of the legs, one contiguous array each.

    Gathered column by column straight from the flow array: indexing the
    structured array first would copy every field of every flow, and a
    structured row array would be copied again into columns for Parquet.
    """
    out = {}
    for name in RAW_DTYPE.names:
        if name in _LEG_FIELDS:
            out[name] = getattr(legs, name).astype(RAW_DTYPE[name], copy=False)
        else:
            out[name] = flows[name].take(legs.flow)
    return out


def legs_table(flows: np.ndarray, legs: Legs) -> np.ndarray:
    """One RAW_DTYPE row per leg (tests, tools; the writer keeps columns)."""
    out = np.empty(len(legs.flow), dtype=RAW_DTYPE)
    for name, col in legs_columns(flows, legs).items():
        out[name] = col
    return out


def hour_dir(root: Path, hour_ms: int) -> Path:
    stamp = datetime.fromtimestamp(hour_ms / 1000, timezone.utc).strftime("%Y-%m-%dT%H")
    return root / f"hour={stamp}"


def _fsync_write(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


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


class RawWriter:
    """One worker's buffered writer of raw legs."""

    def __init__(self, root: Path, worker: str, retention_days: int = 90, flush_rows: int = 2_000_000,
                 flush_interval: float = 60.0) -> None:
        self.root = Path(root)
        self.worker = worker
        self.retention_days = retention_days
        self.flush_rows = flush_rows
        self.flush_interval = flush_interval
        self._marks = self.root / "_marks"
        self._marks.mkdir(parents=True, exist_ok=True)
        self._parts: list[np.ndarray | tuple[np.ndarray, Legs]] = []
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
        for path in self.root.glob(f"hour=*/{prefix}*.parquet"):
            start = path.stem[len(prefix):].split("-")[0]
            if start.isdigit() and int(start) >= mark:
                path.unlink()

    def add(self, rows: np.ndarray, first: int, end: int, now: float | None = None) -> None:
        """Add RAW_DTYPE rows covering journal range [first, end)."""
        self._add(rows, len(rows), first, end, now)

    def add_legs(self, flows: np.ndarray, legs: Legs, first: int, end: int, now: float | None = None) -> None:
        """Add a batch's legs; their rows are built only when `flush` writes them."""
        self._add((flows, legs), len(legs.flow), first, end, now)

    def _add(self, part: np.ndarray | tuple[np.ndarray, Legs], rows: int, first: int, end: int,
             now: float | None) -> None:
        if self._from is None:
            self._from = first
            self._since = time.monotonic() if now is None else now
        self._parts.append(part)
        self.rows += rows
        self._to = end

    def _columns(self) -> dict[str, np.ndarray]:
        """All buffered legs as columns, stably ordered by hour of first_ms."""
        pieces = []
        for part in self._parts:
            if isinstance(part, tuple):
                flows, legs = part
                pieces.append(legs_columns(flows, legs))
            else:
                pieces.append({n: np.ascontiguousarray(part[n]) for n in RAW_DTYPE.names})
        cols = pieces[0] if len(pieces) == 1 else {n: np.concatenate([p[n] for p in pieces]) for n in RAW_DTYPE.names}
        hours = cols["first_ms"] // HOUR_MS
        if len(hours) and hours.min() != hours.max():
            order = np.argsort(hours, kind="stable")
            cols = {n: c.take(order) for n, c in cols.items()}
        return cols

    def due(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return self._from is not None and (self.rows >= self.flush_rows or now - self._since >= self.flush_interval)

    def flush(self, now: float | None = None) -> None:
        if self._from is None:
            return
        name = f"w{self.worker}-{self._from:020d}-{self._to:020d}.parquet"
        if self.rows:
            cols = self._columns()
            hours = cols["first_ms"] // HOUR_MS
            cuts = np.flatnonzero(np.r_[True, hours[1:] != hours[:-1], True])
            for a, b in zip(cuts[:-1], cuts[1:]):
                table = pa.table({n: c[a:b] for n, c in cols.items()})
                folder = hour_dir(self.root, int(hours[a]) * HOUR_MS)
                folder.mkdir(parents=True, exist_ok=True)
                _fsync_write(folder / name, lambda p, t=table: pq.write_table(t, p, compression="zstd"))
        _fsync_write(self._marks / f"w{self.worker}", lambda p: p.write_text(str(self._to)))
        self._parts, self.rows, self._from = [], 0, None
        wall = time.time()
        if wall - self._retention_at > 3600:
            apply_retention(self.root, self.retention_days, wall)
            self._retention_at = wall


def read_account(root: Path, account_id: int, since_ms: int, until_ms: int,
                 chunk_rows: int = 1000) -> Iterator[list[list[Any]]]:
    """An account's raw legs with ``since_ms <= first_ms < until_ms``, oldest hour first, in chunks of rows
    ``[first_ms, last_ms, direction, class, src, dst, src_port, dst_port, proto, bytes, packets, sampling,
    exporter]``."""
    hour = since_ms // HOUR_MS * HOUR_MS
    columns = ["first_ms", "last_ms", "direction", "klass", "src_hi", "src_lo", "dst_hi", "dst_lo", "src_port",
               "dst_port", "proto", "bytes", "packets", "sampling", "exporter_hi", "exporter_lo"]
    while hour < until_ms:
        folder = hour_dir(Path(root), hour)
        hour += HOUR_MS
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.parquet")):
            table = pq.read_table(path, columns=columns + ["account"],
                                  filters=[("account", "=", account_id)])
            mask = pc.and_(pc.greater_equal(table["first_ms"], since_ms), pc.less(table["first_ms"], until_ms))
            table = table.filter(mask)
            for batch in table.to_batches(max_chunksize=chunk_rows):
                cols = {n: batch.column(n).to_pylist() for n in columns}
                out = []
                for k in range(batch.num_rows):
                    out.append([
                        cols["first_ms"][k], cols["last_ms"][k], cols["direction"][k], cols["klass"][k],
                        pair_to_addr(cols["src_hi"][k], cols["src_lo"][k]),
                        pair_to_addr(cols["dst_hi"][k], cols["dst_lo"][k]),
                        cols["src_port"][k], cols["dst_port"][k], cols["proto"][k], cols["bytes"][k],
                        cols["packets"][k], cols["sampling"][k],
                        pair_to_addr(cols["exporter_hi"][k], cols["exporter_lo"][k]),
                    ])
                if out:
                    yield out
