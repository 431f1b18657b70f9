"""The raw store's writer: part files kept open per hour and renamed at flush, columns gathered at once, per-column
encodings. What is read back (pyarrow, `read_account`, DuckDB if installed) is exactly what was added, one file per
hour per flush window, and a crash anywhere leaves every leg in exactly one file after the replay."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import netflow.rawstore as rawstore
from billcore.billing.rawflows import read_account
from billcore.common.rawflows import HOUR_MS, hour_dir, pair_to_addr
from netflow.classifier import Legs
from netflow.flows import FLOW_DTYPE, V4_MAPPED
from netflow.rawstore import MAX_OPEN_HOURS, RAW_DTYPE, RawStoreError, RawWriter, legs_table

HOUR0 = 1_790_000_000_000 // HOUR_MS * HOUR_MS
U64_MAX = (1 << 64) - 1
NAMES: tuple[str, ...] = RAW_DTYPE.names or ()


def make_flows(n: int, seed: int, hours: tuple[int, ...] = (0,), v6_share: float = 0.3) -> np.ndarray:
    """Flows with every field used, extremes included: random 64-bit IPv6 halves, counters near 2**64."""
    rng = np.random.default_rng(seed)
    f = np.zeros(n, dtype=FLOW_DTYPE)
    hour = np.asarray(hours, dtype=np.int64)[rng.integers(0, len(hours), n)]
    f["first_ms"] = HOUR0 + hour * HOUR_MS + rng.integers(0, HOUR_MS, n)
    f["last_ms"] = f["first_ms"] + rng.integers(0, 600_000, n)
    v6 = rng.random(n) < v6_share
    for side in ("src", "dst"):
        f[f"{side}_lo"] = np.where(v6, rng.integers(0, U64_MAX, n, dtype=np.uint64, endpoint=True),
                                   V4_MAPPED | rng.integers(0, 1 << 32, n).astype(np.uint64))
        f[f"{side}_hi"] = np.where(v6, np.uint64(0x2001_0DB8 << 32) | rng.integers(0, 1 << 20, n).astype(np.uint64), 0)
    f["exporter_lo"] = V4_MAPPED | np.uint64(0xC000_0201)
    f["bytes"] = np.where(rng.random(n) < 0.01, np.uint64(U64_MAX), rng.integers(40, 10**9, n).astype(np.uint64))
    f["packets"] = rng.integers(1, 10**6, n)
    f["src_port"], f["dst_port"] = rng.integers(0, 65536, n), rng.choice([53, 80, 443], n)
    f["proto"] = rng.choice([1, 6, 17], n)
    f["tcp_flags"], f["tos"] = rng.integers(0, 256, n), rng.integers(0, 4, n) * 8
    f["ip_version"] = np.where(v6, 6, 4)
    f["sampling"], f["domain"] = rng.choice([1, 1000], n), rng.integers(0, 3, n)
    f["input_if"], f["output_if"] = rng.integers(0, 1 << 32, n), rng.integers(1, 40, n)
    return f


def make_legs(flows: np.ndarray, seed: int) -> Legs:
    """As the classifier makes them: outbound legs, inbound legs (some flows have both), legs of no account."""
    rng = np.random.default_rng(seed)
    n = len(flows)
    out = np.flatnonzero(rng.random(n) < 0.6)
    inb = np.flatnonzero(rng.random(n) < 0.5)
    none = np.setdiff1d(np.arange(n), np.union1d(out, inb))
    flow = np.concatenate([out, inb, none]).astype(np.int64)
    account = np.concatenate([rng.integers(1, 1 << 32, len(out) + len(inb)), np.zeros(len(none), np.int64)])
    klass = rng.integers(0, 5, len(flow)).astype(np.int32)
    direction = np.concatenate([np.ones(len(out), np.uint8), np.zeros(len(inb) + len(none), np.uint8)])
    return Legs(flow, account.astype(np.int64), klass, direction, flows["first_ms"].take(flow))


def read_hours(root: Path) -> dict[str, list[pa.Table]]:
    out: dict[str, list[pa.Table]] = {}
    for path in sorted(root.glob("hour=*/*.parquet")):
        out.setdefault(path.parent.name, []).append(pq.read_table(path))
    return out


def as_rows(table: pa.Table) -> np.ndarray:
    rows = np.empty(table.num_rows, dtype=RAW_DTYPE)
    for name in NAMES:
        rows[name] = table[name].to_numpy()
    return rows


def expected_by_hour(batches: list[tuple[np.ndarray, Legs]]) -> dict[str, np.ndarray]:
    """Each hour's legs in the order they were added (batch by batch, leg order within a batch)."""
    rows = np.concatenate([legs_table(f, legs) for f, legs in batches])
    hours = rows["first_ms"] // HOUR_MS
    return {hour_dir(Path(), int(h) * HOUR_MS).name: rows[hours == h] for h in np.unique(hours)}


def test_batches_over_hours_read_back_exactly_one_file_per_hour(tmp_path: Path) -> None:
    batches = []
    w = RawWriter(tmp_path, "3", row_group_rows=1000)
    for k in range(5):
        flows = make_flows(1500 + 300 * k, seed=k, hours=(0, 1, 2) if k % 2 else (1,))
        legs = make_legs(flows, seed=100 + k)
        batches.append((flows, legs))
        w.add_legs(flows, legs, 1000 * k, 1000 * (k + 1))
    w.flush()
    got = read_hours(tmp_path)
    want = expected_by_hour(batches)
    assert sorted(got) == sorted(want)
    for hour, tables in got.items():
        assert len(tables) == 1, "one part file per hour per flush window"
        table = tables[0]
        assert [(f.name, f.type) for f in table.schema] == \
            [(n, pa.from_numpy_dtype(RAW_DTYPE[n])) for n in NAMES]
        np.testing.assert_array_equal(as_rows(table), want[hour])
    files = sorted(tmp_path.glob("hour=*/*.parquet"))
    assert {p.name for p in files} == {f"w3-{0:020d}-{5000:020d}.parquet"}
    # legs of several batches make several row groups in one file
    assert max(pq.ParquetFile(p).metadata.num_row_groups for p in files) > 1
    assert w.watermark() == 5000 and not list(tmp_path.glob("hour=*/*.tmp"))


def test_columns_are_encoded_as_chosen_and_keep_the_readers_types(tmp_path: Path) -> None:
    flows = make_flows(5000, seed=7)
    w = RawWriter(tmp_path, "1")
    w.add_legs(flows, make_legs(flows, 8), 0, 10)
    w.flush()
    (path,) = tmp_path.glob("hour=*/*.parquet")
    meta = pq.ParquetFile(path).metadata
    columns = {meta.row_group(0).column(i).path_in_schema: meta.row_group(0).column(i)
               for i in range(meta.num_columns)}
    assert "DELTA_BINARY_PACKED" in columns["first_ms"].encodings
    assert "RLE_DICTIONARY" in columns["proto"].encodings
    assert columns["src_lo"].compression == "ZSTD" and columns["bytes"].compression == "UNCOMPRESSED"
    assert columns["account"].statistics is not None and columns["src_lo"].statistics is None
    assert pq.read_schema(path).field("account").type == pa.int64()


def test_read_account_answers_from_the_new_files_as_before(tmp_path: Path) -> None:
    flows = make_flows(3000, seed=11, hours=(0, 1))
    legs = make_legs(flows, 12)
    w = RawWriter(tmp_path, "1")
    w.add_legs(flows[:1000], Legs(*(a[legs.flow < 1000] for a in (legs.flow, legs.account, legs.klass,
                                                                     legs.direction, legs.at_ms))), 0, 5)
    rest = legs.flow >= 1000
    w.add_legs(flows[1000:], Legs(legs.flow[rest] - 1000, legs.account[rest], legs.klass[rest],
                                   legs.direction[rest], legs.at_ms[rest]), 5, 9)
    w.flush()
    account = int(legs.account[0])
    got = [row for chunk in read_account(tmp_path, account, HOUR0, HOUR0 + 2 * HOUR_MS, chunk_rows=7)
           for row in chunk]
    mine = np.flatnonzero(legs.account == account)
    want = []
    for k in sorted(mine, key=lambda k: (flows["first_ms"][legs.flow[k]] // HOUR_MS)):
        f = flows[legs.flow[k]]
        want.append([int(f["first_ms"]), int(f["last_ms"]), int(legs.direction[k]), int(legs.klass[k]),
                     pair_to_addr(f["src_hi"], f["src_lo"]), pair_to_addr(f["dst_hi"], f["dst_lo"]),
                     int(f["src_port"]), int(f["dst_port"]), int(f["proto"]), int(f["bytes"]), int(f["packets"]),
                     int(f["sampling"]), pair_to_addr(f["exporter_hi"], f["exporter_lo"])])
    assert got == want and len(got) >= 1


def test_old_files_and_new_files_are_read_together(tmp_path: Path) -> None:
    flows = make_flows(800, seed=21)
    legs = make_legs(flows, 22)
    old = legs_table(flows, legs)
    folder = hour_dir(tmp_path, HOUR0)
    folder.mkdir(parents=True)
    # as the previous writer wrote them: nullable columns, dictionary + zstd everywhere
    pq.write_table(pa.table({n: old[n] for n in NAMES}), folder / f"w9-{0:020d}-{7:020d}.parquet",
                   compression="zstd")
    w = RawWriter(tmp_path, "8")
    w.add_legs(flows, legs, 0, 7)
    w.flush()
    import pyarrow.dataset as ds
    table = ds.dataset(tmp_path, format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 2 * len(old)
    account = int(legs.account[0])
    rows = [r for chunk in read_account(tmp_path, account, HOUR0, HOUR0 + HOUR_MS) for r in chunk]
    assert len(rows) == 2 * int((legs.account == account).sum())


def test_duckdb_reads_the_store_as_one_table(tmp_path: Path) -> None:
    import duckdb  # a test dependency (pyproject [test]): a real reader of the files
    flows = make_flows(4000, seed=31, hours=(0, 1))
    legs = make_legs(flows, 32)
    w = RawWriter(tmp_path, "1", row_group_rows=1000)
    w.add_legs(flows, legs, 0, 1)
    w.flush()
    got = duckdb.sql(f"SELECT first_ms, src_lo, bytes, account, proto FROM read_parquet('{tmp_path}/*/*.parquet', "
                     "hive_partitioning=true) ORDER BY first_ms, src_lo, account").fetchall()
    rows = np.sort(legs_table(flows, legs), order=["first_ms", "src_lo", "account"])
    assert got == [(int(r["first_ms"]), int(r["src_lo"]), int(r["bytes"]), int(r["account"]), int(r["proto"]))
                   for r in rows]


def test_a_crash_between_the_part_files_and_the_mark_is_replayed_into_one_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flows = make_flows(700, seed=41, hours=(0, 1))
    first = [(flows, make_legs(flows, 42))]
    w = RawWriter(tmp_path, "2")
    w.add_legs(*first[0], 0, 100)
    w.flush()
    assert w.watermark() == 100
    second = make_flows(900, seed=43, hours=(1, 2))
    second_legs = make_legs(second, 44)
    w.add_legs(second, second_legs, 100, 250)

    real_write = rawstore._fsync_write

    def crash_on_mark(path: Path, write: Any) -> None:
        if path.parent.name == "_marks":
            raise OSError("power cut")
        real_write(path, write)

    monkeypatch.setattr(rawstore, "_fsync_write", crash_on_mark)
    with pytest.raises(OSError, match="power cut"):
        w.flush()
    monkeypatch.undo()
    # the part files are in place, but the mark still says 100
    assert len(list(tmp_path.glob(f"hour=*/w2-{100:020d}-*.parquet"))) == 2
    with pytest.raises(RawStoreError):
        w.add_legs(second, second_legs, 100, 250)  # a failed writer takes nothing more
    # restart: the unmarked files go, the replay writes them again
    w = RawWriter(tmp_path, "2")
    assert w.watermark() == 100 and not list(tmp_path.glob(f"hour=*/w2-{100:020d}-*.parquet"))
    w.add_legs(second, second_legs, 100, 250)
    w.flush()
    got = read_hours(tmp_path)
    want = expected_by_hour(first + [(second, second_legs)])
    for hour in want:
        np.testing.assert_array_equal(np.concatenate([as_rows(t) for t in got[hour]]), want[hour])


def test_a_crash_while_part_files_are_open_leaves_nothing_behind(tmp_path: Path) -> None:
    flows = make_flows(3000, seed=51, hours=(0, 1))
    w = RawWriter(tmp_path, "5", row_group_rows=500)
    w.add_legs(flows, make_legs(flows, 52), 0, 10)
    assert list(tmp_path.glob("hour=*/w5-*.parquet.tmp")), "row groups went to open temporary files"
    other = RawWriter(tmp_path, "55", row_group_rows=500)  # another worker's files are not touched
    other.add_legs(flows, make_legs(flows, 53), 0, 10)
    del w  # the process dies here: no flush, no mark
    RawWriter(tmp_path, "5")
    assert not list(tmp_path.glob("hour=*/w5-*"))
    assert list(tmp_path.glob("hour=*/w55-*.tmp"))


def test_a_failed_row_group_write_stops_the_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flows = make_flows(2000, seed=61)
    legs = make_legs(flows, 62)
    w = RawWriter(tmp_path, "1", row_group_rows=100)

    def disk_full(self: Any) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(rawstore._HourPart, "write_waiting", disk_full)
    with pytest.raises(OSError):
        w.add_legs(flows, legs, 0, 1)
    monkeypatch.undo()
    with pytest.raises(RawStoreError):
        w.flush()
    assert w.watermark() is None and not list(tmp_path.glob("hour=*/*"))


def test_a_batch_over_too_many_hours_is_written_and_flushed_before_the_next(tmp_path: Path) -> None:
    hours = tuple(range(0, 3 * MAX_OPEN_HOURS, 2))
    flows = make_flows(4000, seed=71, hours=hours)
    legs = make_legs(flows, 72)
    w = RawWriter(tmp_path, "4")
    w.add_legs(flows, legs, 0, 10)
    assert w.due(0.0), "a closed hour could come again: flush first"
    later = make_flows(500, seed=73, hours=hours[-3:])
    later_legs = make_legs(later, 74)
    w.add_legs(later, later_legs, 10, 20)  # not flushed by the caller: the writer flushes first
    assert w.watermark() == 10
    w.flush()
    got = read_hours(tmp_path)
    want = expected_by_hour([(flows, legs), (later, later_legs)])
    assert sorted(got) == sorted(want)
    for hour, tables in got.items():
        np.testing.assert_array_equal(np.concatenate([as_rows(t) for t in tables]), want[hour])
    assert len(list(tmp_path.glob("hour=*/*.parquet"))) == len(hours) + 3


def test_an_empty_batch_moves_only_the_watermark(tmp_path: Path) -> None:
    flows = make_flows(0, seed=0)
    w = RawWriter(tmp_path, "1")
    w.add_legs(flows, make_legs(flows, 0), 0, 64)
    w.flush()
    assert w.watermark() == 64 and not list(tmp_path.glob("hour=*"))


def test_raw_rows_are_added_as_legs_are(tmp_path: Path) -> None:
    flows = make_flows(1200, seed=81, hours=(2, 0, 1))
    rows = legs_table(flows, make_legs(flows, 82))
    w = RawWriter(tmp_path, "1")
    w.add(rows, 0, 1)
    w.flush()
    got = read_hours(tmp_path)
    hours = rows["first_ms"] // HOUR_MS
    for h in np.unique(hours):
        (table,) = got[hour_dir(tmp_path, int(h) * HOUR_MS).name]
        np.testing.assert_array_equal(as_rows(table), rows[hours == h])


def test_the_writer_keeps_no_flow_array_and_a_bounded_number_of_legs(tmp_path: Path) -> None:
    w = RawWriter(tmp_path, "1", row_group_rows=2000)
    for k in range(12):
        flows = make_flows(1500, seed=90 + k, hours=(0, 1, 2))
        legs = make_legs(flows, 190 + k)
        gone = weakref.ref(flows)
        w.add_legs(flows, legs, k, k + 1)
        del flows, legs
        gc.collect()
        assert gone() is None, "the batch's flow array is released once its legs are gathered"
        waiting = sum(part.rows for part in w._hours.values())  # noqa: SLF001
        assert waiting < 2 * w.row_group_rows + 3000
    w.flush()



def test_a_few_late_legs_do_not_keep_their_batches_in_memory(tmp_path: Path) -> None:
    """Each batch has 1% legs of the previous hour: they wait for the flush, their batches must not."""
    import tracemalloc
    w = RawWriter(tmp_path, "1", row_group_rows=4000)
    tracemalloc.start()
    try:
        held = []
        for k in range(20):
            flows = make_flows(6000, seed=300 + k, hours=(1,))
            late = np.random.default_rng(k).random(len(flows)) < 0.01
            flows["first_ms"][late] -= HOUR_MS
            w.add_legs(flows, make_legs(flows, 400 + k), k, k + 1)
            del flows
            gc.collect()
            held.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    # a kept batch would be ~6000 legs x 117 bytes = 0.7 MB, twenty of them 14 MB
    assert held[-1] - held[1] < 2_000_000
    w.flush()


batch_sizes = st.lists(st.tuples(st.integers(0, 600), st.lists(st.integers(0, 4), min_size=1, max_size=3)),
                       min_size=1, max_size=6)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=batch_sizes, row_group_rows=st.sampled_from([1, 50, 333, 100_000]), flush_after=st.integers(1, 4))
def test_any_sequence_of_batches_and_flushes_keeps_every_leg_once(tmp_path_factory: pytest.TempPathFactory,
                                                                  plan: list[tuple[int, list[int]]],
                                                                  row_group_rows: int, flush_after: int) -> None:
    root = tmp_path_factory.mktemp("raw")
    w = RawWriter(root, "7", row_group_rows=row_group_rows)
    batches = []
    for k, (n, hours) in enumerate(plan):
        flows = make_flows(n, seed=k, hours=tuple(hours))
        legs = make_legs(flows, seed=1000 + k)
        batches.append((flows, legs))
        w.add_legs(flows, legs, 10 * k, 10 * k + 10)
        if (k + 1) % flush_after == 0:
            w.flush()
    w.flush()
    assert w.watermark() == 10 * len(plan)
    got = read_hours(root)
    want = expected_by_hour(batches)
    assert sorted(got) == sorted(want)
    for hour, tables in got.items():  # files sort by journal range, so by flush window
        np.testing.assert_array_equal(np.concatenate([as_rows(t) for t in tables]), want[hour])
