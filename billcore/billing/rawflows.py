"""An account's raw flows, read from the NetFlow workers' hourly Parquet store for ``netflow.raw``.

The store's layout is `billcore.common.rawflows` (its writer, in the NetFlow
workers, takes it from there too); this is the core's read side, next to the
usage it evidences. pyarrow is imported here, so the call module imports this
one only when a raw flow is asked for.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from billcore.common.rawflows import HOUR_MS, PART_GLOB, hour_dir, pair_to_addr

__all__ = ["read_account"]

_COLUMNS = ["first_ms", "last_ms", "direction", "klass", "src_hi", "src_lo", "dst_hi", "dst_lo", "src_port",
            "dst_port", "proto", "bytes", "packets", "sampling", "exporter_hi", "exporter_lo"]


def read_account(root: Path, account_id: int, since_ms: int, until_ms: int,
                 chunk_rows: int = 1000) -> Iterator[list[list[Any]]]:
    """An account's raw legs with ``since_ms <= first_ms < until_ms``, oldest hour first, in chunks of rows
    ``[first_ms, last_ms, direction, class, src, dst, src_port, dst_port, proto, bytes, packets, sampling,
    exporter]``."""
    hour = since_ms // HOUR_MS * HOUR_MS
    while hour < until_ms:
        folder = hour_dir(Path(root), hour)
        hour += HOUR_MS
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob(PART_GLOB)):
            table = pq.read_table(path, columns=_COLUMNS + ["account"], filters=[("account", "=", account_id)])
            mask = pc.and_(pc.greater_equal(table["first_ms"], since_ms), pc.less(table["first_ms"], until_ms))
            table = table.filter(mask)
            for batch in table.to_batches(max_chunksize=chunk_rows):
                cols = {name: batch.column(name).to_pylist() for name in _COLUMNS}
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
