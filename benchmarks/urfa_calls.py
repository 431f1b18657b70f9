"""URFA call throughput and latency, side by side with a bare msgpack echo server.

Both servers run in their own process on uvloop and speak the same framing
(4-byte length + msgpack map).  The echo server decodes every frame with
plain ``msgpack.unpackb`` and answers it with a result frame, nothing else:
it is the ceiling for this transport in Python.  The URFA server is the real
``URFAService`` (sessions, call tables, argument checks, in-flight
accounting) answering ``sys.ping``.

The load generator runs in its own process(es) (``--loaders``, uvloop), so
the orchestrator never competes with the servers.  It opens 1, 16 or 128
connections; URFA ones log in with SCRAM first.  Each connection keeps
``window`` calls in flight (pipelining, as the NetFlow workers and the
RADIUS server do) and records each call's round-trip latency.

On a small shared box the load generator and the server compete for cores,
so besides wall-clock calls/s the script reads the server process's CPU time
(``/proc/PID/stat``) around each run and reports calls per server
CPU-second: the figure that does not depend on who else is running.  Each
case is run ``--repeat`` times, URFA and echo alternating, and the best run
of each is kept; the load average is recorded before and after.

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
import struct
import sys
import time
from array import array
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _machine import cpu_model  # noqa: E402

import msgpack  # noqa: E402
import uvloop  # noqa: E402

from urfa import scram  # noqa: E402

PASSWORD = "bench-pw"
ITER = 4096
CASES = [(1, 64), (16, 16), (128, 4)]
_HDR = struct.Struct(">I")
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _frame(obj: dict[str, Any]) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return _HDR.pack(len(body)) + body


class _Frames:
    """Minimal frame splitter for the load generator and the echo server."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = bytearray()

    def bodies(self, data: bytes) -> list[bytes]:
        buf = self.buf
        buf += data
        out = []
        pos, end = 0, len(buf)
        while end - pos >= 4:
            (n,) = _HDR.unpack_from(buf, pos)
            if end - pos - 4 < n:
                break
            out.append(bytes(buf[pos + 4:pos + 4 + n]))
            pos += 4 + n
        del buf[:pos]
        return out


# -- servers (child processes) -------------------------------------------
def run_urfa_server(port: int, ready: Any) -> None:
    from billcore.server.calls import CallRegistry
    from billcore.server.service import URFAConfig, URFAService
    from billcore.server.sessions import Principal

    class Auth:
        verifier = scram.make_verifier(PASSWORD, iterations=ITER)

        async def find_principal(self, kind: str, login: str) -> Principal | None:
            return Principal(kind, login, 1, frozenset(), self.verifier) if kind == "system" else None

    async def main() -> None:
        # every loader connection comes from 127.0.0.1: no per-address cap
        config = URFAConfig(max_inflight=1024, mock_iterations=ITER, max_connections_per_ip=0)
        svc = URFAService(CallRegistry(), Auth(), config)
        await svc.start(tcp=("127.0.0.1", port))
        ready.set()
        await asyncio.Event().wait()

    uvloop.run(main())


def run_echo_server(port: int, ready: Any) -> None:
    unpackb, packb = msgpack.unpackb, msgpack.packb

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.t = transport
            self.frames = _Frames()

        def data_received(self, data: bytes) -> None:
            out = []
            for body in self.frames.bodies(data):
                m = unpackb(body)
                reply = packb({"t": "result", "id": m.get("id"), "value": "pong"})
                out.append(_HDR.pack(len(reply)) + reply)
            self.t.write(b"".join(out))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_server(Echo, "127.0.0.1", port)
        ready.set()
        await asyncio.Event().wait()

    uvloop.run(main())


# -- load generator (child processes) ------------------------------------
_CALL_PREFIX = (b"\x84" + msgpack.packb("t") + msgpack.packb("call") + msgpack.packb("fn")
                + msgpack.packb("sys.ping") + msgpack.packb("args") + b"\x80" + msgpack.packb("id") + b"\xcf")
_CALL_HDR = _HDR.pack(len(_CALL_PREFIX) + 8)


class Loader(asyncio.Protocol):
    """One connection of the load generator: logs in, then pipelines calls."""

    def __init__(self) -> None:
        self.frames = _Frames()
        self.handshake: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.open = False
        self.sent: dict[int, float] = {}
        self.lat = array("d")
        self.next_id = 1
        self.remaining = 0
        self.done: asyncio.Future[None] | None = None
        self.error: str | None = None

    def connection_made(self, transport: Any) -> None:
        self.t = transport

    def fire(self, n: int) -> None:
        out = []
        now = time.perf_counter()
        for _ in range(n):
            i = self.next_id
            self.next_id = i + 1
            self.sent[i] = now
            out.append(_CALL_HDR + _CALL_PREFIX + i.to_bytes(8, "big"))
        self.t.write(b"".join(out))

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        replies = 0
        for body in self.frames.bodies(data):
            m = msgpack.unpackb(body, timestamp=3)
            if not self.open:
                self.handshake.put_nowait(m)
                continue
            self.lat.append(now - self.sent.pop(m["id"]))
            if m["t"] != "result" and self.error is None:
                self.error = f"call failed: {m}"
            replies += 1
        if replies:
            self.remaining -= replies
            more = min(replies, self.remaining - len(self.sent))
            if more > 0:
                self.fire(more)
            if self.remaining <= 0 and self.done is not None and not self.done.done():
                self.done.set_result(None)


async def _keys_for(port: int) -> scram.ClientKeys:
    """Learn the server's salt with one login exchange, derive the keys once."""
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(Loader, "127.0.0.1", port)
    await proto.handshake.get()
    proto.t.write(_frame({"t": "login", "proto": 1, "kind": "system", "login": "bench", "cnonce": b"c" * 16}))
    ch = await proto.handshake.get()
    proto.t.close()
    return scram.client_keys(PASSWORD, ch["salt"], ch["iter"])


async def _open(port: int, keys: scram.ClientKeys | None) -> Loader:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(Loader, "127.0.0.1", port)
    if keys is not None:
        hello = await proto.handshake.get()
        cnonce = secrets.token_bytes(16)
        proto.t.write(_frame({"t": "login", "proto": 1, "kind": "system", "login": "bench", "cnonce": cnonce}))
        ch = await proto.handshake.get()
        am = scram.auth_message("system", "bench", cnonce, hello["nonce"], ch["salt"], ch["iter"])
        proto.t.write(_frame({"t": "proof", "proof": scram.client_proof(keys, am)}))
        welcome = await proto.handshake.get()
        if welcome["t"] != "welcome":
            raise RuntimeError(f"login failed: {welcome}")
    proto.open = True
    return proto


def run_loader(pipe: Any) -> None:
    """Serve commands from the orchestrator: setup → ready, go → result, close."""
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    keys: dict[int, scram.ClientKeys] = {}
    loaders: list[Loader] = []
    while True:
        cmd = pipe.recv()
        if cmd[0] == "setup":
            _, port, urfa, sessions, window, per = cmd
            if urfa and port not in keys:
                keys[port] = loop.run_until_complete(_keys_for(port))
            loaders = [loop.run_until_complete(_open(port, keys.get(port) if urfa else None))
                       for _ in range(sessions)]
            for ld in loaders:
                ld.remaining = per
                ld.done = loop.create_future()
                ld.window = window  # type: ignore[attr-defined]
            pipe.send("ready")
        elif cmd[0] == "go":
            t0 = time.perf_counter()
            for ld in loaders:
                ld.fire(min(ld.window, ld.remaining))  # type: ignore[attr-defined]
            loop.run_until_complete(asyncio.gather(*(ld.done for ld in loaders)))  # type: ignore[arg-type]
            t1 = time.perf_counter()
            lat = array("d")
            errors = [ld.error for ld in loaders if ld.error]
            for ld in loaders:
                lat.extend(ld.lat)
                ld.t.close()
            loop.run_until_complete(asyncio.sleep(0.05))   # let the closes go out
            loaders = []
            pipe.send((t0, t1, lat.tobytes(), errors))
        elif cmd[0] == "exit":
            return


# -- orchestrator ----------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def start(target: Any, *args: Any) -> Any:
    proc = mp.get_context("spawn").Process(target=target, args=args, daemon=True)
    proc.start()
    return proc


def start_server(target: Any) -> tuple[Any, int]:
    port = _free_port()
    ready = mp.get_context("spawn").Event()
    proc = start(target, port, ready)
    if not ready.wait(30):
        raise RuntimeError("server did not start")
    return proc, port


def run_case(pipes: list[Any], loader_pids: list[int], server_pid: int, port: int, urfa: bool, sessions: int, window: int,
             total: int) -> dict[str, Any]:
    per_session = max(1, total // sessions)
    share = [sessions // len(pipes) + (i < sessions % len(pipes)) for i in range(len(pipes))]
    active = [(p, n) for p, n in zip(pipes, share) if n]
    for p, n in active:
        p.send(("setup", port, urfa, n, window, per_session))
    for p, _ in active:
        assert p.recv() == "ready"
    cpu0 = cpu_seconds(server_pid)
    load0 = sum(cpu_seconds(pid) for pid in loader_pids)
    for p, _ in active:
        p.send(("go",))
    replies = [p.recv() for p, _ in active]
    cpu = cpu_seconds(server_pid) - cpu0
    load_cpu = sum(cpu_seconds(pid) for pid in loader_pids) - load0
    errors = [e for r in replies for e in r[3]]
    if errors:
        raise RuntimeError(errors[0])
    elapsed = max(r[1] for r in replies) - min(r[0] for r in replies)
    lat = array("d")
    for r in replies:
        lat.frombytes(r[2])
    lat = array("d", sorted(lat))
    n = len(lat)
    return {
        "calls": n, "seconds": round(elapsed, 4), "calls_per_s": round(n / elapsed),
        "server_cpu_s": round(cpu, 3), "server_cpu_pct": round(100 * cpu / elapsed),
        "calls_per_cpu_s": round(n / cpu) if cpu > 0 else None,
        "loader_cpu_pct": round(100 * load_cpu / elapsed),
        "p50_us": round(lat[n // 2] * 1e6, 1), "p99_us": round(lat[int(n * 0.99)] * 1e6, 1),
    }




def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def _pct(x: float | None) -> str:
    return f"{x:.0%}" if x is not None else "–"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a few hundred calls per case, one run (CI)")
    ap.add_argument("--calls", type=int, default=200_000, help="calls per case and run")
    ap.add_argument("--repeat", type=int, default=5, help="runs per case and server; the best is kept")
    ap.add_argument("--loaders", type=int, default=1, help="load generator processes")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "urfa_calls"))
    opts = ap.parse_args()
    total = 300 if opts.tiny else opts.calls
    repeat = 1 if opts.tiny else opts.repeat
    load_before = [round(x, 2) for x in os.getloadavg()]
    urfa_proc, urfa_port = start_server(run_urfa_server)
    echo_proc, echo_port = start_server(run_echo_server)
    pipes, loaders = [], []
    for _ in range(opts.loaders):
        parent, child = mp.get_context("spawn").Pipe()
        loaders.append(start(run_loader, child))
        pipes.append(parent)
    servers = {"urfa": (urfa_proc.pid, urfa_port, True), "echo": (echo_proc.pid, echo_port, False)}
    rows = []
    try:
        for sessions, window in CASES:
            best: dict[str, dict[str, Any]] = {}
            runs: dict[str, list[tuple[int, int | None]]] = {"urfa": [], "echo": []}
            for rep in range(repeat):
                order = ("urfa", "echo") if rep % 2 == 0 else ("echo", "urfa")
                for name in order:
                    pid, port, urfa = servers[name]
                    r = run_case(pipes, [ld.pid for ld in loaders], pid, port, urfa, sessions, window, total)
                    runs[name].append((r["calls_per_s"], r["calls_per_cpu_s"]))
                    if name not in best or r["calls_per_s"] > best[name]["calls_per_s"]:
                        best[name] = r
            u, e = best["urfa"], best["echo"]
            rows.append({"sessions": sessions, "window": window, "urfa": u, "echo": e,
                         "runs_calls_per_s_and_per_cpu_s": runs,
                         "ratio": _ratio(u["calls_per_s"], e["calls_per_s"]),
                         "cpu_ratio": _ratio(u["calls_per_cpu_s"], e["calls_per_cpu_s"]),
                         "loadavg_1m": round(os.getloadavg()[0], 2)})
    finally:
        for p in pipes:
            p.send(("exit",))
        for proc in loaders:
            proc.join(5)
        for proc in (*loaders, urfa_proc, echo_proc):
            proc.kill()
    machine = {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu_model(),
               "nproc": os.cpu_count(), "msgpack": msgpack.version, "uvloop": uvloop.__version__,
               "loadavg_before": load_before, "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine,
              "call": "sys.ping", "calls_per_case": total, "repeat": repeat, "loaders": opts.loaders,
              "tiny": opts.tiny, "rows": rows}
    lines = [
        "| sessions | window | URFA calls/s | p50 µs | p99 µs | server CPU | URFA calls/CPU-s "
        "| echo calls/s | p50 µs | p99 µs | server CPU | echo calls/CPU-s | URFA/echo wall | URFA/echo CPU "
        "| loader CPU (URFA/echo) | load 1m |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        u, e = r["urfa"], r["echo"]
        lines.append(
            f"| {r['sessions']} | {r['window']} | {u['calls_per_s']:,} | {u['p50_us']} | {u['p99_us']} | "
            f"{u['server_cpu_pct']}% | {u['calls_per_cpu_s'] or 0:,} | {e['calls_per_s']:,} | {e['p50_us']} | "
            f"{e['p99_us']} | {e['server_cpu_pct']}% | {e['calls_per_cpu_s'] or 0:,} | {_pct(r['ratio'])} | "
            f"{_pct(r['cpu_ratio'])} | {u['loader_cpu_pct']}% / {e['loader_cpu_pct']}% | {r['loadavg_1m']} |")
    table = "\n".join(lines)
    print(table)
    md = (f"# URFA calls: `sys.ping` vs bare msgpack echo\n\n{result['date']} · {machine['cpu']} · "
          f"nproc {machine['nproc']} · load avg before {machine['loadavg_before']}, after "
          f"{machine['loadavg_after']} · {machine['platform']} · Python {machine['python']} · "
          f"msgpack {'.'.join(map(str, msgpack.version))} · uvloop {uvloop.__version__}\n\n"
          f"Each server in its own uvloop process; {opts.loaders} load generator process(es), uvloop; "
          f"TCP loopback; {total:,} calls per run; best of {repeat} runs per case and server, "
          f"alternating; `window` = calls in flight per session.  *server CPU* is the server "
          f"process's user+system time over the run's wall time; *calls/CPU-s* divides calls by it "
          f"(independent of what else runs on the box); *loader CPU* is the same for the load "
          f"generator processes: near 100 % per process means the load generator is the bound.\n\n{table}\n")
    if not opts.tiny or opts.out != ap.get_default("out"):
        Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
        Path(opts.out + ".md").write_text(md)


if __name__ == "__main__":
    main()
