"""Flows decoded per core-second: billcore's vectorized decoders vs a naive loop.

Both sides decode the same in-memory batch of datagrams built by
`netflow.exporter`, in one process on one core (no sockets); billcore gets
them as the worker's journal reader does (`Packets`: one buffer and
per-packet arrays, built outside the timing), the baseline as a list of
payloads. The baseline is
what a straightforward collector does: `struct.unpack_from` per record, a
Python object per flow. For v9/IPFIX the baseline is given the template
layout up front (no template parsing at all), which flatters it.

    python benchmarks/netflow_decode.py            # full run, writes results/
    python benchmarks/netflow_decode.py --tiny     # seconds, for CI
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _machine import cpu_model  # noqa: E402

from netflow.decode import decode_batch, decode_packets  # noqa: E402
from netflow.exporter import ExportClock, FlowSpec, build_ipfix, build_v5, build_v9  # noqa: E402
from netflow.flows import Datagram, Packets  # noqa: E402
from netflow.templates import SequenceTracker, TemplateCache  # noqa: E402

CLOCK = ExportClock(boot_ms=1_700_000_000_000, export_ms=1_700_000_600_000)
RESULTS = Path(__file__).resolve().parent / "results"


def specs(n: int) -> list[FlowSpec]:
    return [
        FlowSpec(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", "198.51.100.1", 1024 + i % 60000, 443, 6,
                 1500 * (1 + i % 40), 1 + i % 40, CLOCK.export_ms - 30_000, CLOCK.export_ms - 1_000, 1, 2)
        for i in range(n)
    ]


def naive_v5(payloads: list[bytes]) -> int:
    header, record = struct.Struct(">HHIIIIBBH"), struct.Struct(">IIIHHIIIIHHBBBBHHBBH")
    flows = []
    for p in payloads:
        _v, count, uptime, secs, nsecs, _seq, _et, _ei, _s = header.unpack_from(p)
        export_ms = secs * 1000 + nsecs // 1_000_000
        for k in range(count):
            r = record.unpack_from(p, 24 + 48 * k)
            flows.append((r[0], r[1], r[9], r[10], r[13], r[6], r[5],
                          export_ms - ((uptime - r[7]) & 0xFFFFFFFF), export_ms - ((uptime - r[8]) & 0xFFFFFFFF),
                          r[3], r[4], r[12]))
    return len(flows)


def naive_v9(payloads: list[bytes]) -> int:
    # layout of the builder's v4 template, known in advance
    record = struct.Struct(">IIHHBBBIIQQII")
    flows = []
    for p in payloads:
        _v, _c, uptime, secs, _seq, _sid = struct.unpack_from(">HHIIII", p)
        pos = 20
        while pos + 4 <= len(p):
            set_id, length = struct.unpack_from(">HH", p, pos)
            if set_id == 256:
                for off in range(pos + 4, pos + length - record.size + 1, record.size):
                    r = record.unpack_from(p, off)
                    flows.append((r[0], r[1], r[2], r[3], r[4], r[9], r[10],
                                  secs * 1000 - ((uptime - r[11]) & 0xFFFFFFFF),
                                  secs * 1000 - ((uptime - r[12]) & 0xFFFFFFFF), r[7], r[8], r[5]))
            pos += max(length, 4)
    return len(flows)


def naive_ipfix(payloads: list[bytes]) -> int:
    record = struct.Struct(">IIHHBBBIIQQQQ")
    flows = []
    for p in payloads:
        _v, end, _t, _seq, _dom = struct.unpack_from(">HHIII", p)
        pos = 16
        while pos + 4 <= end:
            set_id, length = struct.unpack_from(">HH", p, pos)
            if set_id == 300:
                for off in range(pos + 4, pos + length - record.size + 1, record.size):
                    r = record.unpack_from(p, off)
                    flows.append((r[0], r[1], r[2], r[3], r[4], r[9], r[10], r[11], r[12], r[7], r[8], r[5]))
            pos += max(length, 4)
    return len(flows)


def best_rate(fn, flows: int, seconds: float) -> tuple[float, int]:
    """Best flows per CPU-second of this process over repeated runs.

    CPU time (not wall time) so that other load on a shared machine does not
    count against either side; the garbage collector is frozen around the run
    so the benchmark's own heap of FlowSpecs does not tax whichever side runs.
    """
    best, runs, spent = 0.0, 0, 0.0
    while spent < seconds or runs < 3:
        t0 = time.process_time()
        got = fn()
        elapsed = max(time.process_time() - t0, 1e-9)
        assert got == flows, (got, flows)
        best = max(best, flows / elapsed)
        runs += 1
        spent += elapsed
    return best, runs




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small batch, short runs (CI)")
    parser.add_argument("--flows", type=int, default=None)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    n = args.flows or (3_000 if args.tiny else 300_000)
    seconds = 0.2 if args.tiny else 3.0
    flows = specs(n)
    exporter = "192.0.2.1"
    batches = {
        "v5": build_v5(flows, CLOCK),
        "v9": build_v9(flows, CLOCK, per_packet=24),
        "ipfix": build_ipfix(flows, CLOCK.export_ms // 1000, per_packet=25),
    }
    naive = {"v5": naive_v5, "v9": naive_v9, "ipfix": naive_ipfix}
    del flows
    gc.collect()
    gc.freeze()
    rows = []
    for name, payloads in batches.items():
        grams = [Datagram(exporter, p) for p in payloads]
        cache = TemplateCache()
        decode_batch(grams[:1], cache, None, now=0)  # templates learned, as in steady state
        # the worker's input: one buffer and per-packet arrays, as its journal reader gives them
        packets = Packets.from_datagrams(grams)

        def ours(packets: Packets = packets, cache: TemplateCache = cache) -> int:
            return len(decode_packets(packets, cache, SequenceTracker(), now=0).flows)

        vec, vec_runs = best_rate(ours, n, seconds)
        base, base_runs = best_rate(lambda p=payloads, f=naive[name]: f(p), n, seconds)
        rows.append({
            "format": name, "flows": n, "packets": len(payloads),
            "billcore_flows_per_s": round(vec), "naive_struct_flows_per_s": round(base),
            "speedup": round(vec / base, 1), "runs": [vec_runs, base_runs],
        })
    machine = {
        "platform": platform.platform(), "python": platform.python_version(), "cpu": cpu_model(),
        "nproc": os.cpu_count(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "numpy": __import__("numpy").__version__,
    }
    header = "| format | flows/batch | billcore flows/s | naive struct flows/s | speedup |\n|---|---:|---:|---:|---:|"
    lines = [header] + [
        f"| {r['format']} | {r['flows']:,} | {r['billcore_flows_per_s']:,} | {r['naive_struct_flows_per_s']:,} "
        f"| {r['speedup']}x |" for r in rows
    ]
    table = "\n".join(lines)
    print(table)
    print(f"\n{machine['cpu']}, {machine['nproc']} cpus, {machine['platform']}, Python {machine['python']}, "
          f"{machine['date']}")
    if args.no_write or args.tiny:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "netflow_decode.json").write_text(json.dumps({"machine": machine, "results": rows}, indent=2) + "\n")
    (RESULTS / "netflow_decode.md").write_text(
        "# NetFlow decoding, flows per core-second\n\n"
        "One process, one core, in-memory datagrams from `netflow.exporter` (billcore: as `Packets`, the "
        "worker's journal batch); best of repeated runs, "
        "measured in process CPU time (the machine is shared). "
        "Baseline: `struct.unpack_from` per record with the template layout hard-coded.\n\n"
        f"{table}\n\nMachine: {machine['cpu']}, {machine['nproc']} cpus, {machine['platform']}, "
        f"Python {machine['python']}, numpy {machine['numpy']}. Date: {machine['date']}.\n"
    )


if __name__ == "__main__":
    main()
