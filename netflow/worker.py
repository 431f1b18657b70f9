"""The NetFlow worker process: receive → journal → decode → classify → ship.

Theory of operation
-------------------
Two loops share one process and meet only at the journal:

* the **receiver** (a thread) reads the UDP socket, drops packets of
  unknown exporters (counted), appends every other packet to the worker's
  journal, and fsyncs every ``fsync_interval``; after each fsync it
  publishes the *durable offset*.  It never waits for anything else, so a
  slow core or database only makes the journal grow.
* the **shipper** (the asyncio loop) reads the journal from where it stopped
  up to the durable offset (`JournalTail`), decodes, classifies and
  aggregates a batch (`BatchDecoder`), and sends the aggregates to the core
  in one ``netflow.submit`` call carrying the journal offset that ends the
  batch.  The core commits charges and that watermark in one transaction.

Exactly once.  The decoder has state: v9/IPFIX templates, sampling,
sequence counters, and data sets still waiting for their template
(`Pending`).  Before a batch ending at W is shipped, that state is written to
a checkpoint file named W (`Checkpoints`).  A restarted worker asks the core
for its watermark W, loads checkpoint W and replays the journal from W: the
decoder is in exactly the state it had when W was shipped, so the replay
decodes exactly what the crashed run would have, and the pending data sets
below W (not yet charged) come back with the checkpoint.  So the watermark
may pass a pending packet without losing it: its sets are charged in the
batch where its template arrives, and that batch's watermark is what says
so.  A batch that the core already committed (its end ≤ W) is never shipped
again; batches are cut at W during replay so that none straddles it.

Raw flows.  Every shipped batch's classified legs go to a `RawWriter`
(``rawstore``), which writes hourly Parquet part files named after the
journal range they cover.  The journal is trimmed only below both the
committed watermark and the raw store's watermark, and replay starts from
the lower of the two, so raw storage is exact across crashes too.

Bounded.  A batch holds at most ``batch_packets`` packets, decoded in
chunks of `CHUNK_PACKETS` whose aggregates are merged; aggregates are at
most ``MAX_ROWS`` rows per call (a chunk that would produce more is redone
with fewer packets from the same state, or left for the next batch); pending packets are
capped and expire after ``PENDING_TTL`` seconds of exporter time (counted as
missing-template drops).  The journal has no cap: over
``journal_max_bytes`` a loud alarm is logged and exported, nothing dropped.

Journal identity.  At start the worker asks the core for its watermark W and
the epoch of the journal W counts (``netflow.journal``) and compares them with
the journal it opened (`plan_resume`).  Its own journal, intact: replay from
W.  Anything else (a wiped or new directory, a journal from elsewhere, its
own cut below W): the journal's offsets for this run are lifted to start at
W (`Journal.lift_run`), so everything received from now on ends above W and
is charged, and a new epoch is recorded with the core
(``netflow.begin_epoch``), logged as an error and counted in
``netflow_journal_epochs{reason}``.

A full disk.  A block the journal's volume refuses (ENOSPC) is dropped and
counted (``netflow_drops{reason="disk_full"}``), and so is every block while
fewer than `RESERVE_FREE` bytes are free (room for the shipper's checkpoints:
without them it could not ship, and so trim, what is journaled); the receiver
keeps reading the socket (so the kernel drops nothing silently), probes the
free space every `PROBE_INTERVAL` and journals again once `RESUME_FREE` bytes
are free.  The
shipper keeps shipping what is journaled (trimming frees space); a checkpoint
it cannot write is retried, not skipped.  ``netflow_journal_free_bytes`` and
``netflow_journal_disk_low`` (free < ``journal_min_free_bytes``) warn before.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import pickle
import select
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import Counter, Gauge

from netflow.classifier import Aggregates, Classifier, aggregate
from netflow.decode import decode_packets, decode_pending
from netflow.errors import JournalFull
from netflow.flows import FLOW_DTYPE, Packets, Pending, addr_to_pair
from netflow.journal import (
    INDEX_DTYPE,
    MAX_BLOCK_EXPORTERS,
    Journal,
    JournalIdentity,
    JournalRecord,
    list_segments,
    packed_address,
    records_to_packets,
    scan_records,
)
from netflow.rawstore import RawWriter
from netflow.snapshot import SnapshotLoader
from netflow.templates import SequenceTracker, TemplateCache
from urfa.errors import CallFailed, ConnectionLost

__all__ = ["WorkerSettings", "Receiver", "JournalTail", "BatchDecoder", "Checkpoints", "CoreLink",
           "Worker", "Resume", "plan_resume", "open_socket", "kernel_drops", "run", "encode_aggregates"]

log = logging.getLogger("netflow.worker")

MAX_ROWS = 12_000          # aggregate rows per netflow.submit (8 int64 columns stay < 1 MB)
PENDING_TTL = 3600.0       # seconds of exporter time a data set may wait for its template
MAX_PENDING = 65_536       # packets waiting for templates, per worker
CHECKPOINTS_KEPT = 64
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)

RECEIVED = Counter("netflow_packets_received", "Packets journaled by the worker", ["worker"])
RECEIVED_BYTES = Counter("netflow_bytes_received", "UDP payload bytes journaled", ["worker"])
DROPS = Counter("netflow_drops", "Packets or flows lost or refused, by reason "
                "(kernel: receive buffer overflow; exporter: unknown exporter; undecodable; "
                "missing_template: data sets whose template never came; sequence_gap: flows/packets "
                "the exporter numbered but we never received; disk_full: the journal's volume refused them)",
                ["worker", "reason"])
FLOWS = Counter("netflow_flows_decoded", "Flow records decoded", ["worker"])
SHIPPED = Counter("netflow_batches_shipped", "Batches the core committed", ["worker"])
UNBILLED = Counter("netflow_unbilled_bytes", "Bytes of legs with no account or no class (kept in raw storage)",
                   ["worker"])
RCVBUF = Gauge("netflow_rcvbuf_bytes", "Socket receive buffer the kernel granted", ["worker"],
               multiprocess_mode="livemax")
JOURNAL_BYTES = Gauge("netflow_journal_bytes", "Bytes of journal on disk", ["worker"], multiprocess_mode="livemax")
JOURNAL_LAG = Gauge("netflow_journal_lag_bytes", "Journal bytes received but not yet committed by the core",
                    ["worker"], multiprocess_mode="livemax")
JOURNAL_ALARM = Gauge("netflow_journal_over_limit", "1 while the journal exceeds journal_max_bytes", ["worker"],
                      multiprocess_mode="livemax")
JOURNAL_FREE = Gauge("netflow_journal_free_bytes", "Free bytes on the journal's volume", ["worker"],
                     multiprocess_mode="livemin")
JOURNAL_DISK_LOW = Gauge("netflow_journal_disk_low", "1 while the journal's volume has less than "
                         "journal_min_free_bytes free", ["worker"], multiprocess_mode="livemax")
JOURNAL_DISK_FULL = Gauge("netflow_journal_disk_full", "1 while the journal's volume refuses writes "
                          "(packets are dropped, counted as disk_full)", ["worker"], multiprocess_mode="livemax")
EPOCHS = Counter("netflow_journal_epochs", "Journal epochs begun, by reason (replaced: the journal is not the one "
                 "the watermark counts; truncated: it ends below the watermark; first, adopted: routine)",
                 ["worker", "reason"])
CORE_CONNECTED = Gauge("netflow_core_connected", "1 while the worker holds a session with the core", ["worker"],
                       multiprocess_mode="livemax")


# ---------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    worker_id: str
    host: str
    port: int
    journal_dir: Path
    raw_dir: Path | None
    exporters: tuple[str, ...] = ("127.0.0.1", "::1")
    sampling: tuple[str, ...] = ()
    rcvbuf: int = 64 << 20
    journal_max_bytes: int = 16 << 30
    journal_min_free_bytes: int = 1 << 30
    segment_bytes: int = 64 << 20
    fsync_interval: float = 0.2
    ship_interval: float = 1.0
    raw_retention_days: int = 90
    raw_flush_rows: int = 2_000_000
    raw_flush_interval: float = 60.0
    batch_packets: int = 20_000

    @classmethod
    def from_config(cls, config: Any, index: int, worker_id: str | None = None) -> WorkerSettings:
        n = config.netflow
        base = Path(n.journal_dir) if n.journal_dir else config.data_dir / "netflow" / "journal"
        wid = worker_id if worker_id is not None else str(index)
        return cls(
            worker_id=wid, host=n.host, port=n.port, journal_dir=base / wid,
            raw_dir=Path(n.raw_dir) if n.raw_dir else config.data_dir / "netflow" / "raw",
            exporters=tuple(n.exporters), sampling=tuple(n.sampling), rcvbuf=n.rcvbuf,
            journal_max_bytes=n.journal_max_bytes, journal_min_free_bytes=n.journal_min_free_bytes,
            segment_bytes=n.segment_bytes,
            fsync_interval=n.fsync_interval, ship_interval=n.ship_interval,
            raw_retention_days=n.raw_retention_days, raw_flush_rows=n.raw_flush_rows,
            raw_flush_interval=n.raw_flush_interval,
        )

    @property
    def source(self) -> str:
        """The usage source name the core keeps this worker's watermark under."""
        return f"netflow:{self.worker_id}"


class ExporterFilter:
    """Configured exporter prefixes; answers per address, memoized (bounded)."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        self._nets = [ipaddress.ip_network(p, strict=False) for p in prefixes]
        self._memo: dict[str, bool] = {}

    def allowed(self, addr: str) -> bool:
        ok = self._memo.get(addr)
        if ok is None:
            try:
                ip = ipaddress.ip_address(addr.split("%")[0])
            except ValueError:
                return False
            if ip.version == 6 and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            ok = any(ip in net for net in self._nets)
            if len(self._memo) >= 4096:
                self._memo.clear()
            self._memo[addr] = ok
        return ok


def parse_sampling(entries: tuple[str, ...]) -> dict[tuple[int, int], int]:
    """'ADDR=N' config entries -> {exporter (hi, lo): N}."""
    out = {}
    for text in entries:
        addr, _, n = text.rpartition("=")
        out[addr_to_pair(addr)] = int(n)
    return out


# ---------------------------------------------------------------- socket and receiver


def open_socket(host: str, port: int, rcvbuf: int) -> tuple[socket.socket, int]:
    """A UDP socket sharing ``port`` (SO_REUSEPORT) with the buffer the kernel grants."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)  # root: past rmem_max
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((host, port))
    sock.setblocking(False)
    return sock, sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


def kernel_drops(sock: socket.socket) -> int | None:
    """Datagrams the kernel dropped on this socket (receive buffer full), from /proc."""
    inode = str(os.fstat(sock.fileno()).st_ino)
    for name in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(name) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) >= 13 and parts[9] == inode:
                        return int(parts[-1])
        except OSError:
            continue
    return None


MAX_DATAGRAM = 65535
BLOCK_PACKETS = 128  # datagrams per journal block at most (3840 v5 flows: far below MAX_ROWS legs)
BLOCK_BYTES = 128 << 10  # payload bytes per block at most (the last datagram may cross it)
LINGER = 0.002  # seconds a partly filled block waits for more datagrams
READ_BYTES = 8 << 20  # journal bytes the shipper reads at a time
CHUNK_PACKETS = 4_000  # packets decoded at a time: arrays stay small enough to be reused, not faulted in
BEHIND_BYTES = 32 << 20  # journal waiting beyond this is shipped at once rather than at ship_interval
PROBE_INTERVAL = 0.5  # seconds between the receiver's free-space probes
RESERVE_FREE = 1 << 20  # below this many free bytes the receiver journals nothing (room for checkpoints)
RESUME_FREE = RESERVE_FREE + 4 * BLOCK_BYTES  # free bytes that end a disk-full spell
PROBE_BYTES = RESERVE_FREE // 4  # ... and after this many bytes journaled, so a burst cannot eat the reserve
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT)


class _Block:
    """The journal block being received: payloads in the receiver's buffer, the index in lists."""

    __slots__ = ("lengths", "ports", "which", "numbers", "packed", "size", "received_ns", "opened")

    def __init__(self) -> None:
        self.lengths: list[int] = []
        self.ports: list[int] = []
        self.which: list[int] = []
        self.numbers: dict[str, int] = {}
        self.packed: list[bytes] = []
        self.size = 0
        self.received_ns = 0
        self.opened = 0.0

    def exporter(self, host: str) -> int:
        number = self.numbers[host] = len(self.numbers)
        self.packed.append(packed_address(host))
        return number


class Receiver(threading.Thread):
    """Reads the socket and journals every accepted packet; fsyncs in batches.

    The only writer of the journal. `durable` is the offset up to which the
    journal is on disk; `trim(w)` asks it to delete segments below ``w``.
    """

    def __init__(self, sock: socket.socket, journal: Journal, exporters: ExporterFilter,
                 fsync_interval: float, worker: str, wake: Callable[[], None] = lambda: None) -> None:
        super().__init__(name=f"netflow-recv-{worker}", daemon=True)
        self.sock = sock
        self.journal = journal
        self.exporters = exporters
        self.fsync_interval = fsync_interval
        self.durable = journal.offset
        self.packets = 0
        self.unknown = 0
        self.refused = 0  # packets dropped because the journal's volume was full
        self.disk_full = False
        self._next_probe = 0.0
        self._since_probe = 0  # bytes journaled since the last free-space probe
        self.error: BaseException | None = None
        self._wake = wake
        self._stop_flag = threading.Event()
        self._trim_to = -1
        self._lock = threading.Lock()
        self._received = RECEIVED.labels(worker)
        self._received_bytes = RECEIVED_BYTES.labels(worker)
        self._unknown = DROPS.labels(worker, "exporter")
        self._refused = DROPS.labels(worker, "disk_full")
        self._full = JOURNAL_DISK_FULL.labels(worker)

    def stop(self) -> None:
        self._stop_flag.set()

    def trim(self, watermark: int) -> None:
        with self._lock:
            self._trim_to = max(self._trim_to, watermark)

    def lift(self, base: int) -> int:
        """`Journal.lift_run` under the journal lock; returns how far the offsets moved."""
        with self._lock:
            delta = self.journal.lift_run(base)
            self.durable += delta
        return delta

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - reported to the shipper, which stops the worker
            self.error = exc
            log.exception("receiver failed")
        finally:
            with contextlib.suppress(Exception):
                self._sync()

    def _loop(self) -> None:
        """Receive into one buffer and journal it as a block record (see `journal`).

        Datagrams land straight in the block buffer (``recvfrom_into``), so a
        packet costs one system call and three list appends; the block (at
        most `BLOCK_PACKETS` packets or `BLOCK_BYTES` bytes) is written when
        it is full, or once the socket is drained and the block is
        `LINGER` old: a quiet socket is waited on, a busy one is read in
        bursts, so blocks stay large under load and latency stays low when
        it is not.
        """
        sock, allowed = self.sock, self.exporters.allowed
        recv_into, now_ns, monotonic = sock.recvfrom_into, time.time_ns, time.monotonic
        buffer = bytearray(BLOCK_BYTES + MAX_DATAGRAM)
        view = memoryview(buffer)
        next_sync = monotonic() + self.fsync_interval
        packets = nbytes = 0
        block = _Block()
        while not self._stop_flag.is_set():
            drained = False
            for _ in range(BLOCK_PACKETS):
                try:
                    size, addr = recv_into(view[block.size:], MAX_DATAGRAM)
                except BlockingIOError:
                    drained = True
                    break
                except InterruptedError:
                    continue
                host = addr[0]
                number = block.numbers.get(host)
                if number is None:
                    if not allowed(host):
                        self.unknown += 1
                        self._unknown.inc()
                        continue
                    number = block.exporter(host)
                if not block.lengths:
                    block.received_ns = now_ns()
                    block.opened = monotonic()
                block.lengths.append(size)
                block.ports.append(addr[1])
                block.which.append(number)
                block.size += size
                if block.size >= BLOCK_BYTES or len(block.numbers) >= MAX_BLOCK_EXPORTERS:
                    break
            now = monotonic()
            count = len(block.lengths)
            if count and (not drained or count >= BLOCK_PACKETS or block.size >= BLOCK_BYTES
                          or len(block.numbers) >= MAX_BLOCK_EXPORTERS or now - block.opened >= LINGER):
                if self._write(block, view):
                    packets += count
                    nbytes += block.size
                block = _Block()
            if now >= next_sync or packets >= 100_000:
                self.packets += packets
                self._received.inc(packets)
                self._received_bytes.inc(nbytes)
                packets = nbytes = 0
                self._sync()
                next_sync = now + self.fsync_interval
            if drained:
                if block.lengths:  # let the block fill for the rest of its linger
                    time.sleep(max(0.0, LINGER - (now - block.opened)))
                else:
                    select.select([sock], [], [], max(0.001, min(0.05, next_sync - now)))
        if block.lengths and self._write(block, view):
            packets += len(block.lengths)
            nbytes += block.size
        self.packets += packets
        self._received.inc(packets)
        self._received_bytes.inc(nbytes)

    def _write(self, block: _Block, view: memoryview) -> bool:
        """Journal the block; False if the journal's volume is full (the block is dropped and counted).

        "Full" starts below `RESERVE_FREE` bytes free (probed every
        `PROBE_INTERVAL` and every `PROBE_BYTES` journaled) or at an ENOSPC, whichever comes first, and ends at
        `RESUME_FREE`: the reserve is room for the shipper's checkpoints, without
        which it could not ship (and so trim) what the journal holds.
        """
        count = len(block.lengths)
        now = time.monotonic()
        if now >= self._next_probe or self._since_probe >= PROBE_BYTES:
            self._next_probe, self._since_probe = now + PROBE_INTERVAL, 0
            free = self._free()
            if self.disk_full and free >= RESUME_FREE:
                log.warning("journal volume has space again: journaling resumed",
                            extra={"free_bytes": free, "dropped": self.refused})
                self.disk_full = False
                self._full.set(0)
            elif not self.disk_full and free < RESERVE_FREE:
                self._now_full(f"{free} bytes free, under the reserve of {RESERVE_FREE}")
        if self.disk_full:
            self._refuse(count)
            return False
        index = np.empty(count, dtype=INDEX_DTYPE)
        index["length"] = block.lengths
        index["port"] = block.ports
        index["exporter"] = block.which
        try:
            with self._lock:
                # written through at once: a kill -9 then loses only the socket queue and the
                # block being filled (at most LINGER); fsync, for power loss, runs every fsync_interval
                self.journal.append_block(block.received_ns, block.packed, index.tobytes(), count,
                                          view[:block.size])
        except JournalFull as exc:
            self._now_full(str(exc))
            self._refuse(count)
            return False
        self._since_probe += block.size
        return True

    def _now_full(self, reason: str) -> None:
        log.error("JOURNAL VOLUME FULL: packets are dropped (counted as disk_full) until space returns; "
                  "everything journaled is kept and shipped", extra={"reason": reason})
        self.disk_full = True
        self._full.set(1)

    def _free(self) -> int:
        try:
            return self.journal.free_bytes()
        except OSError:
            return RESUME_FREE  # cannot tell: let the write decide

    def _refuse(self, count: int) -> None:
        self.refused += count
        self._refused.inc(count)

    def _sync(self) -> None:
        journal = self.journal
        with self._lock:
            try:
                journal.flush()
            except OSError as exc:
                if exc.errno not in DISK_ERRORS:
                    raise
                # not durable yet: `durable` stays, the next sync tries again
                log.error("journal fsync refused by a full volume; retrying", extra={"reason": str(exc)})
                return
            moved = journal.offset != self.durable
            self.durable = journal.offset
            if self._trim_to > 0:
                journal.drop_below(min(self._trim_to, journal.offset))
                self._trim_to = -1
        if moved:
            self._wake()

    def journal_size(self) -> int:
        with self._lock:
            return self.journal.size


# ---------------------------------------------------------------- journal tail


class JournalTail:
    """Incremental reader of a journal that is being written: [position, limit)."""

    def __init__(self, directory: Path, position: int) -> None:
        self.directory = directory
        self.position = position

    def read(self, limit: int, max_packets: int) -> Packets:
        """Whole records from `position` (which moves past them) holding about ``max_packets`` datagrams.

        Reads at most `READ_BYTES` at a time (more only for a record larger
        than that), never across a segment end, so a batch is one read
        buffer and its packets point into it.
        """
        if self.position >= limit:
            return Packets.empty()
        segments = list_segments(self.directory)
        seg = None
        for n, (base, path) in enumerate(segments):
            nxt = segments[n + 1][0] if n + 1 < len(segments) else None
            if base <= self.position and (nxt is None or self.position < nxt):
                seg = (base, path, nxt)
                break
        if seg is None:
            raise RuntimeError(f"journal offset {self.position} is in no segment of {self.directory}")
        base, path, nxt = seg
        if nxt is not None and self.position - base >= path.stat().st_size:
            # the gap a lifted run leaves (`Journal.lift_run`): nothing was ever there
            self.position = min(nxt, limit)
            return Packets.empty()
        end = min(limit, nxt) if nxt is not None else limit
        size = READ_BYTES
        while True:
            want = min(size, end - self.position)
            with open(path, "rb") as f:
                f.seek(self.position - base)
                data = f.read(want)
            out = []
            packets = 0
            for record in scan_records(data, self.position):
                out.append(record)
                packets += len(record.index)
                if packets >= max_packets:
                    break
            if out or want >= end - self.position:
                break
            size *= 4  # one record larger than the read
        if not out:
            raise RuntimeError(f"journal record at {self.position} in {path.name} does not scan")
        self.position = out[-1].end
        return records_to_packets(out, data)

    def rewind(self, position: int) -> None:
        self.position = position


# ---------------------------------------------------------------- decoding with state


@dataclass
class DecoderState:
    cache: TemplateCache = field(default_factory=TemplateCache)
    tracker: SequenceTracker = field(default_factory=SequenceTracker)
    pending: list[Pending] = field(default_factory=list)  # Pending.index = journal offset of the packet

    def dumps(self) -> bytes:
        return pickle.dumps((self.cache, self.tracker, self.pending), protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def loads(cls, data: bytes) -> DecoderState:
        # our own file, written by this worker (never bytes from outside)
        cache, tracker, pending = pickle.loads(data)  # noqa: S301
        return cls(cache, tracker, pending)


@dataclass(frozen=True, slots=True)
class BatchStats:
    packets: int
    flows: int
    undecodable: int
    missing_template: int
    sequence_lost: int


class BatchDecoder:
    """Decodes batches of journal records, carrying templates and pending sets."""

    def __init__(self, state: DecoderState, sampling: dict[tuple[int, int], int]) -> None:
        self.state = state
        self.sampling = sampling

    def decode(self, batch: Packets | list[JournalRecord]) -> tuple[np.ndarray, BatchStats]:
        """Decode a batch (as `JournalTail.read` gives it, or records of a `JournalReader`)."""
        st = self.state
        packets = batch if isinstance(batch, Packets) else \
            Packets.from_datagrams([r.datagram for r in batch], [r.offset for r in batch])
        if not len(packets):
            return np.zeros(0, FLOW_DTYPE), BatchStats(0, 0, 0, 0, 0)
        now = int(packets.received_ns[-1]) / 1e9
        result = decode_packets(packets, st.cache, st.tracker, now)
        parts = [result.flows]
        fresh = [Pending(int(packets.offsets[p.index]), p.datagram, p.set_offsets) for p in result.pending]
        old = st.pending
        expired = 0
        if old:
            again = decode_pending(old, st.cache)
            parts.append(again.flows)
            old = list(again.pending)
            horizon = now - PENDING_TTL
            kept = [p for p in old if p.datagram.received_ns / 1e9 >= horizon]
            expired += sum(len(p.set_offsets) for p in old) - sum(len(p.set_offsets) for p in kept)
            old = kept
        if fresh:
            # templates that came later in this same batch
            again = decode_pending(fresh, st.cache)
            parts.append(again.flows)
            fresh = list(again.pending)
        pending = old + fresh
        if len(pending) > MAX_PENDING:
            expired += sum(len(p.set_offsets) for p in pending[:-MAX_PENDING])
            pending = pending[-MAX_PENDING:]
        st.pending = pending
        flows = np.concatenate(parts) if len(parts) > 1 else parts[0]
        for (hi, lo), n in self.sampling.items():
            flows["sampling"][(flows["exporter_hi"] == hi) & (flows["exporter_lo"] == lo)] = n
        lost = sum(g.lost for g in result.gaps if g.lost > 0)
        return flows, BatchStats(result.packets, len(flows), len(result.malformed), expired, lost)


class Checkpoints:
    """Decoder state as of a watermark, one file per watermark (written before shipping it)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def _path(self, watermark: int) -> Path:
        return self.directory / f"{watermark:020d}.ckpt"

    def save(self, watermark: int, data: bytes) -> None:
        path = self._path(watermark)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load(self, watermark: int) -> bytes | None:
        try:
            return self._path(watermark).read_bytes()
        except FileNotFoundError:
            return None

    def marks(self) -> list[int]:
        return sorted(int(p.stem) for p in self.directory.glob("*.ckpt") if p.stem.isdigit())

    def prune(self, keep_from: int) -> None:
        """Delete checkpoints below ``keep_from`` (it stays), leaving at least a few."""
        marks = self.marks()
        for mark in marks[:-CHECKPOINTS_KEPT]:
            if mark < keep_from:
                self._path(mark).unlink(missing_ok=True)


# ---------------------------------------------------------------- the core's side, over URFA


AGG_COLUMNS = ("account", "klass", "direction", "hour_ms", "bytes", "packets", "flows")


def billable_rows(agg: Aggregates) -> int:
    return int(np.count_nonzero((agg.account > 0) & (agg.klass > 0)))


def merge_aggregates(a: Aggregates, b: Aggregates) -> Aggregates:
    """The sums of two batches' aggregates, per (account, class, direction, hour), exact."""
    cols = {name: np.concatenate([getattr(a, name), getattr(b, name)]) for name in AGG_COLUMNS}
    order = np.lexsort((cols["hour_ms"], cols["direction"], cols["klass"], cols["account"]))
    keys = [cols[n].take(order) for n in ("account", "klass", "direction", "hour_ms")]
    change = np.zeros(len(order), dtype=bool)
    if len(order):
        change[0] = True
    for k in keys:
        change[1:] |= k[1:] != k[:-1]
    starts = np.flatnonzero(change)
    return Aggregates(*(k.take(starts) for k in keys),
                      *(np.add.reduceat(cols[n].take(order), starts) if len(order) else cols[n]
                        for n in ("bytes", "packets", "flows")),
                      implausible=a.implausible + b.implausible)


def encode_aggregates(agg: Aggregates) -> dict[str, bytes]:
    """Billable rows (account > 0, class > 0) as little-endian int64 columns."""
    keep = (agg.account > 0) & (agg.klass > 0)
    return {name: np.ascontiguousarray(getattr(agg, name)[keep], dtype="<i8").tobytes() for name in AGG_COLUMNS}


class CoreLink:
    """The worker's session with the core: (re)login with backoff, calls, classifier events.

    A call that fails because the connection dropped is retried on a new
    session; that is safe for every call the worker makes (``netflow.submit``
    is idempotent by its watermark). Calls give up only once ``stop`` is set.
    """

    def __init__(self, open_session: Callable[[], Awaitable[Any]], worker: str) -> None:
        self._open = open_session
        self.client: Any = None
        self.snapshot_stale = True
        self.seen_version = 0  # the newest classifier version an event announced
        self._connected = CORE_CONNECTED.labels(worker)
        self._events: asyncio.Task[None] | None = None

    async def session(self, stop: asyncio.Event) -> Any:
        delay = 0.1
        while self.client is None or self.client.closed:
            self._connected.set(0)
            try:
                client = await self._open()
                await client.subscribe("classifier")
            except Exception as exc:  # noqa: BLE001 - unreachable, restarting or refusing: retry
                log.warning("core unreachable; the journal keeps everything",
                            extra={"reason": f"{type(exc).__name__}: {exc}"})
                if stop.is_set():
                    raise CoreUnavailable("stopping while the core is unreachable") from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 3.0)
                continue
            self.client = client
            self.snapshot_stale = True  # events may have been missed while away
            self.seen_version = 0  # versions are the database's: a restored one may count from lower
            self._connected.set(1)
            if self._events is not None:
                self._events.cancel()
            self._events = asyncio.create_task(self._pump(client))
        return self.client

    async def _pump(self, client: Any) -> None:
        with contextlib.suppress(Exception):
            while True:
                event = await client.next_event()
                if event.topic == "classifier":
                    version = event.payload.get("version") if isinstance(event.payload, dict) else None
                    if isinstance(version, int):  # compared with the loaded version: see Worker.stale
                        self.seen_version = max(self.seen_version, version)
                    else:
                        self.snapshot_stale = True

    async def call(self, fn: str, args: dict[str, Any], stop: asyncio.Event, timeout: float = 300.0) -> Any:
        return await self._retrying(fn, stop, lambda client: client.call(fn, args, timeout=timeout))

    async def load(self, fn: str, stop: asyncio.Event, chunk_timeout: float = 60.0) -> tuple[SnapshotLoader, Any]:
        """A streaming call's chunks fed to a fresh `SnapshotLoader`, with the call's answer.

        Retried from the start like `call` (a half-loaded stream is thrown
        away); each chunk must come within ``chunk_timeout`` seconds.
        """
        async def attempt(client: Any) -> tuple[SnapshotLoader, Any]:
            loader = SnapshotLoader()
            stream = client.stream(fn, {})
            try:
                while True:
                    try:
                        chunk = await asyncio.wait_for(stream.__anext__(), chunk_timeout)
                    except StopAsyncIteration:
                        return loader, stream.result
                    loader.feed(chunk)
            except BaseException:
                with contextlib.suppress(Exception):
                    client.cancel(stream)
                raise

        return await self._retrying(fn, stop, attempt)

    async def _retrying(self, fn: str, stop: asyncio.Event, attempt: Callable[[Any], Awaitable[Any]]) -> Any:
        delay = 0.1
        while True:
            client = await self.session(stop)
            try:
                return await attempt(client)
            except (ConnectionLost, OSError, asyncio.TimeoutError) as exc:
                log.warning("core call interrupted; retrying", extra={"fn": fn, "reason": f"{type(exc).__name__}: {exc}"})
                with contextlib.suppress(Exception):
                    await client.close()
                self.client = None
            except CallFailed as exc:
                if exc.code in ("not_in_table", "bad_args", "forbidden", "deleted",
                                "billing.epoch_mismatch", "netflow.epoch_conflict"):
                    raise  # a retry cannot help (an epoch conflict: restart and decide again)
                # the core could not commit (database down, restarting): the journal waits
                log.error("core refused a call; retrying", extra={"fn": fn, "code": exc.code, "reason": str(exc)})
            if stop.is_set():
                raise CoreUnavailable(f"stopping before {fn} succeeded")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 3.0)

    async def close(self) -> None:
        if self._events is not None:
            self._events.cancel()
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.close()
        self._connected.set(0)


class CoreUnavailable(Exception):
    """The worker is stopping and the core did not answer; the journal keeps the rest."""


class StoppedWhileFull(Exception):
    """The worker was asked to stop while a write it needs was refused by a full volume."""


# ---------------------------------------------------------------- journal identity


@dataclass(frozen=True, slots=True)
class Resume:
    """What a starting worker does about its journal's identity (`plan_resume`)."""

    identity: JournalIdentity  # the journal's identity from now on
    reason: str | None  # why the core's epoch changes (`EPOCH_REASONS` of billcore.billing.usage); None: it does not


def plan_resume(identity: JournalIdentity | None, journal_end: int, watermark: int, epoch: str | None) -> Resume:
    """Compare the journal a worker opened (its ``identity``, where it ended, ``journal_end``)
    with what the core counts (``watermark`` of journal ``epoch``).

    Whatever the answer, the worker lifts this run's offsets above ``watermark``
    when ``journal_end`` is below it; this decides the epoch and the alarm.
    """
    if identity is not None and identity.epoch == epoch:
        if journal_end >= watermark:
            return Resume(identity, None)  # its own journal, intact: replay from the watermark
        return Resume(JournalIdentity.mint(), "truncated")
    if epoch is None and watermark < 0:
        return Resume(identity or JournalIdentity.mint(), "first")  # nothing was ever counted
    if epoch is None and identity is None:
        # a journal and a watermark from before identities: the same one, unless it cannot be
        return Resume(JournalIdentity.mint(), "adopted" if journal_end >= watermark else "truncated")
    return Resume(identity or JournalIdentity.mint(), "replaced")


# ---------------------------------------------------------------- the worker


class Worker:
    def __init__(self, settings: WorkerSettings, open_session: Callable[[], Awaitable[Any]]) -> None:
        self.s = settings
        self.link = CoreLink(open_session, settings.worker_id)
        self.classifier: Classifier | None = None
        self.classifier_version: int | None = None
        self.committed = -1
        self.epoch: str | None = None
        self.sent_batches = 0
        self.granted_rcvbuf = 0
        w = settings.worker_id
        self._m = {
            "flows": FLOWS.labels(w), "shipped": SHIPPED.labels(w), "unbilled": UNBILLED.labels(w),
            "undecodable": DROPS.labels(w, "undecodable"), "missing": DROPS.labels(w, "missing_template"),
            "gap": DROPS.labels(w, "sequence_gap"), "kernel": DROPS.labels(w, "kernel"),
            "journal": JOURNAL_BYTES.labels(w), "lag": JOURNAL_LAG.labels(w), "alarm": JOURNAL_ALARM.labels(w),
            "rcvbuf": RCVBUF.labels(w), "free": JOURNAL_FREE.labels(w), "low": JOURNAL_DISK_LOW.labels(w),
            "full": JOURNAL_DISK_FULL.labels(w),
        }
        self._kernel_seen = 0
        self._alarmed = False
        self._low = False

    async def refresh_classifier(self, stop: asyncio.Event) -> None:
        """Load the streamed snapshot and swap the classifier whole (see `netflow.snapshot`).

        The stale flag is cleared before asking. A change committed after the
        core's database snapshot has a newer version than the one loaded (the
        version row serializes the changes), and its event comes on the session
        that was subscribed before the load began: `stale` then holds, and the
        next loop loads once more. No change is lost.
        """
        self.link.snapshot_stale = False
        started = time.monotonic()
        loader, answer = await self.link.load("netflow.snapshot", stop)
        snapshot, version = loader.finish(answer)
        self.classifier = Classifier(snapshot)
        if version != self.classifier_version:
            log.info("classifier loaded", extra={
                "version": version, "bindings": loader.bindings, "chunks": loader.chunks,
                "seconds": round(time.monotonic() - started, 3), "classifier_bytes": self.classifier.nbytes()})
        self.classifier_version = version

    def stale(self) -> bool:
        """Reload? After a (re)connect (events may have been missed), or once an event announced a
        version newer than the one loaded. An event for a change the last load already held (it
        committed before the core's database snapshot, its NOTIFY came after) costs no second load:
        at a million bindings that is seconds per change."""
        return self.link.snapshot_stale or self.link.seen_version > (self.classifier_version or 0)

    # -- one batch ------------------------------------------------------------
    def _prepare(self, decoder: BatchDecoder, tail: JournalTail, limit: int, max_packets: int, saved: bytes
                 ) -> tuple[Packets, np.ndarray, Aggregates, Any, BatchStats]:
        """Decode and aggregate the next chunk; too many rows → fewer packets from the same state."""
        assert self.classifier is not None
        start = tail.position
        while True:
            records = tail.read(limit, max_packets)
            flows, stats = decoder.decode(records)
            legs = self.classifier.classify(flows)
            agg = aggregate(flows, legs)
            billable = billable_rows(agg)
            if billable <= MAX_ROWS or len(np.unique(records.offsets)) <= 1:
                break
            decoder.state = DecoderState.loads(saved)
            tail.rewind(start)
            max_packets = max(1, len(records) // 2)
        if billable > MAX_ROWS:
            raise RuntimeError(f"one journal record makes {billable} aggregate rows, over {MAX_ROWS}")
        return records, flows, agg, legs, stats

    def _batch(self, decoder: BatchDecoder, tail: JournalTail, limit: int
               ) -> tuple[list[tuple[int, int, np.ndarray, Any]], Aggregates]:
        """Decode chunks of `CHUNK_PACKETS` up to ``batch_packets`` (or ``limit``) into one batch.

        Small chunks keep the worker's arrays small (CPU per flow rises with
        arrays past glibc's mmap threshold); one batch of many chunks keeps
        the core's work per flow small (its cost is per call and per account
        touched). A chunk that would take the merged aggregates past
        MAX_ROWS is undone (decoder state and tail) and left for the next batch.
        """
        chunks: list[tuple[int, int, np.ndarray, Any]] = []
        merged: Aggregates | None = None
        packets = 0
        while tail.position < limit and packets < self.s.batch_packets:
            start = tail.position
            saved = decoder.state.dumps()
            records, flows, agg, legs, stats = self._prepare(decoder, tail, limit, CHUNK_PACKETS, saved)
            combined = agg if merged is None else merge_aggregates(merged, agg)
            if merged is not None and billable_rows(combined) > MAX_ROWS:
                decoder.state = DecoderState.loads(saved)
                tail.rewind(start)
                break
            merged = combined
            self._count(stats, agg)
            chunks.append((start, tail.position, flows, legs))
            packets += len(records)
        assert merged is not None, "a batch starts below the limit"
        return chunks, merged

    def _count(self, stats: BatchStats, agg: Aggregates) -> None:
        m = self._m
        m["flows"].inc(stats.flows)
        if stats.undecodable:
            m["undecodable"].inc(stats.undecodable)
        if stats.missing_template:
            m["missing"].inc(stats.missing_template)
        if stats.sequence_lost:
            m["gap"].inc(stats.sequence_lost)
        unbilled = (agg.account <= 0) | (agg.klass <= 0)
        if unbilled.any():
            m["unbilled"].inc(int(agg.bytes[unbilled].sum()))

    async def _on_disk(self, what: str, fn: Callable[[], Any], stop: asyncio.Event) -> Any:
        """``fn()``, retried while the journal's volume is full (the worker stays up).

        Raises `StoppedWhileFull` if the worker is asked to stop first."""
        delay, warned = 0.5, False
        while True:
            try:
                result = fn()
            except OSError as exc:
                if exc.errno not in DISK_ERRORS:
                    raise
                if not warned:
                    log.error("JOURNAL VOLUME FULL: cannot write; retrying until space returns",
                              extra={"what": what, "reason": str(exc)})
                    warned = True
                self._m["full"].set(1)
                if stop.is_set():
                    raise StoppedWhileFull(what) from exc
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=delay)
                delay = min(delay * 2, 5.0)
                continue
            if warned:
                self._m["full"].set(0)
                log.warning("journal volume has space again", extra={"what": what})
            return result

    def _open_journal(self) -> tuple[Journal, Checkpoints]:
        s = self.s
        journal = Journal(s.journal_dir, s.segment_bytes, s.journal_max_bytes)
        try:
            journal.start_run()  # this run's receipts begin a segment, so they can be lifted
            return journal, Checkpoints(s.journal_dir / "checkpoints")
        except BaseException:
            journal.close()
            raise

    async def _resume(self, journal: Journal, receiver: Receiver, journal_end: int, raw: RawWriter | None,
                      stop: asyncio.Event) -> None:
        """Settle the journal's identity with the core (see the module docstring)."""
        s = self.s
        try:
            mark = await self.link.call("netflow.journal", {"worker": s.worker_id}, stop)
        except CallFailed as exc:
            if exc.code != "not_in_table":
                raise
            # a core from before journal identities: offsets alone keep new traffic above the watermark
            log.warning("the core knows no journal epochs; journal identity is not checked")
            committed = int(await self.link.call("netflow.watermark", {"worker": s.worker_id}, stop))
            if journal_end < committed:
                receiver.lift(committed)
            self.committed, self.epoch = committed, None
            return
        watermark, epoch = int(mark["watermark"]), mark["epoch"]
        plan = plan_resume(journal.identity, journal_end, watermark, epoch)
        raw_mark = raw.watermark() if raw is not None else None
        floor = max(watermark, raw_mark or 0, 0)
        lifted = receiver.lift(floor) if journal_end < floor else 0
        if plan.identity != journal.identity:
            await self._on_disk("journal identity", lambda: journal.set_identity(plan.identity), stop)
        if plan.reason is not None:
            answer = await self.link.call("netflow.begin_epoch", {
                "worker": s.worker_id, "epoch": plan.identity.epoch, "expect": epoch or "",
                "reason": plan.reason, "journal_end": journal_end}, stop)
            watermark = int(answer["watermark"])
            EPOCHS.labels(s.worker_id, plan.reason).inc()
            alarm = plan.reason in ("replaced", "truncated")
            (log.error if alarm else log.info)(
                "JOURNAL IS NOT THE ONE THE WATERMARK COUNTS: new epoch; everything received from now on is charged"
                if alarm else "journal epoch began",
                extra={"reason": plan.reason, "epoch": plan.identity.epoch, "previous": epoch,
                       "watermark": watermark, "journal_end": journal_end, "lifted_by": lifted})
        self.epoch = plan.identity.epoch
        self.committed = watermark

    async def serve(self, stop: asyncio.Event, ready: Callable[[dict[str, Any]], None] | None = None) -> None:
        s = self.s
        try:
            journal, checkpoints = await self._on_disk("journal open", self._open_journal, stop)
        except StoppedWhileFull:
            return
        journal_end = journal.run_base  # where the journal ended before this run received anything
        raw = RawWriter(s.raw_dir, s.worker_id, s.raw_retention_days, s.raw_flush_rows, s.raw_flush_interval) \
            if s.raw_dir is not None else None
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        sock, self.granted_rcvbuf = open_socket(s.host, s.port, s.rcvbuf)
        self._m["rcvbuf"].set(self.granted_rcvbuf)
        receiver = Receiver(sock, journal, ExporterFilter(s.exporters), s.fsync_interval, s.worker_id,
                            wake=lambda: loop.call_soon_threadsafe(wake.set))
        receiver.start()
        try:
            await self._resume(journal, receiver, journal_end, raw, stop)
            await self.refresh_classifier(stop)
            oldest = list_segments(s.journal_dir)[0][0]
            start = max(self.committed, 0)
            raw_mark = raw.watermark() if raw is not None else None
            if raw is not None and (raw_mark or 0) < start:
                start = raw_mark or 0
            start = max(start, oldest)
            state_bytes = checkpoints.load(start) if start > 0 else None
            if start > 0 and state_bytes is None:
                log.error("no decoder checkpoint at the replay start; templates and pending sets start empty",
                          extra={"watermark": start})
            decoder = BatchDecoder(DecoderState.loads(state_bytes) if state_bytes else DecoderState(),
                                   parse_sampling(s.sampling))
            tail = JournalTail(s.journal_dir, start)
            info = {"worker": s.worker_id, "port": s.port, "rcvbuf": self.granted_rcvbuf,
                    "committed": self.committed, "replay_from": start, "replay_bytes": receiver.durable - start}
            log.info("netflow serving", extra=info)
            if ready is not None:
                ready(info)
            last_ship = loop.time()
            while True:
                if receiver.error is not None:
                    raise RuntimeError("receiver thread died") from receiver.error
                durable = receiver.durable
                self._watch(receiver, sock, durable)
                if self.stale():
                    await self.refresh_classifier(stop)
                if tail.position >= durable:
                    if raw is not None and raw.tick_due(loop.time()):
                        # raw_flush_interval and retention hold when no packet comes to trigger them
                        await asyncio.to_thread(raw.tick, loop.time())
                        self._trim(receiver, checkpoints, raw)
                    if stop.is_set():
                        break
                    wake.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(wake.wait(), timeout=min(1.0, s.ship_interval))
                    continue
                # ship every ship_interval, at once when far behind or stopping
                behind = durable - tail.position > BEHIND_BYTES or tail.position < self.committed
                wait = s.ship_interval - (loop.time() - last_ship)
                if wait > 0 and not behind and not stop.is_set():
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=wait)
                    continue
                # replayed batches never straddle the committed watermark
                limit = durable if tail.position >= self.committed else min(durable, self.committed)
                first = tail.position
                chunks, agg = self._batch(decoder, tail, limit)
                end = tail.position
                state = decoder.state.dumps()
                try:
                    await self._on_disk("checkpoint", lambda: checkpoints.save(end, state), stop)
                except StoppedWhileFull:
                    log.warning("stopping with uncommitted journal; it is replayed at the next start",
                                extra={"from": first})
                    break
                if end > self.committed:
                    try:
                        result = await self.link.call(
                            "netflow.submit", {"worker": s.worker_id, "watermark": end, **encode_aggregates(agg),
                                               **({"epoch": self.epoch} if self.epoch else {})}, stop)
                    except CoreUnavailable:
                        log.warning("stopping with uncommitted journal; it is replayed at the next start",
                                    extra={"from": first})
                        break
                    self.committed = max(self.committed, int(result["watermark"]))
                    self._m["shipped"].inc()
                    self.sent_batches += 1
                last_ship = loop.time()
                if raw is not None:
                    # only once the core has the batch: the raw store's mark never passes the committed one
                    for a, b, flows, legs in chunks:
                        raw.add_legs(flows, legs, a, b, loop.time())  # due() is asked on the same clock
                    if raw.due(loop.time()) or stop.is_set():
                        await asyncio.to_thread(raw.flush, loop.time())
                self._trim(receiver, checkpoints, raw)
            if raw is not None and raw.rows:
                await asyncio.to_thread(raw.flush, loop.time())
                self._trim(receiver, checkpoints, raw)
        except CoreUnavailable:
            log.warning("stopped before the core answered")
        except StoppedWhileFull:
            log.warning("stopped while the journal volume was full")
        finally:
            receiver.stop()
            receiver.join(timeout=5)
            sock.close()
            with contextlib.suppress(Exception):
                journal.close()
            await self.link.close()

    def _trim(self, receiver: Receiver, checkpoints: Checkpoints, raw: RawWriter | None) -> None:
        safe = self.committed
        if raw is not None:
            mark = raw.watermark()
            safe = min(safe, mark if mark is not None else 0)
        if safe > 0:
            receiver.trim(safe)
            checkpoints.prune(safe)

    def _watch(self, receiver: Receiver, sock: socket.socket, durable: int) -> None:
        m = self._m
        size = receiver.journal_size()
        m["journal"].set(size)
        m["lag"].set(max(0, durable - max(self.committed, 0)))
        over = size > self.s.journal_max_bytes
        m["alarm"].set(1 if over else 0)
        if over and not self._alarmed:
            log.error("JOURNAL OVER LIMIT: the core is not keeping up; nothing is dropped but the disk is filling",
                      extra={"journal_bytes": size, "limit": self.s.journal_max_bytes})
        self._alarmed = over
        with contextlib.suppress(OSError):
            free = receiver.journal.free_bytes()
            m["free"].set(free)
            low = free < self.s.journal_min_free_bytes
            m["low"].set(1 if low else 0)
            if low and not self._low:
                log.error("JOURNAL VOLUME LOW: packets are dropped once it is full",
                          extra={"free_bytes": free, "threshold": self.s.journal_min_free_bytes})
            self._low = low
        drops = kernel_drops(sock)
        if drops is not None and drops > self._kernel_seen:
            m["kernel"].inc(drops - self._kernel_seen)
            if self._kernel_seen == 0 or drops - self._kernel_seen > 0:
                log.warning("kernel dropped packets (receive buffer full)",
                            extra={"dropped": drops - self._kernel_seen, "total": drops})
            self._kernel_seen = drops


# ---------------------------------------------------------------- process entry


def local_session_opener(config: Any, login: str, password: str) -> Callable[[], Awaitable[Any]]:
    from urfa.client import connect

    async def open_session() -> Any:
        address = config.netflow.core_address
        sock = config.urfa_socket
        if address:
            host, _, port = address.rpartition(":")
            client = await connect(host.strip("[]"), int(port), timeout=10.0)
        elif sock is not None:
            client = await connect(unix=str(sock), timeout=10.0)
        else:
            client = await connect(config.urfa.host, config.urfa.port, timeout=10.0)
        try:
            await client.login("system", login, password)
        except BaseException:
            await client.close()
            raise
        return client

    return open_session


def read_password(config: Any) -> str:
    from billcore.common.sysfiles import service_password_file

    path = Path(config.netflow.password_file) if config.netflow.password_file else \
        service_password_file(config.data_dir, "netflow")
    deadline = time.monotonic() + 30
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)  # the core writes it at its first start
    return path.read_text().strip()


async def run(config: Any, dsn: str, index: int, stop: asyncio.Event) -> None:
    """The supervisor's ``netflow`` role: worker ``index`` of ``config.netflow_workers``."""
    settings = WorkerSettings.from_config(config, index)
    password = await asyncio.to_thread(read_password, config)
    worker = Worker(settings, local_session_opener(config, config.netflow.login, password))
    await worker.serve(stop)
