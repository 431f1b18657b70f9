"""RADIUS end to end: billcore beside FreeRADIUS, same run, same loader.

Targets, all started (each on its own free UDP ports) before the first
measurement, then measured in interleaved rounds so that a change in the
shared machine's load hits all of them alike; the report gives per-round
ratios and their median:

* **billcore ×1** / **billcore ×N** — a real ``billcore serve`` (supervisor,
  core, radius process(es)) with its database on the run's PostgreSQL: every
  request goes NAS → radius process → URFA → core → PostgreSQL → back; ×N
  runs ``[radius] processes = N`` (SO_REUSEPORT, one socket per process);
* **freeradius files** — the Debian FreeRADIUS, its ``files`` module holding
  the same users and reply attributes;
* **freeradius rlm_sql** — the same FreeRADIUS with ``rlm_sql`` on the same
  PostgreSQL (radcheck/radreply, Debian's schema), as shipped: the default
  site also logs each authentication to ``radpostauth`` (post-auth ``-sql``);
* **freeradius rlm_sql, no post-auth log** — the same without that INSERT.

Cases, each measured on every target:

* **pap** — Access-Request, PAP + Message-Authenticator → Access-Accept with
  Framed-IP-Address, Session-Timeout, Acct-Interim-Interval and
  Mikrotik-Rate-Limit;
* **mschapv2** — the same with MS-CHAPv2 (RFC 2759: the loader computes the
  NT-Response from the cleartext with pycryptodome's MD4 and DES); a target
  that does not accept it prints "unsupported";
* **acct** — Accounting-Request Start, Interim-Update, Stop of a session in
  turn; the figure is Accounting-Responses a second.

The loader must not flatter anyone: it sends as a NAS fleet does — from
``--nas`` source addresses (127.0.0.1, .2, …, each a NAS of every target)
and many source ports (``--ports`` sockets per sender process), a
Message-Authenticator on every Access-Request, a fresh authenticator (and
hidden password or NT-Response) per packet so that no duplicate cache
answers.  ``--senders`` processes precompute their packets before the clock
starts, then keep their share of ``--inflight`` requests in flight with
non-blocking sockets and epoll: per request one recv and one send.  A
request unanswered for 1 s is counted lost and its slot reused.

Beside each rate: CPU seconds per 1,000 answers of every process of the
target (billcore's core, radius processes and PostgreSQL backends;
FreeRADIUS and its backends) and of the loader, which wall-clock figures on
a shared machine cannot give.  The load average is checked and recorded
before the run.

PostgreSQL is the embedded server (pgserver) billcore uses by default, shared
by billcore and rlm_sql.  Usage:
    python benchmarks/radius_auth.py [--tiny] [--no-write] [--seconds S] [--rounds R] [--inflight N]
                                     [--users U] [--senders K] [--processes N] [--cases pap,mschapv2,acct]
                                     [--targets NAME,...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import multiprocessing as mp
import os
import re
import select
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _machine import machine, process_cpu, publish, tree_commit  # noqa: E402
from Crypto.Cipher import DES  # noqa: E402
from Crypto.Hash import MD4  # noqa: E402

from radius.auth import pap_hide  # noqa: E402

SECRET = b"bench-secret"
ADMIN_PASSWORD = "bench-admin-pw"
LOST_AFTER = 1.0
CASES = ("pap", "mschapv2", "acct")


def login(i: int) -> str:
    return f"sub{i:06d}"


def password(i: int) -> str:
    return f"pw-{i:06d}-x"


def framed_ip(i: int) -> str:
    return f"10.{50 + i // 65536}.{(i // 256) % 256}.{i % 256}"


def nas_address(k: int) -> str:
    return f"127.0.0.{1 + k}"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- packets ------------------------------------------------------------------------


def _signed_access_request(ident: int, auth: bytes, attrs: bytes) -> bytes:
    """Message-Authenticator first (RFC 3579 s.3.2: HMAC-MD5 over the packet with it zeroed)."""
    attrs = b"\x50\x12" + b"\0" * 16 + attrs
    header = struct.pack("!BBH", 1, ident, 20 + len(attrs))
    ma = hmac.new(SECRET, header + auth + attrs, hashlib.md5).digest()
    return header + auth + b"\x50\x12" + ma + attrs[18:]


def encode_request(ident: int, user: int) -> bytes:
    """PAP."""
    auth = os.urandom(16)
    name = login(user).encode()
    hidden = pap_hide(password(user).encode(), SECRET, auth)
    return _signed_access_request(ident, auth, bytes([1, 2 + len(name)]) + name + bytes([2, 2 + len(hidden)]) + hidden)


def _des_key(seven: bytes) -> bytes:
    """7 key octets → the 8 of DES (odd parity in each low bit: RFC 2759 s.8.6, via DES)."""
    bits = int.from_bytes(seven, "big")
    out = bytearray()
    for i in range(8):
        b = ((bits >> (56 - 7 * (i + 1))) & 0x7F) << 1
        out.append(b | (bin(b).count("1") % 2 == 0))
    return bytes(out)


def nt_response(auth_challenge: bytes, peer_challenge: bytes, user: str, cleartext: str) -> bytes:
    """RFC 2759 s.8.1 GenerateNTResponse, the client side."""
    challenge = hashlib.sha1(peer_challenge + auth_challenge + user.encode()).digest()[:8]
    password_hash = MD4.new(cleartext.encode("utf-16-le")).digest().ljust(21, b"\0")
    return b"".join(DES.new(_des_key(password_hash[i:i + 7]), DES.MODE_ECB).encrypt(challenge) for i in (0, 7, 14))


def _ms_vsa(vtype: int, value: bytes) -> bytes:
    inner = bytes([vtype, 2 + len(value)]) + value
    return bytes([26, 6 + len(inner)]) + struct.pack("!I", 311) + inner


def encode_mschap(ident: int, user: int) -> bytes:
    """MS-CHAPv2 (RFC 2548: MS-CHAP-Challenge 11, MS-CHAP2-Response 25 = Ident Flags Peer-Challenge Reserved NT-Response)."""
    auth = os.urandom(16)
    challenge, peer = os.urandom(16), os.urandom(16)
    name = login(user)
    response = bytes([ident, 0]) + peer + b"\0" * 8 + nt_response(challenge, peer, name, password(user))
    raw = name.encode()
    return _signed_access_request(ident, auth, bytes([1, 2 + len(raw)]) + raw + _ms_vsa(11, challenge)
                                  + _ms_vsa(25, response))


def encode_accounting(ident: int, user: int, session: str, status: int, seconds: int) -> bytes:
    """An Accounting-Request (RFC 2866: Request Authenticator = MD5 over the packet, zeros, secret)."""
    def attr(code: int, value: bytes) -> bytes:
        return bytes([code, 2 + len(value)]) + value

    name = login(user).encode()
    attrs = (attr(1, name) + attr(40, struct.pack("!I", status)) + attr(44, session.encode())
             + attr(8, socket.inet_aton(framed_ip(user))) + attr(4, socket.inet_aton("127.0.0.1"))
             + attr(5, struct.pack("!I", user % 65536)) + attr(46, struct.pack("!I", seconds))
             + attr(42, struct.pack("!I", seconds * 1000)) + attr(43, struct.pack("!I", seconds * 5000)))
    header = struct.pack("!BBH", 4, ident, 20 + len(attrs))
    auth = hashlib.md5(header + b"\0" * 16 + attrs + SECRET).digest()
    return header + auth + attrs


def slot_queue(case: str, ident: int, n: int, users: int, user: int, tag: str) -> tuple[list[bytes], int]:
    """``n`` packets (at least) for one in-flight slot, in the reverse of their sending order; the next user."""
    q: list[bytes] = []
    if case == "acct":
        k = 0
        while len(q) < n:   # Start, Interim-Update, Stop of one session after the other
            u = user % users
            session = f"{tag}-{ident}-{k}"
            q += [encode_accounting(ident, u, session, 1, 0), encode_accounting(ident, u, session, 3, 60),
                  encode_accounting(ident, u, session, 2, 90)]
            user += 7919
            k += 1
    else:
        encode = encode_mschap if case == "mschapv2" else encode_request
        for _ in range(n):
            q.append(encode(ident, user % users))
            user += 7919  # a prime stride: the users are spread over the batch
    q.reverse()
    return q, user


# -- load generator --------------------------------------------------------------


def sender(case: str, port: int, window: int, budget: int, users: int, seed: int, seconds: float, ports: int,
           nas: int, ready: Any, go: Any, out: Any) -> None:
    """One load process: ``window`` requests in flight over ``ports`` sockets, at most ``budget`` sent."""
    nsock = max(1, min(ports, window))
    slots = [window // nsock + (1 if k < window % nsock else 0) for k in range(nsock)]
    assert max(slots) <= 256, "at most 256 in flight per source port (the Identifier)"
    per_slot = max(4, budget // window + 1)
    queues: list[list[list[bytes]]] = []
    user = seed
    for k in range(nsock):
        qs = []
        for i in range(slots[k]):
            q, user = slot_queue(case, i, per_slot, users, user, f"s{seed}-{k}")
            qs.append(q)
        queues.append(qs)
    socks = []
    for k in range(nsock):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.bind((nas_address(k % nas), 0))   # a fleet: many NAS addresses, many source ports
        s.connect(("127.0.0.1", port))
        s.setblocking(False)
        socks.append(s)
    ep = select.epoll()
    index = {}
    for k, s in enumerate(socks):
        ep.register(s.fileno(), select.EPOLLIN)
        index[s.fileno()] = k
    sent_at = [[0.0] * 256 for _ in range(nsock)]
    ready.set()
    go.wait()
    cpu0 = time.process_time()
    start = time.monotonic()
    deadline = start + seconds
    for k, s in enumerate(socks):
        for i in range(slots[k]):
            s.send(queues[k][i].pop())
            sent_at[k][i] = start
    accepts = others = lost = 0
    exhausted = False
    next_scan = start + 0.2
    now = start
    while not exhausted:
        now = time.monotonic()
        if now >= deadline:
            break
        for fd, _ in ep.poll(0.05):
            k = index[fd]
            s = socks[k]
            qs = queues[k]
            stamps = sent_at[k]
            while True:
                try:
                    data = s.recv(4096)
                except BlockingIOError:
                    break
                if data[0] == 2 or data[0] == 5:   # Access-Accept, Accounting-Response
                    accepts += 1
                else:
                    others += 1
                i = data[1]
                q = qs[i]
                if not q:
                    exhausted = True
                    break
                s.send(q.pop())
                stamps[i] = now
        if now >= next_scan:
            next_scan = now + 0.2
            for k, s in enumerate(socks):
                for i in range(slots[k]):
                    if now - sent_at[k][i] > LOST_AFTER and queues[k][i]:
                        lost += 1
                        s.send(queues[k][i].pop())
                        sent_at[k][i] = now
    out.put((accepts, others, lost, now - start, exhausted, time.process_time() - cpu0))


def measure(case: str, port: int, args: argparse.Namespace, seconds: float, guess_rate: float,
            cpu: Callable[[], dict[str, float]]) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    senders = args.senders
    budget = int(guess_rate * seconds / senders) + 2 * args.inflight
    ready = [ctx.Event() for _ in range(senders)]
    go = ctx.Event()
    out = ctx.Queue()
    procs = [ctx.Process(target=sender, args=(case, port, args.inflight // senders, budget, args.users,
                                             k * 104729 + int(time.monotonic() * 1000) % 100000, seconds,
                                             args.ports, args.nas, ready[k], go, out)) for k in range(senders)]
    for p in procs:
        p.start()
    for r in ready:
        r.wait(600)
    before = cpu()
    go.set()
    results = [out.get(timeout=seconds + 120) for _ in procs]
    after = cpu()
    for p in procs:
        p.join()
    accepts = sum(r[0] for r in results)
    rate = sum(r[0] / r[3] for r in results if r[3] > 0)
    per_k = 1000.0 / accepts if accepts else 0.0
    # per backend: one that started in the window counts from 0, one that ended in it is not seen (its last
    # moments are lost); a sum over whichever backends are alive could go negative when the pool recycles one
    used: dict[str, float] = {}
    for k, t in after.items():
        name = k.partition(":")[0]
        used[name] = used.get(name, 0.0) + t - before.get(k, 0.0)
    cpu_per_1000 = {k: round(v * per_k, 4) for k, v in used.items()}
    cpu_per_1000["loader"] = round(sum(r[5] for r in results) * per_k, 4)
    return {"per_s": rate, "answers": accepts, "not_accept": sum(r[1] for r in results),
            "lost": sum(r[2] for r in results), "seconds": max(r[3] for r in results),
            "budget_exhausted": any(r[4] for r in results), "cpu_s_per_1000": cpu_per_1000}


def probe(case: str, port: int) -> bool:
    """Does the target answer this case (an Access-Accept / Accounting-Response to one request)?"""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3.0)
        s.connect(("127.0.0.1", port))
        q, _ = slot_queue(case, 7, 1, 1, 0, f"probe-{os.getpid()}-{time.monotonic_ns()}")
        try:
            s.send(q[-1])
            data = s.recv(4096)
        except OSError:
            return False
    return data[0] in (2, 5)


@dataclass
class Target:
    name: str
    auth_port: int
    acct_port: int
    cpu: Callable[[], dict[str, float]]
    guess: float = 40_000
    supported: dict[str, bool] = field(default_factory=dict)

    def port(self, case: str) -> int:
        return self.acct_port if case == "acct" else self.auth_port


def run_target(target: Target, case: str, args: argparse.Namespace) -> dict[str, Any] | None:
    if case not in target.supported:
        target.supported[case] = probe(case, target.port(case))
    if not target.supported[case]:
        print(f"{case:9s} {target.name:40s}  unsupported", flush=True)
        return None
    measure(case, target.port(case), args, 0.3, target.guess, target.cpu)  # warm-up
    result = measure(case, target.port(case), args, args.seconds, target.guess, target.cpu)
    cpu = " ".join(f"{k} {v * 1000:.0f}" for k, v in result["cpu_s_per_1000"].items())
    print(f"{case:9s} {target.name:40s} {result['per_s']:9.0f}/s  (lost {result['lost']}, not accepted"
          f" {result['not_accept']}; CPU µs per answer: {cpu})", flush=True)
    return result


def backends(dsn: str) -> Callable[[], dict[int, float]]:
    """CPU so far of the client backends of ``dsn``'s database, read over a connection of its own."""
    import asyncpg

    async def read() -> dict[int, float]:
        conn = await asyncpg.connect(dsn)
        try:
            pids = await conn.fetchval(
                "SELECT array_agg(pid) FROM pg_stat_activity WHERE datname = current_database()"
                " AND backend_type = 'client backend' AND pid <> pg_backend_pid()")
        finally:
            await conn.close()
        return {pid: process_cpu(pid) for pid in pids or []}

    return lambda: asyncio.run(read())


# -- billcore ----------------------------------------------------------------------


async def billcore_setup(bc: Any, dsn: str, users: int, nas: int) -> None:
    import asyncpg

    from billcore.server.principals import create_admin
    from urfa.client import connect

    conn = await asyncpg.connect(dsn)
    try:
        await create_admin(conn, "bench", ADMIN_PASSWORD, ["superusers"])
    finally:
        await conn.close()
    admin = await connect("127.0.0.1", bc.urfa_port)
    try:
        await admin.login("admin", "bench", ADMIN_PASSWORD)
        for k in range(nas):
            await admin.call("radius.nas_add", {"name": f"bench{k}", "address": nas_address(k),
                                                "secret": SECRET.decode(), "require_message_authenticator": True})
        accounts = []
        for k in range(max(1, users // 100)):
            user = await admin.call("users.create", {"login": f"bench{k}", "password": "bench-user-pw"})
            accounts.append(user["basic_account_id"])
        for chunk in range(0, users, 50):
            await asyncio.gather(*(admin.call("radius.link_add", {
                "account_id": accounts[i % len(accounts)], "login": login(i), "password": password(i),
                "static_ip": framed_ip(i), "session_limit": 3600, "interim_interval": 300,
                "rate_limit": "10M/20M", "max_sessions": 1000}) for i in range(chunk, min(users, chunk + 50))))
    finally:
        await admin.close()


@contextlib.contextmanager
def billcore_server(args: argparse.Namespace, server_dsn: str, tmp: Path, name: str,
                    processes: int) -> Iterator[Target]:
    """A running ``billcore serve`` with the benchmark's users and NAS addresses."""
    import asyncpg

    from tests.running import BillcoreProcess

    dbname = re.sub(r"\W+", "_", name)

    async def create_db() -> str:
        conn = await asyncpg.connect(server_dsn)
        try:
            await conn.execute(f"CREATE DATABASE {dbname}")
        finally:
            await conn.close()
        return str(urlsplit(server_dsn)._replace(path=f"/{dbname}").geturl())

    dsn = asyncio.run(create_db())
    port, acct_port = free_udp_port(), free_udp_port()
    workdir = tmp / dbname
    workdir.mkdir()
    bc = BillcoreProcess(workdir, dsn=dsn, radius={"enabled": True, "host": "127.0.0.1", "auth_port": port,
                                                   "acct_port": acct_port, "max_inflight": 4096,
                                                   "processes": processes})
    bc.start()
    try:
        for _ in range(processes):
            bc.wait_for(r'role=radius .*msg="core connected"', timeout=60)
        asyncio.run(billcore_setup(bc, dsn, args.users, args.nas))
        deadline = time.monotonic() + 30
        while bc.log().count(f'msg="NAS table loaded" nas={args.nas}') < processes and time.monotonic() < deadline:
            time.sleep(0.1)
        log = bc.log()
        core = int(re.findall(r"role=core pid=(\d+)", log)[-1])
        radius = sorted({int(p) for p in re.findall(r'role=radius pid=(\d+) .*msg="radius serving"', log)})
        pg = backends(dsn)

        def cpu() -> dict[str, float]:
            return {"core": process_cpu(core), "radius": sum(process_cpu(p) for p in radius),
                    **{f"postgres:{pid}": t for pid, t in pg().items()}}

        yield Target(name, port, acct_port, cpu)
    finally:
        if os.environ.get("BENCH_LOG"):
            print(bc.log()[-int(os.environ["BENCH_LOG"]):])
        bc.stop()


# -- FreeRADIUS --------------------------------------------------------------------


def freeradius_dir(tmp: Path, ports: tuple[int, int], users: int, sql_conninfo: str | None,
                   postauth_log: bool) -> Path:
    src = Path("/etc/freeradius/3.0")
    dst = tmp / "raddb"
    shutil.copytree(src, dst, symlinks=True)
    (tmp / "log" / "radacct").mkdir(parents=True)
    conf = (dst / "radiusd.conf").read_text()
    conf = conf.replace("\tuser = freerad", "#").replace("\tgroup = freerad", "#")
    conf = conf.replace("logdir = /var/log/freeradius", f"logdir = {tmp / 'log'}")
    (dst / "radiusd.conf").write_text(conf)
    (dst / "clients.conf").write_text(   # every loader address is a NAS
        f"client bench {{\n\tipaddr = 127.0.0.0/8\n\tsecret = {SECRET.decode()}\n"
        "\trequire_message_authenticator = yes\n}\n")
    site = dst / "sites-enabled" / "default"
    text = (dst / "sites-available" / "default").read_text()
    site.unlink()
    # listen sections in order: IPv4 auth, IPv4 acct, then ::1 auth and acct
    numbers = iter([ports[0], ports[1], free_udp_port(), free_udp_port()])
    text = "\n".join((line.replace("port = 0", f"port = {next(numbers)}") if line.strip() == "port = 0" else line)
                     for line in text.splitlines())
    text = text.replace("ipv6addr = ::", "ipv6addr = ::1")
    if sql_conninfo is not None and not postauth_log:
        head, _, tail = text.partition("post-auth {")
        tail = tail.replace("\t-sql\n", "\t#-sql\n", 1)
        text = head + "post-auth {" + tail
    site.write_text(text)
    (dst / "sites-enabled" / "inner-tunnel").unlink(missing_ok=True)
    authorize = dst / "mods-config" / "files" / "authorize"
    if sql_conninfo is None:
        entries = "".join(
            f'{login(i)} Cleartext-Password := "{password(i)}"\n'
            f'\tFramed-IP-Address = {framed_ip(i)},\n\tSession-Timeout = 3600,\n'
            f'\tAcct-Interim-Interval = 300,\n\tMikrotik-Rate-Limit = "10M/20M"\n\n' for i in range(users))
        authorize.write_text(entries + authorize.read_text())
    else:
        sql = (src / "mods-available" / "sql").read_text()
        sql = sql.replace('dialect = "sqlite"', 'dialect = "postgresql"')
        sql = sql.replace('driver = "rlm_sql_null"', 'driver = "rlm_sql_${dialect}"')
        sql = sql.replace('radius_db = "radius"', f'radius_db = "{sql_conninfo}"')
        (dst / "mods-enabled" / "sql").unlink(missing_ok=True)
        (dst / "mods-enabled" / "sql").write_text(sql)
    return dst


async def sql_setup(server_dsn: str, users: int) -> tuple[str, str]:
    """The rlm_sql database; its libpq conninfo and its DSN."""
    import asyncpg

    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute("CREATE DATABASE radius")
    finally:
        await conn.close()
    dsn = str(urlsplit(server_dsn)._replace(path="/radius").geturl())
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(Path("/etc/freeradius/3.0/mods-config/sql/main/postgresql/schema.sql").read_text())
        await conn.copy_records_to_table(
            "radcheck", columns=["username", "attribute", "op", "value"],
            records=[(login(i), "Cleartext-Password", ":=", password(i)) for i in range(users)])
        reply = []
        for i in range(users):
            reply += [(login(i), "Framed-IP-Address", "=", framed_ip(i)), (login(i), "Session-Timeout", "=", "3600"),
                      (login(i), "Acct-Interim-Interval", "=", "300"),
                      (login(i), "Mikrotik-Rate-Limit", "=", "10M/20M")]
        await conn.copy_records_to_table("radreply", columns=["username", "attribute", "op", "value"], records=reply)
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    host = parse_qs(urlsplit(server_dsn).query)["host"][0]
    return f"dbname=radius host={host} user=postgres", dsn


@contextlib.contextmanager
def freeradius_server(args: argparse.Namespace, tmp: Path, label: str, sql: tuple[str, str] | None,
                      postauth_log: bool = True) -> Iterator[Target | None]:
    """A running FreeRADIUS; None when it is missing or failed."""
    freeradius = shutil.which("freeradius")
    if freeradius is None:
        print(f"{label}: freeradius is not installed", flush=True)
        yield None
        return
    ports = (free_udp_port(), free_udp_port())
    work = tmp / re.sub(r"\W+", "-", label)
    work.mkdir()
    raddb = freeradius_dir(work, ports, args.users, sql[0] if sql else None, postauth_log)
    logfile = work / "radius.log"
    proc = subprocess.Popen([freeradius, "-d", str(raddb), "-f", "-l", str(logfile)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None:
            if logfile.exists() and "Ready to process requests" in logfile.read_text(errors="replace"):
                break
            time.sleep(0.1)
        if proc.poll() is not None or "Ready to process requests" not in logfile.read_text(errors="replace"):
            print(f"{label}: freeradius did not start:\n{logfile.read_text(errors='replace')[-2000:]}", flush=True)
            yield None
        else:
            pg = backends(sql[1]) if sql else None

            def cpu() -> dict[str, float]:
                out = {"freeradius": process_cpu(proc.pid)}
                if pg is not None:
                    out.update({f"postgres:{pid}": t for pid, t in pg().items()})
                return out

            yield Target(label, ports[0], ports[1], cpu, guess=60_000)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# -- report --------------------------------------------------------------------------


def freeradius_version() -> str:
    try:
        out = subprocess.run(["freeradius", "-v"], capture_output=True, text=True, timeout=10).stdout
        return out.splitlines()[0] if out else ""
    except (OSError, subprocess.SubprocessError):
        return ""


FILES = "freeradius files"
SQL = "freeradius rlm_sql"
SQL_NO_LOG = "freeradius rlm_sql, no post-auth log"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="a quick run for CI (figures are not written)")
    ap.add_argument("--no-write", action="store_true", help="print only: leave benchmarks/results/ alone")
    ap.add_argument("--seconds", type=float, default=8.0, help="per target, case and round")
    ap.add_argument("--rounds", type=int, default=3, help="every target is measured once per round, interleaved")
    ap.add_argument("--inflight", type=int, default=512)
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--senders", type=int, default=2, help="load processes")
    ap.add_argument("--ports", type=int, default=32, help="source ports (sockets) per load process")
    ap.add_argument("--nas", type=int, default=8, help="NAS source addresses (127.0.0.1 …)")
    ap.add_argument("--processes", type=int, default=2, help="radius processes of the 'billcore ×N' target")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--targets", default="", help="only the targets whose names contain one of these (comma)")
    args = ap.parse_args()
    if args.tiny:
        args.seconds, args.rounds, args.users, args.inflight, args.senders, args.ports, args.nas = 0.5, 1, 200, 64, 1, 8, 2
    cases = [c for c in args.cases.split(",") if c]
    if unknown := set(cases) - set(CASES):
        ap.error(f"unknown cases: {', '.join(sorted(unknown))}")
    info = machine()
    nproc = info["nproc"] or 1
    load = os.getloadavg()
    if load[0] > 0.5 * nproc:
        print(f"WARNING: load average {load[0]:.2f} on {nproc} CPUs before the run: another job is running,"
              " the figures are noisy (the ratios, measured in the same rounds, less so)", flush=True)
    wanted = [t for t in args.targets.split(",") if t]

    def want(name: str) -> bool:
        return not wanted or any(w in name for w in wanted)

    from billcore.db.embedded import EmbeddedPostgres

    one, many = "billcore ×1", f"billcore ×{args.processes}"
    rounds: dict[str, dict[str, list[dict[str, Any]]]] = {c: {} for c in cases}
    unsupported: dict[str, list[str]] = {c: [] for c in cases}
    with tempfile.TemporaryDirectory(prefix="radius-bench-") as tmpdir, contextlib.ExitStack() as servers:
        tmp = Path(tmpdir)
        pg = EmbeddedPostgres(tmp / "pgserver")
        server_dsn = pg.start()
        servers.callback(pg.stop)
        # every server is up (idle) before the first measurement: the rounds
        # interleave the targets, so a change in the shared machine's load
        # hits all of them alike
        targets: list[Target | None] = []
        if want(one):
            targets.append(servers.enter_context(billcore_server(args, server_dsn, tmp, one, 1)))
        if args.processes > 1 and want(many):
            targets.append(servers.enter_context(billcore_server(args, server_dsn, tmp, many, args.processes)))
        if want(FILES):
            targets.append(servers.enter_context(freeradius_server(args, tmp, FILES, None)))
        if want(SQL):
            sql = asyncio.run(sql_setup(server_dsn, args.users))
            targets.append(servers.enter_context(freeradius_server(args, tmp, SQL, sql, postauth_log=True)))
            targets.append(servers.enter_context(freeradius_server(args, tmp, SQL_NO_LOG, sql, postauth_log=False)))
        live = [t for t in targets if t is not None]
        for n in range(args.rounds):
            print(f"-- round {n + 1}/{args.rounds}", flush=True)
            for case in cases:
                for target in live:
                    result = run_target(target, case, args)
                    if result is None:
                        if target.name not in unsupported[case]:
                            unsupported[case].append(target.name)
                    else:
                        rounds[case].setdefault(target.name, []).append(result)
    report: dict[str, Any] = {
        "machine": info, "load_avg_before": [round(x, 2) for x in load],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()], "commit": tree_commit(),
        "freeradius": freeradius_version(), "inflight": args.inflight, "seconds": args.seconds,
        "rounds": args.rounds, "users": args.users, "senders": args.senders, "ports_per_sender": args.ports,
        "nas_addresses": args.nas, "processes": args.processes, "cases": {}}
    for case in cases:
        per = rounds[case]
        rates = {k: statistics.median(r["per_s"] for r in v) for k, v in per.items()}
        cpu = {k: {p: statistics.median(r["cpu_s_per_1000"].get(p, 0.0) for r in v) for p in v[0]["cpu_s_per_1000"]}
               for k, v in per.items()}
        ratios: dict[str, Any] = {}
        for base in (one, many):
            for k, v in per.items():
                if k in (one, many) or base not in per:
                    continue
                each = [b["per_s"] / t["per_s"] for b, t in zip(per[base], v) if t["per_s"] > 0]
                if each:
                    ratios[f"{base} / {k}"] = {"median": statistics.median(each), "rounds": each}
        report["cases"][case] = {"per_s_median": rates, "cpu_s_per_1000_median": cpu, "ratios": ratios,
                                 "unsupported": unsupported[case], "per_round": per}
    text = markdown(report)
    publish(report, text, ROOT / "benchmarks" / "results" / "radius_auth", args.tiny or args.no_write)
    return 0 if any(one in c["per_s_median"] or many in c["per_s_median"] for c in report["cases"].values()) \
        or not (want(one) or want(many)) else 1


CASE_TITLES = {"pap": "PAP Access-Accept/s", "mschapv2": "MS-CHAPv2 Access-Accept/s",
               "acct": "Accounting-Response/s (Start, Interim-Update, Stop in turn)"}


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"# radius_auth — {m['date']} ({report['commit']})", "",
             f"Machine: {m['platform']}, {m['cpu']}, {m['nproc']} CPUs, Python {m['python']}; "
             f"load average {report['load_avg_before'][0]:.2f} before, {report['load_avg_after'][0]:.2f} after. "
             f"{report['freeradius']}.", "",
             f"{report['users']} subscribers (reply: Framed-IP-Address, Session-Timeout, Acct-Interim-Interval, "
             f"Mikrotik-Rate-Limit; Message-Authenticator on every Access-Request, required); "
             f"{report['inflight']} requests in flight from {report['senders']} loader processes, each over "
             f"{report['ports_per_sender']} source ports from {report['nas_addresses']} NAS addresses, packets "
             f"precomputed; {report['rounds']} rounds of {report['seconds']:.0f} s per target and case after a "
             f"short warm-up, targets interleaved. Everything — loader, servers, PostgreSQL — shares this "
             f"machine's {m['nproc']} CPUs.", ""]
    for case, c in report["cases"].items():
        lines += [f"## {CASE_TITLES[case]}", "",
                  "| target | per s (median) | per round | lost | CPU µs per answer (median): process, … |",
                  "| --- | ---: | --- | ---: | --- |"]
        for k, runs in c["per_round"].items():
            cpu = ", ".join(f"{p} {v * 1000:.0f}" for p, v in c["cpu_s_per_1000_median"][k].items())
            each = ", ".join(f"{r['per_s']:.0f}" for r in runs)
            lines.append(f"| {k} | {c['per_s_median'][k]:.0f} | {each} | "
                         f"{sum(r['lost'] for r in runs)} | {cpu} |")
        for k in c["unsupported"]:
            lines.append(f"| {k} | unsupported | | | |")
        if c["ratios"]:
            lines += ["", "| ratio | median of rounds | rounds |", "| --- | ---: | --- |"]
            lines += [f"| {k} | {v['median']:.2f}× | {', '.join(f'{x:.2f}' for x in v['rounds'])} |"
                      for k, v in c["ratios"].items()]
        lines.append("")
    lines += [
        "Notes:", "",
        "- billcore's figures are end to end: each request is parsed and checked by a radius process,",
        "  decided by the core (`radius.authorize_many`, one query per batch; accounting one transaction",
        "  per request) and answered with a signed reply. FreeRADIUS rlm_sql runs the stock radcheck/radreply/",
        "  group queries per request and, as shipped, INSERTs every authentication into `radpostauth`; the",
        "  `no post-auth log` row has that disabled. Accounting: FreeRADIUS files writes its detail file,",
        "  rlm_sql INSERTs/UPDATEs radacct.",
        "- 'lost' counts requests unanswered for 1 s (the loader then sends its next one).",
        "- CPU µs per answer: user + system time of each process (PostgreSQL: the target's client backends)",
        "  over the measured seconds, per answer; 'loader' is the load generator's own.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
