"""Access-Request/s: billcore's radius server beside FreeRADIUS, same run.

A load generator (its own process) keeps N PAP Access-Requests in flight,
each one freshly encoded (new authenticator, Message-Authenticator) so no
duplicate cache answers for the server, and counts Access-Accepts per
second.  Targets:

* billcore   — radius.server.RadiusServer in its own process.  The decision
  comes from an in-process table (the URFA path to the core is NOT in this
  figure: see benchmarks/results/radius_auth.md);
* freeradius — the Debian FreeRADIUS with its ``files`` module, from a
  generated config dir under a tmp dir, on another port.

FreeRADIUS + rlm_sql on PostgreSQL is not measured yet (see the results).
Usage: python benchmarks/radius_auth.py [--tiny] [--seconds S] [--inflight N]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import hmac
import json
import multiprocessing as mp
import os
import platform
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from radius.auth import pap_hide  # noqa: E402

SECRET = b"testing123"
LOGIN, PASSWORD = b"alice", b"wonderland"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def encode_request(ident: int) -> bytes:
    auth = os.urandom(16)
    attrs = b"\x50\x12" + b"\0" * 16  # Message-Authenticator first
    attrs += bytes([1, 2 + len(LOGIN)]) + LOGIN
    hidden = pap_hide(PASSWORD, SECRET, auth)
    attrs += bytes([2, 2 + len(hidden)]) + hidden
    header = struct.pack("!BBH", 1, ident, 20 + len(attrs))
    ma = hmac.new(SECRET, header + auth + attrs, hashlib.md5).digest()
    return header + auth + b"\x50\x12" + ma + attrs[18:]


async def _load(port: int, inflight: int, seconds: float, out: "mp.Queue[tuple[int, int]]") -> None:
    loop = asyncio.get_running_loop()
    accepts = 0
    sent = 0
    deadline = time.monotonic() + seconds
    per_socket = 200
    done = asyncio.Event()

    class Slotted(asyncio.DatagramProtocol):
        def __init__(self) -> None:
            self.transport: asyncio.DatagramTransport | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport  # type: ignore[assignment]

        def datagram_received(self, data: bytes, addr: object) -> None:
            nonlocal accepts, sent
            if data[0] == 2:
                accepts += 1
            if time.monotonic() < deadline:
                assert self.transport is not None
                self.transport.sendto(encode_request(data[1]))
                sent += 1

    protos = []
    for i in range(0, inflight, per_socket):
        _, proto = await loop.create_datagram_endpoint(Slotted, remote_addr=("127.0.0.1", port))
        protos.append((proto, min(per_socket, inflight - i)))
    for proto, n in protos:
        for ident in range(n):
            proto.transport.sendto(encode_request(ident))
            sent += 1
    await asyncio.sleep(seconds + 0.5)
    done.set()
    out.put((accepts, sent))


def load_process(port: int, inflight: int, seconds: float, out: "mp.Queue[tuple[int, int]]") -> None:
    asyncio.run(_load(port, inflight, seconds, out))


def billcore_server(port: int, ready: "mp.Event") -> None:  # type: ignore[valid-type]
    from radius.server import Decision, Nas, NasTable, RadiusServer

    class Table:
        async def authorize(self, nas: Nas, request: dict) -> Decision:  # type: ignore[type-arg]
            ok = request["login"] == "alice" and request.get("password") == PASSWORD
            return Decision(ok, (("Session-Timeout", 3600), ("Acct-Interim-Interval", 300)) if ok else ())

        async def account(self, nas: Nas, record: dict) -> None:  # type: ignore[type-arg]
            return None

    async def main() -> None:
        server = RadiusServer(decider=Table(), nas_table=NasTable([Nas("127.0.0.1", SECRET)]), max_inflight=4096)
        await server.listen("127.0.0.1", port, free_udp_port())
        ready.set()
        await asyncio.sleep(3600)

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


def freeradius_dir(tmp: Path, port: int = 18120) -> Path:
    src = Path("/etc/freeradius/3.0")
    dst = tmp / "raddb"
    shutil.copytree(src, dst, symlinks=True)
    conf = (dst / "radiusd.conf").read_text()
    conf = conf.replace("\tuser = freerad", "#").replace("\tgroup = freerad", "#")
    (dst / "radiusd.conf").write_text(conf)
    site = dst / "sites-enabled" / "default"
    text = (dst / "sites-available" / "default").read_text()
    site.unlink()
    # the IPv4 auth and acct listeners on our ports; -p would bypass the site
    ports = iter([port, port + 1, 0, 0])
    text = "\n".join(
        (line.replace("port = 0", f"port = {next(ports)}") if line.strip() == "port = 0" else line)
        for line in text.splitlines())
    site.write_text(text.replace("ipv6addr = ::", "ipv6addr = ::1"))
    for name in ("inner-tunnel",):
        (dst / "sites-enabled" / name).unlink(missing_ok=True)
    users = dst / "mods-config" / "files" / "authorize"
    users.write_text('alice Cleartext-Password := "wonderland"\n\tSession-Timeout = 3600,\n\tAcct-Interim-Interval = 300\n'
                     + users.read_text())
    return dst


def measure(port: int, inflight: int, seconds: float) -> float:
    q: "mp.Queue[tuple[int, int]]" = mp.Queue()
    p = mp.Process(target=load_process, args=(port, inflight, seconds, q))
    p.start()
    accepts, _ = q.get(timeout=seconds + 30)
    p.join()
    return accepts / seconds


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="a second-long run for CI")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--inflight", type=int, default=256)
    args = ap.parse_args()
    seconds = 1.0 if args.tiny else args.seconds
    results: dict[str, float] = {}

    port = free_udp_port()
    ready = mp.Event()
    srv = mp.Process(target=billcore_server, args=(port, ready), daemon=True)
    srv.start()
    ready.wait(20)
    measure(port, args.inflight, 0.5)  # warm-up
    results["billcore (in-process decider, no URFA)"] = measure(port, args.inflight, seconds)
    srv.terminate()

    freeradius = shutil.which("freeradius")
    if freeradius:
        with tempfile.TemporaryDirectory() as tmp:
            fport = free_udp_port()
            raddb = freeradius_dir(Path(tmp), fport)
            proc = subprocess.Popen([freeradius, "-d", str(raddb), "-f",
                                     "-l", str(Path(tmp) / "radius.log")],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                time.sleep(2.0)
                if proc.poll() is None:
                    measure(fport, args.inflight, 0.5)
                    results["freeradius files"] = measure(fport, args.inflight, seconds)
                else:
                    print("freeradius did not start:", (Path(tmp) / "radius.log").read_text()[-2000:])
            finally:
                proc.terminate()
                proc.wait(10)

    machine = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
               "nproc": os.cpu_count(), "python": platform.python_version()}
    base = results.get("freeradius files")
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine,
              "inflight": args.inflight, "seconds": seconds, "access_requests_per_s": results,
              "ratio_to_freeradius_files": {k: v / base for k, v in results.items()} if base else {},
              "not_measured": ["freeradius + rlm_sql (PostgreSQL)", "billcore end to end through URFA and the core"]}
    for k, v in results.items():
        ratio = f"  ({v / base:.2f}x freeradius files)" if base else ""
        print(f"{k:45s} {v:10.0f} Access-Request/s{ratio}")
    if not args.tiny:
        out = ROOT / "benchmarks" / "results"
        out.mkdir(parents=True, exist_ok=True)
        (out / "radius_auth.json").write_text(json.dumps(report, indent=2) + "\n")
        lines = [f"# radius_auth — {report['date']}", "",
                 f"Machine: {machine['platform']}, {machine['cpu']}, {machine['nproc']} CPUs, Python {machine['python']}.",
                 f"{args.inflight} requests in flight, {seconds:.0f} s per target, PAP + Message-Authenticator.", "",
                 "| target | Access-Request/s | × freeradius files |", "| --- | ---: | ---: |"]
        for k, v in results.items():
            lines.append(f"| {k} | {v:.0f} | {v / base:.2f} |" if base else f"| {k} | {v:.0f} | — |")
        lines += ["", "Not measured in this run: " + "; ".join(report["not_measured"]) + "."]
        (out / "radius_auth.md").write_text("\n".join(lines) + "\n")
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
