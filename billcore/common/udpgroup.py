"""A UDP port shared by our processes only (SO_REUSEPORT), strangers detected.

Theory of operation
-------------------
SO_REUSEPORT lets several sockets bind one port; the kernel hashes each
datagram's (source address, source port, destination) to one socket of the
group.  A NAS retransmits from the same source port, so its retransmissions
land on the socket — the process, the duplicate cache — that saw the first
copy, as long as the group does not change.

Its danger: any process of the same user that also sets SO_REUSEPORT joins
the group silently and takes a share of the traffic (pyrad's server binds
that way).  So the group is bound by one process — the supervisor — and
checked:

* ``bind_group`` first binds the port *exclusively* (no SO_REUSEPORT, no
  SO_REUSEADDR): if anyone holds it, with or without reuse, that fails and
  ``PortTaken`` names the port.  It then closes the probe and binds
  ``count`` SO_REUSEPORT sockets, and checks with ``strangers`` that no
  other socket slipped in between.
* ``strangers`` reads the kernel's socket table (/proc/net/udp, udp6) and
  lists the sockets bound to the port (same address or a wildcard) that are
  not ours, by inode.  The supervisor calls it every few seconds while it
  holds the group and says so loudly in its log: a stranger can join later.
* The sockets stay open in the supervisor for the group's whole life: a
  child that restarts gets the same socket back (``pass_fds``), so the hash
  never moves and datagrams that arrive meanwhile wait in its buffer.

Only the standard library; Linux (/proc).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ENV_FDS", "PortTaken", "Stranger", "bind_exclusive", "bind_group", "strangers", "inode"]

# a child given sockets of a group finds their descriptors here: "auth_fd,acct_fd"
ENV_FDS = "BILLCORE_UDP_FDS"


class PortTaken(Exception):
    """The port is held by a socket that is not ours."""


@dataclass(frozen=True, slots=True)
class Stranger:
    address: str
    port: int
    inode: int
    uid: int


def inode(sock: socket.socket) -> int:
    """The socket's inode, as /proc/net/udp lists it."""
    return os.fstat(sock.fileno()).st_ino


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _socket(host: str, rcvbuf: int, reuseport: bool) -> socket.socket:
    sock = socket.socket(_family(host), socket.SOCK_DGRAM)
    try:
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        except OSError:
            pass
    except BaseException:
        sock.close()
        raise
    return sock


def _taken(host: str, port: int, exc: OSError | None = None, who: str = "") -> PortTaken:
    what = who or "another RADIUS server, or a second billcore radius?"
    err = PortTaken(f"UDP {host}:{port} is already in use ({what}); refusing to share it")
    if exc is not None:
        err.__cause__ = exc
    return err


def bind_exclusive(host: str, port: int, rcvbuf: int = 4 << 20) -> socket.socket:
    """One non-blocking UDP socket on ``host:port`` bound *exclusively* (no SO_REUSEPORT, no
    SO_REUSEADDR): if anyone holds the port, with or without reuse, ``PortTaken`` names it."""
    sock = _socket(host, rcvbuf, reuseport=False)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise _taken(host, port, exc) from exc
        raise
    sock.setblocking(False)
    return sock


def bind_group(host: str, port: int, count: int, rcvbuf: int = 4 << 20) -> list[socket.socket]:
    """``count`` SO_REUSEPORT sockets on ``host:port`` (0: a free port), held by nobody else."""
    if count < 1:
        raise ValueError("a group has at least one socket")
    if port:
        bind_exclusive(host, port, rcvbuf).close()   # the probe
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = _socket(host, rcvbuf, reuseport=True)
            socks.append(sock)
            try:
                sock.bind((host, port))
            except OSError as exc:   # a stranger bound exclusively since the probe
                if exc.errno == errno.EADDRINUSE:
                    raise _taken(host, port, exc) from exc
                raise
            port = sock.getsockname()[1]
        others = strangers(host, port, {inode(s) for s in socks})
        if others:
            raise _taken(host, port, who=f"a stranger joined it: inode {others[0].inode}, uid {others[0].uid}")
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    for sock in socks:
        sock.setblocking(False)
    return socks


def _overlaps(ours: str, theirs: str) -> bool:
    wild = ("0.0.0.0", "::")
    if ours in wild or theirs in wild:
        return True
    a, b = ipaddress.ip_address(ours), ipaddress.ip_address(theirs)
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    if isinstance(b, ipaddress.IPv6Address) and b.ipv4_mapped is not None:
        b = b.ipv4_mapped
    return a == b


def _proc_address(text: str) -> str:
    raw = bytes.fromhex(text)
    # /proc prints the address as 32-bit words in host (little-endian) order
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words))


def strangers(host: str, port: int, ours: set[int], proc: Path = Path("/proc/net")) -> list[Stranger]:
    """Sockets bound to ``port`` on ``host`` (or a wildcard) whose inode is not in ``ours``."""
    found = []
    for name in ("udp", "udp6"):
        try:
            lines = (proc / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10:
                continue
            address, _, hexport = fields[1].partition(":")
            if int(hexport, 16) != port:
                continue
            node = int(fields[9])
            if node in ours or node == 0:
                continue
            local = _proc_address(address)
            if _overlaps(host, local):
                found.append(Stranger(local, port, node, int(fields[7])))
    return found
