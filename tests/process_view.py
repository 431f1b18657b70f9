"""A running process seen from outside, as an auditor with root would see it.

What the console-holds-nothing test needs: the sockets a process has open
and where each one leads (``ss`` over the kernel's socket diagnostics, so a
Unix socket's far end is found by its peer inode), its environment, and a
search of its memory (``/proc/PID/mem`` over every readable mapping) for
a byte string in each encoding CPython may keep a ``str`` in.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Socket", "sockets_of", "unix_peer_owners", "environ_of", "memory_hits", "encodings_of"]

CHUNK = 1 << 22          # read the memory 4 MiB at a time
_USERS = re.compile(r"pid=(\d+),fd=(\d+)")


@dataclass(frozen=True, slots=True)
class Socket:
    kind: str            # "tcp", "udp" or "unix"
    state: str           # ss's state: LISTEN, ESTAB, UNCONN…
    local: str           # "127.0.0.1:8081", or a Unix path ("*" when unnamed)
    peer: str            # "127.0.0.1:11758", or the Unix path of the far end ("*" unnamed, "" none)
    inode: int = 0

    @property
    def local_port(self) -> int | None:
        return _port(self.local) if self.kind != "unix" else None

    @property
    def peer_port(self) -> int | None:
        return _port(self.peer) if self.kind != "unix" else None


def _port(address: str) -> int | None:
    head, _, tail = address.rpartition(":")
    return int(tail) if head and tail.isdigit() else None


def _ss(*flags: str) -> list[str]:
    done = subprocess.run(["ss", "-n", "-a", "-p", "-e", *flags], capture_output=True, text=True, timeout=30,
                          check=True)
    return done.stdout.splitlines()[1:]


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:          # closed while we looked
            continue
        m = re.fullmatch(r"socket:\[(\d+)\]", target)
        if m:
            inodes.add(int(m.group(1)))
    return inodes


def sockets_of(pid: int) -> list[Socket]:
    """Every TCP, UDP and Unix socket among ``pid``'s open file descriptors.

    A Unix socket's ``peer`` is the path the far end is bound to, looked up
    through the peer inode ``ss -x`` reports (a connected client socket has
    no name of its own; the server's accepted socket carries the path)."""
    mine = _socket_inodes(pid)
    found: list[Socket] = []
    for kind, flag in (("tcp", "-t"), ("udp", "-u")):
        for line in _ss(flag):
            fields = line.split()
            numbered = re.search(r"\bino:(\d+)", line)
            if len(fields) >= 5 and numbered and int(numbered.group(1)) in mine:
                found.append(Socket(kind, fields[0], fields[3], fields[4], int(numbered.group(1))))
    unix_lines = [line.split() for line in _ss("-x")]
    # u_str ESTAB 0 0 /path/or/* LOCAL_INODE * PEER_INODE users:(...)
    by_inode = {int(f[5]): f for f in unix_lines if len(f) >= 8 and f[5].isdigit()}
    for unix_inode, columns in by_inode.items():
        if unix_inode not in mine:
            continue
        peer_inode = int(columns[7]) if columns[7].isdigit() else 0
        far = by_inode.get(peer_inode)
        found.append(Socket("unix", columns[1], columns[4], far[4] if far else "", unix_inode))
    missing = mine - {sock.inode for sock in found}
    # netlink and other families ss did not list: reported, so nothing hides
    found.extend(Socket("other", "?", "?", "?", other) for other in sorted(missing))
    return found


def unix_peer_owners(pid: int) -> set[int]:
    """The processes at the far end of ``pid``'s connected Unix sockets (e.g. the PostgreSQL
    backends serving its database connections), from ``ss -x -p``'s owner of each peer inode."""
    mine = _socket_inodes(pid)
    owners: dict[int, set[int]] = {}
    peers: set[int] = set()
    for line in _ss("-x"):
        columns = line.split()
        if len(columns) < 8 or not columns[5].isdigit():
            continue
        inode = int(columns[5])
        owners[inode] = {int(found.group(1)) for found in _USERS.finditer(line)}
        if inode in mine and columns[7].isdigit():
            peers.add(int(columns[7]))
    return {owner for peer in peers for owner in owners.get(peer, set())} - {pid}


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {key.decode(errors="replace"): value.decode(errors="replace") for key, value in pairs}


def encodings_of(text: str) -> list[bytes]:
    """The byte forms a ``str`` takes in CPython's memory (PEP 393: one,
    two or four bytes a character) and on the wire (UTF-8)."""
    forms = [text.encode("utf-8"), text.encode("utf-16-le"), text.encode("utf-32-le")]
    try:
        forms.append(text.encode("latin-1"))
    except UnicodeEncodeError:
        pass
    return list(dict.fromkeys(forms))


def _readable_regions(pid: int) -> Iterator[tuple[int, int, str]]:
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        span, perms = fields[0], fields[1]
        name = fields[5] if len(fields) > 5 else ""
        if perms[0] != "r" or name in ("[vvar]", "[vsyscall]", "[vvar_vclock]"):
            continue
        lo, hi = (int(x, 16) for x in span.split("-"))
        yield lo, hi, name


def memory_hits(pid: int, needles: list[bytes]) -> dict[bytes, list[tuple[int, str]]]:
    """Where each needle occurs in ``pid``'s readable memory: (address, mapping name).

    Regions are read in chunks that overlap by the longest needle, so a hit
    across a chunk boundary is still found. Needs root (or ptrace rights)."""
    hits: dict[bytes, list[tuple[int, str]]] = {needle: [] for needle in needles}
    overlap = max(len(n) for n in needles) - 1
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for lo, hi, name in _readable_regions(pid):
            at = lo
            while at < hi:
                size = min(CHUNK + overlap, hi - at)
                try:
                    mem.seek(at)
                    data = mem.read(size)
                except OSError:          # a guard page or a mapping gone meanwhile
                    break
                if not data:
                    break
                for needle in needles:
                    start = data.find(needle)
                    while start != -1:
                        if start < CHUNK or at + size >= hi:   # the overlap is searched again next chunk
                            hits[needle].append((at + start, name))
                        start = data.find(needle, start + 1)
                at += CHUNK
    return hits
