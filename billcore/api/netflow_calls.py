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
* ``netflow.snapshot()`` (right ``netflow.read``, streaming) — what a worker
  classifies with: chunks ``{"kind": "bindings", "n", "address", "bits",
  "account", "from_ms", "to_ms"}`` (big-endian binary columns, at most
  half a frame each), then ``{"kind": "rules", "rules": [...]}`` in match
  order; the answer ``{"version", "bindings", "rules"}`` counts what was
  sent.  One REPEATABLE READ transaction: the version names exactly these
  rows (see ``netflow.snapshot`` for the loader, docs/netflow.md).
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
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Final

from billcore.api import ADMIN_SYSTEM, announce, handler, listened, need_int
from billcore.common.errors import UsageError
from billcore.billing.rating import TrafficUsage
from billcore.billing.classification import port_range
from billcore.billing.usage import begin_epoch, commit_usage, journal_mark, watermark
from billcore.server.calls import CallSpec
from billcore.server.context import CoreContext
from urfa.errors import CallFailed

__all__ = ["calls", "MAX_ROWS", "COLUMNS", "decode_columns"]

log = logging.getLogger("billcore.netflow")

MAX_ROWS: Final = 20_000
MAX_RAW_ROWS: Final = 5_000_000
MAX_RAW_WINDOW: Final = timedelta(days=31)
COLUMNS: Final = ("account", "klass", "direction", "hour_ms", "bytes", "packets", "flows")
# netflow.raw's streamed rows, column by column (billcore.billing.rawflows.read_account's order)
RAW_FIELDS: Final = {"first_ms": "int", "last_ms": "int", "direction": "int", "class_id": "int", "src": "ip",
                     "dst": "ip", "src_port": "int", "dst_port": "int", "proto": "int", "bytes": "int",
                     "packets": "int", "sampling": "int", "exporter": "ip"}
SYSTEM: Final = frozenset({"system"})
_WORKER = re.compile(r"[A-Za-z0-9._:@-]{1,64}")


def decode_columns(args: dict[str, Any]) -> dict[str, array[int]]:
    """The submit's int64 columns; refuses ragged, oversized or non-bytes input."""
    out: dict[str, array[int]] = {}
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


# ---------------------------------------------------------------- the classifier snapshot, streamed

SNAPSHOT_HISTORY: Final = timedelta(days=7)
"""How far back ``netflow.snapshot`` keeps ended bindings (journal replay, late flows)."""
BINDING_WIRE_BYTES: Final = 42
"""Bytes one binding takes in a snapshot chunk: address 16, bits 2, account 8, from 8, to 8."""
SNAPSHOT_CHUNK_ROWS: Final = 16_384
"""Bindings per chunk at most; `snapshot_chunk_rows` keeps a chunk within half a frame (12 483 rows,
524 KB, at the default 1 MB ``[urfa] max_frame``)."""
RULE_CHUNK_ROWS: Final = 256
"""Rules per chunk (a rule is at most ~400 bytes of msgpack)."""

# One chunk of bindings as big-endian binary columns, aggregated by PostgreSQL
# itself (no Python object per binding on either side). Keyset paging by id
# inside one REPEATABLE READ transaction: every chunk sees the same snapshot,
# and the server holds one chunk at a time. A v4 prefix travels in flow space
# (::ffff:a.b.c.d, length + 96), as the classifier keeps it. The columns stay
# row-aligned without an ORDER BY per aggregate: one scan feeds each row to
# every aggregate in turn (five sorts per chunk saved; the row order itself
# does not matter, the classifier sorts).
_BINDING_CHUNK = """
SELECT count(*)::int AS n, max(id) AS last_id,
       string_agg(CASE WHEN family(prefix) = 4 THEN '\\x00000000000000000000ffff'::bytea ELSE ''::bytea END
                  || substring(inet_send(prefix) FROM 5), ''::bytea) AS address,
       string_agg(int2send((masklen(prefix) + CASE WHEN family(prefix) = 4 THEN 96 ELSE 0 END)::int2),
                  ''::bytea) AS bits,
       string_agg(int8send(account_id), ''::bytea) AS account,
       string_agg(int8send(floor(extract(epoch FROM valid_from) * 1000)::bigint), ''::bytea) AS from_ms,
       string_agg(int8send(coalesce(floor(extract(epoch FROM valid_to) * 1000)::bigint, -1)), ''::bytea) AS to_ms
FROM (SELECT id, prefix, account_id, valid_from, valid_to FROM ip_bindings
      WHERE id > $1 AND (valid_to IS NULL OR valid_to > $2) ORDER BY id LIMIT $3) b
"""

_RULES = """
SELECT r.id, r.class_id, r.position, r.skip, r.local_net::text AS local_net, r.remote_net::text AS remote_net,
       r.local_ports, r.remote_ports, r.protocol, host(r.exporter) AS exporter, r.iface
FROM traffic_class_rules r JOIN traffic_classes c ON c.id = r.class_id
ORDER BY c.position, c.id, r.position, r.id
"""


def snapshot_chunk_rows(max_frame: int) -> int:
    """Bindings per chunk so that a chunk stays within half of ``max_frame``."""
    return max(1, min(SNAPSHOT_CHUNK_ROWS, (max_frame // 2) // BINDING_WIRE_BYTES))


async def snapshot_chunks(conn: Any, since: datetime, rows: int = SNAPSHOT_CHUNK_ROWS
                          ) -> AsyncIterator[dict[str, Any]]:
    """The classifier snapshot as chunks, then a last ``{"end": …}`` chunk with the version and counts.

    Bindings valid at ``since`` or later (ended ones are kept for journal
    replays and late flows) and the class rules in match order, all read in
    one REPEATABLE READ transaction: the version names exactly these rows.
    A change committed after it bumps the version and NOTIFYs (schema 0008),
    so the worker, told of the new version, loads again: nothing is lost
    between "read" and "loaded".
    """
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        version = int(await conn.fetchval("SELECT version FROM classifier_version"))
        last, bindings = 0, 0
        while True:
            piece = await conn.fetchrow(_BINDING_CHUNK, last, since, rows)
            if not piece["n"]:
                break
            last, bindings = piece["last_id"], bindings + piece["n"]
            yield {"kind": "bindings", "n": piece["n"], "address": piece["address"], "bits": piece["bits"],
                   "account": piece["account"], "from_ms": piece["from_ms"], "to_ms": piece["to_ms"]}
        rules = 0
        chunk: list[dict[str, Any]] = []
        async for rule in conn.cursor(_RULES, prefetch=RULE_CHUNK_ROWS):
            chunk.append({"id": rule["id"], "class_id": rule["class_id"], "position": rule["position"], "skip": rule["skip"],
                          "local_net": rule["local_net"], "remote_net": rule["remote_net"],
                          "local_ports": port_range(rule["local_ports"]), "remote_ports": port_range(rule["remote_ports"]),
                          "protocol": rule["protocol"], "exporter": rule["exporter"], "iface": rule["iface"]})
            rules += 1
            if len(chunk) >= RULE_CHUNK_ROWS:
                yield {"kind": "rules", "rules": chunk}
                chunk = []
        if chunk:
            yield {"kind": "rules", "rules": chunk}
    yield {"kind": "end", "version": version, "bindings": bindings, "rules": rules}


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
                                        epoch=epoch or None, rated_event=listened(core, "batch.rated"))
        await announce(core, result.block_changes)  # type: ignore[arg-type]
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
        from billcore.billing.rawflows import read_account  # pyarrow only where raw flows are read

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

    chunk_rows = snapshot_chunk_rows(core.config.urfa.max_frame)

    async def netflow_snapshot(ctx: Any) -> dict[str, Any]:
        """The classifier snapshot, streamed: chunks of bindings (binary columns) and of rules in
        match order, all from one database snapshot; the result names its version and counts."""
        async with core.pool.acquire() as conn:
            async for chunk in snapshot_chunks(conn, core.now() - SNAPSHOT_HISTORY, chunk_rows):
                if chunk["kind"] == "end":
                    return {"version": chunk["version"], "bindings": chunk["bindings"], "rules": chunk["rules"]}
                await ctx.stream(chunk)
        raise AssertionError("snapshot_chunks always ends with its end chunk")

    cols = {name: "bytes" for name in COLUMNS}
    return [
        CallSpec("netflow.snapshot", netflow_snapshot, right="netflow.read", kinds=SYSTEM, result="map",
                 doc=netflow_snapshot.__doc__ or "", streaming=True, bound="stream"),
        CallSpec("netflow.submit", netflow_submit, right="netflow.submit", kinds=SYSTEM,
                 args={"worker": "str", "watermark": "int", "epoch": "str?", **cols}, result="map",
                 doc=netflow_submit.__doc__ or "", bound="fixed", fields={"charged": "money", "rejected_bytes": "int"}),
        CallSpec("netflow.watermark", netflow_watermark, right="netflow.watermark", kinds=SYSTEM,
                 args={"worker": "str"}, result="int", doc=netflow_watermark.__doc__ or "", bound="fixed"),
        CallSpec("netflow.journal", netflow_journal, right="netflow.watermark", kinds=SYSTEM,
                 args={"worker": "str"}, result="map", doc=netflow_journal.__doc__ or "", bound="fixed"),
        CallSpec("netflow.begin_epoch", netflow_begin_epoch, right="netflow.submit", kinds=SYSTEM,
                 args={"worker": "str", "epoch": "str", "expect": "str", "reason": "str", "journal_end": "int"},
                 result="map", doc=netflow_begin_epoch.__doc__ or "", bound="fixed"),
        CallSpec("netflow.raw", netflow_raw, right="netflow.read", kinds=ADMIN_SYSTEM,
                 args={"account_id": "int", "since": "time", "until": "time"}, result="map",
                 doc=netflow_raw.__doc__ or "", streaming=True, bound="stream", fields=RAW_FIELDS),
    ]
