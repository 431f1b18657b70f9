"""URFA calls of the NetFlow workers, and the raw traffic report.

System calls (kinds ``{"system"}``, rights ``netflow.*``):

* ``netflow.submit(worker, watermark, account, klass, direction, hour_ms,
  bytes, packets, flows)`` — one batch of a worker's aggregates as columns
  of little-endian int64 (msgpack bin), all of one length (at most
  ``MAX_ROWS``), ending at journal offset ``watermark``.  Rated and
  committed with the watermark in one transaction (``commit_usage``, source
  ``netflow:<worker>``); a batch at or below the committed watermark is
  ignored as a whole.  Answer: ``{"watermark", "duplicate", "charged",
  "rejected", "rejected_bytes"}``.  Rejected rows (no tariff, no rate for
  the class) are logged and counted; their flows stay in raw storage.
  With ``epoch`` (the worker's journal identity) a batch of another epoch
  than the worker's current one is refused (``billing.epoch_mismatch``).
* ``netflow.watermark(worker)`` — the committed watermark (−1: never).
* ``netflow.journal(worker)`` — ``{"watermark", "epoch"}``: the committed
  watermark and the identity of the journal it counts (nil: none yet).
* ``netflow.begin_epoch(worker, epoch, expect, reason, journal_end)`` — the
  worker found another journal than the one its watermark counts (``reason``:
  ``first``, ``adopted``, ``replaced``, ``truncated``; ``expect`` is the epoch
  it was told, ``""`` for none): make ``epoch`` current if ``expect`` still is
  (else ``netflow.epoch_conflict``), recorded in ``ingest_epochs``.  Answer:
  ``{"watermark", "epoch"}``.

Admin/system call (right ``netflow.read``): ``netflow.raw(account_id,
since, until)`` streams the account's raw flow legs with ``since <= start <
until`` from the hourly Parquet files under ``[netflow] raw_dir`` (the local
workers' files; a remote collector keeps its own), in chunks of rows
``[first_ms, last_ms, direction, class, src, dst, src_port, dst_port,
proto, bytes, packets, sampling, exporter]``.  Result: ``{"rows",
"truncated"}``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
from array import array
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Final

from billcore.api import ADMIN_SYSTEM, announce, handler, need_int
from billcore.billing.errors import UsageError
from billcore.billing.rating import TrafficUsage
from billcore.billing.usage import begin_epoch, commit_usage, journal_mark, watermark
from billcore.calls import CallSpec
from billcore.context import CoreContext
from urfa.errors import CallFailed

__all__ = ["calls", "MAX_ROWS", "COLUMNS", "decode_columns"]

log = logging.getLogger("billcore.netflow")

MAX_ROWS: Final = 20_000
MAX_RAW_ROWS: Final = 5_000_000
MAX_RAW_WINDOW: Final = timedelta(days=31)
COLUMNS: Final = ("account", "klass", "direction", "hour_ms", "bytes", "packets", "flows")
SYSTEM: Final = frozenset({"system"})
_WORKER = re.compile(r"[A-Za-z0-9._:@-]{1,64}")


def decode_columns(args: dict[str, Any]) -> dict[str, array]:
    """The submit's int64 columns; refuses ragged, oversized or non-bytes input."""
    out: dict[str, array] = {}
    for name in COLUMNS:
        raw = args[name]
        if not isinstance(raw, (bytes, bytearray)) or len(raw) % 8 or len(raw) > MAX_ROWS * 8:
            raise CallFailed("bad_args", f"{name}: expected at most {MAX_ROWS} little-endian int64 values")
        col = array("q")
        col.frombytes(raw)
        if sys.byteorder != "little":
            col.byteswap()
        out[name] = col
    n = len(out["account"])
    if any(len(c) != n for c in out.values()):
        raise CallFailed("bad_args", "columns differ in length")
    return out


def _worker(worker: object) -> str:
    if not isinstance(worker, str) or not _WORKER.fullmatch(worker):
        raise CallFailed("bad_args", "worker: 1..64 characters of A-Z a-z 0-9 . _ : @ -")
    return worker


def calls(core: CoreContext) -> list[CallSpec]:
    tz = core.config.zone
    section = core.config.netflow
    raw_dir = Path(section.raw_dir) if section.raw_dir else core.config.data_dir / "netflow" / "raw"

    @handler
    async def netflow_submit(ctx: Any, worker: str, watermark: int, epoch: str | None = None,
                             **columns: Any) -> dict[str, Any]:
        """Rate one batch of a worker's aggregates and commit it with the worker's journal watermark."""
        source = "netflow:" + _worker(worker)
        cols = decode_columns(columns)
        accounts, klasses, hours, sizes = cols["account"], cols["klass"], cols["hour_ms"], cols["bytes"]
        if accounts and (min(accounts) <= 0 or min(klasses) <= 0 or min(sizes) < 0 or min(hours) < 0):
            bad = next(i for i in range(len(accounts))
                       if accounts[i] <= 0 or klasses[i] <= 0 or sizes[i] < 0 or hours[i] < 0)
            raise UsageError(f"bad aggregate row: account {accounts[bad]}, class {klasses[bad]}, bytes {sizes[bad]}")
        totals: dict[tuple[int, int, int], int] = {}
        for key, nbytes in zip(zip(accounts, klasses, hours), sizes):  # direction is not a rating dimension
            totals[key] = totals.get(key, 0) + nbytes
        stamps: dict[int, datetime] = {}  # one per hour bucket, shared by its rows
        usage = []
        for (a, k, h), b in sorted(totals.items()):
            at = stamps.get(h)
            if at is None:
                at = stamps[h] = datetime.fromtimestamp(h // 1000, timezone.utc)
            usage.append(TrafficUsage(a, k, at, b))
        async with core.pool.acquire() as conn:
            result = await commit_usage(conn, source, watermark, usage, core.now(), tz=tz, actor=source,
                                        epoch=epoch or None)
        await announce(core, result.block_changes)  # type: ignore[arg-type]
        if result.charges:
            await core.fire("batch.rated", {"batch_id": f"{source}@{result.watermark}", "charges": [
                {"account_id": a, "amount": amount, "balance": balance} for a, amount, balance in result.charges]})
        rejected_bytes = sum(getattr(r.usage, "bytes", 0) for r in result.rejected)
        if result.rejected:
            log.warning("netflow usage rejected by rating", extra={
                "source": source, "watermark": watermark, "rows": len(result.rejected),
                "bytes": rejected_bytes, "reason": str(getattr(result.rejected[0], "reason", ""))})
        return {"watermark": result.watermark, "duplicate": result.duplicate, "charged": result.charged,
                "rejected": len(result.rejected), "rejected_bytes": rejected_bytes}

    @handler
    async def netflow_watermark(ctx: Any, worker: str) -> int:
        """The worker's committed journal watermark (-1: it never committed)."""
        async with core.pool.acquire() as conn:
            return await watermark(conn, "netflow:" + _worker(worker))

    @handler
    async def netflow_journal(ctx: Any, worker: str) -> dict[str, Any]:
        """The worker's committed watermark and the epoch of the journal it counts (nil: none yet)."""
        async with core.pool.acquire() as conn:
            mark = await journal_mark(conn, "netflow:" + _worker(worker))
        return {"watermark": mark.watermark, "epoch": mark.epoch}

    @handler
    async def netflow_begin_epoch(ctx: Any, worker: str, epoch: str, expect: str, reason: str,
                                  journal_end: int) -> dict[str, Any]:
        """Make ``epoch`` the worker's journal epoch if ``expect`` ("" = none) still is; logged and recorded."""
        source = "netflow:" + _worker(worker)
        async with core.pool.acquire() as conn:
            mark = await begin_epoch(conn, source, epoch, expect=expect or None, reason=reason,
                                     journal_end=journal_end, now=core.now())
        if mark is None:
            raise CallFailed("netflow.epoch_conflict", f"{source}: the journal epoch is no longer {expect or 'none'}")
        level = logging.ERROR if reason in ("replaced", "truncated") else logging.INFO
        log.log(level, "netflow journal epoch began", extra={
            "source": source, "epoch": epoch, "previous": expect or None, "reason": reason,
            "watermark": mark.watermark, "journal_end": journal_end})
        return {"watermark": mark.watermark, "epoch": mark.epoch}

    @handler
    async def netflow_raw(ctx: Any, account_id: int, since: datetime, until: datetime) -> dict[str, Any]:
        """An account's raw flows in [since, until) from the hourly Parquet files; streamed."""
        from netflow.rawstore import read_account  # pyarrow only where raw flows are read

        need_int("account_id", account_id)
        if not isinstance(since, datetime) or not isinstance(until, datetime) or not since < until:
            raise CallFailed("bad_args", "since < until, both times")
        if until - since > MAX_RAW_WINDOW:
            raise CallFailed("bad_args", f"at most {MAX_RAW_WINDOW.days} days per call")
        since_ms, until_ms = int(since.timestamp() * 1000), int(until.timestamp() * 1000)
        rows = read_account(raw_dir, account_id, since_ms, until_ms)
        sent = 0
        while sent < MAX_RAW_ROWS:
            chunk = await asyncio.to_thread(next, rows, None)
            if chunk is None:
                break
            await ctx.stream(chunk)
            sent += len(chunk)
        return {"rows": sent, "truncated": sent >= MAX_RAW_ROWS}

    cols = {name: "bytes" for name in COLUMNS}
    return [
        CallSpec("netflow.submit", netflow_submit, right="netflow.submit", kinds=SYSTEM,
                 args={"worker": "str", "watermark": "int", "epoch": "str?", **cols}, result="map",
                 doc=netflow_submit.__doc__ or ""),
        CallSpec("netflow.watermark", netflow_watermark, right="netflow.watermark", kinds=SYSTEM,
                 args={"worker": "str"}, result="int", doc=netflow_watermark.__doc__ or ""),
        CallSpec("netflow.journal", netflow_journal, right="netflow.watermark", kinds=SYSTEM,
                 args={"worker": "str"}, result="map", doc=netflow_journal.__doc__ or ""),
        CallSpec("netflow.begin_epoch", netflow_begin_epoch, right="netflow.submit", kinds=SYSTEM,
                 args={"worker": "str", "epoch": "str", "expect": "str", "reason": "str", "journal_end": "int"},
                 result="map", doc=netflow_begin_epoch.__doc__ or ""),
        CallSpec("netflow.raw", netflow_raw, right="netflow.read", kinds=ADMIN_SYSTEM,
                 args={"account_id": "int", "since": "time", "until": "time"}, result="map",
                 doc=netflow_raw.__doc__ or "", streaming=True),
    ]
