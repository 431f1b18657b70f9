"""The raw flow store's layout on disk, shared by its writer and its reader (stdlib only).

The NetFlow workers write it (``netflow.rawstore``, with pyarrow); the core
reads it for ``netflow.raw`` (``billcore.billing.rawflows``, with pyarrow).
Neither imports the other: both take the layout from here, so a column or a
folder name cannot drift between them. Hive-style partitions, one folder per
hour of the flows' start::

    <raw_dir>/hour=2024-03-20T12/w<worker>-<from>-<to>.parquet

One row per classified leg, the columns of `RAW_COLUMNS` in that order.
Addresses are the flow representation's 128-bit halves (``src_hi``/``src_lo``;
IPv4 mapped into ``::ffff:0:0/96``), which `pair_to_addr` turns into text.
"""

from __future__ import annotations

import ipaddress
from datetime import datetime, timezone
from pathlib import Path

__all__ = ["HOUR_MS", "RAW_COLUMNS", "PART_GLOB", "hour_dir", "pair_to_addr"]

HOUR_MS = 3_600_000

RAW_COLUMNS: tuple[tuple[str, str], ...] = (
    ("first_ms", "<i8"), ("last_ms", "<i8"), ("account", "<i8"), ("klass", "<i4"), ("direction", "u1"),
    ("exporter_hi", "<u8"), ("exporter_lo", "<u8"), ("src_hi", "<u8"), ("src_lo", "<u8"),
    ("dst_hi", "<u8"), ("dst_lo", "<u8"), ("src_port", "<u2"), ("dst_port", "<u2"), ("proto", "u1"),
    ("tcp_flags", "u1"), ("tos", "u1"), ("ip_version", "u1"), ("bytes", "<u8"), ("packets", "<u8"),
    ("sampling", "<u4"), ("input_if", "<u4"), ("output_if", "<u4"), ("domain", "<u4"),
)
"""(name, numpy type string) of each Parquet column, in file order; every column is NOT NULL."""

PART_GLOB = "*.parquet"
"""The finished part files of an hour folder (a writer's open files end in ``.tmp``)."""


def hour_dir(root: Path, hour_ms: int) -> Path:
    """The folder of the hour starting at ``hour_ms`` (epoch milliseconds, UTC)."""
    stamp = datetime.fromtimestamp(hour_ms / 1000, timezone.utc).strftime("%Y-%m-%dT%H")
    return root / f"hour={stamp}"


def pair_to_addr(hi: int, lo: int) -> str:
    """An address from its (hi, lo) halves: v4-mapped pairs print as dotted quads."""
    hi, lo = int(hi), int(lo)
    if hi == 0 and (lo >> 32) == 0xFFFF:
        return str(ipaddress.IPv4Address(lo & 0xFFFF_FFFF))
    return str(ipaddress.IPv6Address((hi << 64) | lo))
