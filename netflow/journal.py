"""The append-only packet journal: what a worker received, before decoding.

Theory of operation: datagrams are appended to the current segment file as
records

    u32 body length | u32 crc32(body) | body

of two kinds. A *datagram* record (kind 0, `append`) holds one datagram:

    body = u64 receive time ns | u16 port | u8 address length (4/16) | u8 0
           | address | payload

A *block* record (kind 1, `append_block`; what the worker's receiver writes)
holds up to 65535 datagrams received together, so the CRC, the header and the
write are paid per block, not per packet, and the reader finds every packet
with one `np.frombuffer` of the index:

    body = u64 receive time ns | u16 packets | u8 exporters | u8 1
           | exporters x (u8 address length (4/16) | address)
           | packets x (u16 payload length | u16 port | u8 exporter number)
           | payloads, concatenated

The packets of a block share its receive time (the first packet's).
`append*` returns the journal offset just past the record: a global byte
offset over all segments, which is the worker's watermark. Committing
watermark W with the core means "every record ending at or below W is
charged"; a restarted worker replays from W with `JournalReader(dir, W)`.

Segments are named after the global offset of their first byte, so a
watermark maps to a file and a position by name alone. A segment rotates when
it reaches `segment_bytes`. Every append is written through to the kernel at
once (it survives a process kill, not a power loss); `flush()` fsyncs, and the
caller decides how often (each batch), trading durability against fsync cost.

A crash can tear the last record of the last segment (partly written or
never fsynced). Opening a `Journal` truncates such a tail; a `JournalReader`
stops before it. A bad record anywhere else is corruption and raises.

`drop_below(W)` deletes segments that lie wholly below a committed watermark
(list them first with `segments_below` to roll them into raw storage);
`size` and `over_limit` account the bytes on disk against `max_bytes`.

Identity.  A journal directory carries ``journal.id`` (`JournalIdentity`): a
random *epoch*, written when the journal is created.  The core keeps the epoch
beside the worker's watermark, so a worker that finds a different journal than
the one its watermark counts (a wiped disk, a new volume, a moved data dir, a
journal truncated below the watermark) knows it and says so.  What keeps
charging exact across such a change is the offset space: a journal never
reuses offsets at or below the watermark.  `start_run` begins each run in a
fresh segment, and `lift_run(base)` renames that run's segments so that what
it received starts at ``base`` (the committed watermark): new traffic always
ends above the watermark, whatever happened to the files before.

A full disk.  Appends are written with one ``writev`` on an unbuffered file; a
write that fails (ENOSPC) is cut off again (``ftruncate`` to the last whole
record) and raises `JournalFull`, so the journal stays whole and the caller
decides what to drop.  `free_bytes` reports the volume's free space.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import secrets
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from netflow.errors import JournalCorrupt, JournalError, JournalFull
from netflow.flows import Datagram, Packets

SUFFIX = ".nfj"
IDENTITY_FILE = "journal.id"
MAX_IDENTITY = 1024  # bytes of journal.id read at most
FRAME = struct.Struct(">II")
META = struct.Struct(">QHBB")
KIND_DATAGRAM, KIND_BLOCK = 0, 1
INDEX_DTYPE = np.dtype([("length", ">u2"), ("port", ">u2"), ("exporter", "u1")])
MAX_PAYLOAD = 65535
MAX_BLOCK_EXPORTERS = 255
MAX_BLOCK_PACKETS = 65535
MAX_BLOCK_PAYLOAD = 1 << 22
MAX_BODY = META.size + MAX_BLOCK_EXPORTERS * 17 + MAX_BLOCK_PACKETS * INDEX_DTYPE.itemsize + MAX_BLOCK_PAYLOAD


@dataclass(frozen=True, slots=True)
class JournalRecord:
    offset: int  # where the record starts
    end: int  # the watermark that covers it
    datagram: Datagram


@dataclass(frozen=True, slots=True)
class JournalIdentity:
    """Which journal this is: a random epoch, minted when the journal (or a new epoch of it) begins."""

    epoch: str

    @staticmethod
    def mint() -> JournalIdentity:
        return JournalIdentity(secrets.token_hex(16))

    def dumps(self) -> bytes:
        return json.dumps({"epoch": self.epoch}).encode() + b"\n"

    @staticmethod
    def loads(data: bytes) -> JournalIdentity:
        try:
            epoch = json.loads(data)["epoch"]
        except (ValueError, KeyError, TypeError) as exc:
            raise JournalCorrupt(f"{IDENTITY_FILE} is not a journal identity") from exc
        if not isinstance(epoch, str) or not 1 <= len(epoch) <= 64 or not epoch.isalnum():
            raise JournalCorrupt(f"{IDENTITY_FILE} holds a bad epoch")
        return JournalIdentity(epoch)


def read_identity(directory: Path) -> JournalIdentity | None:
    """The journal's identity; None for a journal written before identities existed."""
    try:
        with open(directory / IDENTITY_FILE, "rb") as f:
            return JournalIdentity.loads(f.read(MAX_IDENTITY))
    except FileNotFoundError:
        return None


def write_identity(directory: Path, identity: JournalIdentity) -> None:
    """Replace the identity atomically (written, fsynced, renamed, directory fsynced)."""
    path = directory / IDENTITY_FILE
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(identity.dumps())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(directory)


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory: so that a create, rename or unlink in it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def segment_name(base: int) -> str:
    return f"{base:020d}{SUFFIX}"


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    out = []
    for path in directory.iterdir():
        if path.suffix == SUFFIX and path.stem.isdigit() and len(path.stem) == 20:
            out.append((int(path.stem), path))
    return sorted(out)


def encode_record(received_ns: int, exporter: str, port: int, payload: bytes) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise JournalError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    addr = _packed(exporter)
    body = META.pack(received_ns, port, len(addr), 0) + addr + payload
    return FRAME.pack(len(body), zlib.crc32(body)) + body


def block_head(received_ns: int, exporters: list[bytes], index: bytes, count: int) -> bytes:
    """Body of a block record up to its payloads (see the module docstring)."""
    if not 0 < count <= MAX_BLOCK_PACKETS or len(exporters) > MAX_BLOCK_EXPORTERS:
        raise JournalError(f"a block holds 1..{MAX_BLOCK_PACKETS} packets of <= {MAX_BLOCK_EXPORTERS} exporters")
    table = b"".join(bytes([len(a)]) + a for a in exporters)
    return META.pack(received_ns, count, len(exporters), KIND_BLOCK) + table + index


def packed_address(exporter: str) -> bytes:
    """An exporter's address as a block's exporter table stores it (4 or 16 bytes)."""
    return _packed(exporter)


@lru_cache(maxsize=4096)
def _packed(exporter: str) -> bytes:
    try:
        return ipaddress.ip_address(exporter).packed
    except ValueError as exc:
        raise JournalError(f"not an exporter address: {exporter!r}") from exc


def decode_body(body: bytes) -> Datagram:
    received_ns, port, addr_len, _ = META.unpack_from(body)
    if addr_len not in (4, 16) or len(body) < META.size + addr_len:
        raise JournalCorrupt("journal record has a bad address length")
    exporter = _unpacked(body[META.size : META.size + addr_len])
    return Datagram(exporter, body[META.size + addr_len :], port, received_ns)


@lru_cache(maxsize=4096)
def _unpacked(addr: bytes) -> str:
    return str(ipaddress.ip_address(addr))  # per record this was a third of a replay's cost


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One journal record, parsed but not split into `Datagram` objects."""

    offset: int
    end: int
    received_ns: int
    exporters: tuple[str, ...]
    index: np.ndarray  # INDEX_DTYPE, one row per packet
    payload: memoryview  # the packets' payloads, concatenated
    payload_at: int  # where `payload` starts in the buffer that was scanned


def scan_records(data: bytes, base: int) -> Iterator[RawRecord]:
    """Records of one segment's bytes; stops silently at a torn or bad record.

    The caller decides whether stopping early was a torn tail or corruption
    by comparing the last `end` with the segment's length. The CRC is taken
    over a view (no copy); payloads stay views of ``data``.
    """
    view = memoryview(data)
    size = len(data)
    frame, meta = FRAME.unpack_from, META.unpack_from
    crc32 = zlib.crc32
    fsize, msize, min_body = FRAME.size, META.size, META.size + 4
    isize = INDEX_DTYPE.itemsize
    pos = 0
    while size - pos >= fsize:
        length, crc = frame(data, pos)
        start = pos + fsize
        end = start + length
        if length < min_body or length > MAX_BODY or end > size:
            return
        if crc32(view[start:end]) != crc:
            return
        received_ns, port, addr_len, kind = meta(data, start)
        at = start + msize
        if kind == KIND_DATAGRAM:
            if addr_len not in (4, 16) or length < msize + addr_len:
                raise JournalCorrupt("journal record has a bad address length")
            index = np.zeros(1, INDEX_DTYPE)
            index["length"] = end - at - addr_len
            index["port"] = port
            yield RawRecord(base + pos, base + end, received_ns, (_unpacked(data[at:at + addr_len]),), index,
                            view[at + addr_len:end], at + addr_len)
        elif kind == KIND_BLOCK:
            exporters = []
            for _ in range(addr_len):
                n = data[at] if at < end else 0
                if n not in (4, 16) or at + 1 + n > end:
                    raise JournalCorrupt("journal block has a bad exporter table")
                exporters.append(_unpacked(data[at + 1:at + 1 + n]))
                at += 1 + n
            if port == 0 or at + port * isize > end:
                raise JournalCorrupt("journal block has a bad packet index")
            index = np.frombuffer(data, INDEX_DTYPE, port, at)
            at += port * isize
            if int(index["length"].sum(dtype=np.int64)) != end - at or int(index["exporter"].max()) >= addr_len:
                raise JournalCorrupt("journal block index does not match its payloads")
            yield RawRecord(base + pos, base + end, received_ns, tuple(exporters), index, view[at:end], at)
        else:
            raise JournalCorrupt(f"journal record of unknown kind {kind}")
        pos = end


def scan_segment(data: bytes, base: int) -> Iterator[JournalRecord]:
    """`scan_records`, one `JournalRecord` per datagram (tests, tools).

    Every datagram of a block has the block's offset and end: a watermark
    covers whole records.
    """
    for record in scan_records(data, base):
        pos = 0
        for length, port, number in record.index.tolist():
            payload = bytes(record.payload[pos:pos + length])
            pos += length
            yield JournalRecord(record.offset, record.end,
                                Datagram(record.exporters[number], payload, port, record.received_ns))


def records_to_packets(records: list[RawRecord], scanned: bytes) -> Packets:
    """The datagrams of consecutive records as one `Packets` batch pointing into ``scanned``,
    the buffer every record was scanned from (no copy)."""
    if not records:
        return Packets.empty()
    names: dict[str, int] = {}
    numbers, counts, offsets = [], [], []
    for record in records:
        remap = np.array([names.setdefault(e, len(names)) for e in record.exporters], dtype=np.int64)
        numbers.append(remap[record.index["exporter"]])
        counts.append(len(record.index))
        offsets.append(record.offset)
    lengths = np.concatenate([record.index["length"] for record in records]).astype(np.int64)
    count = np.array(counts, dtype=np.int64)
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    # from joined-payload coordinates to the scanned buffer's: shift each record's packets
    first = np.r_[0, np.cumsum(count)[:-1]]
    shift = np.array([r.payload_at for r in records], dtype=np.int64) - starts[first]
    starts += np.repeat(shift, count)
    return Packets(
        data=scanned,
        starts=starts,
        lengths=lengths,
        exporter_no=np.concatenate(numbers),
        exporters=tuple(names),
        ports=np.concatenate([r.index["port"] for r in records]).astype(np.int64),
        received_ns=np.repeat(np.array([r.received_ns for r in records], dtype=np.int64), count),
        offsets=np.repeat(np.array(offsets, dtype=np.int64), count),
    )


class Journal:
    """Writer side. One process owns a journal directory."""

    def __init__(self, directory: str | Path, segment_bytes: int = 64 << 20, max_bytes: int = 16 << 30) -> None:
        if segment_bytes < 1 << 16:
            raise JournalError("segments must hold at least one maximum datagram")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = segment_bytes
        self.max_bytes = max_bytes
        segments = list_segments(self.directory)
        self._closed_bytes = sum(p.stat().st_size for _, p in segments[:-1])
        if segments:
            base, path = segments[-1]
            self.torn_bytes = self._recover(base, path)
            self.identity = read_identity(self.directory)  # None: a journal from before identities
            self.created = False
        else:
            # a new journal (or every segment gone): a new identity, so that it is never taken
            # for the journal a committed watermark counts
            base = 0
            self.torn_bytes = 0
            self._create(base)
            self.identity = JournalIdentity.mint()
            write_identity(self.directory, self.identity)
            self.created = True
        self._base = base
        self._file = open(self.directory / segment_name(base), "ab", buffering=0)
        self._position = self._file.tell()
        self._dirty = False
        self.run_base = base  # first offset of what `start_run` began (see `lift_run`)

    @staticmethod
    def _recover(base: int, path: Path) -> int:
        """Cut a torn tail off the last segment; return how many bytes went."""
        data = path.read_bytes()
        good = 0
        for record in scan_records(data, base):
            good = record.end - base
        if good < len(data):
            with open(path, "r+b") as f:
                f.truncate(good)
                f.flush()
                os.fsync(f.fileno())
        return len(data) - good

    def _create(self, base: int) -> None:
        path = self.directory / segment_name(base)
        with open(path, "xb") as f:
            os.fsync(f.fileno())
        fsync_path(self.directory)

    def start_run(self) -> int:
        """Begin this process's appends in a fresh segment; returns its base (`run_base`)."""
        if self._position:
            self._rotate()
        self.run_base = self._base
        return self.run_base

    def lift_run(self, base: int) -> int:
        """Move what this run appended (every segment from `run_base`) up to start at ``base``.

        Renames segment files, highest first, so that the journal's offsets
        continue above ``base`` (a committed watermark this journal does not
        reach). Returns how far the offsets moved.
        """
        delta = base - self.run_base
        if delta <= 0:
            return 0
        self.flush()
        self._file.close()
        mine = [(b, p) for b, p in list_segments(self.directory) if b >= self.run_base]
        for b, path in reversed(mine):
            os.replace(path, self.directory / segment_name(b + delta))
        fsync_path(self.directory)
        self._base += delta
        self.run_base = base
        self._file = open(self.directory / segment_name(self._base), "ab", buffering=0)
        return delta

    def set_identity(self, identity: JournalIdentity) -> None:
        write_identity(self.directory, identity)
        self.identity = identity

    def free_bytes(self) -> int:
        """Bytes an unprivileged writer may still use on the journal's volume."""
        st = os.statvfs(self.directory)
        return st.f_bavail * st.f_frsize

    @property
    def offset(self) -> int:
        """The watermark just past the last appended record."""
        return self._base + self._position

    @property
    def size(self) -> int:
        return self._closed_bytes + self._position

    @property
    def over_limit(self) -> bool:
        return self.size > self.max_bytes

    def append(self, received_ns: int, exporter: str, port: int, payload: bytes) -> int:
        """Append one datagram; returns its watermark. Not durable until `flush`."""
        record = encode_record(received_ns, exporter, port, payload)
        return self._put((record,), len(record))

    def append_block(self, received_ns: int, exporters: list[bytes], index: bytes, count: int,
                     payload: bytes | bytearray | memoryview) -> int:
        """Append a block of ``count`` datagrams, written through to the kernel.

        ``exporters`` are packed addresses (`packed_address`), ``index`` is
        ``count`` rows of `INDEX_DTYPE` whose lengths add up to ``len(payload)``.
        Raises `JournalFull` (nothing of the block written) when the volume is full.
        """
        if len(payload) > MAX_BLOCK_PAYLOAD:
            raise JournalError(f"block payload of {len(payload)} bytes exceeds {MAX_BLOCK_PAYLOAD}")
        head = block_head(received_ns, exporters, index, count)
        frame = FRAME.pack(len(head) + len(payload), zlib.crc32(payload, zlib.crc32(head)))
        return self._put((frame, head, payload), FRAME.size + len(head) + len(payload))

    def _put(self, parts: tuple[bytes | bytearray | memoryview, ...], size: int) -> int:
        """Write one record (its parts) whole, or not at all."""
        try:
            if self._position and self._position + size > self.segment_bytes:
                self._rotate()
            fd = self._file.fileno()
            done = os.writev(fd, parts)
            while done < size:  # a short write: the volume filled up in the middle of the record
                done += os.write(fd, b"".join(bytes(p) for p in parts)[done:])
        except OSError as exc:
            os.ftruncate(self._file.fileno(), self._position)  # cut the partial record off again (frees its blocks)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise JournalFull(f"journal volume full: {exc}") from exc
            raise
        self._position += size
        self._dirty = True
        return self._base + self._position

    def append_datagram(self, datagram: Datagram) -> int:
        return self.append(datagram.received_ns, datagram.exporter, datagram.port, datagram.payload)

    def flush_buffer(self) -> None:
        """Appends are written through at once (a ``kill -9`` loses nothing appended;
        only a power loss can, until `flush`): nothing to do. Kept for callers."""

    def flush(self) -> None:
        """Fsync everything appended so far."""
        if self._dirty:
            os.fsync(self._file.fileno())
            self._dirty = False

    def _rotate(self) -> None:
        base = self._base + self._position
        self._create(base)  # first: if the volume refuses, the current segment stays open
        self.flush()
        self._file.close()
        self._closed_bytes += self._position
        self._base = base
        self._position = 0
        self._file = open(self.directory / segment_name(base), "ab", buffering=0)

    def segments_below(self, watermark: int) -> list[Path]:
        """Closed segments whose every record ends at or below `watermark`."""
        segments = list_segments(self.directory)
        out = []
        for (base, path), (next_base, _) in zip(segments, segments[1:]):
            if next_base <= watermark and base != self._base:
                out.append(path)
        return out

    def drop_below(self, watermark: int) -> list[Path]:
        """Delete the segments `segments_below` names; returns their paths."""
        if watermark > self.offset:
            raise JournalError(f"watermark {watermark} is beyond the journal end {self.offset}")
        dropped = self.segments_below(watermark)
        for path in dropped:
            self._closed_bytes -= path.stat().st_size
            path.unlink()
        return dropped

    def close(self) -> None:
        self.flush()
        self._file.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class JournalReader:
    """Replays records from a watermark to the end of what is on disk.

    Reads one segment into memory at a time, so memory is bounded by the
    writer's `segment_bytes`.
    """

    def __init__(self, directory: str | Path, start: int = 0) -> None:
        self.directory = Path(directory)
        self.start = start
        self.torn_bytes = 0

    def __iter__(self) -> Iterator[JournalRecord]:
        segments = list_segments(self.directory)
        if not segments:
            if self.start:
                raise JournalError(f"journal is empty but replay starts at {self.start}")
            return
        if self.start < segments[0][0]:
            raise JournalError(f"watermark {self.start} is below the oldest segment {segments[0][0]}")
        for n, (base, path) in enumerate(segments):
            next_base = segments[n + 1][0] if n + 1 < len(segments) else None
            if next_base is not None and next_base <= self.start:
                continue
            data = path.read_bytes()
            skip = max(0, self.start - base)
            if skip > len(data):
                raise JournalError(f"watermark {self.start} is past the end of {path.name}")
            end = base + skip
            for record in scan_segment(data[skip:], base + skip):
                end = record.end
                yield record
            if end < base + len(data):
                if next_base is not None:
                    raise JournalCorrupt(f"bad record at offset {end} in {path.name}")
                self.torn_bytes = base + len(data) - end
