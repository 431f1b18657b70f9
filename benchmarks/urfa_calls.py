"""URFA call throughput and latency, side by side with a bare msgpack echo server.

Both servers run in their own process on uvloop and speak the same framing
(4-byte length + msgpack map).  The echo server answers every frame with a
result frame and does nothing else: it is the ceiling for this transport in
Python.  The URFA server is the real ``URFAService`` (sessions, call tables,
argument checks, a task per call) answering ``sys.ping``.

The load generator (this process, uvloop) opens 1, 16 or 128 connections;
URFA ones log in with SCRAM first.  Each connection keeps ``window`` calls in
flight (pipelining, as real clients such as the NetFlow workers do) and
records each call's round-trip latency.

    python benchmarks/urfa_calls.py           # full run, writes results/urfa_calls.{json,md}
    python benchmarks/urfa_calls.py --tiny    # a few hundred calls, for CI
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import secrets
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvloop  # noqa: E402

from urfa import scram  # noqa: E402
from urfa.framing import FrameDecoder, FrameEncoder  # noqa: E402

PASSWORD = "bench-pw"
ITER = 4096


# -- servers (child processes) -------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_urfa_server(port: int, ready: Any) -> None:
    from billcore.calls import CallRegistry
    from billcore.urfa_server import Principal, URFAConfig, URFAService

    class Auth:
        verifier = scram.make_verifier(PASSWORD, iterations=ITER)

        async def find_principal(self, kind: str, login: str) -> Principal | None:
            return Principal(kind, login, 1, frozenset(), self.verifier) if kind == "system" else None

    async def main() -> None:
        svc = URFAService(CallRegistry(), Auth(), URFAConfig(max_inflight=1024, mock_iterations=ITER))
        await svc.start(tcp=("127.0.0.1", port))
        ready.set()
        await asyncio.Event().wait()

    uvloop.run(main())


def run_echo_server(port: int, ready: Any) -> None:
    class Echo(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.t = transport
            self.dec = FrameDecoder()
            self.enc = FrameEncoder()

        def data_received(self, data: bytes) -> None:
            self.dec.feed(data)
            out = []
            while (m := self.dec.next_message()) is not None:
                out.append(self.enc.encode({"t": "result", "id": m.get("id"), "value": "pong"}))
            self.t.write(b"".join(out))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_server(Echo, "127.0.0.1", port)
        ready.set()
        await asyncio.Event().wait()

    uvloop.run(main())


# -- load generator ------------------------------------------------------
class Loader(asyncio.Protocol):
    def __init__(self) -> None:
        self.dec = FrameDecoder()
        self.enc = FrameEncoder()
        self.handshake: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.open = False
        self.sent: dict[int, float] = {}
        self.lat: list[float] = []
        self.next_id = 1
        self.remaining = 0
        self.done: asyncio.Future[None] | None = None
        self.call = {"t": "call", "id": 0, "fn": "sys.ping", "args": {}}

    def connection_made(self, transport: Any) -> None:
        self.t = transport

    def fire(self, n: int) -> None:
        out = []
        now = time.perf_counter()
        for _ in range(n):
            i = self.next_id
            self.next_id += 1
            self.call["id"] = i
            self.sent[i] = now
            out.append(self.enc.encode(self.call))
        self.t.write(b"".join(out))

    def data_received(self, data: bytes) -> None:
        self.dec.feed(data)
        now = time.perf_counter()
        replies = 0
        while (m := self.dec.next_message()) is not None:
            if not self.open:
                self.handshake.put_nowait(m)
                continue
            self.lat.append(now - self.sent.pop(m["id"]))
            if m["t"] != "result":
                raise RuntimeError(f"call failed: {m}")
            replies += 1
        if replies:
            self.remaining -= replies
            more = min(replies, self.remaining - len(self.sent))
            if more > 0:
                self.fire(more)
            if self.remaining <= 0 and self.done is not None and not self.done.done():
                self.done.set_result(None)


async def open_loader(port: int, urfa: bool, keys: scram.ClientKeys | None) -> Loader:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(Loader, "127.0.0.1", port)
    if urfa:
        assert keys is not None
        hello = await proto.handshake.get()
        cnonce = secrets.token_bytes(16)
        proto.t.write(proto.enc.encode({"t": "login", "proto": 1, "kind": "system", "login": "bench", "cnonce": cnonce}))
        ch = await proto.handshake.get()
        am = scram.auth_message("system", "bench", cnonce, hello["nonce"], ch["salt"], ch["iter"])
        proto.t.write(proto.enc.encode({"t": "proof", "proof": scram.client_proof(keys, am)}))
        welcome = await proto.handshake.get()
        assert welcome["t"] == "welcome", welcome
    proto.open = True
    return proto


async def measure(port: int, urfa: bool, sessions: int, window: int, total: int) -> dict[str, Any]:
    keys: scram.ClientKeys | None = None     # derived once, from the server's real salt
    loaders = []
    for _ in range(sessions):
        if urfa and keys is None:
            keys = await _keys_for(port)
        loaders.append(await open_loader(port, urfa, keys))
    per = max(1, total // sessions)
    loop = asyncio.get_running_loop()
    for ld in loaders:
        ld.remaining = per
        ld.done = loop.create_future()
    t0 = time.perf_counter()
    for ld in loaders:
        ld.fire(min(window, per))
    await asyncio.gather(*(ld.done for ld in loaders))  # type: ignore[misc]
    elapsed = time.perf_counter() - t0
    lat = sorted(x for ld in loaders for x in ld.lat)
    for ld in loaders:
        ld.t.close()
    return {
        "calls": len(lat), "seconds": round(elapsed, 4), "calls_per_s": round(len(lat) / elapsed),
        "p50_us": round(lat[len(lat) // 2] * 1e6, 1), "p99_us": round(lat[int(len(lat) * 0.99)] * 1e6, 1),
    }


async def _keys_for(port: int) -> scram.ClientKeys:
    """Learn the server's salt with one login exchange, derive the keys once."""
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(Loader, "127.0.0.1", port)
    await proto.handshake.get()
    proto.t.write(proto.enc.encode({"t": "login", "proto": 1, "kind": "system", "login": "bench", "cnonce": b"c" * 16}))
    ch = await proto.handshake.get()
    proto.t.close()
    return scram.client_keys(PASSWORD, ch["salt"], ch["iter"])


def start_server(target: Any) -> tuple[Any, int]:
    ctx = mp.get_context("spawn")
    port = _free_port()
    ready = ctx.Event()
    proc = ctx.Process(target=target, args=(port, ready), daemon=True)
    proc.start()
    if not ready.wait(30):
        raise RuntimeError("server did not start")
    return proc, port


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a few hundred calls per case (CI)")
    ap.add_argument("--calls", type=int, default=200_000, help="calls per case")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "urfa_calls"))
    opts = ap.parse_args()
    total = 300 if opts.tiny else opts.calls
    cases = [(1, 64), (16, 16), (128, 4)]
    urfa_proc, urfa_port = start_server(run_urfa_server)
    echo_proc, echo_port = start_server(run_echo_server)
    rows = []
    try:
        for sessions, window in cases:
            # Alternate and keep the better of two runs each: fewer scheduler artefacts.
            best: dict[str, dict[str, Any]] = {}
            for _ in range(1 if opts.tiny else 2):
                for name, port, urfa in (("urfa", urfa_port, True), ("echo", echo_port, False)):
                    r = uvloop.run(measure(port, urfa, sessions, window, total))
                    if name not in best or r["calls_per_s"] > best[name]["calls_per_s"]:
                        best[name] = r
            rows.append({"sessions": sessions, "window": window, "urfa": best["urfa"], "echo": best["echo"],
                         "ratio": round(best["urfa"]["calls_per_s"] / best["echo"]["calls_per_s"], 3)})
    finally:
        for p in (urfa_proc, echo_proc):
            p.kill()
    machine = {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu_model(),
               "nproc": os.cpu_count(), "loadavg_1m_after": round(os.getloadavg()[0], 2)}
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine,
              "call": "sys.ping", "calls_per_case": total, "tiny": opts.tiny, "rows": rows}
    header = "| sessions | window | URFA calls/s | p50 µs | p99 µs | echo calls/s | p50 µs | p99 µs | URFA/echo |"
    lines = [header, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        u, e = r["urfa"], r["echo"]
        lines.append(f"| {r['sessions']} | {r['window']} | {u['calls_per_s']:,} | {u['p50_us']} | {u['p99_us']} | "
                     f"{e['calls_per_s']:,} | {e['p50_us']} | {e['p99_us']} | {r['ratio']:.0%} |")
    table = "\n".join(lines)
    print(table)
    md = (f"# URFA calls: `sys.ping` vs bare msgpack echo\n\n{result['date']} · {machine['cpu']} · "
          f"nproc {machine['nproc']} · load avg {machine['loadavg_1m_after']} · {machine['platform']} · Python {machine['python']}\n\n"
          f"Each server in its own uvloop process; load generator in one uvloop process; "
          f"TCP loopback; {total:,} calls per case; `window` = calls in flight per session.\n\n{table}\n")
    if not opts.tiny or opts.out != ap.get_default("out"):
        Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
        Path(opts.out + ".md").write_text(md)


if __name__ == "__main__":
    main()
