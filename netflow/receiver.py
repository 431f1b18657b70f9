"""The NetFlow receiver: the UDP socket (SO_REUSEPORT, a large buffer) and the thread that journals it.

Theory of operation
-------------------
The receiver (a thread) reads the socket, drops packets of unknown exporters
(counted), appends every other packet to the worker's journal in blocks, and
fsyncs every ``fsync_interval``; after each fsync it publishes the *durable
offset* and wakes the shipper. It never waits for anything else, so a slow
core or database only makes the journal grow. It is the journal's only
writer: the shipper asks it to trim (`Receiver.trim`) or to lift this run's
offsets (`Receiver.lift`), under the journal lock.

A full disk. A block the journal's volume refuses (ENOSPC) is dropped and
counted (``netflow_drops{reason="disk_full"}``), and so is every block while
fewer than `RESERVE_FREE` bytes are free (room for the shipper's checkpoints:
without them it could not ship, and so trim, what is journaled); the receiver
keeps reading the socket (so the kernel drops nothing silently), probes the
free space every `PROBE_INTERVAL` and journals again once `RESUME_FREE` bytes
are free.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable

import numpy as np

from netflow.errors import JournalFull
from netflow.journal import INDEX_DTYPE, MAX_BLOCK_EXPORTERS, Journal, packed_address
from netflow.metrics import DROPS, JOURNAL_DISK_FULL, RECEIVED, RECEIVED_BYTES

__all__ = ["ExporterFilter", "Receiver", "open_socket", "kernel_drops", "DISK_ERRORS"]

log = logging.getLogger("netflow.worker")

SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


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

