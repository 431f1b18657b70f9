"""Interop: real exporters (softflowd, nfdump's nfreplay) feed billcore over loopback.

softflowd reads a pcap this test writes (plain struct, Ethernet/IPv4/TCP) and exports v5,
v9 and IPFIX; the bytes it reports per flow are the IP total lengths of the packets, so the
test knows each account's bytes from its own input. nfreplay replays an nfcapd file that
nfcapd captured from packets our exporter builders sent.
"""

from __future__ import annotations

import re
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from netflow.exporter import ExportClock, FlowSpec, build_v5, build_v9
from tests.conftest import free_port, need_peer
from tests.test_netflow_worker import bc_port
from tests.test_netflow_worker_support import charged, netflow_core, recent_ms, setup_accounts, wait_charged
from tests.waiting import wait_for

LOCALS = ["10.50.0.1", "10.50.0.2", "10.50.0.3"]
REMOTE = "198.51.100.77"


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ip_tcp_packet(src: str, dst: str, sport: int, dport: int, payload_len: int, flags: int) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0) + b"x" * payload_len
    total = 20 + len(tcp)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0, 64, 6, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    return ip + tcp


def write_pcap(path: Path, start_s: int, accounts: dict[str, int]) -> dict[int, int]:
    """A pcap of TCP conversations between LOCALS and REMOTE; bytes per account (IP lengths)."""
    want: dict[int, int] = {}
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]  # LINKTYPE_ETHERNET
    t = float(start_s)
    for n, local in enumerate(LOCALS):
        for k in range(40 + 10 * n):
            outbound = k % 2 == 0
            src, dst = (local, REMOTE) if outbound else (REMOTE, local)
            sport, dport = (40000 + n, 443) if outbound else (443, 40000 + n)
            flags = 0x02 if k == 0 else (0x11 if k == 39 + 10 * n else 0x10)
            ip = ip_tcp_packet(src, dst, sport, dport, 100 + 37 * k % 1300, flags)
            frame = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip
            t += 0.01
            out.append(struct.pack("<IIII", int(t), int(t % 1 * 1e6), len(frame), len(frame)) + frame)
            want[accounts[local]] = want.get(accounts[local], 0) + len(ip)
    path.write_bytes(b"".join(out))
    return want


@pytest.mark.parametrize("version", [5, 9, 10])
async def test_softflowd_reading_a_pcap(tmp_path: Path, db_dsn: str, version: int) -> None:
    need_peer(all(shutil.which(t) for t in ("softflowd", "softflowctl")), "softflowd is not installed")
    accounts = await setup_accounts(db_dsn, LOCALS)
    pcap_dir = Path(tempfile.mkdtemp(prefix="sfp", dir="/tmp"))
    ctl_dir = Path(tempfile.mkdtemp(prefix="sfc", dir="/tmp"))
    pcap = pcap_dir / "in.pcap"
    want = write_pcap(pcap, recent_ms(5) // 1000, accounts)
    with netflow_core(tmp_path, db_dsn) as bc:
        port = bc_port(bc)
        for _ in range(2):
            bc.wait_for(r'msg="netflow serving"', timeout=60)
        # -d -r: read the file, expire and export every flow at EOF, exit. softflowd 1.1.0
        # may block in accept() on its control socket (seen under pytest) once
        # per main-loop turn, so a control command is sent per turn until it has exited.
        ctl = ctl_dir / "ctl"
        proc = subprocess.Popen(["softflowd", "-d", "-r", str(pcap), "-n", f"127.0.0.1:{port}",
                                 "-v", str(version), "-c", str(ctl)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            for _ in range(600):
                if proc.poll() is not None:
                    break
                if ctl.exists():
                    subprocess.run(["softflowctl", "-c", str(ctl), "statistics"], capture_output=True, timeout=10)
                time.sleep(0.05)
            text, _ = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            shutil.rmtree(pcap_dir, ignore_errors=True)
            shutil.rmtree(ctl_dir, ignore_errors=True)
        out = text or ""
        assert proc.returncode == 0 and "Shutting down after pcap EOF" in out, out
        assert re.search(r"Flows exported: \d+ .* \(0 failures\)", out), out
        got = await wait_charged(db_dsn, want, timeout=30)
        assert got == want, f"softflowd v{version}: {out}"


def udp_rx_queue(port: int) -> int | None:
    """Bytes waiting in the receive queue of the IPv4 UDP socket bound to
    ``port`` (/proc/net/udp); None while no socket is bound to it."""
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port:
            return int(fields[4].split(":")[1], 16)
    return None


async def test_nfreplay_of_an_nfcapd_capture(tmp_path: Path, db_dsn: str) -> None:
    need_peer(all(shutil.which(t) for t in ("nfcapd", "nfreplay")), "nfdump (nfcapd, nfreplay) is not installed")
    accounts = await setup_accounts(db_dsn, LOCALS)
    at = recent_ms()
    flows = [FlowSpec(LOCALS[i % 3] if i % 2 else REMOTE, REMOTE if i % 2 else LOCALS[i % 3], 1000 + i, 80, 6,
                      1000 + 13 * i, 1 + i % 7, at, at + 500) for i in range(600)]
    want: dict[int, int] = {}
    for f in flows:
        acc = accounts[f.src if f.src in accounts else f.dst]
        want[acc] = want.get(acc, 0) + f.bytes
    capture_port = free_port(socket.SOCK_DGRAM)
    store = tmp_path / "nfcapd"
    store.mkdir()
    nfcapd = subprocess.Popen(["nfcapd", "-b", "127.0.0.1", "-p", str(capture_port), "-w", str(store), "-t", "3600"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: udp_rx_queue(capture_port) is not None, what="nfcapd bound its port")
        clock = ExportClock(at - 60_000, at + 1000)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for p in build_v5(flows[:300], clock) + build_v9(flows[300:], clock, source_id=1):
                s.sendto(p, ("127.0.0.1", capture_port))
                time.sleep(0.001)  # part of the scenario: an exporter's pace, not a burst
        wait_for(lambda: udp_rx_queue(capture_port) == 0, what="nfcapd read every datagram")
    finally:
        nfcapd.terminate()
        nfcapd.wait(timeout=20)
    files = [p for p in store.rglob("nfcapd.*") if not p.name.endswith("current") and p.is_file()]
    assert files, f"nfcapd wrote nothing: {nfcapd.stdout.read() if nfcapd.stdout else ''}"
    with netflow_core(tmp_path, db_dsn) as bc:
        port = bc_port(bc)
        for _ in range(2):
            bc.wait_for(r'msg="netflow serving"', timeout=60)
        for version in ("5", "9"):
            before = (await charged(db_dsn))[0]
            proc = subprocess.run(["nfreplay", "-r", str(files[0]), "-H", "127.0.0.1", "-p", str(port), "-v", version],
                                  capture_output=True, timeout=60, text=True)
            assert proc.returncode == 0, proc.stderr
            expect = {a: before.get(a, 0) + b for a, b in want.items()}
            got = await wait_charged(db_dsn, expect, timeout=30)
            assert got == expect, f"nfreplay v{version}: {proc.stdout}{proc.stderr}"
