"""The packet journal in a real directory: replay, torn writes, rotation, dropping."""

from __future__ import annotations

from pathlib import Path

import pytest

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


def test_flush_buffer_makes_appends_visible_to_a_reader_without_close(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    marks = [journal.append_datagram(datagram(i)) for i in range(20)]
    assert list(JournalReader(tmp_path, 0)) == []  # still in the writer's buffer
    journal.flush_buffer()
    # what a kill -9 right now would leave on disk: every record, no fsync needed
    assert [r.end for r in JournalReader(tmp_path, 0)] == marks
    journal.close()
