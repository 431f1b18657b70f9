"""The packet journal in a real directory: replay, torn writes, rotation, dropping."""

from __future__ import annotations

import socket
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from netflow.batches import JournalTail
from netflow.errors import JournalCorrupt, JournalError
from netflow.flows import Datagram
from netflow.journal import Journal, JournalReader, list_segments


def datagram(i: int) -> Datagram:
    exporter = "192.0.2.1" if i % 2 else "2001:db8::9"
    return Datagram(exporter, bytes([i % 256]) * (100 + i % 700), 2055, 1_700_000_000_000_000_000 + i)


def test_replay_returns_every_record_after_the_watermark(tmp_path: Path) -> None:
    with Journal(tmp_path) as journal:
        marks = [journal.append_datagram(datagram(i)) for i in range(50)]
        journal.flush()
    assert marks == sorted(marks) and len(set(marks)) == 50
    replay = list(JournalReader(tmp_path, 0))
    assert [r.datagram for r in replay] == [datagram(i) for i in range(50)]
    assert [r.end for r in replay] == marks
    tail = list(JournalReader(tmp_path, marks[29]))
    assert [r.datagram for r in tail] == [datagram(i) for i in range(30, 50)]
    assert list(JournalReader(tmp_path, marks[-1])) == []


def test_rotation_keeps_offsets_global_and_replay_crosses_segments(tmp_path: Path) -> None:
    journal = Journal(tmp_path, segment_bytes=1 << 16)
    marks = [journal.append_datagram(datagram(i)) for i in range(1000)]
    journal.close()
    segments = list_segments(tmp_path)
    assert len(segments) > 3
    # segment names are the global offset of their first byte
    for (base, path), (next_base, _) in zip(segments, segments[1:]):
        assert base + path.stat().st_size == next_base
    start = marks[123]
    assert [r.datagram for r in JournalReader(tmp_path, start)] == [datagram(i) for i in range(124, 1000)]


def test_torn_last_record_is_ignored_by_reader_and_cut_by_writer(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    for i in range(10):
        journal.append_datagram(datagram(i))
    journal.flush()
    good_end = journal.offset
    # simulate a crash mid-write: half a record reaches the disk
    journal._file.write(b"\x00\x00\x01\x00\xde\xad\xbe\xef" + b"\x01" * 40)  # noqa: SLF001
    journal._file.flush()  # noqa: SLF001
    reader = JournalReader(tmp_path, 0)
    assert len(list(reader)) == 10 and reader.torn_bytes == 48
    reopened = Journal(tmp_path)  # the restarted worker
    assert reopened.torn_bytes == 48 and reopened.offset == good_end
    mark = reopened.append_datagram(datagram(99))
    reopened.close()
    assert [r.datagram for r in JournalReader(tmp_path, good_end)] == [datagram(99)]
    assert mark == reopened.offset


def test_bit_rot_in_a_closed_segment_is_corruption(tmp_path: Path) -> None:
    journal = Journal(tmp_path, segment_bytes=1 << 16)
    for i in range(1000):
        journal.append_datagram(datagram(i))
    journal.close()
    first = list_segments(tmp_path)[0][1]
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF
    first.write_bytes(bytes(data))
    with pytest.raises(JournalCorrupt):
        list(JournalReader(tmp_path, 0))


def test_drop_below_removes_only_wholly_committed_segments(tmp_path: Path) -> None:
    journal = Journal(tmp_path, segment_bytes=1 << 16, max_bytes=300_000)
    marks = [journal.append_datagram(datagram(i)) for i in range(1000)]
    assert journal.over_limit
    journal.flush()
    assert journal.size == sum(p.stat().st_size for _, p in list_segments(tmp_path))
    committed = marks[750]
    listed = journal.segments_below(committed)
    dropped = journal.drop_below(committed)
    assert dropped == listed and dropped and not any(p.exists() for p in dropped)
    assert journal.size == sum(p.stat().st_size for _, p in list_segments(tmp_path))
    assert not journal.over_limit
    # everything after the committed watermark is still replayable
    assert [r.datagram for r in JournalReader(tmp_path, committed)] == [datagram(i) for i in range(751, 1000)]
    with pytest.raises(JournalError):
        list(JournalReader(tmp_path, 0))  # that history was dropped
    with pytest.raises(JournalError):
        journal.drop_below(journal.offset + 1)
    journal.close()


def test_oversized_payload_is_refused(tmp_path: Path) -> None:
    with Journal(tmp_path) as journal, pytest.raises(JournalError):
        journal.append(0, "192.0.2.1", 2055, b"x" * 70_000)


def test_appends_are_visible_to_a_reader_without_flush_or_close(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    marks = [journal.append_datagram(datagram(i)) for i in range(20)]
    # written through (no user-space buffer, so a failed write can be cut off whole):
    # what a kill -9 right now would leave on disk is every record, no fsync needed
    assert [r.end for r in JournalReader(tmp_path, 0)] == marks
    journal.close()


# -- block records: what the worker's receiver writes ---------------------------------------


def append_as_blocks(journal: Journal, grams: list[Datagram], per_block: int) -> list[int]:
    from netflow.journal import INDEX_DTYPE, packed_address

    marks = []
    for k in range(0, len(grams), per_block):
        chunk = grams[k:k + per_block]
        names = list(dict.fromkeys(d.exporter for d in chunk))
        index = np.empty(len(chunk), INDEX_DTYPE)
        index["length"] = [len(d.payload) for d in chunk]
        index["port"] = [d.port for d in chunk]
        index["exporter"] = [names.index(d.exporter) for d in chunk]
        marks.append(journal.append_block(chunk[0].received_ns, [packed_address(n) for n in names],
                                          index.tobytes(), len(chunk), b"".join(d.payload for d in chunk)))
    return marks


def test_blocks_replay_every_datagram_with_block_watermarks(tmp_path: Path) -> None:
    grams = [datagram(i) for i in range(300)]
    journal = Journal(tmp_path, segment_bytes=1 << 16)
    marks = append_as_blocks(journal, grams, 7)
    journal.append_datagram(datagram(300))  # the two kinds mix in one journal
    journal.close()
    replay = list(JournalReader(tmp_path, 0))
    # a block's datagrams share its receive time (the first one's) and its watermark
    want = [Datagram(d.exporter, d.payload, d.port, grams[k // 7 * 7].received_ns) for k, d in enumerate(grams)]
    assert [r.datagram for r in replay[:300]] == want and replay[300].datagram == datagram(300)
    assert sorted(set(r.end for r in replay[:300])) == marks
    assert [r.datagram for r in JournalReader(tmp_path, marks[10])] == want[77:] + [datagram(300)]
    tail = JournalTail(tmp_path, marks[2])
    batch = tail.read(journal.offset, 50)  # whole records: 8 blocks of 7 datagrams
    assert len(batch) == 56 and tail.position == marks[10]
    assert [batch.datagram(k) for k in range(len(batch))] == want[21:77]
    assert set(batch.offsets.tolist()) == {marks[n] - (marks[n] - marks[n - 1]) for n in range(3, 11)}


def test_torn_block_is_cut_and_a_bad_block_index_is_corruption(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    append_as_blocks(journal, [datagram(i) for i in range(20)], 5)
    good = journal.offset
    journal._file.write(b"\x00\x01\x00\x00\x00\x00\x00\x00" + b"\x02" * 30)  # noqa: SLF001
    journal._file.flush()  # noqa: SLF001
    reopened = Journal(tmp_path)
    assert reopened.offset == good and reopened.torn_bytes == 38
    reopened.close()
    # a block whose index lengths do not add up to its payloads (CRC valid) is refused loudly
    from netflow.journal import FRAME, block_head

    bad_head = block_head(1, [bytes(4)], np.array([(10, 1, 0)], dtype=[("l", ">u2"), ("p", ">u2"), ("e", "u1")])
                          .tobytes(), 1)
    body = bad_head + b"x" * 9
    with open(list_segments(tmp_path)[-1][1], "ab") as f:
        f.write(FRAME.pack(len(body), zlib.crc32(body)) + body)
    with pytest.raises(JournalCorrupt):
        list(JournalReader(tmp_path, 0))


def test_receiver_journals_udp_datagrams_in_blocks(tmp_path: Path) -> None:
    """A real socket: every datagram of a configured exporter lands in the journal, in order."""
    from netflow.receiver import ExporterFilter, Receiver, open_socket

    sock, _ = open_socket("127.0.0.1", 0, 1 << 20)
    port = sock.getsockname()[1]
    journal = Journal(tmp_path)
    receiver = Receiver(sock, journal, ExporterFilter(("127.0.0.1/32",)), 0.05, "t")
    receiver.start()
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger.bind(("127.0.0.2", 0))  # not a configured exporter
    sent = [bytes([k % 251]) * (50 + k % 1400) for k in range(2000)]
    for k, payload in enumerate(sent):
        if k % 100 == 0:
            stranger.sendto(b"refused", ("127.0.0.1", port))
        sender.sendto(payload, ("127.0.0.1", port))
        if k % 200 == 0:
            time.sleep(0.01)  # quiet moments: blocks are cut by their linger too
    deadline = time.monotonic() + 10
    while receiver.packets < len(sent) and time.monotonic() < deadline:
        time.sleep(0.02)
    receiver.stop()
    receiver.join(5)
    journal.close()
    sender.close()
    stranger.close()
    sock.close()
    records = list(JournalReader(tmp_path, 0))
    assert [r.datagram.payload for r in records] == sent
    assert len({r.end for r in records}) < len(sent) // 4  # datagrams were grouped into blocks
    assert receiver.unknown == 20 and receiver.packets == len(sent)
